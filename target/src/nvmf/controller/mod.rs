//! Controllers: Fabrics Connect, properties (CC/CSTS), admin commands, features, log pages,
//! asynchronous events and keep-alive.
//!
//! A controller is created by an admin-queue Connect and shared (`Arc`) with the I/O queues
//! that name its cntlid. Admin commands run on the admin queue's reactor; the shared state
//! sits behind a mutex that the I/O path never takes. I/O queues read only the atomic
//! `failed` flag and the reset epoch, once per poll.
//!
//! Here: Connect, the controller's state, properties, events and keep-alive; `commands.rs`
//! runs the admin commands (Identify, log pages, features).

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
}

mod commands;
pub use commands::identify_namespace;

#[cfg(test)]
mod tests;
