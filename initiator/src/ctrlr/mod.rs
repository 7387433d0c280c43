//! Controllers: bring-up over a transport, the admin queue, keep-alive, asynchronous events,
//! namespaces, and the reset / reconnect state machine with SPDK's timeouts.
//!
//! The owner calls [`Controller::poll`] regularly (every few milliseconds is plenty: it only
//! drives keep-alive, AER, aborts and reconnects). Bring-up and reconnect attempts run admin
//! commands synchronously with bounded waits; they happen at attach and after failures, never
//! on the I/O path.
//!
//! Here: the controller, what it reports, and its I/O queue pairs; `bringup.rs` brings it up;
//! `health.rs` polls it and handles its failures.

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

mod bringup;
mod health;

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
