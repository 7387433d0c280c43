//! The transport seam.
//!
//! A transport provides one thing: a *queue* (admin or I/O) that can connect to a controller,
//! take commands with an owned buffer and a tag, move their data, and report completions when
//! polled. Everything above it — bring-up, keep-alive, AER, timeouts, reset/reconnect,
//! namespaces, plexperf — is transport-neutral and lives in [`crate::ctrlr`] and
//! [`crate::qpair`].
//!
//! What names the transport is the queue's [`Endpoint`] (made from the transport ID by
//! [`Endpoint::for_trid`]); the command and completion types here ([`Dir`], [`Done`],
//! [`ConnectProgress`], [`ConnParams`]) are the transports' common words, so nothing above this
//! file names TCP.
//!
//! Queues are dispatched through the [`Queue`] enum rather than a trait object so the hot path
//! stays a direct, inlinable call. A transport is an endpoint and a queue variant
//! ([`crate::pcie::queue::PcieQueue`] and [`crate::rdma::queue::RdmaQueue`] followed TCP's)
//! implementing the same
//! inherent methods as
//! [`crate::tcp::queue::TcpQueue`]:
//! `start_connect(cntlid)` and `poll_connect()` (a connection advanced by polls that never
//! block, for queues owned by reactors), `connect(cntlid)` (the same, waited for, for
//! control-plane threads), `is_connecting()`, `disconnect()`, `submit(sqe, dir, buf, tag)`, `poll(on_done)`,
//! `flush()`, `fail_all(..)`, `for_each_active(..)`, `outstanding()`, `busy()`,
//! `is_connected()`, `depth()`, `wait_readable(..)`. For PCIe "connect" is Create I/O CQ/SQ
//! and "poll" reads the completion queue in memory; the layers above do not change. The
//! fabrics transports (TCP, RDMA) keep their commands in `slots.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::{Command, Status};

use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::opts::CtrlrOpts;
use crate::pcie::queue::PcieQueue;
use crate::pcie::PcieDevice;
use crate::rdma::queue::RdmaQueue;
use crate::rdma::RdmaEndpoint;
use crate::tcp::queue::{TcpEndpoint, TcpQueue};
use crate::trid::{TrType, TransportId};

/// Data direction of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    None,
    /// Controller to host (reads).
    ToHost,
    /// Host to controller (writes).
    ToCtrl,
}

/// Where a transport's queues reach their controller: the one part of a queue's parameters
/// that names the transport.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    Tcp(TcpEndpoint),
    /// A controller on PCIe, opened (and its registers mapped) when the endpoint is made.
    Pcie(Arc<PcieDevice>),
    Rdma(RdmaEndpoint),
}

impl Endpoint {
    /// The endpoint `trid` names, with `opts`' transport settings (TCP's digests).
    pub fn for_trid(trid: &TransportId, opts: &CtrlrOpts) -> Result<Endpoint> {
        match trid.trtype {
            TrType::Tcp => Ok(Endpoint::Tcp(TcpEndpoint {
                addr: trid.socket_addr().map_err(Error::io("resolve traddr"))?,
                hdgst: opts.hdgst,
                ddgst: opts.ddgst,
            })),
            TrType::Pcie => Ok(Endpoint::Pcie(PcieDevice::open(&trid.traddr)?)),
            TrType::Rdma => {
                rdma::available()?;
                Ok(Endpoint::Rdma(RdmaEndpoint {
                    addr: trid.socket_addr().map_err(Error::io("resolve traddr"))?,
                }))
            }
        }
    }
}

impl Endpoint {
    /// Whether the controller needs Keep Alive commands (fabrics do; PCIe has no connection
    /// to lose).
    pub fn uses_keep_alive(&self) -> bool {
        matches!(self, Endpoint::Tcp(_) | Endpoint::Rdma(_))
    }
}

/// A command out on this many connections that were lost fails with a host pathing error
/// instead of going out again: one that itself brings the target down (or makes it drop the
/// connection) would otherwise be resent, and bring it down, forever.
pub(crate) const MAX_LOST_SENDS: u8 = 4;

/// Whether a command out on `lost_sends` lost connections is given up at a reconnection
/// (see [`MAX_LOST_SENDS`]); says so when it is.
pub(crate) fn give_up(qid: u16, lost_sends: u8, tag: u64, opcode: u8) -> bool {
    let give_up = lost_sends >= MAX_LOST_SENDS;
    if give_up {
        tracing::warn!(
            qid,
            tag,
            opcode,
            "I/O failed: {MAX_LOST_SENDS} connections were lost while it was out; it is not \
             sent again"
        );
    }
    give_up
}

/// A connection step pending until `deadline`, a timeout of `step` after it.
pub(crate) fn still_pending(deadline: Instant, step: &'static str) -> Result<ConnectProgress> {
    if Instant::now() >= deadline {
        Err(Error::Timeout(step))
    } else {
        Ok(ConnectProgress::InProgress)
    }
}

/// Parameters to (re)connect one queue.
#[derive(Debug, Clone)]
pub(crate) struct ConnParams {
    pub endpoint: Endpoint,
    pub qid: u16,
    /// Queue entries (Connect SQSIZE is this minus one).
    pub qsize: u16,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Keep-alive timeout for Connect (admin queue only).
    pub kato_ms: u32,
    pub connect_timeout: Duration,
    /// Largest write carried in the command itself (fabrics: IOCCSZ*16 - 64 for I/O queues,
    /// 8 KiB for admin).
    pub in_capsule_max: usize,
}

/// What one [`Queue::poll_connect`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectProgress {
    /// Not there yet: poll again later.
    InProgress,
    /// Connected to the controller with this ID.
    Connected { cntlid: u16 },
}

/// A finished command, handed to the queue's owner.
pub(crate) struct Done<B> {
    pub tag: u64,
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub buf: Option<B>,
}

/// One queue of some transport.
pub(crate) enum Queue<B> {
    Tcp(TcpQueue<B>),
    Pcie(PcieQueue<B>),
    Rdma(RdmaQueue<B>),
}

macro_rules! each {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Queue::Tcp($q) => $e,
            Queue::Pcie($q) => $e,
            Queue::Rdma($q) => $e,
        }
    };
}

impl<B: IoBuf> Queue<B> {
    /// A disconnected queue to `p.endpoint`, of that endpoint's transport.
    pub fn new(p: ConnParams) -> Self {
        match p.endpoint.clone() {
            Endpoint::Tcp(t) => Queue::Tcp(TcpQueue::new(p, t)),
            Endpoint::Pcie(d) => Queue::Pcie(PcieQueue::new(p, d)),
            Endpoint::Rdma(r) => Queue::Rdma(RdmaQueue::new(p, r)),
        }
    }
    /// Admin commands the controller must run before this I/O queue can connect (PCIe:
    /// Create I/O CQ and SQ); none for fabrics, whose Connect does it.
    pub fn setup_commands(&mut self) -> Result<Vec<Command>> {
        match self {
            Queue::Tcp(_) | Queue::Rdma(_) => Ok(Vec::new()),
            Queue::Pcie(q) => q.setup_commands(),
        }
    }
    /// Admin commands that remove this I/O queue from the controller (PCIe: Delete I/O SQ
    /// and CQ); none for fabrics, where disconnecting does it.
    pub fn teardown_commands(&self) -> Vec<Command> {
        match self {
            Queue::Tcp(_) | Queue::Rdma(_) => Vec::new(),
            Queue::Pcie(q) => q.teardown_commands(),
        }
    }
    /// The controller's registers when they are memory-mapped (PCIe); fabrics reach them
    /// with Property Get/Set on the admin queue.
    pub fn registers(&self) -> Option<&PcieDevice> {
        match self {
            Queue::Tcp(_) | Queue::Rdma(_) => None,
            Queue::Pcie(q) => Some(q.device()),
        }
    }
    /// I/O queues that asked, since the last call, to be created again on the controller
    /// after a reset, each with its admin commands (PCIe; fabrics queues reconnect alone).
    pub fn take_queue_setups(&self) -> Vec<crate::pcie::QueueSetup> {
        match self {
            Queue::Tcp(_) | Queue::Rdma(_) => Vec::new(),
            Queue::Pcie(q) => q.device().take_setups(),
        }
    }
    /// Tells I/O queue `qid` that its setup commands ran.
    pub fn queue_set_up(&self, qid: u16) {
        if let Queue::Pcie(q) = self {
            q.device().mark_ready(qid);
        }
    }
    /// Shadow doorbell pages to hand the controller with Doorbell Buffer Config (zeroed,
    /// not in use until [`Self::use_shadow_doorbells`]); PCIe only.
    pub fn shadow_doorbell_pages(&self, max_qid: u16) -> Option<(u64, u64)> {
        match self {
            Queue::Tcp(_) | Queue::Rdma(_) => None,
            Queue::Pcie(q) => q
                .device()
                .shadow
                .as_ref()
                .filter(|s| s.reaches(max_qid))
                .map(|s| s.prepare()),
        }
    }
    /// The controller accepted Doorbell Buffer Config: queues write shadow doorbells now.
    pub fn use_shadow_doorbells(&self) {
        if let Queue::Pcie(q) = self {
            if let Some(s) = &q.device().shadow {
                s.enable();
            }
        }
    }
    /// Identify's SGLS, for a transport that chooses per command between PRPs and an SGL
    /// (PCIe; 0 keeps it on PRPs). Fabrics always use SGLs.
    pub fn use_sgls(&self, sgls: u32) {
        if let Queue::Pcie(q) = self {
            q.device().set_sgls(sgls);
        }
    }
    /// The largest transfer one command may carry on this transport.
    pub fn transfer_limit(&self) -> u32 {
        match self {
            Queue::Tcp(_) => u32::MAX,
            Queue::Pcie(_) => crate::pcie::MAX_TRANSFER,
            Queue::Rdma(_) => crate::rdma::MAX_TRANSFER,
        }
    }
    /// Whether data buffers must be DMA memory with an IOVA (PCIe I/O queues).
    pub fn requires_iova(&self) -> bool {
        matches!(self, Queue::Pcie(_))
    }
    /// Connects and waits for it: control-plane threads only.
    pub fn connect(&mut self, cntlid: u16) -> Result<u16> {
        each!(self, q => q.connect(cntlid))
    }
    /// Starts connecting without waiting; [`Queue::poll_connect`] carries it on.
    pub fn start_connect(&mut self, cntlid: u16) -> Result<()> {
        each!(self, q => q.start_connect(cntlid))
    }
    /// Advances a connection attempt with non-blocking calls only. An error ends the attempt.
    pub fn poll_connect(&mut self) -> Result<ConnectProgress> {
        each!(self, q => q.poll_connect())
    }
    #[inline]
    pub fn is_connecting(&self) -> bool {
        each!(self, q => q.is_connecting())
    }
    pub fn disconnect(&mut self) {
        each!(self, q => q.disconnect())
    }
    #[inline]
    pub fn submit(
        &mut self,
        sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
    ) -> Result<u16, Option<B>> {
        each!(self, q => q.submit(sqe, dir, buf, tag))
    }
    #[inline]
    pub fn poll(&mut self, max: usize, on_done: &mut impl FnMut(Done<B>)) -> Result<usize> {
        each!(self, q => q.poll(max, on_done))
    }
    pub fn flush(&mut self) -> Result<()> {
        each!(self, q => q.flush())
    }
    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        each!(self, q => q.fail_all(status, on_done))
    }
    /// Completes with `status` the active commands an Abort was sent for. Only once the
    /// association they went out on is gone: a reset disabled the PCIe controller, a TCP
    /// connection is closed, an RDMA queue pair is destroyed.
    pub fn fail_aborted(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        let mut aborted = Vec::new();
        self.for_each_active(|cid, _, abort_posted, _| {
            if *abort_posted {
                aborted.push(cid);
            }
        });
        for cid in aborted {
            on_done(each!(self, q => q.fail_one(cid, status)));
        }
    }
    pub fn for_each_active(&mut self, f: impl FnMut(u16, &mut u64, &mut bool, u64)) {
        each!(self, q => q.for_each_active(f))
    }
    #[inline]
    pub fn outstanding(&self) -> usize {
        each!(self, q => q.outstanding())
    }
    #[inline]
    pub fn busy(&self) -> bool {
        each!(self, q => q.busy())
    }
    #[inline]
    pub fn is_connected(&self) -> bool {
        each!(self, q => q.is_connected())
    }
    pub fn depth(&self) -> u16 {
        each!(self, q => q.depth())
    }
    pub fn wait_readable(&self, t: Duration) {
        each!(self, q => q.wait_readable(t))
    }
    pub fn params(&self) -> &ConnParams {
        each!(self, q => &q.params)
    }
    pub fn qid(&self) -> u16 {
        self.params().qid
    }
    pub fn digests(&self) -> crate::ctrlr::Digests {
        match self {
            Queue::Tcp(q) => q.digests(),
            Queue::Pcie(_) | Queue::Rdma(_) => crate::ctrlr::Digests::default(),
        }
    }
}
