//! Controllers: Fabrics Connect, properties (CC/CSTS), admin commands, features, log pages,
//! asynchronous events and keep-alive.
//!
//! A controller is created by an admin-queue Connect and shared (`Arc`) with the I/O queues
//! that name its cntlid. Admin commands run on the admin queue's reactor; the shared state
//! sits behind a mutex that the I/O path never takes. I/O queues read only the atomic
//! `failed` flag and the reset epoch, once per poll.

use super::subsystem::{ListenAddr, Namespace, SubType, Subsystem};
use super::{NvmfTarget, TransportOpts, FIRMWARE_REVISION};
use nvme_spec::cmd::{Command, GetFeatures, GetLogPage, Identify, SetFeatures};
use nvme_spec::fabrics::{
    connect_data_offset as cdo, connect_sqe_offset as cso, invalid_param_dw0, Connect, ConnectData,
    InvalidParamIn, NqnError, PropertyGet, PropertySet, PropertySize, CNTLID_DYNAMIC,
    CNTLID_STATIC_ANY,
};
use nvme_spec::features::{self, fid, NumberOfQueues};
use nvme_spec::identify::{
    self, cns, cntrltype, encode_ns_id_descriptors, IdentifyController, IdentifyNamespace,
    LbaFormat, NamespaceList, NsIdDescriptor,
};
use nvme_spec::log::{self, lid, AsyncEvent, ErrorInfoEntry, FwSlotLog, SmartLog};
use nvme_spec::opcode::admin;
use nvme_spec::regs::{offset as reg, shutdown, Cap, Cc, Csts, Vs};
use nvme_spec::resv::rescap;
use nvme_spec::{IntoBytes, Status};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Milliseconds on the reactors' clock (`reactor::now_ns`), for keep-alive and transport
/// timeouts: on a reactor it is the time its loop pass began, so the data path reads no clock
/// of its own. Every thread's reading is on the same epoch; one taken on a reactor can lag
/// another thread's by a pass, so differences are taken with `saturating_sub`.
pub fn now_ms() -> u64 {
    crate::reactor::now_ns() / 1_000_000
}

/// A queue pair as `nvmf_subsystem_get_qpairs` shows it.
#[derive(Clone, Debug)]
pub struct QpairInfo {
    pub qid: u16,
    pub reactor: usize,
    pub listen: ListenAddr,
    pub peer: String,
    /// NVMe/TCP header digest in force (granted in our ICResp).
    pub hdgst: bool,
    /// NVMe/TCP data digest in force.
    pub ddgst: bool,
}

/// Most asynchronous event requests a host may have outstanding (AERL + 1).
pub const MAX_AERS: usize = 4;

pub struct CtrlState {
    pub cc: Cc,
    pub csts: Csts,
    /// I/O queues granted by Set Features Number of Queues (0 = not set yet).
    pub num_io_queues: u16,
    pub aec: u32,
    pub vwc: bool,
    pub temp_threshold: u32,
    pub err_recovery: u32,
    pub arbitration: u32,
    pub power_mgmt: u32,
    pub int_coalescing: u32,
    pub write_atomicity: u32,
    pub changed_ns: Vec<u32>,
    /// A namespace notice was sent; more wait until the host reads the changed list.
    ns_notice_outstanding: bool,
    pub events: VecDeque<u32>,
    pub qpairs: Vec<QpairInfo>,
}

pub struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub opts: Arc<TransportOpts>,
    state: Mutex<CtrlState>,
    failed: AtomicBool,
    /// Bumped when CC.EN goes 1 → 0: I/O queues of the old incarnation close.
    epoch: AtomicU32,
    events_pending: AtomicBool,
    kato_ms: AtomicU32,
    last_keep_alive: AtomicU64,
    /// Bytes of the target's data budget its queues hold (`budget::DataBudget`).
    pub data_held: AtomicU64,
    pub admin_sqsize: u16,
}

/// What an admin command came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOutcome {
    Done {
        status: Status,
        dw0: u32,
    },
    /// An Asynchronous Event Request: held until an event occurs.
    HoldAer,
}

impl AdminOutcome {
    fn ok(dw0: u32) -> Self {
        AdminOutcome::Done {
            status: Status::SUCCESS,
            dw0,
        }
    }
    fn err(status: Status) -> Self {
        AdminOutcome::Done {
            status: status.with_dnr(),
            dw0: 0,
        }
    }
}

/// A Connect that failed: the status and the Invalid Parameter dword if any.
pub type ConnectReject = (Status, u32);

fn invalid_param(place: InvalidParamIn, off: u16) -> ConnectReject {
    (
        Status::CONNECT_INVALID_PARAMETERS.with_dnr(),
        invalid_param_dw0(place, off),
    )
}

/// Where a connection arrived, for Connect checks and the qpair table.
pub struct ConnInfo<'a> {
    pub listen: &'a ListenAddr,
    pub peer: &'a str,
    pub reactor: usize,
    pub opts: &'a Arc<TransportOpts>,
    /// Digests the connection negotiated, shown per queue by `nvmf_subsystem_get_qpairs`.
    pub hdgst: bool,
    pub ddgst: bool,
}

/// A successful Connect: the controller and queue, and the queue size to provide.
pub struct Connected {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    pub sqsize: u32,
}

/// Handles Fabrics Connect: checks the subsystem, host, queue and controller, creates the
/// controller for an admin queue. `data` is the 1024-byte Connect data.
pub fn connect(
    target: &NvmfTarget,
    info: &ConnInfo<'_>,
    cmd: &Command,
    data: &[u8],
) -> Result<Connected, ConnectReject> {
    let c = Connect::from_command(cmd).ok_or((Status::INVALID_FIELD.with_dnr(), 0))?;
    let d = ConnectData::read(data).ok_or((Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0))?;
    if c.recfmt != 0 {
        return Err((
            Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(),
            invalid_param_dw0(InvalidParamIn::Command, cso::RECFMT),
        ));
    }
    let subnqn = d
        .subnqn()
        .map_err(|_| invalid_param(InvalidParamIn::Data, cdo::SUBNQN))?;
    // SPDK's host sends an all-zero HOSTNQN unless its transport ID names one; SPDK's target
    // takes that as the empty host NQN, which only a subsystem allowing any host admits.
    let hostnqn = match d.hostnqn() {
        Ok(h) => h,
        Err(NqnError::Empty) => "",
        Err(_) => return Err(invalid_param(InvalidParamIn::Data, cdo::HOSTNQN)),
    };
    let subsys = target
        .find(subnqn)
        .filter(|s| s.listens_on(info.listen))
        .ok_or_else(|| invalid_param(InvalidParamIn::Data, cdo::SUBNQN))?;
    if subsys.subtype == SubType::Nvme && !subsys.host_allowed(hostnqn) {
        return Err((Status::CONNECT_INVALID_HOST.with_dnr(), 0));
    }
    let opts = info.opts;
    if c.qid == 0 {
        if c.sqsize < 2 || c.sqsize > u32::from(opts.max_aq_depth) {
            return Err(invalid_param(InvalidParamIn::Command, cso::SQSIZE));
        }
        let want = d.cntlid();
        if want != CNTLID_DYNAMIC && want != CNTLID_STATIC_ANY {
            return Err(invalid_param(InvalidParamIn::Data, cdo::CNTLID));
        }
        let ctrl = subsys
            .add_controller(|cntlid| {
                Arc::new(Controller::new(
                    cntlid,
                    subsys.clone(),
                    hostnqn.to_string(),
                    d.hostid,
                    opts.clone(),
                    c.kato,
                    c.sqsize as u16,
                ))
            })
            .ok_or((Status::CONNECT_CONTROLLER_BUSY.with_dnr(), 0))?;
        ctrl.lock().qpairs.push(QpairInfo {
            qid: 0,
            reactor: info.reactor,
            listen: info.listen.clone(),
            peer: info.peer.to_string(),
            hdgst: info.hdgst,
            ddgst: info.ddgst,
        });
        tracing::info!(
            "nvmf: controller {} of {} for host {} from {}",
            ctrl.cntlid,
            subsys.nqn,
            hostnqn,
            info.peer
        );
        return Ok(Connected {
            ctrl,
            qid: 0,
            sqsize: c.sqsize,
        });
    }
    if subsys.subtype == SubType::Discovery {
        return Err(invalid_param(InvalidParamIn::Command, cso::QID));
    }
    if c.sqsize < 2 || c.sqsize > u32::from(opts.max_queue_depth) {
        return Err(invalid_param(InvalidParamIn::Command, cso::SQSIZE));
    }
    let ctrl = subsys
        .find_controller(d.cntlid())
        .ok_or_else(|| invalid_param(InvalidParamIn::Data, cdo::CNTLID))?;
    if ctrl.hostnqn != hostnqn {
        return Err(invalid_param(InvalidParamIn::Data, cdo::HOSTNQN));
    }
    // The same host, not only the same NQN: another host reusing an NQN must not join a
    // controller it did not create.
    if ctrl.hostid != d.hostid {
        return Err(invalid_param(InvalidParamIn::Data, cdo::HOSTID));
    }
    if ctrl.is_failed() {
        return Err(invalid_param(InvalidParamIn::Data, cdo::CNTLID));
    }
    let mut st = ctrl.lock();
    if !st.cc.en() || !st.csts.rdy() {
        return Err((Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0));
    }
    let max_q = if st.num_io_queues > 0 {
        st.num_io_queues
    } else {
        opts.max_io_qpairs_per_ctrlr
    };
    if c.qid > max_q || st.qpairs.iter().any(|q| q.qid == c.qid) {
        return Err(invalid_param(InvalidParamIn::Command, cso::QID));
    }
    st.qpairs.push(QpairInfo {
        qid: c.qid,
        reactor: info.reactor,
        listen: info.listen.clone(),
        peer: info.peer.to_string(),
        hdgst: info.hdgst,
        ddgst: info.ddgst,
    });
    drop(st);
    Ok(Connected {
        ctrl,
        qid: c.qid,
        sqsize: c.sqsize,
    })
}

impl Controller {
    fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        opts: Arc<TransportOpts>,
        kato_ms: u32,
        admin_sqsize: u16,
    ) -> Controller {
        Controller {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            opts,
            state: Mutex::new(CtrlState {
                cc: Cc(0),
                csts: Csts(0),
                num_io_queues: 0,
                aec: 0,
                vwc: true,
                temp_threshold: 0x0157, // 343 K
                err_recovery: 0,
                arbitration: 0,
                power_mgmt: 0,
                int_coalescing: 0,
                write_atomicity: 0,
                changed_ns: Vec::new(),
                ns_notice_outstanding: false,
                events: VecDeque::new(),
                qpairs: Vec::new(),
            }),
            failed: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            events_pending: AtomicBool::new(false),
            kato_ms: AtomicU32::new(kato_ms),
            last_keep_alive: AtomicU64::new(now_ms()),
            data_held: AtomicU64::new(0),
            admin_sqsize,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, CtrlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_discovery(&self) -> bool {
        self.subsys.subtype == SubType::Discovery
    }

    /// Tears the controller down: every queue of it closes on its next poll.
    pub fn fail(&self, why: &str) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::info!(
                "nvmf: controller {} of {} ends: {why}",
                self.cntlid,
                self.subsys.nqn
            );
        }
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn keep_alive(&self) {
        self.last_keep_alive.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the keep-alive timer ran out. Half a KATO of slack covers a slow host timer.
    pub fn keep_alive_expired(&self, now: u64) -> bool {
        let kato = u64::from(self.kato_ms.load(Ordering::Relaxed));
        kato != 0
            && now.saturating_sub(self.last_keep_alive.load(Ordering::Relaxed)) > kato + kato / 2
    }

    pub fn qpair_closed(&self, qid: u16) {
        self.lock().qpairs.retain(|q| q.qid != qid);
    }

    /// The admin queue is gone: the controller goes with it.
    pub fn destroy(&self) {
        self.fail("admin queue closed");
        self.subsys.remove_controller(self.cntlid);
    }

    pub fn num_io_qpairs(&self) -> usize {
        self.lock().qpairs.iter().filter(|q| q.qid != 0).count()
    }

    /// Takes the next event to report, if one is queued and enabled.
    pub fn take_event(&self) -> Option<u32> {
        if !self.events_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut st = self.lock();
        let e = st.events.pop_front();
        if st.events.is_empty() {
            self.events_pending.store(false, Ordering::Release);
        }
        e
    }

    fn push_event(&self, st: &mut CtrlState, dw0: u32) {
        st.events.push_back(dw0);
        self.events_pending.store(true, Ordering::Release);
    }

    /// A namespace was added, removed or resized.
    pub fn namespace_changed(&self, nsid: u32) {
        let mut st = self.lock();
        if !st.changed_ns.contains(&nsid) {
            st.changed_ns.push(nsid);
        }
        if st.aec & features::aec::NS_ATTRIBUTE != 0 && !st.ns_notice_outstanding {
            st.ns_notice_outstanding = true;
            self.push_event(&mut st, AsyncEvent::NS_CHANGED.to_dw0());
        }
    }

    pub fn discovery_changed(&self) {
        let mut st = self.lock();
        if st.aec & features::aec::DISCOVERY_CHANGE != 0 {
            self.push_event(&mut st, AsyncEvent::DISCOVERY_CHANGED.to_dw0());
        }
    }

    // ---- properties ----

    pub fn cap(&self) -> Cap {
        Cap(0)
            .with_mqes(self.opts.max_queue_depth - 1)
            .with_cqr(true)
            .with_to(15)
            .with_css(Cap::CSS_NVM)
    }

    pub fn property_get(&self, p: &PropertyGet) -> Result<u64, Status> {
        let st = self.lock();
        let v = match (p.offset, p.size) {
            (reg::CAP, PropertySize::Eight) => self.cap().0,
            (reg::VS, PropertySize::Four) => u64::from(Vs::V1_3.0),
            (reg::CC, PropertySize::Four) => u64::from(st.cc.0),
            (reg::CSTS, PropertySize::Four) => u64::from(st.csts.0),
            (reg::CAP | reg::VS | reg::CC | reg::CSTS, _) => {
                return Err(Status::INVALID_FIELD.with_dnr())
            }
            _ => return Err(Status::INVALID_FIELD.with_dnr()),
        };
        Ok(v)
    }

    pub fn property_set(&self, p: &PropertySet) -> Status {
        if p.offset != reg::CC || p.size != PropertySize::Four {
            return Status::INVALID_FIELD.with_dnr();
        }
        let new = Cc(p.value as u32);
        let mut st = self.lock();
        let old = st.cc;
        st.cc = new;
        if new.en() && !old.en() {
            if new.iosqes() != 6 && new.iosqes() != 0 || new.iocqes() != 4 && new.iocqes() != 0 {
                tracing::debug!(
                    "nvmf: CC with IOSQES/IOCQES {}/{}",
                    new.iosqes(),
                    new.iocqes()
                );
            }
            st.csts = st.csts.with_rdy(true).with_shst(shutdown::SHST_NORMAL);
        } else if !new.en() && old.en() {
            // Controller reset: queues of the old incarnation go away.
            st.csts = Csts(0);
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        if new.shn() != shutdown::SHN_NONE && old.shn() == shutdown::SHN_NONE {
            st.csts = st.csts.with_shst(shutdown::SHST_COMPLETE);
        } else if new.shn() == shutdown::SHN_NONE {
            st.csts = st.csts.with_shst(shutdown::SHST_NORMAL);
        }
        Status::SUCCESS
    }

    // ---- admin commands ----

    /// Runs one admin command. `data` is the command's buffer: filled for controller-to-host
    /// commands, read for host-to-controller ones.
    pub fn admin(&self, target: &NvmfTarget, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        self.keep_alive();
        let discovery = self.is_discovery();
        match cmd.opcode {
            admin::IDENTIFY => self.identify(cmd, data),
            admin::GET_LOG_PAGE => self.get_log_page(target, cmd, data),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_FEATURES => self.get_features(cmd),
            admin::KEEP_ALIVE => AdminOutcome::ok(0),
            admin::ASYNC_EVENT_REQUEST => AdminOutcome::HoldAer,
            // We never abort: dword 0 bit 0 set says "not aborted", which the spec allows.
            admin::ABORT if !discovery => AdminOutcome::ok(1),
            _ => AdminOutcome::err(Status::INVALID_OPCODE),
        }
    }

    fn identify(&self, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        let id = Identify::from_command(cmd);
        data.fill(0);
        let mut page = [0u8; identify::IDENTIFY_DATA_SIZE];
        match id.cns {
            cns::CONTROLLER => {
                let c = self.identify_controller();
                page.copy_from_slice(c.as_bytes());
            }
            _ if self.is_discovery() => return AdminOutcome::err(Status::INVALID_FIELD),
            cns::NAMESPACE => {
                if id.nsid == 0 || id.nsid > self.subsys.max_namespaces {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                }
                // An inactive NSID gets a zeroed structure, as the spec says.
                if let Some(ns) = self.subsys.namespace(id.nsid) {
                    page.copy_from_slice(identify_namespace(&ns).as_bytes());
                }
            }
            cns::ACTIVE_NS_LIST => {
                if id.nsid >= 0xFFFF_FFFE {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                }
                let ids = self
                    .subsys
                    .namespaces()
                    .iter()
                    .map(|n| n.nsid)
                    .collect::<Vec<_>>();
                let (l, _) = NamespaceList::from_ids(id.nsid, ids);
                page.copy_from_slice(l.as_bytes());
            }
            cns::NS_DESC_LIST => {
                let Some(ns) = self.subsys.namespace(id.nsid) else {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                };
                let descs = [
                    NsIdDescriptor::Eui64(ns.eui64),
                    NsIdDescriptor::Nguid(ns.nguid),
                    NsIdDescriptor::Uuid(*ns.uuid.as_bytes()),
                    NsIdDescriptor::Csi(identify::csi::NVM),
                ];
                if encode_ns_id_descriptors(&mut page, &descs).is_none() {
                    return AdminOutcome::err(Status::INTERNAL);
                }
            }
            // NVM command set specific structures: all zero means "no limits beyond MDTS".
            cns::CSI_CONTROLLER | cns::CSI_NAMESPACE if id.csi == identify::csi::NVM => {}
            _ => return AdminOutcome::err(Status::INVALID_FIELD),
        }
        let n = data.len().min(page.len());
        data[..n].copy_from_slice(&page[..n]);
        AdminOutcome::ok(0)
    }

    pub fn identify_controller(&self) -> IdentifyController {
        let mut c = IdentifyController::default();
        let s = &self.subsys;
        c.set_serial(&s.serial);
        c.set_model(&s.model);
        c.set_firmware_rev(FIRMWARE_REVISION);
        c.set_subnqn(&s.nqn);
        c.rab = 6;
        c.mdts = self.opts.mdts();
        c.cntlid.set(self.cntlid);
        c.ver.set(Vs::V1_3.0);
        c.kas.set(10); // keep-alive granularity: 1 s
        c.sqes = 0x66;
        c.cqes = 0x44;
        c.maxcmd.set(self.opts.max_queue_depth);
        c.ioccsz.set(self.opts.ioccsz());
        c.iorcsz.set(1);
        c.msdbd = 1;
        // RDMA data moves by keyed SGLs (the Linux host insists on the bit).
        let keyed = if self.opts.is_rdma() {
            identify::sgls::KEYED
        } else {
            0
        };
        c.sgls
            .set(identify::sgls::SUPPORTED | identify::sgls::OFFSET | keyed);
        c.aerl = (MAX_AERS - 1) as u8;
        c.elpe = 0;
        c.lpa = identify::lpa::EXTENDED_DATA;
        if self.is_discovery() {
            c.cntrltype = cntrltype::DISCOVERY;
            c.oaes.set(identify::oaes::DISCOVERY_CHANGE);
            return c;
        }
        c.cntrltype = cntrltype::IO;
        // Several controllers (hosts, paths) may share a namespace.
        c.cmic = 0x3;
        c.oaes.set(identify::oaes::NS_ATTRIBUTE);
        c.acl = 3;
        c.frmw = 0x3; // one slot, slot 1 read-only
        c.nn.set(s.max_namespaces);
        c.mnan.set(s.max_namespaces);
        c.oncs
            .set(identify::oncs::DSM | identify::oncs::WRITE_ZEROES | identify::oncs::RESERVATIONS);
        // Registrants are named by the 128-bit Host Identifier of Connect.
        c.ctratt.set(identify::ctratt::HOST_ID_128);
        // Volatile write cache present; flush with the broadcast NSID is not supported.
        c.vwc = 0x1 | 0x4;
        c.fna = 0;
        c.awun.set(0);
        c.awupf.set(0);
        c.wctemp.set(0x0157);
        c.cctemp.set(0x0175);
        c.psd[0].mp.set(2500);
        c
    }

    fn get_log_page(&self, target: &NvmfTarget, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        let g = GetLogPage::from_command(cmd);
        data.fill(0);
        if !g.offset.is_multiple_of(4) {
            return AdminOutcome::err(Status::INVALID_FIELD);
        }
        let page: Vec<u8> = match (g.lid, self.is_discovery()) {
            (lid::DISCOVERY, true) => super::discovery::log_page(target, &self.hostnqn),
            // No errors are recorded: one empty entry.
            (lid::ERROR_INFO, _) => ErrorInfoEntry::default().as_bytes().to_vec(),
            (lid::SMART, false) => {
                // A healthy, cool device: 25 °C, spare 100% above a 10% threshold.
                let mut smart = SmartLog::default();
                smart.temperature.set(298);
                smart.avail_spare = 100;
                smart.spare_thresh = 10;
                smart.as_bytes().to_vec()
            }
            (lid::FW_SLOT, false) => FwSlotLog::single_slot(FIRMWARE_REVISION)
                .as_bytes()
                .to_vec(),
            (lid::CHANGED_NS_LIST, false) => {
                let mut st = self.lock();
                let list = log::changed_namespace_list(&st.changed_ns);
                if !g.rae {
                    st.changed_ns.clear();
                    st.ns_notice_outstanding = false;
                }
                list.as_bytes().to_vec()
            }
            _ => return AdminOutcome::err(Status::INVALID_LOG_PAGE),
        };
        if log::copy_log_window(&page, g.offset, data).is_none() {
            return AdminOutcome::err(Status::INVALID_FIELD);
        }
        AdminOutcome::ok(0)
    }

    fn set_features(&self, cmd: &Command) -> AdminOutcome {
        let f = SetFeatures::from_command(cmd);
        if f.sv {
            return AdminOutcome::err(Status::FEATURE_NOT_SAVEABLE);
        }
        let mut st = self.lock();
        let discovery = self.is_discovery();
        match f.fid {
            fid::ASYNC_EVENT_CONFIG => {
                st.aec = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::KEEP_ALIVE_TIMER => {
                self.kato_ms
                    .store(features::keep_alive_ms(f.cdw11), Ordering::Relaxed);
                self.keep_alive();
                AdminOutcome::ok(0)
            }
            _ if discovery => AdminOutcome::err(Status::INVALID_FIELD),
            fid::NUMBER_OF_QUEUES => {
                if st.qpairs.iter().any(|q| q.qid != 0) {
                    return AdminOutcome::err(Status::COMMAND_SEQUENCE_ERROR);
                }
                let Some(req) = NumberOfQueues::from_request(f.cdw11) else {
                    return AdminOutcome::err(Status::INVALID_FIELD);
                };
                let max = self.opts.max_io_qpairs_per_ctrlr;
                let n = req.nsq.min(req.ncq).min(u32::from(max)).max(1);
                st.num_io_queues = n as u16;
                AdminOutcome::ok(NumberOfQueues { nsq: n, ncq: n }.to_dword())
            }
            fid::VOLATILE_WRITE_CACHE => {
                st.vwc = f.cdw11 & features::VWC_ENABLE != 0;
                AdminOutcome::ok(0)
            }
            fid::TEMPERATURE_THRESHOLD => {
                st.temp_threshold = f.cdw11 & 0xFFFF;
                AdminOutcome::ok(0)
            }
            fid::ERROR_RECOVERY => {
                st.err_recovery = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::ARBITRATION => {
                st.arbitration = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::POWER_MGMT => {
                if f.cdw11 & 0x1F != 0 {
                    return AdminOutcome::err(Status::INVALID_FIELD);
                }
                st.power_mgmt = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::INTERRUPT_COALESCING => {
                st.int_coalescing = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::WRITE_ATOMICITY => {
                st.write_atomicity = f.cdw11 & 1;
                AdminOutcome::ok(0)
            }
            fid::HOST_IDENTIFIER => AdminOutcome::err(Status::COMMAND_SEQUENCE_ERROR),
            fid::RESERVATION_PERSISTENCE => {
                let Some(ns) = self.subsys.namespace(cmd.nsid()) else {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                };
                drop(st);
                match ns.resv.set_ptpl(f.cdw11 & 1 != 0) {
                    s if s.is_success() => AdminOutcome::ok(0),
                    s => AdminOutcome::Done { status: s, dw0: 0 },
                }
            }
            _ => AdminOutcome::err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, cmd: &Command) -> AdminOutcome {
        let f = GetFeatures::from_command(cmd);
        let st = self.lock();
        if f.sel == features::sel::SUPPORTED_CAPABILITIES {
            let mut caps = features::capability::CHANGEABLE;
            if f.fid == fid::RESERVATION_PERSISTENCE {
                caps |= features::capability::NS_SPECIFIC;
            }
            return AdminOutcome::ok(caps);
        }
        let discovery = self.is_discovery();
        let v = match f.fid {
            fid::ASYNC_EVENT_CONFIG => st.aec,
            fid::KEEP_ALIVE_TIMER => self.kato_ms.load(Ordering::Relaxed),
            _ if discovery => return AdminOutcome::err(Status::INVALID_FIELD),
            fid::NUMBER_OF_QUEUES => {
                let n = if st.num_io_queues > 0 {
                    st.num_io_queues
                } else {
                    self.opts.max_io_qpairs_per_ctrlr
                };
                NumberOfQueues {
                    nsq: u32::from(n),
                    ncq: u32::from(n),
                }
                .to_dword()
            }
            fid::VOLATILE_WRITE_CACHE => u32::from(st.vwc),
            fid::TEMPERATURE_THRESHOLD => st.temp_threshold,
            fid::ERROR_RECOVERY => st.err_recovery,
            fid::ARBITRATION => st.arbitration,
            fid::POWER_MGMT => st.power_mgmt,
            fid::INTERRUPT_COALESCING => st.int_coalescing,
            fid::WRITE_ATOMICITY => st.write_atomicity,
            fid::RESERVATION_PERSISTENCE => match self.subsys.namespace(cmd.nsid()) {
                Some(ns) => u32::from(ns.resv.ptpl()),
                None => return AdminOutcome::err(Status::INVALID_NAMESPACE),
            },
            _ => return AdminOutcome::err(Status::INVALID_FIELD),
        };
        AdminOutcome::ok(v)
    }
}

/// Identify Namespace for `ns`: one LBA format, the bdev's size, shared, with its IDs.
pub fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
    let mut n = IdentifyNamespace::default();
    let blocks = ns.num_blocks();
    n.nsze.set(blocks);
    n.ncap.set(blocks);
    n.nuse.set(blocks);
    n.nlbaf = 0;
    n.set_lba_format_index(0);
    n.lbaf[0] = LbaFormat::new(ns.block_size());
    n.nmic = 1;
    n.nguid = ns.nguid;
    n.eui64 = ns.eui64;
    n.rescap = rescap::ALL_TYPES;
    if ns.resv.ptpl_capable() {
        n.rescap |= rescap::PTPL;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{malloc::MallocBdev, BdevRegistry};

    fn setup() -> (NvmfTarget, Arc<Subsystem>, ListenAddr, Arc<TransportOpts>) {
        let t = NvmfTarget::default();
        t.create_transport(TransportOpts::default()).unwrap();
        let s = t
            .add_subsystem(
                Subsystem::new(
                    "nqn.2024-01.io.plexstor:t1".into(),
                    None,
                    None,
                    false,
                    8,
                    1,
                    0xFFEF,
                )
                .unwrap(),
            )
            .unwrap();
        let l = ListenAddr {
            trtype: "TCP".into(),
            adrfam: "IPv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
        };
        s.add_listener(l.clone());
        let opts = t.transport("TCP").unwrap();
        (t, s, l, opts)
    }

    /// The connection every test's Connect arrives on: one peer, reactor 0, no digests.
    fn conn_info<'a>(l: &'a ListenAddr, opts: &'a Arc<TransportOpts>) -> ConnInfo<'a> {
        ConnInfo {
            listen: l,
            peer: "p",
            reactor: 0,
            opts,
            hdgst: false,
            ddgst: false,
        }
    }

    fn connect_cmd(qid: u16, sqsize: u32) -> Command {
        Connect {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato: 5000,
        }
        .to_command(1)
    }

    fn data(subnqn: &str, host: &str, cntlid: u16) -> Vec<u8> {
        ConnectData::new([7; 16], cntlid, subnqn, host)
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn connect_checks_subsystem_host_and_queue() {
        let (t, s, l, opts) = setup();
        let info = conn_info(&l, &opts);
        let host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
        // Unknown subsystem: invalid parameters pointing at SUBNQN in the data.
        let e = connect(
            &t,
            &info,
            &connect_cmd(0, 32),
            &data("nqn.2024-01.x:none", host, 0xFFFF),
        )
        .err()
        .unwrap();
        assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
        assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::SUBNQN));
        // Host not allowed.
        let e = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF))
            .err()
            .unwrap();
        assert!(e.0.same_code(Status::CONNECT_INVALID_HOST));
        s.add_host(host).unwrap();
        // Admin queue too deep.
        let e = connect(
            &t,
            &info,
            &connect_cmd(0, 4096),
            &data(&s.nqn, host, 0xFFFF),
        )
        .err()
        .unwrap();
        assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
        let c = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF)).unwrap();
        assert_eq!(c.qid, 0);
        let cntlid = c.ctrl.cntlid;
        // I/O queue before CC.EN: sequence error.
        let e = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid))
            .err()
            .unwrap();
        assert!(e.0.same_code(Status::COMMAND_SEQUENCE_ERROR));
        c.ctrl.property_set(&PropertySet {
            size: PropertySize::Four,
            offset: reg::CC,
            value: u64::from(Cc::enable_default().0),
        });
        let csts = c
            .ctrl
            .property_get(&PropertyGet {
                size: PropertySize::Four,
                offset: reg::CSTS,
            })
            .unwrap();
        assert_eq!(csts & 1, 1);
        let io = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid)).unwrap();
        assert_eq!(io.qid, 1);
        // Same host NQN, another host ID: not this controller's host.
        let mut other_host = data(&s.nqn, host, cntlid);
        other_host[..16].copy_from_slice(&[8; 16]);
        let e = connect(&t, &info, &connect_cmd(2, 128), &other_host)
            .err()
            .unwrap();
        assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
        assert_eq!(e.1, invalid_param(InvalidParamIn::Data, cdo::HOSTID).1);
        // Same qid twice, unknown cntlid.
        assert!(connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid)).is_err());
        assert!(connect(&t, &info, &connect_cmd(2, 128), &data(&s.nqn, host, 999)).is_err());
        // A second admin queue gets another cntlid.
        let c2 = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF)).unwrap();
        assert_ne!(c2.ctrl.cntlid, cntlid);
    }

    /// SPDK's host leaves HOSTNQN all zero: only a subsystem allowing any host admits it, and
    /// the controller's host NQN is then the empty string, as SPDK's target reports it.
    #[test]
    fn connect_with_an_empty_hostnqn_needs_allow_any_host() {
        let (t, s, l, opts) = setup();
        let info = conn_info(&l, &opts);
        let e = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, "", 0xFFFF))
            .err()
            .unwrap();
        assert!(e.0.same_code(Status::CONNECT_INVALID_HOST));
        s.set_allow_any_host(true);
        let c = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, "", 0xFFFF)).unwrap();
        assert_eq!(c.ctrl.hostnqn, "");
        // An I/O queue of that controller must carry the same (empty) host NQN.
        c.ctrl.property_set(&PropertySet {
            size: PropertySize::Four,
            offset: reg::CC,
            value: u64::from(Cc::enable_default().0),
        });
        let cntlid = c.ctrl.cntlid;
        let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
        let e = connect(
            &t,
            &info,
            &connect_cmd(1, 128),
            &data(&s.nqn, other, cntlid),
        )
        .err()
        .unwrap();
        assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::HOSTNQN));
        let io = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, "", cntlid)).unwrap();
        assert_eq!(io.qid, 1);
        // A HOSTNQN without its terminating NUL is still refused, pointing at the field.
        let mut bad = data(&s.nqn, "", 0xFFFF);
        bad[cdo::HOSTNQN as usize..cdo::HOSTNQN as usize + 256].fill(b'a');
        let e = connect(&t, &info, &connect_cmd(0, 32), &bad).err().unwrap();
        assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::HOSTNQN));
    }

    #[test]
    fn identify_and_namespace_events() {
        let (t, s, l, opts) = setup();
        s.set_allow_any_host(true);
        let info = conn_info(&l, &opts);
        let c = connect(
            &t,
            &info,
            &connect_cmd(0, 32),
            &data(&s.nqn, "nqn.2024-01.h:1", 0xFFFF),
        )
        .unwrap()
        .ctrl;
        let mut buf = vec![0u8; 4096];
        let mut cmd = Command::identify(cns::CONTROLLER, 0, 0, 0);
        assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
        let idc = IdentifyController::read_from_bytes(&buf[..]).unwrap();
        assert_eq!(idc.model(), Some("plexstor"));
        assert_eq!(idc.firmware_rev(), Some(FIRMWARE_REVISION));
        assert_eq!(idc.mdts, 8);
        assert_eq!(idc.ioccsz.get(), (8192 + 64) / 16);
        // Enable namespace notices, then add a namespace.
        cmd = Command::set_features(fid::ASYNC_EVENT_CONFIG, features::aec::NS_ATTRIBUTE, false);
        assert_eq!(c.admin(&t, &cmd, &mut []), AdminOutcome::ok(0));
        let reg = BdevRegistry::default();
        let u = uuid::Uuid::new_v4();
        let e = reg
            .register(Arc::new(MallocBdev::new("m0".into(), 256, 512, u).unwrap()))
            .unwrap();
        assert_eq!(
            s.add_namespace(e.clone(), 0, None, None, None, None)
                .unwrap(),
            1
        );
        assert!(e.claimed_by().is_some());
        assert_eq!(c.take_event(), Some(0x0004_0002));
        assert_eq!(c.take_event(), None);
        // Namespace and its descriptors.
        cmd = Command::identify(cns::NAMESPACE, 1, 0, 0);
        assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
        let idn = IdentifyNamespace::read_from_bytes(&buf[..]).unwrap();
        assert_eq!(idn.nsze.get(), 256);
        assert_eq!(idn.block_size(), Some(512));
        assert_eq!(&idn.nguid, u.as_bytes());
        cmd = Command::identify(cns::NS_DESC_LIST, 1, 0, 0);
        assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
        let d: Vec<_> = identify::parse_ns_id_descriptors(&buf).collect();
        assert!(d.contains(&NsIdDescriptor::Uuid(*u.as_bytes())));
        cmd = Command::identify(cns::NS_DESC_LIST, 2, 0, 0);
        assert!(
            matches!(c.admin(&t, &cmd, &mut buf), AdminOutcome::Done { status, .. } if status.same_code(Status::INVALID_NAMESPACE))
        );
        // Changed namespace list, read and cleared.
        cmd = Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
        assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
        assert_eq!(&buf[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        // A resize is noticed and announced once the host has read the list.
        let _ = c.admin(
            &t,
            &Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0),
            &mut buf,
        );
        let _ = c.take_event();
        e.info().set_num_blocks(512);
        s.check_resized();
        assert_eq!(c.take_event(), Some(0x0004_0002));
        s.check_resized();
        assert_eq!(c.take_event(), None);
        let _ = c.admin(
            &t,
            &Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0),
            &mut buf,
        );
        s.remove_namespace(1).unwrap();
        assert!(e.claimed_by().is_none());
        assert!(c.take_event().is_some());
        // Unknown opcode.
        assert!(
            matches!(c.admin(&t, &Command::new(0xC5), &mut buf), AdminOutcome::Done { status, .. } if status.same_code(Status::INVALID_OPCODE))
        );
    }

    use nvme_spec::FromBytes;
}
