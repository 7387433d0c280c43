//! One NVMe/RDMA queue: a reliable RDMA connection, a slot per command, and the registered
//! memory its capsules, responses and data pass through (see the module above).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::cmd::SglDescriptor;
use nvme_spec::fabrics::{Connect, ConnectData};
use nvme_spec::rdma::{CmAccept, CmReject, CmRequest, ADMIN_QUEUE_DEPTH};
use nvme_spec::{Command, Completion, IntoBytes, Status};
use rdma::verbs::CompletedOp;
use rdma::{
    Access, CmEventKind, CmId, CompletionQueue, ConnParam, EventChannel, MemoryRegion,
    ProtectionDomain, QueueCaps, SendOp, WorkCompletion,
};
use tracing::{debug, warn};

use super::{RdmaEndpoint, MAX_TRANSFER};
use crate::error::{Error, Result};
use crate::slots::{SlotPart, Slots};
use crate::transport::{still_pending, ConnParams, ConnectProgress, Dir, Done};
use rdma::DeviceMemory;

const SQE: usize = 64;
const CQE: usize = 16;
/// Largest queue we build.
const MAX_DEPTH: u16 = 1024;
/// Work request IDs: a send carries its command slot, a receive this bit and its buffer.
const RECV: u64 = 1 << 32;
/// Connect CATTR bit 2, as on TCP: this host never looks at SQHD.
const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Down,
    ResolvingAddr {
        cntlid: u16,
        deadline: Instant,
    },
    ResolvingRoute {
        cntlid: u16,
        deadline: Instant,
    },
    /// Connect request sent with our private data; waiting for the target to accept.
    Establishing {
        cntlid: u16,
        deadline: Instant,
    },
    AwaitingConnectResp {
        deadline: Instant,
    },
    Up,
}

/// What an RDMA queue keeps per command besides the common slot (`crate::slots`).
#[derive(Default)]
struct RdmaSlot {
    /// Its SEND has not completed yet: the capsule buffer is still the device's.
    send_pending: bool,
    /// The response, when it came before the SEND's completion: the command finishes when
    /// both are in, as the Linux host's and SPDK's do.
    response: Option<(Status, u32, u32)>,
}

impl SlotPart for RdmaSlot {
    fn finished(&mut self) {
        // A response kept for a SEND still in flight belongs to this command only: the SEND's
        // completion must not deliver it once the command ended otherwise (an abort, a
        // failed path), nor to the next command in this slot.
        self.response = None;
    }
}

/// One RDMA connection and what the device knows of our memory.
struct Connection {
    id: CmId,
    events: Arc<EventChannel>,
    regions: Option<Regions>,
    cq: Option<Arc<CompletionQueue>>,
}

impl Drop for Connection {
    /// Queue pair (no more DMA), memory regions and PD, completion queue, then the
    /// identifier: the identifier holds the device context the others were made on, which
    /// librdmacm closes with the last identifier once the device is gone.
    fn drop(&mut self) {
        self.id.destroy_qp();
        self.regions = None;
        self.cq = None;
    }
}

struct Regions {
    data: MemoryRegion,
    capsules: MemoryRegion,
    responses: MemoryRegion,
}

pub(crate) struct RdmaQueue<B> {
    pub params: ConnParams,
    endpoint: RdmaEndpoint,
    /// Declared before the memory it registers, so it is dropped first.
    conn: Option<Connection>,
    state: ConnState,
    /// A data region of `MAX_TRANSFER` per slot.
    data: DeviceMemory,
    /// A 64-byte capsule per slot.
    capsules: DeviceMemory,
    /// A 16-byte response buffer per slot, each always posted as a receive while connected.
    responses: DeviceMemory,
    slots: Slots<B, RdmaSlot>,
    internal_done: Option<(Status, u32)>,
    /// A failure met outside `poll` (a post at submission), for the next poll to report.
    failure: Option<Error>,
    /// When an idle poll last read the connection's events.
    events_read: Instant,
    pub cntlid: u16,
}

/// How often an idle connected queue reads its connection events (a target's disconnect,
/// a device removal); a busy one learns of them from its completions.
const EVENTS_EVERY: Duration = Duration::from_millis(5);

impl<B: crate::buf::IoBuf> RdmaQueue<B> {
    pub fn new(params: ConnParams, endpoint: RdmaEndpoint) -> Self {
        let mut depth = params.qsize.clamp(2, MAX_DEPTH);
        if params.qid == 0 {
            // The largest admin queue NVMe/RDMA targets take (the Linux target's limit).
            depth = depth.min(ADMIN_QUEUE_DEPTH);
        }
        // One more slot than the queue's depth: Fabrics Connect's, at index `depth`.
        let slots = usize::from(depth) + 1;
        RdmaQueue {
            params,
            endpoint,
            conn: None,
            state: ConnState::Down,
            data: DeviceMemory::new(slots * MAX_TRANSFER as usize),
            capsules: DeviceMemory::new(slots * SQE),
            responses: DeviceMemory::new(slots * CQE),
            slots: Slots::new(depth),
            internal_done: None,
            failure: None,
            events_read: Instant::now(),
            cntlid: 0,
        }
    }

    fn qid(&self) -> u16 {
        self.params.qid
    }

    pub fn depth(&self) -> u16 {
        self.slots.depth()
    }

    pub fn outstanding(&self) -> usize {
        self.slots.outstanding()
    }

    /// Whether a poll has anything to do. A connected queue always has: polling its
    /// completion queue costs no system call, and an idle queue must still notice a
    /// disconnect.
    pub fn busy(&self) -> bool {
        self.is_connected() || self.slots.outstanding() > 0 || self.slots.has_given_up()
    }

    pub fn is_connected(&self) -> bool {
        self.state == ConnState::Up
    }

    pub fn is_connecting(&self) -> bool {
        !matches!(self.state, ConnState::Down | ConnState::Up)
    }

    pub fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    pub fn wait_readable(&self, t: Duration) {
        std::thread::sleep(t.min(Duration::from_micros(200)));
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.params.connect_timeout
    }

    fn timeout_ms(&self) -> i32 {
        self.params.connect_timeout.as_millis().clamp(100, 60_000) as i32
    }

    // ---------------------------------------------------------------- connection

    /// Starts a (re)connection: resolves the target's address. Non-blocking; `poll_connect`
    /// does the rest. Commands still active go out again once connected.
    pub fn start_connect(&mut self, cntlid: u16) -> Result<()> {
        self.disconnect();
        let events = EventChannel::new()?;
        let id = CmId::new(&events)?;
        id.resolve_addr(self.endpoint.addr, self.timeout_ms())?;
        self.conn = Some(Connection {
            id,
            events,
            regions: None,
            cq: None,
        });
        self.state = ConnState::ResolvingAddr {
            cntlid,
            deadline: self.deadline(),
        };
        Ok(())
    }

    /// Advances a connection attempt without blocking; an error ends it (active commands
    /// stay in their slots).
    pub fn poll_connect(&mut self) -> Result<ConnectProgress> {
        let res = self.advance_connect();
        if res.is_err() {
            self.disconnect();
        }
        res
    }

    /// Connects and waits for it: control-plane threads only.
    pub fn connect(&mut self, cntlid: u16) -> Result<u16> {
        self.start_connect(cntlid)?;
        loop {
            if let ConnectProgress::Connected { cntlid } = self.poll_connect()? {
                return Ok(cntlid);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn next_cm_event(&mut self) -> Result<Option<rdma::CmEvent>> {
        let Some(conn) = &self.conn else {
            return Err(Error::Disconnected);
        };
        Ok(conn.events.next_event()?)
    }

    fn advance_connect(&mut self) -> Result<ConnectProgress> {
        loop {
            let (step, deadline) = match self.state {
                ConnState::Down => return Err(Error::Disconnected),
                ConnState::Up => {
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    })
                }
                ConnState::AwaitingConnectResp { deadline } => {
                    self.process(usize::MAX, &mut |_| {})?;
                    let Some((status, dw0)) = self.internal_done.take() else {
                        if let Some(event) = self.next_cm_event()? {
                            return Err(self.refused("Fabrics Connect", &event));
                        }
                        return still_pending(deadline, "Fabrics Connect");
                    };
                    if !status.is_success() {
                        return Err(Error::Nvme {
                            cmd: "Fabrics Connect",
                            status,
                        });
                    }
                    self.cntlid = (dw0 & 0xffff) as u16;
                    self.state = ConnState::Up;
                    debug!(
                        qid = self.qid(),
                        cntlid = self.cntlid,
                        depth = self.slots.depth(),
                        "RDMA queue connected"
                    );
                    self.resend_active()?;
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    });
                }
                ConnState::ResolvingAddr { deadline, .. } => ("RDMA address resolution", deadline),
                ConnState::ResolvingRoute { deadline, .. } => ("RDMA route resolution", deadline),
                ConnState::Establishing { deadline, .. } => ("RDMA connection", deadline),
            };
            let Some(event) = self.next_cm_event()? else {
                return still_pending(deadline, step);
            };
            let expected = match self.state {
                ConnState::ResolvingAddr { .. } => CmEventKind::AddrResolved,
                ConnState::ResolvingRoute { .. } => CmEventKind::RouteResolved,
                _ => CmEventKind::Established,
            };
            if event.kind != expected {
                return Err(self.refused(step, &event));
            }
            match self.state {
                ConnState::ResolvingAddr { cntlid, .. } => {
                    let timeout = self.timeout_ms();
                    self.connection()?.id.resolve_route(timeout)?;
                    self.state = ConnState::ResolvingRoute {
                        cntlid,
                        deadline: self.deadline(),
                    };
                }
                ConnState::ResolvingRoute { cntlid, .. } => {
                    self.open_queue_pair(cntlid)?;
                    self.state = ConnState::Establishing {
                        cntlid,
                        deadline: self.deadline(),
                    };
                }
                ConnState::Establishing { cntlid, .. } => {
                    let crqsize = CmAccept::read(&event.private_data).map(|a| a.crqsize());
                    if let Some(crqsize) = crqsize.filter(|&c| c < self.slots.depth()) {
                        return Err(Error::Unsupported(format!(
                            "the target takes {crqsize} commands at once on queue {}; this \
                             queue needs {}",
                            self.qid(),
                            self.slots.depth()
                        )));
                    }
                    self.send_fabrics_connect(cntlid)?;
                    self.state = ConnState::AwaitingConnectResp {
                        deadline: self.deadline(),
                    };
                }
                _ => unreachable!("handled above"),
            }
        }
    }

    /// The error for an unexpected connection event, with the target's reason when it gave one.
    fn refused(&self, step: &'static str, event: &rdma::CmEvent) -> Error {
        if event.kind == CmEventKind::Rejected {
            if let Some(reason) = CmReject::read(&event.private_data).and_then(|r| r.status()) {
                return Error::RdmaConnect(format!(
                    "the target rejected queue {}: {reason}",
                    self.qid()
                ));
            }
        }
        Error::RdmaConnect(format!(
            "{step} for queue {} to {}: {} (status {})",
            self.qid(),
            self.endpoint.addr,
            event.kind.name(),
            event.status
        ))
    }

    fn connection(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or(Error::Disconnected)
    }

    /// Creates the queue pair, registers this queue's memory, posts every receive and sends
    /// the connect request.
    fn open_queue_pair(&mut self, cntlid: u16) -> Result<()> {
        let slots = self.slots.len() as u32;
        let conn = self.conn.as_mut().ok_or(Error::Disconnected)?;
        let device = conn
            .id
            .device()
            .ok_or_else(|| Error::Protocol("route resolved without an RDMA device".into()))?;
        let limits = device.limits()?;
        // A slot is busy until both its send and its response completed: at most one send
        // and one receive per slot are ever waiting.
        for (what, need, offered) in [
            ("work requests per queue", slots, limits.max_qp_wr),
            ("completion queue entries", 2 * slots, limits.max_cqe),
            ("scatter-gather elements per send", 2, limits.max_sge),
        ] {
            if need > offered {
                return Err(Error::Unsupported(format!(
                    "queue {} needs {need} {what}; the RDMA device offers {offered} (use a \
                     smaller queue size)",
                    self.params.qid
                )));
            }
        }
        let pd = ProtectionDomain::new(&device)?;
        let cq = CompletionQueue::new(&device, 2 * slots, None)?;
        let caps = QueueCaps {
            max_send_wr: slots,
            max_recv_wr: slots,
            // The capsule, and a write's in-capsule data.
            max_send_sge: 2,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        conn.id.create_qp(&pd, &cq, &cq, None, caps)?;
        let remote = Access::LOCAL_WRITE
            .union(Access::REMOTE_READ)
            .union(Access::REMOTE_WRITE);
        let register = |m: &DeviceMemory, access| {
            // SAFETY: the memory belongs to this queue and outlives the connection (field
            // order); Rust touches a range only while no work names it (see DeviceMemory).
            unsafe { MemoryRegion::register(&pd, m.as_mut_ptr(), m.len(), access) }.map_err(|e| {
                if e.errno() == libc::ENOMEM {
                    Error::Unsupported(format!(
                        "registering {} bytes with the RDMA device: {e}; raise the locked-memory \
                         limit (ulimit -l, RLIMIT_MEMLOCK) or grant CAP_IPC_LOCK",
                        m.len()
                    ))
                } else {
                    e.into()
                }
            })
        };
        let regions = Regions {
            data: register(&self.data, remote)?,
            capsules: register(&self.capsules, Access::LOCAL_WRITE)?,
            responses: register(&self.responses, Access::LOCAL_WRITE)?,
        };
        for i in 0..slots as usize {
            let sge = regions
                .responses
                .sge(i * CQE, CQE as u32)
                .expect("inside the region");
            // SAFETY: response buffer i is read only after its receive completes.
            unsafe { conn.id.post_recv(RECV | i as u64, sge) }?;
        }
        let request = CmRequest::for_queue(self.params.qid, self.slots.depth(), cntlid).to_bytes();
        conn.id.connect(ConnParam {
            private_data: &request,
            // The target reads our data by RDMA READ: as many at once as the device serves.
            responder_resources: limits.max_qp_rd_atom.min(255) as u8,
            initiator_depth: 0,
            retry_count: 7,
            rnr_retry_count: 7,
        })?;
        conn.regions = Some(regions);
        conn.cq = Some(cq);
        Ok(())
    }

    fn send_fabrics_connect(&mut self, cntlid: u16) -> Result<()> {
        let p = &self.params;
        let sqe = Connect {
            recfmt: 0,
            qid: p.qid,
            sqsize: u32::from(self.slots.depth()),
            cattr: if p.qid == 0 { 0 } else { CATTR_DISABLE_SQFLOW },
            kato: p.kato_ms,
        }
        .to_command(0);
        let data = ConnectData::new(p.hostid, cntlid, &p.subnqn, &p.hostnqn)
            .ok_or_else(|| Error::Unsupported("NQN longer than 255 bytes".into()))?;
        let cid = self.slots.internal_cid();
        self.internal_done = None;
        self.start_cmd(cid, sqe, Dir::ToCtrl, None, 0, true);
        self.send_capsule(cid, Some(data.as_bytes()))
    }

    /// Sends again every command active from a previous connection or submitted while
    /// connecting; gives up on those lost too often.
    fn resend_active(&mut self) -> Result<()> {
        for cid in self.slots.resend_after_reconnect(self.qid()) {
            self.send_capsule(cid, None)?;
        }
        Ok(())
    }

    /// Drops the connection (its queue pair first, so the device stops). Active commands stay
    /// in their slots, to go out again on the next connection or be failed by `fail_all`.
    pub fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.state == ConnState::Up {
                let _ = conn.id.disconnect();
            }
            drop(conn);
        }
        self.state = ConnState::Down;
        self.slots.connection_lost();
        for s in self.slots.iter_mut() {
            s.t = RdmaSlot::default();
        }
    }

    /// Disconnects after a failure of the connection and returns the error to report.
    fn lost(&mut self, e: Error) -> Error {
        warn!(qid = self.qid(), addr = %self.endpoint.addr, "RDMA connection lost: {e}");
        self.disconnect();
        e
    }

    // ---------------------------------------------------------------- commands

    fn start_cmd(
        &mut self,
        cid: u16,
        sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
        internal: bool,
    ) {
        self.slots.start(cid, sqe, dir, buf, tag, internal).t = RdmaSlot::default();
    }

    /// Takes a command; it goes out at once when connected, else when the connection is up.
    /// Returns the buffer back if no slot is free or it is longer than a slot carries (the
    /// queue pair above checks lengths and writable buffers first).
    pub fn submit(
        &mut self,
        sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
    ) -> Result<u16, Option<B>> {
        if buf
            .as_ref()
            .is_some_and(|b| b.len() > MAX_TRANSFER as usize)
        {
            return Err(buf);
        }
        let Some(cid) = self.slots.take() else {
            return Err(buf);
        };
        self.start_cmd(cid, sqe, dir, buf, tag, false);
        if self.is_connected() && self.failure.is_none() {
            if let Err(e) = self.send_capsule(cid, None) {
                // The command stays active, to go out again once reconnected; the next poll
                // reports the failure, which starts that.
                self.failure = Some(e);
            }
        }
        Ok(cid)
    }

    /// Points the command at its slot's data region (copying a write's data there) and
    /// sends its capsule. `data` replaces the slot's buffer (Fabrics Connect's).
    fn send_capsule(&mut self, cid: u16, data: Option<&[u8]>) -> Result<()> {
        let conn = self.conn.as_ref().ok_or(Error::Disconnected)?;
        let regions = conn.regions.as_ref().ok_or(Error::Disconnected)?;
        let s = &mut self.slots[cid as usize];
        let at = cid as usize * MAX_TRANSFER as usize;
        let len = data.map_or(s.len, |d| d.len() as u32);
        if let Some(d) = data {
            self.data.write(at, d);
        } else if s.dir == Dir::ToCtrl && len > 0 {
            self.data.write(at, s.buf.as_deref().unwrap_or(&[]));
        }
        // A small write on an I/O queue rides in the capsule, as far as the controller's
        // IOCCSZ allows: one SEND instead of a SEND and the target's RDMA READ. The admin
        // queue never takes in-capsule data over RDMA (the Linux target posts no buffer for it).
        let in_capsule = self.params.qid != 0
            && data.is_none()
            && s.dir == Dir::ToCtrl
            && len > 0
            && len as usize <= self.params.in_capsule_max;
        let sgl = if len == 0 {
            SglDescriptor::keyed_data_block(0, 0, 0, false)
        } else if in_capsule {
            SglDescriptor::in_capsule(0, len)
        } else {
            SglDescriptor::keyed_data_block(
                regions.data.addr() + at as u64,
                len,
                regions.data.rkey(),
                false,
            )
        };
        s.sqe.set_sgl1(sgl);
        self.capsules.write(cid as usize * SQE, s.sqe.as_bytes());
        let capsule = regions
            .capsules
            .sge(cid as usize * SQE, SQE as u32)
            .expect("inside the region");
        let inline = regions.data.sge(at, len).expect("inside the region");
        let sges: &[_] = if in_capsule {
            &[capsule, inline]
        } else {
            &[capsule]
        };
        // SAFETY: the capsule and the data range stay untouched until the command finishes,
        // which waits for both the send's completion and the response (which follows the
        // target's data transfer).
        unsafe { conn.id.post_send(u64::from(cid), SendOp::Send, sges, true) }?;
        s.capsule_sent = true;
        s.t.send_pending = true;
        s.t.response = None;
        Ok(())
    }

    /// Takes work completions until `max` commands have finished (each completion finishes
    /// at most one), or none are left.
    pub fn poll(&mut self, max: usize, on_done: &mut impl FnMut(Done<B>)) -> Result<usize> {
        if !self.is_connected() {
            return Err(Error::Disconnected);
        }
        if let Some(e) = self.failure.take() {
            return Err(self.lost(e));
        }
        let mut n = self.slots.deliver_given_up(on_done);
        let got = self.process(max.saturating_sub(n), &mut |d| {
            n += 1;
            on_done(d)
        })?;
        if got == 0 && self.events_read.elapsed() >= EVENTS_EVERY {
            self.events_read = Instant::now();
            self.check_connection()?;
        }
        Ok(n)
    }

    /// An idle queue's look at its connection events: a disconnect or a device removal ends
    /// the connection.
    fn check_connection(&mut self) -> Result<()> {
        let event = match self.next_cm_event() {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.lost(e)),
        };
        let e = match event.kind {
            CmEventKind::Disconnected => Error::Closed,
            other => Error::RdmaConnect(format!("{} (status {})", other.name(), event.status)),
        };
        Err(self.lost(e))
    }

    /// Takes up to `max` waiting work completions; returns how many there were.
    fn process(&mut self, max: usize, on_done: &mut impl FnMut(Done<B>)) -> Result<usize> {
        let mut wcs = [WorkCompletion::default(); 32];
        let mut total = 0;
        loop {
            let want = wcs.len().min(max - total);
            if want == 0 {
                return Ok(total);
            }
            let polled = match self.conn.as_ref().and_then(|c| c.cq.as_ref()) {
                Some(cq) => cq.poll(&mut wcs[..want]),
                None => return Err(Error::Disconnected),
            };
            let n = match polled {
                Ok(n) => n,
                Err(e) => return Err(self.lost(e.into())),
            };
            for wc in &wcs[..n] {
                if let Err(e) = self.completed(wc, on_done) {
                    return Err(self.lost(e));
                }
            }
            total += n;
            if n < want {
                return Ok(total);
            }
        }
    }

    fn completed(&mut self, wc: &WorkCompletion, on_done: &mut impl FnMut(Done<B>)) -> Result<()> {
        if let Err(e) = wc.result() {
            // The first failure moves the queue pair to the error state and flushes all the
            // rest; a flush with no failure before it (a fatal device event) means the same.
            return Err(Error::Protocol(format!("queue {}: {e}", self.qid())));
        }
        if wc.wr_id() & RECV == 0 {
            // A capsule went out: its buffer is ours again, and the command may finish.
            let cid = wc.wr_id() as usize;
            let Some(s) = self.slots.get_mut(cid) else {
                return Err(Error::Protocol(format!("a send completion for slot {cid}")));
            };
            s.t.send_pending = false;
            if let Some((status, dw0, dw1)) = s.t.response.take() {
                self.deliver(cid as u16, status, dw0, dw1, on_done);
            }
            return Ok(());
        }
        let i = (wc.wr_id() & 0xffff) as usize;
        if wc.op() != CompletedOp::Recv || i >= self.slots.len() {
            return Err(Error::Protocol(format!(
                "unexpected work completion {wc:?}"
            )));
        }
        let mut bytes = [0u8; CQE];
        self.responses.read(i * CQE, &mut bytes);
        self.repost_recv(i)?;
        if (wc.byte_len() as usize) < CQE {
            return Err(Error::Protocol(format!(
                "a {}-byte response capsule",
                wc.byte_len()
            )));
        }
        let c = Completion::read(&bytes).expect("16 bytes");
        let cid = c.cid();
        if !self.slots.answerable(cid) {
            warn!(
                qid = self.qid(),
                cid, "response for no command out on this connection; ignored"
            );
            return Ok(());
        }
        let s = &mut self.slots[cid as usize];
        let response = (c.status(), c.result.get(), c.dw1.get());
        if s.t.send_pending {
            s.t.response = Some(response);
        } else {
            self.deliver(cid, response.0, response.1, response.2, on_done);
        }
        Ok(())
    }

    /// A command's response and its send's completion are both in: finish it.
    fn deliver(
        &mut self,
        cid: u16,
        status: Status,
        dw0: u32,
        dw1: u32,
        on_done: &mut impl FnMut(Done<B>),
    ) {
        if self.slots[cid as usize].internal {
            self.internal_done = Some((status, dw0));
            self.slots.finish(cid, status, dw0, dw1);
        } else {
            on_done(self.finish(cid, status, dw0, dw1));
        }
    }

    fn repost_recv(&mut self, i: usize) -> Result<()> {
        let conn = self.conn.as_ref().ok_or(Error::Disconnected)?;
        let regions = conn.regions.as_ref().ok_or(Error::Disconnected)?;
        let sge = regions
            .responses
            .sge(i * CQE, CQE as u32)
            .expect("inside the region");
        // SAFETY: response buffer i was copied out above; it is read again only after this
        // receive completes.
        unsafe { conn.id.post_recv(RECV | i as u64, sge) }?;
        Ok(())
    }

    /// Ends the command in slot `cid`, a read's data copied out of its data region first.
    fn finish(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) -> Done<B> {
        let s = &mut self.slots[cid as usize];
        if s.dir == Dir::ToHost && status.is_success() {
            if let Some(dst) = s.buf.as_mut().and_then(|b| b.bytes_mut()) {
                self.data.read(cid as usize * MAX_TRANSFER as usize, dst);
            }
        }
        self.slots.finish(cid, status, dw0, dw1)
    }

    pub fn fail_one(&mut self, cid: u16, status: Status) -> Done<B> {
        self.finish(cid, status, 0, 0)
    }

    pub fn for_each_active(&mut self, f: impl FnMut(u16, &mut u64, &mut bool, u64)) {
        self.slots.for_each_active(f)
    }

    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        self.slots.fail_all(status, on_done)
    }
}
