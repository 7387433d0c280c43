//! One NVMe/RDMA queue pair: capsules from its receives, data by RDMA READ and WRITE, responses
//! by SEND. Commands and their execution are the transport-neutral queue's ([`NvmeQueue`]);
//! a slot's index names the work of its command (`wr_id`), so a completion finds its command
//! in O(1).
//!
//! Ordering does the bookkeeping: a read's RDMA WRITE goes unsignaled, and the response SEND
//! after it on the same queue pair completes only once the WRITE has, so the SEND's completion
//! frees the slot and its buffer.

use super::memory::{ChunkKeys, DeviceMemory};
use crate::nvmf::controller;
use crate::nvmf::queue::{NvmeQueue, SlotState, Transport};
use crate::nvmf::subsystem::ListenAddr;
use crate::nvmf::{NvmfTarget, TransportOpts};
use nvme_spec::cmd::{sgl_subtype, sgl_type};
use nvme_spec::{Command, Completion, FromBytes, IntoBytes, Status};
use rdma::{
    CmId, CompletionChannel, CompletionQueue, MemoryRegion, SendOp, Sge, SharedReceiveQueue,
    WorkCompletion,
};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub const CAPSULE_LEN: usize = 64;
const CQE_LEN: usize = 16;
/// Response buffers for commands that got no slot (a host past its queue size).
pub const SPARE_RESPONSES: usize = 8;
/// Completions taken per poll of one queue.
const POLL_BATCH: usize = 32;
/// Capsules a queue pair holds in their receives while it waits for slots; past that the
/// host is taken to be sending past its queue size.
const MAX_HELD: usize = 64;

// A work request's id: what it is in the top bits, its receive or slot index below.
const WR_RECV: u64 = 1 << 48;
const WR_SEND: u64 = 2 << 48;
const WR_READ: u64 = 3 << 48;
const WR_WRITE: u64 = 4 << 48;
const WR_SPARE: u64 = 5 << 48;
const WR_INDEX: u64 = (1 << 48) - 1;

/// What the connection manager's thread tells a queue about its connection.
#[derive(Default)]
pub struct ConnEvents {
    /// The host disconnected, the connection failed, or its device went away.
    pub gone: AtomicBool,
}

/// Where a command's data lives in the host's memory (its keyed SGL).
#[derive(Clone, Copy, Default)]
struct Remote {
    addr: u64,
    key: u32,
    /// Send the response with invalidate of `key`.
    invalidate: bool,
}

/// What the listener sets up for a queue before handing it to a reactor.
pub struct Setup {
    pub id: CmId,
    pub cq: Arc<CompletionQueue>,
    pub channel: Arc<CompletionChannel>,
    pub mem: Arc<DeviceMemory>,
    pub buffers: QueueBuffers,
    /// The device's shared receive queue, if the queue pair takes its capsules from there
    /// (`buffers` then holds no receives of its own).
    pub shared: Option<Arc<SharedReceives>>,
    pub events: Arc<ConnEvents>,
    /// RDMA READs we may have outstanding against the host.
    pub max_reads: u16,
    /// The device's name, for the counters (`nvmf_get_stats`).
    pub device_name: String,
}

/// A queue's receive and response buffers: `recvs` capsules of `capsule_len` bytes, then a
/// 16-byte response per slot and the spares; registered once with the device.
pub struct QueueBuffers {
    // Declared first: deregistered before the memory goes.
    mr: MemoryRegion,
    bytes: rdma::DeviceMemory,
    recvs: usize,
    capsule_len: usize,
    responses: usize,
}

impl QueueBuffers {
    pub fn new(
        mem: &DeviceMemory,
        recvs: usize,
        capsule_len: usize,
        slots: usize,
    ) -> rdma::Result<QueueBuffers> {
        let responses = slots + SPARE_RESPONSES;
        let bytes = rdma::DeviceMemory::new(recvs * capsule_len + responses * CQE_LEN);
        let mr = register(mem, &bytes)?;
        Ok(QueueBuffers {
            mr,
            bytes,
            recvs,
            capsule_len,
            responses,
        })
    }

    fn recv_sge(&self, i: usize) -> Option<Sge> {
        self.mr.sge(i * self.capsule_len, self.capsule_len as u32)
    }

    fn response_offset(&self, i: usize) -> usize {
        self.recvs * self.capsule_len + i * CQE_LEN
    }

    /// Posts receive `i`.
    fn post_recv(&self, id: &CmId, i: usize) -> rdma::Result<()> {
        let sge = self
            .recv_sge(i)
            .ok_or_else(|| rdma::Error::Invalid(format!("no receive buffer {i}")))?;
        // SAFETY: the buffer is registered and this queue reads it only after the receive
        // completes.
        unsafe { id.post_recv(WR_RECV | i as u64, sge) }
    }

    /// Posts every receive (before accepting).
    pub fn post_all(&self, id: &CmId) -> rdma::Result<()> {
        (0..self.recvs).try_for_each(|i| self.post_recv(id, i))
    }
}

/// Registers receive or response memory that lives beside its registration (`QueueBuffers`,
/// `SharedReceives`), for the device to write receives into and read responses from.
fn register(mem: &DeviceMemory, bytes: &rdma::DeviceMemory) -> rdma::Result<MemoryRegion> {
    // SAFETY: both owners declare the registration before the memory, so it is dropped first;
    // a range is touched by the queue only before the work naming it is posted or after it
    // completed (a shared receive by the one queue whose completion named it).
    unsafe {
        MemoryRegion::register(
            &mem.pd,
            bytes.as_mut_ptr(),
            bytes.len(),
            rdma::Access::LOCAL_WRITE,
        )
    }
}

/// A device's shared receive queue and its capsule buffers, registered once: every queue pair
/// of the device (through one listener) takes its capsules from here, so memory for
/// receives follows `max_srq_depth`, not the number of queue pairs.
pub struct SharedReceives {
    srq: Arc<SharedReceiveQueue>,
    // Declared before the memory: deregistered first.
    mr: MemoryRegion,
    bytes: rdma::DeviceMemory,
    count: usize,
    capsule_len: usize,
}

impl SharedReceives {
    /// `count` receives of `capsule_len` bytes, all posted.
    pub fn new(mem: &DeviceMemory, count: u32, capsule_len: usize) -> rdma::Result<Self> {
        let srq = SharedReceiveQueue::new(&mem.pd, count, 1)?;
        let bytes = rdma::DeviceMemory::new(count as usize * capsule_len);
        let mr = register(mem, &bytes)?;
        let shared = SharedReceives {
            srq,
            mr,
            bytes,
            count: count as usize,
            capsule_len,
        };
        (0..shared.count).try_for_each(|i| shared.post(i))?;
        Ok(shared)
    }

    pub fn srq(&self) -> &Arc<SharedReceiveQueue> {
        &self.srq
    }

    fn post(&self, i: usize) -> rdma::Result<()> {
        let sge = self
            .mr
            .sge(i * self.capsule_len, self.capsule_len as u32)
            .ok_or_else(|| rdma::Error::Invalid(format!("no shared receive buffer {i}")))?;
        // SAFETY: the buffer is registered; whoever gets its completion reads it, then posts
        // it again.
        unsafe { self.srq.post_recv(WR_RECV | i as u64, sge) }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    /// Disconnected and the queue pair destroyed: waiting for bdev I/O to drain.
    Closed,
}

/// An RDMA queue pair's own state; the queue it carries is `NvmeQueue<Rdma>` ([`RdmaConn`]).
pub struct Rdma {
    // Declared first: the queue pair goes before the buffers its work names.
    id: CmId,
    cq: Arc<CompletionQueue>,
    channel: Arc<CompletionChannel>,
    buffers: QueueBuffers,
    shared: Option<Arc<SharedReceives>>,
    mem: Arc<DeviceMemory>,
    events: Arc<ConnEvents>,
    state: State,
    remote: Vec<Remote>,
    spare_free: Vec<u16>,
    reads_in_flight: u16,
    max_reads: u16,
    /// Writes whose RDMA READ waits for room under `max_reads`.
    pending_reads: VecDeque<u16>,
    /// Capsules (receive index, length) held in their receives until a slot frees: the host
    /// may reuse a command's slot as soon as it has the response, before the response's send
    /// completes here (the device's ACK can lag, soft-RoCE's under load by dozens).
    held: VecDeque<(usize, usize)>,
    /// The completion queue will notify its channel at the next completion.
    armed: bool,
    /// The group saw the channel readable: a notification waits to be taken.
    pub(super) notified: bool,
    /// The pool chunks this queue has moved data through, with their keys.
    chunks: ChunkKeys,
    wc: [WorkCompletion; POLL_BATCH],
    /// This reactor's counters for the device.
    stats: Arc<super::DeviceStats>,
}

pub type RdmaConn = NvmeQueue<Rdma>;

impl Rdma {
    /// The descriptor that is readable when the queue has completions while armed.
    pub fn wake_fd(&self) -> RawFd {
        self.channel.fd()
    }

    pub(super) fn is_armed(&self) -> bool {
        self.armed
    }

    /// Where capsules arrive: the shared receives' memory, or this queue's own; and how many
    /// receives and how long each.
    fn receives(&self) -> (&rdma::DeviceMemory, usize, usize) {
        match &self.shared {
            Some(s) => (&s.bytes, s.count, s.capsule_len),
            None => (
                &self.buffers.bytes,
                self.buffers.recvs,
                self.buffers.capsule_len,
            ),
        }
    }

    /// Gives back the shared receives that completions a closed queue will not handle name.
    fn return_receives(&self, wcs: &[WorkCompletion]) {
        if self.shared.is_none() {
            return;
        }
        for wc in wcs {
            if wc.wr_id() & !WR_INDEX == WR_RECV {
                let _ = self.repost((wc.wr_id() & WR_INDEX) as usize);
            }
        }
    }

    /// Posts receive `i` again, where it came from.
    fn repost(&self, i: usize) -> rdma::Result<()> {
        match &self.shared {
            Some(s) => s.post(i),
            None => self.buffers.post_recv(&self.id, i),
        }
    }
}

impl RdmaConn {
    pub fn new_rdma(
        setup: Setup,
        target: Arc<NvmfTarget>,
        opts: Arc<TransportOpts>,
        listen: ListenAddr,
        peer: String,
        reactor: usize,
    ) -> RdmaConn {
        let slots = setup.buffers.responses - SPARE_RESPONSES;
        let stats = target
            .poll_group_stats(reactor)
            .rdma_device(&setup.device_name);
        let t = Rdma {
            id: setup.id,
            cq: setup.cq,
            channel: setup.channel,
            buffers: setup.buffers,
            shared: setup.shared,
            mem: setup.mem,
            events: setup.events,
            state: State::Live,
            remote: vec![Remote::default(); slots],
            spare_free: (slots as u16..(slots + SPARE_RESPONSES) as u16).collect(),
            reads_in_flight: 0,
            max_reads: setup.max_reads.max(1),
            pending_reads: VecDeque::new(),
            held: VecDeque::new(),
            armed: false,
            notified: false,
            chunks: ChunkKeys::default(),
            wc: [WorkCompletion::default(); POLL_BATCH],
            stats,
        };
        NvmeQueue::with_transport(t, target, opts, listen, peer, reactor)
    }

    /// The work of one poll. Returns (did work, finished for good).
    pub fn step(&mut self) -> (bool, bool) {
        let mut busy = false;
        if self.t.state == State::Live {
            if self.t.events.gone.load(Ordering::Acquire) {
                self.close();
            } else {
                busy |= self.poll_cq();
                if !self.t.held.is_empty() {
                    busy |= self.release_held();
                }
                if !self.buf_waiting.is_empty() {
                    busy |= self.admit_waiting();
                }
                busy |= self.poll_io();
                self.check_controller();
                if !busy && !self.t.armed && self.t.state == State::Live {
                    // Quiet: ask for a wake-up, then look once more for what came meanwhile.
                    self.t.armed = self.t.cq.arm().is_ok();
                    busy |= self.poll_cq();
                }
            }
        }
        if self.t.state == State::Closed {
            busy |= self.ns.poll(&mut |_| {}) > 0;
            if self.ns.in_flight() == 0 {
                self.release_queue();
                return (true, true);
            }
        }
        if self.qid != 0 && (!self.retry.is_empty() || self.ns.awaiting_device() > 0) {
            busy = true;
        }
        (busy, false)
    }

    /// The group's periodic look: a queue that has not connected in time is closed.
    pub fn sweep(&mut self) {
        let connect = u64::from(self.opts.connect_timeout_ms);
        if self.t.state == State::Live
            && self.ctrl.is_none()
            && connect > 0
            && controller::now_ms().saturating_sub(self.born_ms) > connect
        {
            crate::log_limited!(
                INFO,
                "nvmf/rdma {}: no Connect within {connect} ms; closing",
                self.peer
            );
            self.close();
        }
    }

    /// Disconnects and destroys the queue pair: the device stops touching our memory, so
    /// the slots' buffers may go as their commands end.
    pub fn close(&mut self) {
        if self.t.state == State::Closed {
            return;
        }
        self.t.state = State::Closed;
        let _ = self.t.id.disconnect();
        self.t.id.destroy_qp();
        if self.t.shared.is_some() {
            // Capsules that came for this queue pair and were never looked at hold shared
            // receives: give them back, or the device's queue shrinks with every close.
            // (Its own array: `poll_cq` may be half way through `wc`.)
            let mut left = [WorkCompletion::default(); POLL_BATCH];
            while let Ok(n) = self.t.cq.poll(&mut left) {
                self.t.return_receives(&left[..n]);
                if n == 0 {
                    break;
                }
            }
        }
        // Whatever waited for the device will not hear from it again.
        self.t.pending_reads.clear();
        for (index, _) in std::mem::take(&mut self.t.held) {
            if self.t.shared.is_some() {
                let _ = self.t.repost(index);
            }
        }
        for si in 0..self.slots.len() as u16 {
            if matches!(
                self.slots[si as usize].state,
                SlotState::AwaitData | SlotState::Sending
            ) {
                self.free_slot(si);
            }
        }
    }

    fn poll_cq(&mut self) -> bool {
        // Only when the group saw the channel readable: a read that finds nothing is a
        // wasted system call on every poll.
        if self.t.notified {
            self.t.notified = false;
            if self.t.channel.drain().unwrap_or(0) > 0 {
                self.t.armed = false;
            }
        }
        let mut busy = false;
        loop {
            let n = match self.t.cq.poll(&mut self.t.wc) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("nvmf/rdma {}: completion queue failed: {e}", self.peer);
                    self.close();
                    return true;
                }
            };
            for k in 0..n {
                let wc = self.t.wc[k];
                self.completed(&wc);
                if self.t.state != State::Live {
                    let rest = self.t.wc;
                    self.t.return_receives(&rest[k + 1..n]);
                    return true;
                }
            }
            busy |= n > 0;
            if n < POLL_BATCH {
                return busy;
            }
        }
    }

    fn completed(&mut self, wc: &WorkCompletion) {
        let index = (wc.wr_id() & WR_INDEX) as usize;
        if let Err(e) = wc.result() {
            self.t.return_receives(std::slice::from_ref(wc));
            if !e.is_flush() {
                crate::log_limited!(
                    WARN,
                    "nvmf/rdma {}: {:?} work failed: {e}; closing the queue pair",
                    self.peer,
                    wc.op()
                );
            }
            return self.close();
        }
        match wc.wr_id() & !WR_INDEX {
            WR_RECV => self.capsule_arrived(index, wc.byte_len() as usize),
            WR_SEND => self.free_slot(index as u16),
            WR_SPARE => self.t.spare_free.push(index as u16),
            WR_READ => {
                self.t.reads_in_flight -= 1;
                let s = &mut self.slots[index];
                if s.state == SlotState::AwaitData {
                    s.recvd = s.xfer_len;
                    s.state = SlotState::RecvData;
                    self.awaiting_data -= 1;
                    self.data_arrived(index as u16);
                }
                self.start_pending_reads();
            }
            _ => {
                tracing::warn!(
                    "nvmf/rdma {}: completion of unknown work {:#x} ({:?})",
                    self.peer,
                    wc.wr_id(),
                    wc.op()
                );
            }
        }
    }

    /// A command capsule came into receive `index`: the command (and its in-capsule data)
    /// is copied out, the receive posted again, and the command started; or, while no slot
    /// is free, the capsule waits in its receive (`held`).
    fn capsule_arrived(&mut self, index: usize, len: usize) {
        let recvs = self.t.receives().1;
        if len < CAPSULE_LEN || index >= recvs {
            if index < recvs && self.t.shared.is_some() {
                let _ = self.t.repost(index);
            }
            crate::log_limited!(
                WARN,
                "nvmf/rdma {}: a {len}-byte capsule (at least {CAPSULE_LEN}); closing",
                self.peer
            );
            return self.close();
        }
        // In order: once one capsule waits for a slot, those after it wait too.
        let waits = !self.t.held.is_empty() || !self.has_free_slot();
        if waits && self.t.state == State::Live && self.t.held.len() < MAX_HELD {
            self.t.held.push_back((index, len));
            crate::bdev::bump(&self.t.stats.pending_free_request, 1);
            return;
        }
        self.start_arrived(index, len);
    }

    /// Starts the capsules held for a slot, as far as slots are free.
    fn release_held(&mut self) -> bool {
        let mut started = false;
        while self.t.state == State::Live && self.has_free_slot() {
            let Some((index, len)) = self.t.held.pop_front() else {
                break;
            };
            self.start_arrived(index, len);
            started = true;
        }
        started
    }

    /// Takes a slot for the capsule in receive `index` (checked) and starts its command.
    fn start_arrived(&mut self, index: usize, len: usize) {
        let capsule_len = self.t.receives().2;
        let base = index * capsule_len;
        let mut raw = [0u8; CAPSULE_LEN];
        self.t.receives().0.read(base, &mut raw);
        let cmd = Command::read_from_bytes(&raw).expect("64 bytes");
        let in_capsule = (len - CAPSULE_LEN) as u32;
        if let Some(si) = self.take_slot(cmd) {
            crate::bdev::bump(&self.t.stats.requests, 1);
            self.start_capsule(si, &cmd, base, in_capsule);
        }
        // A shared receive goes back even when this queue pair has just closed.
        if self.t.state == State::Live || self.t.shared.is_some() {
            if let Err(e) = self.t.repost(index) {
                tracing::warn!("nvmf/rdma {}: cannot post a receive: {e}", self.peer);
                self.close();
            }
        }
    }

    /// Reads the command's SGL and starts it: in-capsule data copied into its buffer, or a
    /// keyed data block remembered for the READ or WRITE to come.
    fn start_capsule(&mut self, si: u16, cmd: &Command, base: usize, in_capsule: u32) {
        let sgl = cmd.sgl1();
        let mut refused = None;
        // A slot is reused: only this command's own key may be written to or invalidated.
        self.t.remote[si as usize] = Remote::default();
        let (xfer_len, in_capsule_data) = match (sgl.desc_type(), sgl.subtype()) {
            (sgl_type::DATA_BLOCK, sgl_subtype::OFFSET) => {
                let (offset, len) = (sgl.addr(), sgl.len());
                if offset.saturating_add(u64::from(len)) > u64::from(in_capsule)
                    || len > self.opts.in_capsule_data_size
                {
                    refused = Some(Status::SGL_INVALID_OFFSET);
                }
                (len, true)
            }
            (sgl_type::KEYED_DATA_BLOCK, sub)
                if sub == sgl_subtype::ADDRESS || sub == sgl_subtype::INVALIDATE_KEY =>
            {
                self.t.remote[si as usize] = Remote {
                    addr: sgl.addr(),
                    key: sgl.keyed_key(),
                    invalidate: sub == sgl_subtype::INVALIDATE_KEY,
                };
                (sgl.keyed_len(), false)
            }
            _ => {
                refused = Some(Status::SGL_INVALID_TYPE);
                (0, false)
            }
        };
        if self.start_command(si, xfer_len, in_capsule_data, refused) {
            let offset = base + CAPSULE_LEN + sgl.addr() as usize;
            let s = &mut self.slots[si as usize];
            if let Some(b) = s.buf.as_mut().and_then(|b| b.bytes_mut()) {
                self.t
                    .receives()
                    .0
                    .read(offset, &mut b[..xfer_len as usize]);
            }
            self.data_arrived(si);
        }
    }

    /// Posts the RDMA READs that waited for room.
    fn start_pending_reads(&mut self) {
        while self.t.reads_in_flight < self.t.max_reads {
            let Some(si) = self.t.pending_reads.pop_front() else {
                return;
            };
            self.post_read(si);
        }
    }

    fn post_read(&mut self, si: u16) {
        let s = &self.slots[si as usize];
        let Some(buf) = s.buf.as_ref() else { return };
        let remote = self.t.remote[si as usize];
        let local = match self.t.chunks.sge(&self.t.mem, buf.addr(), s.xfer_len) {
            Ok(sge) => sge,
            Err(e) => return self.fail_transfer(si, &e),
        };
        // SAFETY: the slot's buffer is pool memory registered with this device; the slot
        // waits (AwaitData) and leaves it alone until the READ completes or the queue pair
        // is destroyed.
        let posted = unsafe {
            self.t.id.post_send(
                WR_READ | u64::from(si),
                SendOp::RdmaRead {
                    remote_addr: remote.addr,
                    rkey: remote.key,
                },
                &[local],
                true,
            )
        };
        match posted {
            Ok(()) => self.t.reads_in_flight += 1,
            Err(e) => {
                tracing::warn!("nvmf/rdma {}: cannot post an RDMA READ: {e}", self.peer);
                self.close();
            }
        }
    }

    /// Ends a transfer that cannot be made (its buffer cannot be reached by the device).
    fn fail_transfer(&mut self, si: u16, why: &str) {
        crate::log_limited!(WARN, "nvmf/rdma {}: {why}", self.peer);
        let s = &mut self.slots[si as usize];
        if s.state == SlotState::AwaitData {
            s.state = SlotState::RecvData;
            self.awaiting_data -= 1;
        }
        self.slots[si as usize].status = Status::INTERNAL;
        self.data_arrived(si);
    }

    /// Posts response `cqe` from response buffer `index`, after the read data if `data`.
    fn post_response(
        &mut self,
        index: usize,
        wr_id: u64,
        cqe: &Completion,
        data: Option<Sge>,
        remote: Remote,
    ) -> bool {
        let offset = self.t.buffers.response_offset(index);
        self.t.buffers.bytes.write(offset, cqe.as_bytes());
        let Some(resp) = self.t.buffers.mr.sge(offset, CQE_LEN as u32) else {
            return false;
        };
        if let Some(local) = data {
            // SAFETY: the slot's buffer is registered pool memory, left alone while Sending.
            let posted = unsafe {
                self.t.id.post_send(
                    WR_WRITE | (wr_id & WR_INDEX),
                    SendOp::RdmaWrite {
                        remote_addr: remote.addr,
                        rkey: remote.key,
                    },
                    &[local],
                    false,
                )
            };
            if let Err(e) = posted {
                tracing::warn!("nvmf/rdma {}: cannot post an RDMA WRITE: {e}", self.peer);
                return false;
            }
        }
        let op = if remote.invalidate {
            SendOp::SendInvalidate { rkey: remote.key }
        } else {
            SendOp::Send
        };
        // SAFETY: the response buffer is registered, written above, and not written again
        // until this SEND completes (its slot or spare index is busy until then).
        match unsafe { self.t.id.post_send(wr_id, op, &[resp], true) } {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("nvmf/rdma {}: cannot post a response: {e}", self.peer);
                false
            }
        }
    }
}

impl Transport for Rdma {
    const NAME: &'static str = "nvmf/rdma";

    fn fetch_data(q: &mut RdmaConn, si: u16) {
        if q.t.state != State::Live {
            return;
        }
        if q.t.reads_in_flight < q.t.max_reads {
            q.post_read(si);
        } else {
            q.t.pending_reads.push_back(si);
            crate::bdev::bump(&q.t.stats.pending_rdma_read, 1);
        }
    }

    fn respond(q: &mut RdmaConn, si: u16, cqe: Completion, with_data: bool) {
        if q.t.state != State::Live {
            return q.free_slot(si);
        }
        let remote = q.t.remote[si as usize];
        let mut data = None;
        if with_data {
            let s = &q.slots[si as usize];
            let buf = s.buf.as_ref().expect("checked by complete");
            match q.t.chunks.sge(&q.t.mem, buf.addr(), s.xfer_len) {
                Ok(sge) => data = Some(sge),
                Err(e) => {
                    crate::log_limited!(WARN, "nvmf/rdma {}: {e}", q.peer);
                    let mut failed = cqe;
                    failed.set_status(Status::INTERNAL);
                    failed.result.set(0);
                    return Self::respond(q, si, failed, false);
                }
            }
        }
        q.slots[si as usize].state = SlotState::Sending;
        if !q.post_response(si as usize, WR_SEND | u64::from(si), &cqe, data, remote) {
            q.close();
        }
    }

    fn send_cqe(q: &mut RdmaConn, cqe: Completion) {
        if q.t.state != State::Live {
            return;
        }
        let Some(index) = q.t.spare_free.pop() else {
            crate::log_limited!(
                WARN,
                "nvmf/rdma {}: the host keeps sending past its queue size; closing",
                q.peer
            );
            return q.close();
        };
        let ok = q.post_response(
            usize::from(index),
            WR_SPARE | u64::from(index),
            &cqe,
            None,
            Remote::default(),
        );
        if !ok {
            q.close();
        }
    }

    fn close(q: &mut RdmaConn) {
        q.close();
    }
}
