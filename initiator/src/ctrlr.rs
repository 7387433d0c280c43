//! Controllers: bring-up over a transport, the admin queue, keep-alive, asynchronous events,
//! namespaces, and the reset / reconnect state machine with SPDK's timeouts.
//!
//! The owner calls [`Controller::poll`] regularly (every few milliseconds is plenty: it only
//! drives keep-alive, AER, aborts and reconnects). Bring-up and reconnect attempts run admin
//! commands synchronously with bounded waits; they happen at attach and after failures, never
//! on the I/O path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::fabrics::{PropertyGet, PropertySet, PropertySize};
use nvme_spec::identify::{cns, oacs, IdentifyController, IdentifyNamespace};
use nvme_spec::opcode::admin;
use nvme_spec::regs::{offset as reg, shutdown, Cap, Cc, Csts};
use nvme_spec::{Command, FromBytes, Status};
use tracing::{debug, info, warn};

use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::opts::CtrlrOpts;
use crate::qpair::IoQpair;
use crate::transport::{ConnParams, Dir, Done, Endpoint, Queue};
use crate::trid::TransportId;

/// Controller state as SPDK's `bdev_nvme_get_controllers` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum CtrlrState {
    /// Up; I/O flows.
    Connected = 0,
    /// A reset is in progress (first reconnect attempt after a failure).
    Resetting = 1,
    /// Waiting `reconnect_delay_sec` between attempts.
    Reconnecting = 2,
    /// Gave up (`ctrlr_loss_timeout_sec` passed) or detached: all I/O fails.
    Failed = 3,
}

impl CtrlrState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => CtrlrState::Connected,
            1 => CtrlrState::Resetting,
            2 => CtrlrState::Reconnecting,
            _ => CtrlrState::Failed,
        }
    }
}

/// What the owner learns from [`Controller::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlrEvent {
    /// The state changed.
    State(CtrlrState),
    /// The namespace list or a namespace's size changed (after an AEN or a reconnect).
    NamespacesChanged {
        added: Vec<u32>,
        removed: Vec<u32>,
        resized: Vec<u32>,
    },
    /// Another asynchronous event (type, info, log page), passed on as is.
    Aen { ty: u8, info: u8, log_page: u8 },
}

/// An active namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
}

impl Namespace {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size as u64)
    }
}

/// State shared between a controller and its I/O queue pairs (which may be on other threads).
pub(crate) struct Shared {
    state: AtomicU8,
    /// Bumped when an association is torn down; qpairs reconnect when it moves.
    pub epoch: AtomicU64,
    pub cntlid: AtomicU32,
    /// Pending and new I/O fail (fast_io_fail_timeout passed, or failed/detached).
    pub fail_io: AtomicBool,
    /// A qpair saw its connection fail or an I/O outlive its abort.
    pub reset_req: AtomicBool,
    /// Abort requests from qpairs: (qid << 16 | cid), 0 = empty.
    aborts: [AtomicU32; 16],
    qids: [AtomicU64; 16],
    pub reconnect_delay: Duration,
    pub io_timeout: Option<Duration>,
}

impl Shared {
    /// A controller's shared state before its first association: resetting, no controller ID.
    pub(crate) fn new(opts: &CtrlrOpts) -> Self {
        Shared {
            state: AtomicU8::new(CtrlrState::Resetting as u8),
            epoch: AtomicU64::new(1),
            cntlid: AtomicU32::new(0xffff),
            fail_io: AtomicBool::new(false),
            reset_req: AtomicBool::new(false),
            aborts: Default::default(),
            qids: Default::default(),
            reconnect_delay: opts.reconnect_delay,
            io_timeout: opts.io_timeout,
        }
    }

    pub fn state(&self) -> CtrlrState {
        CtrlrState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, s: CtrlrState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Queues an Abort for the admin owner. False if the mailbox is full.
    pub fn post_abort(&self, qid: u16, cid: u16) -> bool {
        let v = (u32::from(qid) << 16) | u32::from(cid);
        self.aborts.iter().any(|a| {
            a.compare_exchange(0, v, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    fn take_abort(&self) -> Option<(u16, u16)> {
        self.aborts.iter().find_map(|a| {
            let v = a.swap(0, Ordering::AcqRel);
            (v != 0).then_some(((v >> 16) as u16, v as u16))
        })
    }

    fn claim_qid(&self, max: u16) -> Option<u16> {
        for qid in 1..=max.min(1023) {
            let (w, b) = (qid as usize / 64, qid % 64);
            let prev = self.qids[w].fetch_or(1 << b, Ordering::AcqRel);
            if prev & (1 << b) == 0 {
                return Some(qid);
            }
        }
        None
    }

    pub fn release_qid(&self, qid: u16) {
        if let Some(w) = self.qids.get(qid as usize / 64) {
            w.fetch_and(!(1 << (qid % 64)), Ordering::AcqRel);
        }
    }
}

/// NVMe/TCP digests of one connection: what the host asked for in its ICReq and what the
/// controller's ICResp granted. Only the granted ones are in force on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Digests {
    /// Header digest in force (granted).
    pub hdgst: bool,
    /// Data digest in force (granted).
    pub ddgst: bool,
    /// Header digest asked for.
    pub hdgst_requested: bool,
    /// Data digest asked for.
    pub ddgst_requested: bool,
}

impl Digests {
    /// Whether the controller declined a digest the host asked for.
    pub fn declined(&self) -> bool {
        (self.hdgst_requested && !self.hdgst) || (self.ddgst_requested && !self.ddgst)
    }

    /// "header on, data requested but declined" and the like, for reports.
    pub fn describe(&self) -> String {
        fn one(granted: bool, requested: bool) -> &'static str {
            match (granted, requested) {
                (true, _) => "on",
                (false, true) => "requested but declined",
                (false, false) => "off",
            }
        }
        format!(
            "header {}, data {}",
            one(self.hdgst, self.hdgst_requested),
            one(self.ddgst, self.ddgst_requested)
        )
    }
}

/// What Identify Controller told us, in host terms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CtrlrInfo {
    /// Controller ID of the current association.
    pub cntlid: u16,
    /// NVMe version (VS register).
    pub version: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Largest transfer in bytes (MDTS).
    pub max_transfer: u32,
    /// Largest write carried in the command capsule (IOCCSZ).
    pub in_capsule_data: u32,
    /// Keep-alive granularity (KAS) in milliseconds.
    pub kas_ms: u32,
    /// CAP.MQES + 1.
    pub max_queue_entries: u32,
    /// I/O queues the controller granted.
    pub io_queues: u16,
    /// Header digest in force on the admin queue (same as `digests.hdgst`).
    pub hdgst: bool,
    /// Data digest in force on the admin queue (same as `digests.ddgst`).
    pub ddgst: bool,
    /// Digests of the admin queue: requested and granted.
    pub digests: Digests,
    /// I/O queues write shadow doorbells (PCIe, where the controller offers them).
    pub shadow_doorbells: bool,
    /// The controller takes SGLs for I/O data (and, on PCIe, we use them where PRPs would
    /// need a list).
    pub sgls: bool,
}

/// How often a controller without keep-alive (PCIe) has its CSTS read.
const HEALTH_CHECK: Duration = Duration::from_millis(10);

const TAG_KA: u64 = 1;
const TAG_AER: u64 = 2;
const TAG_ABORT: u64 = 3;
const TAG_SYNC: u64 = 4;

/// Admin transfers are small; in-capsule writes up to 8 KiB on the admin queue (TP 8000).
const ADMIN_IN_CAPSULE: usize = 8192;
/// Largest transfer we issue even if MDTS allows more (keeps in-capsule arithmetic bounded).
const MAX_XFER_CAP: u64 = 4 << 20;

/// A controller reached through a transport ID.
pub struct Controller {
    trid: TransportId,
    opts: CtrlrOpts,
    shared: Arc<Shared>,
    admin: Queue<Vec<u8>>,
    info: CtrlrInfo,
    cap: u64,
    namespaces: Vec<Namespace>,
    events: VecDeque<CtrlrEvent>,
    deferred: Vec<Done<Vec<u8>>>,
    kato: Duration,
    last_ka: Instant,
    ka_sent: Option<Instant>,
    /// When CSTS was last read to check a controller whose registers we map (PCIe).
    last_health: Instant,
    aer_outstanding: bool,
    down_since: Option<Instant>,
    next_attempt: Instant,
    detached: bool,
}

impl Controller {
    /// Connects to the controller named by `trid` and brings it up (blocking; bounded by the
    /// options' timeouts). The discovery NQN yields a discovery controller (no namespaces, no
    /// keep-alive by default).
    pub fn connect(trid: &TransportId, opts: &CtrlrOpts) -> Result<Controller> {
        let endpoint = Endpoint::for_trid(trid, opts)?;
        let mut opts = opts.clone();
        if let Some(h) = &trid.hostnqn {
            opts.hostnqn = h.clone();
        }
        let kato = if trid.is_discovery() || !endpoint.uses_keep_alive() {
            Duration::ZERO
        } else {
            opts.keep_alive_timeout
        };
        let params = ConnParams {
            endpoint,
            qid: 0,
            qsize: opts.admin_queue_size.max(2),
            subnqn: trid.subnqn.clone(),
            hostnqn: opts.hostnqn.clone(),
            hostid: opts.hostid,
            kato_ms: kato.as_millis().min(u32::MAX as u128) as u32,
            connect_timeout: opts.connect_timeout,
            in_capsule_max: ADMIN_IN_CAPSULE,
        };
        let shared = Arc::new(Shared::new(&opts));
        let mut c = Controller {
            trid: trid.clone(),
            opts,
            shared,
            admin: Queue::new(params),
            info: CtrlrInfo {
                cntlid: 0xffff,
                version: String::new(),
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                subnqn: String::new(),
                max_transfer: 0,
                in_capsule_data: 0,
                kas_ms: 0,
                max_queue_entries: 0,
                io_queues: 0,
                hdgst: false,
                ddgst: false,
                digests: Digests::default(),
                shadow_doorbells: false,
                sgls: false,
            },
            cap: 0,
            namespaces: Vec::new(),
            events: VecDeque::new(),
            deferred: Vec::new(),
            kato,
            last_ka: Instant::now(),
            last_health: Instant::now(),
            ka_sent: None,
            aer_outstanding: false,
            down_since: None,
            next_attempt: Instant::now(),
            detached: false,
        };
        c.bring_up()?;
        // The first scan is the starting list, not a change.
        c.events.clear();
        c.shared.set_state(CtrlrState::Connected);
        Ok(c)
    }

    /// The transport ID this controller was attached with.
    pub fn trid(&self) -> &TransportId {
        &self.trid
    }

    /// Identify data in host terms.
    pub fn info(&self) -> &CtrlrInfo {
        &self.info
    }

    /// Current state.
    pub fn state(&self) -> CtrlrState {
        self.shared.state()
    }

    /// Active namespaces (empty for a discovery controller).
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// One namespace by ID.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The next event, if any (state changes, namespace changes, other AENs).
    pub fn next_event(&mut self) -> Option<CtrlrEvent> {
        self.events.pop_front()
    }

    /// The CAP register.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    // ------------------------------------------------------------------ bring-up

    fn bring_up(&mut self) -> Result<()> {
        self.admin.disconnect();
        self.aer_outstanding = false;
        self.ka_sent = None;
        let cntlid = self.admin.connect(0xffff)?;
        self.info.cntlid = cntlid;
        let digests = self.admin.digests();
        self.info.hdgst = digests.hdgst;
        self.info.ddgst = digests.ddgst;
        self.info.digests = digests;

        self.cap = self.prop_get(reg::CAP, true)?;
        let vs = self.prop_get(reg::VS, false)? as u32;
        self.info.version = format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff);
        let cap = Cap(self.cap);
        if cap.max_queue_entries() < 2 {
            // MQES 0 is invalid: no queue could hold a command and leave a slot empty.
            return Err(Error::Protocol(
                "CAP.MQES is 0: no queue can be made".into(),
            ));
        }
        self.info.max_queue_entries = cap.max_queue_entries();
        let to = Duration::from_millis(u64::from(cap.timeout_ms().max(500)));

        // A fresh association starts disabled; if not, disable first (CC.EN 1 -> 0).
        let cur = Cc(self.prop_get(reg::CC, false)? as u32);
        if cur.en() {
            self.prop_set(reg::CC, u64::from(cur.with_en(false).0))?;
            self.wait_csts(|s| !s.rdy(), to, "CSTS.RDY = 0")?;
        }
        self.prop_set(reg::CC, u64::from(Cc::enable_default().0))?;
        self.wait_csts(|s| s.rdy(), to, "CSTS.RDY = 1 (CAP.TO)")?;

        let data = self.admin_cmd(
            Command::identify(cns::CONTROLLER, 0, 0, 0),
            Dir::ToHost,
            Some(vec![0u8; 4096]),
        )?;
        let id = IdentifyController::read_from_prefix(&data.1.unwrap_or_default())
            .map(|(id, _)| id)
            .map_err(|_| Error::Protocol("short Identify Controller data".into()))?;
        self.absorb_identify(&id);
        let sgls = if self.opts.pcie_sgl { id.sgls.get() } else { 0 };
        self.admin.use_sgls(sgls);
        self.info.sgls = sgls & nvme_spec::identify::sgls::SUPPORT_MASK != 0;
        self.info.shadow_doorbells = false;
        let shadow_offered = id.oacs.get() & oacs::DOORBELL_BUFFER_CONFIG != 0;

        let discovery = self.trid.is_discovery() || id.cntrltype == 3;
        if !discovery {
            // Ask for namespace attribute notices first, so that no change after the scan
            // below goes unnoticed; a target that refuses still works.
            if let Err(e) =
                self.admin_cmd(Command::set_features(0x0B, 1 << 8, false), Dir::None, None)
            {
                debug!("Set Features Async Event Configuration: {e}");
            }
            // Scanned before Number of Queues, which may depend on how many there are.
            let nss = self.scan_namespaces()?;
            let want = match self.opts.io_queues_per_namespace {
                0 => self.opts.num_io_queues.max(1),
                per_ns => (nss.len().max(1) * usize::from(per_ns)).clamp(1, 1024) as u16,
            };
            let v = u32::from(want - 1) | (u32::from(want - 1) << 16);
            let (dw0, _) =
                self.admin_cmd(Command::set_features(0x07, v, false), Dir::None, None)?;
            let granted = ((dw0 & 0xffff) + 1)
                .min((dw0 >> 16) + 1)
                .min(u32::from(want)) as u16;
            self.info.io_queues = granted;
            // Before any I/O queue exists, and once it is known how many there can be.
            if shadow_offered {
                self.config_shadow_doorbells(granted);
            }
            // Diffed against what we knew, so a reconnect reports namespaces that came, went
            // or changed size while the controller was away.
            self.apply_namespaces(nss);
            self.submit_aer();
        }
        self.last_ka = Instant::now();
        self.shared
            .cntlid
            .store(u32::from(cntlid), Ordering::Release);
        info!(
            trid = %self.trid,
            cntlid,
            model = %self.info.model,
            namespaces = self.namespaces.len(),
            io_queues = self.info.io_queues,
            "controller ready"
        );
        Ok(())
    }

    /// Hands the controller our shadow doorbell pages (before any I/O queue exists on this
    /// enable); without them, or if it refuses, queues write the registers alone. Not where
    /// the pages cannot hold the words of queues 1..=`max_qid` at the controller's doorbell
    /// stride: the controller would read, and write EventIdx, past them.
    fn config_shadow_doorbells(&mut self, max_qid: u16) {
        let Some((doorbells, event_idx)) = self.admin.shadow_doorbell_pages(max_qid) else {
            return;
        };
        let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
        cmd.set_prps(doorbells, event_idx);
        match self.admin_cmd(cmd, Dir::None, None) {
            Ok(_) => {
                self.admin.use_shadow_doorbells();
                self.info.shadow_doorbells = true;
            }
            Err(e) => debug!("Doorbell Buffer Config: {e}; doorbell registers only"),
        }
    }

    fn absorb_identify(&mut self, id: &IdentifyController) {
        let mpsmin = Cap(self.cap).min_page_size();
        let mdts = id.max_transfer_bytes(mpsmin).unwrap_or(MAX_XFER_CAP);
        // What one command may carry: the controller's MDTS, within what this transport's
        // queues take (PCIe: 2 MiB of PRPs; RDMA: a slot's registered region).
        self.info.max_transfer = (mdts.min(MAX_XFER_CAP) as u32).min(self.admin.transfer_limit());
        let ioccsz = u64::from(id.ioccsz.get()) * 16;
        self.info.in_capsule_data = ioccsz.saturating_sub(64).min(1 << 20) as u32;
        self.info.kas_ms = u32::from(id.kas.get()) * 100;
        self.info.serial = id.serial().unwrap_or("?").to_string();
        self.info.model = id.model().unwrap_or("?").to_string();
        self.info.firmware = id.firmware_rev().unwrap_or("?").to_string();
        self.info.subnqn = id.subnqn_str().unwrap_or("?").to_string();
        if id.sgls.get() & 0x3 == 0 && self.admin.registers().is_none() {
            warn!("controller reports no SGL support; NVMe over Fabrics requires it");
        }
    }

    /// A controller register: read from memory where the transport maps them (PCIe), else
    /// with Fabrics Property Get.
    fn prop_get(&mut self, offset: u32, eight: bool) -> Result<u64> {
        if let Some(r) = self.admin.registers() {
            return Ok(if eight {
                r.bar.read64(offset as usize)
            } else {
                u64::from(r.read32(offset))
            });
        }
        let size = if eight {
            PropertySize::Eight
        } else {
            PropertySize::Four
        };
        let cmd = PropertyGet { size, offset }.to_command(0);
        let (lo, hi, _) = self.admin_cmd_full(cmd, Dir::None, None)?;
        Ok(if eight {
            u64::from(lo) | (u64::from(hi) << 32)
        } else {
            u64::from(lo)
        })
    }

    fn prop_set(&mut self, offset: u32, value: u64) -> Result<()> {
        if let Some(r) = self.admin.registers() {
            r.write32(offset, value as u32);
            return Ok(());
        }
        let cmd = PropertySet {
            size: PropertySize::Four,
            offset,
            value,
        }
        .to_command(0);
        self.admin_cmd(cmd, Dir::None, None).map(|_| ())
    }

    fn wait_csts(
        &mut self,
        ok: impl Fn(Csts) -> bool,
        to: Duration,
        what: &'static str,
    ) -> Result<Csts> {
        let deadline = Instant::now() + to;
        loop {
            let s = Csts(self.prop_get(reg::CSTS, false)? as u32);
            if s.cfs() {
                return Err(Error::Protocol("controller fatal status (CSTS.CFS)".into()));
            }
            if ok(s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(what));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one admin command to completion (control path). Fails on non-success status.
    fn admin_cmd(
        &mut self,
        cmd: Command,
        dir: Dir,
        buf: Option<Vec<u8>>,
    ) -> Result<(u32, Option<Vec<u8>>)> {
        let (dw0, _, b) = self.admin_cmd_full(cmd, dir, buf)?;
        Ok((dw0, b))
    }

    fn admin_cmd_full(
        &mut self,
        cmd: Command,
        dir: Dir,
        buf: Option<Vec<u8>>,
    ) -> Result<(u32, u32, Option<Vec<u8>>)> {
        let name = cmd.opcode_name(true);
        let name = if cmd.is_fabrics() {
            "Fabrics command"
        } else {
            name
        };
        if self.admin.submit(cmd, dir, buf, TAG_SYNC).is_err() {
            return Err(Error::Unsupported("admin queue full".into()));
        }
        let deadline = Instant::now() + self.opts.admin_timeout;
        loop {
            let mut mine = None;
            let deferred = &mut self.deferred;
            self.admin.poll(&mut |d: Done<Vec<u8>>| {
                if d.tag == TAG_SYNC {
                    mine = Some(d);
                } else {
                    deferred.push(d);
                }
            })?;
            if let Some(d) = mine {
                if !d.status.is_success() {
                    return Err(Error::Nvme {
                        cmd: name,
                        status: d.status,
                    });
                }
                // Property Get returns 8-byte values in DW0 (low) and DW1 (high).
                return Ok((d.dw0, d.dw1, d.buf));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.admin.disconnect();
                return Err(Error::Timeout(name));
            }
            self.admin
                .wait_readable(left.min(Duration::from_millis(50)));
        }
    }

    /// Identify the active namespace list and each namespace.
    fn scan_namespaces(&mut self) -> Result<Vec<Namespace>> {
        let mut out = Vec::new();
        let mut after = 0u32;
        loop {
            let (_, b) = self.admin_cmd(
                Command::identify(cns::ACTIVE_NS_LIST, after, 0, 0),
                Dir::ToHost,
                Some(vec![0u8; 4096]),
            )?;
            let b = b.unwrap_or_default();
            let ids: Vec<u32> = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .take_while(|&id| id != 0)
                .collect();
            for &nsid in &ids {
                if nsid <= after {
                    return Err(Error::Protocol(
                        "active namespace list not ascending".into(),
                    ));
                }
                let (_, d) = self.admin_cmd(
                    Command::identify(cns::NAMESPACE, nsid, 0, 0),
                    Dir::ToHost,
                    Some(vec![0u8; 4096]),
                )?;
                let d = d.unwrap_or_default();
                let Ok((ns, _)) = IdentifyNamespace::read_from_prefix(&d) else {
                    return Err(Error::Protocol("short Identify Namespace data".into()));
                };
                let blocks = ns.nsze.get();
                match ns.block_size() {
                    Some(bs) if blocks > 0 && (512..=1 << 16).contains(&bs) => {
                        out.push(Namespace {
                            nsid,
                            blocks,
                            block_size: bs,
                        })
                    }
                    _ => debug!(nsid, blocks, "skipping namespace with no usable LBA format"),
                }
            }
            match ids.last() {
                Some(&last) if ids.len() == 1024 => after = last,
                _ => break,
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------------ I/O qpairs

    /// Creates and connects an I/O queue pair (blocking). `qsize` defaults to the options'
    /// `io_queue_size`, clamped to CAP.MQES+1. Move the result to the thread that polls it.
    pub fn alloc_io_qpair<B: IoBuf>(&mut self, qsize: Option<u16>) -> Result<IoQpair<B>> {
        if self.state() != CtrlrState::Connected {
            return Err(Error::Disconnected);
        }
        let qid = self.shared.claim_qid(self.info.io_queues).ok_or_else(|| {
            Error::Unsupported(format!("all {} I/O queues in use", self.info.io_queues))
        })?;
        let qsize = qsize
            .unwrap_or(self.opts.io_queue_size)
            .clamp(2, self.info.max_queue_entries.min(65535) as u16);
        let params = ConnParams {
            qid,
            qsize,
            kato_ms: 0,
            in_capsule_max: self.info.in_capsule_data as usize,
            ..self.admin.params().clone()
        };
        let mut q = Queue::new(params);
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let cntlid = self.shared.cntlid.load(Ordering::Acquire) as u16;
        if let Err(e) = self
            .create_on_controller(&mut q)
            .and_then(|_| q.connect(cntlid))
        {
            self.shared.release_qid(qid);
            return Err(e);
        }
        let max_transfer = self.info.max_transfer.min(q.transfer_limit());
        Ok(IoQpair::new(q, self.shared.clone(), epoch, max_transfer))
    }

    /// Runs the admin commands that make an I/O queue exist on the controller (PCIe's Create
    /// I/O CQ/SQ), after removing a queue of the same ID that an earlier owner, or the
    /// association before a reset, may have left behind (refused when there is none, which is
    /// the usual case).
    fn run_queue_setup(&mut self, deletes: Vec<Command>, creates: Vec<Command>) -> Result<()> {
        for cmd in deletes {
            let _ = self.admin_cmd(cmd, Dir::None, None);
        }
        for cmd in creates {
            self.admin_cmd(cmd, Dir::None, None)?;
        }
        Ok(())
    }

    fn create_on_controller<B: IoBuf>(&mut self, q: &mut Queue<B>) -> Result<()> {
        let deletes = q.teardown_commands();
        let creates = q.setup_commands()?;
        self.run_queue_setup(deletes, creates)
    }

    // ------------------------------------------------------------------ polling

    /// Drives keep-alive, asynchronous events, aborts requested by qpairs, and the
    /// reset/reconnect state machine. Returns true if it did anything.
    pub fn poll(&mut self) -> bool {
        if self.detached {
            return false;
        }
        let now = Instant::now();
        match self.state() {
            CtrlrState::Failed => false,
            CtrlrState::Resetting | CtrlrState::Reconnecting => {
                self.update_down_timers(now);
                if now < self.next_attempt || self.state() == CtrlrState::Failed {
                    return false;
                }
                self.try_reconnect(now);
                true
            }
            CtrlrState::Connected => {
                let mut busy = false;
                let deferred = &mut self.deferred;
                let r = self.admin.poll(&mut |d: Done<Vec<u8>>| deferred.push(d));
                if let Err(e) = r {
                    self.start_reset(&format!("admin connection: {e}"));
                    return true;
                }
                for d in std::mem::take(&mut self.deferred) {
                    busy = true;
                    self.handle_async(d);
                }
                if self.shared.reset_req.swap(false, Ordering::AcqRel) {
                    self.start_reset("requested by an I/O queue");
                    return true;
                }
                if now.duration_since(self.last_health) >= HEALTH_CHECK {
                    self.last_health = now;
                    if self.check_health() {
                        return true;
                    }
                }
                for setup in self.admin.take_queue_setups() {
                    busy = true;
                    let qid = setup.qid;
                    if let Err(e) = self.run_queue_setup(setup.deletes, setup.creates) {
                        warn!(qid, "I/O queue not created again after the reset: {e}");
                        self.start_reset("an I/O queue could not be created again");
                        return true;
                    }
                    self.admin.queue_set_up(qid);
                }
                while let Some((qid, cid)) = self.shared.take_abort() {
                    busy = true;
                    if self
                        .admin
                        .submit(Command::abort(qid, cid), Dir::None, None, TAG_ABORT)
                        .is_err()
                    {
                        self.start_reset("admin queue full while aborting");
                        return true;
                    }
                }
                if !self.kato.is_zero() {
                    if let Some(sent) = self.ka_sent {
                        if now.duration_since(sent) > self.kato {
                            self.start_reset("keep-alive not answered within KATO");
                            return true;
                        }
                    } else if now.duration_since(self.last_ka) >= self.kato / 2
                        && self
                            .admin
                            .submit(Command::keep_alive(), Dir::None, None, TAG_KA)
                            .is_ok()
                    {
                        self.ka_sent = Some(now);
                        busy = true;
                    }
                }
                if let Err(e) = self.admin.flush() {
                    self.start_reset(&format!("admin connection: {e}"));
                }
                busy
            }
        }
    }

    fn handle_async(&mut self, d: Done<Vec<u8>>) {
        match d.tag {
            TAG_KA => {
                self.ka_sent = None;
                self.last_ka = Instant::now();
                if !d.status.is_success() {
                    warn!("Keep Alive failed: {}", d.status);
                }
            }
            TAG_AER => {
                self.aer_outstanding = false;
                if !d.status.is_success() {
                    // Aborted at reset, or the controller has no AER slots: do not re-arm.
                    debug!("AER completed with {}", d.status);
                    return;
                }
                let ty = (d.dw0 & 0x7) as u8;
                let info = ((d.dw0 >> 8) & 0xff) as u8;
                let lid = ((d.dw0 >> 16) & 0xff) as u8;
                debug!(ty, info, lid, "asynchronous event");
                if ty == 2 && info == 0 {
                    // Namespace attribute changed: read (and so clear) the Changed Namespace
                    // List, then rescan.
                    let _ = self.admin_cmd(
                        Command::get_log_page(0xffff_ffff, 0x04, 0, false, 4096, 0),
                        Dir::ToHost,
                        Some(vec![0u8; 4096]),
                    );
                    self.rescan();
                } else {
                    if lid != 0 {
                        // Reading the log page re-enables this event type.
                        let _ = self.admin_cmd(
                            Command::get_log_page(0xffff_ffff, lid, 0, false, 512, 0),
                            Dir::ToHost,
                            Some(vec![0u8; 512]),
                        );
                    }
                    self.events.push_back(CtrlrEvent::Aen {
                        ty,
                        info,
                        log_page: lid,
                    });
                }
                self.submit_aer();
            }
            TAG_ABORT if !d.status.is_success() => {
                warn!("Abort failed ({}): resetting", d.status);
                self.shared.reset_req.store(true, Ordering::Release);
            }
            _ => {}
        }
    }

    fn submit_aer(&mut self) {
        if !self.aer_outstanding
            && self
                .admin
                .submit(Command::async_event_request(), Dir::None, None, TAG_AER)
                .is_ok()
        {
            self.aer_outstanding = true;
        }
    }

    /// Re-reads the namespace list and reports differences.
    pub fn rescan(&mut self) {
        match self.scan_namespaces() {
            Ok(new) => self.apply_namespaces(new),
            Err(e) => warn!("namespace rescan failed: {e}"),
        }
    }

    fn apply_namespaces(&mut self, new: Vec<Namespace>) {
        let old = &self.namespaces;
        let added: Vec<u32> = new
            .iter()
            .filter(|n| !old.iter().any(|o| o.nsid == n.nsid))
            .map(|n| n.nsid)
            .collect();
        let removed: Vec<u32> = old
            .iter()
            .filter(|o| !new.iter().any(|n| n.nsid == o.nsid))
            .map(|o| o.nsid)
            .collect();
        let resized: Vec<u32> = new
            .iter()
            .filter(|n| old.iter().any(|o| o.nsid == n.nsid && o != *n))
            .map(|n| n.nsid)
            .collect();
        self.namespaces = new;
        if !(added.is_empty() && removed.is_empty() && resized.is_empty()) {
            info!(?added, ?removed, ?resized, "namespaces changed");
            self.events.push_back(CtrlrEvent::NamespacesChanged {
                added,
                removed,
                resized,
            });
        }
    }

    // ------------------------------------------------------------------ failure handling

    fn set_state(&mut self, s: CtrlrState) {
        if self.shared.state() != s {
            self.shared.set_state(s);
            self.events.push_back(CtrlrEvent::State(s));
        }
    }

    /// Tears down the association; qpairs drop their connections and wait.
    fn start_reset(&mut self, why: &str) {
        warn!(trid = %self.trid, "controller reset: {why}");
        self.admin.disconnect();
        let mut sink = |_d: Done<Vec<u8>>| {};
        self.admin.fail_all(Status::ABORTED_SQ_DELETION, &mut sink);
        self.aer_outstanding = false;
        self.ka_sent = None;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.down_since.get_or_insert_with(Instant::now);
        self.next_attempt = Instant::now();
        self.set_state(CtrlrState::Resetting);
    }

    /// For a controller whose registers we map (no keep-alive tells us it is gone): reads
    /// CSTS. All ones means the device is gone (surprise removal): the controller fails at
    /// once and its I/O with it. CSTS.CFS (a fatal controller error), or RDY clear on a
    /// controller we enabled (reset behind our back, or its BAR no longer decoded), starts a
    /// reset. Returns whether any of these happened.
    fn check_health(&mut self) -> bool {
        let Some(csts) = self.admin.registers().map(|r| Csts(r.read32(reg::CSTS))) else {
            return false;
        };
        if csts.0 == u32::MAX {
            warn!(trid = %self.trid, "registers read all ones: the device was removed; controller failed");
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            self.fail();
            return true;
        }
        if csts.cfs() {
            self.start_reset("CSTS.CFS: the controller reported a fatal status");
            return true;
        }
        if !csts.rdy() {
            self.start_reset("CSTS.RDY cleared: the controller stopped without being told to");
            return true;
        }
        false
    }

    fn update_down_timers(&mut self, now: Instant) {
        let Some(since) = self.down_since else { return };
        let down = now.duration_since(since);
        if let Some(t) = self.opts.fast_io_fail_timeout {
            if down >= t && !self.shared.fail_io.swap(true, Ordering::AcqRel) {
                warn!(trid = %self.trid, "fast_io_fail_timeout passed: failing I/O");
            }
        }
        if let Some(t) = self.opts.ctrlr_loss_timeout {
            // With ctrlr_loss_timeout 0 only the immediate reset attempt is made.
            if down >= t && self.state() == CtrlrState::Reconnecting {
                warn!(trid = %self.trid, "ctrlr_loss_timeout passed: controller failed");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.shared.fail_io.store(true, Ordering::Release);
        self.admin.disconnect();
        self.set_state(CtrlrState::Failed);
    }

    fn try_reconnect(&mut self, now: Instant) {
        match self.bring_up() {
            Ok(()) => {
                info!(trid = %self.trid, "controller reconnected");
                self.down_since = None;
                self.shared.fail_io.store(false, Ordering::Release);
                self.shared.reset_req.store(false, Ordering::Release);
                self.set_state(CtrlrState::Connected);
            }
            Err(e) => {
                warn!(trid = %self.trid, "reconnect failed: {e}");
                self.admin.disconnect();
                self.next_attempt = now + self.opts.reconnect_delay;
                self.set_state(CtrlrState::Reconnecting);
                self.update_down_timers(Instant::now());
            }
        }
    }

    /// Forces a reset now (as `bdev_nvme_reset_controller` does).
    pub fn reset(&mut self) {
        if self.state() != CtrlrState::Failed {
            self.start_reset("requested by the owner");
        }
    }

    /// Normal shutdown (CC.SHN), then disconnect. I/O queue pairs fail their I/O afterwards.
    pub fn detach(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        self.shared.fail_io.store(true, Ordering::Release);
        let res = if self.state() == CtrlrState::Connected && !self.trid.is_discovery() {
            (|| {
                let cur = Cc(self.prop_get(reg::CC, false)? as u32);
                self.prop_set(reg::CC, u64::from(cur.with_shn(shutdown::SHN_NORMAL).0))?;
                self.wait_csts(
                    |s| s.shst() == shutdown::SHST_COMPLETE,
                    Duration::from_secs(5),
                    "CSTS.SHST shutdown complete",
                )
                .map(|_| ())
            })()
        } else {
            Ok(())
        };
        // A PCIe controller is also disabled, shut down cleanly or not: then it has no queue
        // left to fetch from or complete into once the process's memory is unmapped.
        let res = match self.admin.registers().map(|dev| dev.disable()) {
            Some(Err(e)) if res.is_ok() => Err(e),
            _ => res,
        };
        self.admin.disconnect();
        self.shared.set_state(CtrlrState::Failed);
        res
    }

    // ------------------------------------------------------------------ raw admin

    /// Runs an admin command synchronously (control path): returns DW0 and the buffer.
    pub fn admin_command(
        &mut self,
        cmd: Command,
        data_in: Option<usize>,
    ) -> Result<(u32, Option<Vec<u8>>)> {
        if self.state() != CtrlrState::Connected {
            return Err(Error::Disconnected);
        }
        let (dir, buf) = match data_in {
            Some(n) => (Dir::ToHost, Some(vec![0u8; n])),
            None => (Dir::None, None),
        };
        self.admin_cmd(cmd, dir, buf)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
