//! One NVMe-oF queue pair, whatever carries it: command slots, execution against the
//! controller and the bdevs, the data budget, and completions. A transport (TCP, RDMA) owns
//! the wire: it turns what arrives into commands with their data, fetches write data the
//! host holds (an R2T, an RDMA READ) and sends read data and responses. The queue is generic
//! over its transport ([`Transport`]) so the hot path has no dynamic dispatch.
//!
//! Commands live in preallocated slots (a free list); a slot's index is the tag the transport
//! uses to find its command again (TCP's R2T transfer tag, RDMA's work request id), so
//! nothing here allocates per I/O except taking a `DmaBuf` from the pool's per-thread cache
//! (and not even that for in-capsule data a transport lends from its receive buffer).
//!
//! Here: slots, the path of a command up to its execution (data budget, waiting, fetching
//! data) and the responses; `exec.rs` carries commands out and takes the bdevs' completions.

use super::controller::{self, AdminOutcome, ConnInfo, Controller, MAX_AERS};
use super::io::{data_direction, is_reservation_opcode, nvme_status, supported_io_opcode, NsTable};
use super::subsystem::ListenAddr;
use super::{NvmfTarget, TransportOpts};
use crate::bdev::{BdevIo, BufView, IoCompletion, IoType};
use nvme_spec::cmd::{DatasetManagement, DsmRange, ReadWrite, WriteZeroes};
use nvme_spec::fabrics::{PropertyGet, PropertySet};
use nvme_spec::opcode::{fctype, io, DataDirection};
use nvme_spec::{Command, Completion, Status};
use smallvec::smallvec;
use std::collections::VecDeque;
use std::sync::Arc;

/// Slots before Connect (Connect itself, maybe a few more in flight).
const PRE_CONNECT_SLOTS: usize = 4;
/// Slots beyond the queue size, for commands whose response is still being sent when the
/// host (legitimately) reuses their cid.
const EXTRA_SLOTS: usize = 32;

/// The most slots a queue of `depth` entries uses: what a transport sizes per-slot resources
/// by.
pub fn max_slots(depth: u16) -> usize {
    (usize::from(depth) + EXTRA_SLOTS).max(PRE_CONNECT_SLOTS)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    /// Receiving in-capsule data or the host's write data.
    RecvData,
    /// Write data asked for (an R2T sent, an RDMA READ posted), not all of it in yet.
    AwaitData,
    /// Waiting in `buf_waiting` for the data budget to lend it a buffer.
    AwaitBuf,
    /// At the bdev.
    Exec,
    /// An AER held until an event.
    HeldAer,
    /// Its read data is on its way to the host; freed once sent.
    Sending,
}

pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) cmd: Command,
    /// Its data: a buffer of its own, or in-capsule data lent by the transport.
    pub(super) buf: Option<BufView>,
    pub(super) dir: DataDirection,
    pub(super) xfer_len: u32,
    /// Write data bytes received so far.
    pub(super) recvd: u32,
    /// Sub-I/O outstanding (DSM fans out).
    pending: u16,
    /// Next DSM range to submit.
    next_range: u16,
    pub(super) status: Status,
    /// The namespace's preempt-and-abort count when the command arrived.
    abort_seen: u64,
    /// When it last began waiting for the host's write data.
    pub(super) waiting_since_ms: u64,
    /// Bytes of the target's data budget its buffer holds.
    charged: u32,
}

impl Slot {
    /// Its data, to fill or change: `None` when it has no buffer (or, never here, one that
    /// another view shares).
    pub(super) fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        self.buf.as_mut().and_then(|b| b.bytes_mut())
    }

    /// As [`Self::bytes_mut`], empty when there is no buffer.
    pub(super) fn data_mut(&mut self) -> &mut [u8] {
        self.bytes_mut().unwrap_or_default()
    }
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: SlotState::Free,
            cmd: Command::default(),
            buf: None,
            dir: DataDirection::None,
            xfer_len: 0,
            recvd: 0,
            pending: 0,
            next_range: 0,
            status: Status::SUCCESS,
            abort_seen: 0,
            waiting_since_ms: 0,
            charged: 0,
        }
    }
}

/// What a transport does for the queue. Each function takes the whole queue: the transport's
/// own state is `q.t`, and it reads the slots it sends from.
pub trait Transport: Sized {
    /// The log prefix, "nvmf/tcp".
    const NAME: &'static str;
    /// Header and data digests in use, for the controller's record of the queue.
    fn digests(&self) -> (bool, bool) {
        (false, false)
    }
    /// Asks the host for write data of slot `si`, which holds its buffer and waits in
    /// `AwaitData`; the transport calls [`NvmeQueue::data_arrived`] when all of it is in.
    fn fetch_data(q: &mut NvmeQueue<Self>, si: u16);
    /// Sends slot `si`'s read data (when `with_data`) and then `cqe`, and frees the slot
    /// ([`NvmeQueue::free_slot`]) once nothing it sends still refers to its buffer.
    fn respond(q: &mut NvmeQueue<Self>, si: u16, cqe: Completion, with_data: bool);
    /// Sends a response for a command that got no slot.
    fn send_cqe(q: &mut NvmeQueue<Self>, cqe: Completion);
    /// Ends the connection in good order (controller failed, Disconnect, keep-alive lost).
    fn close(q: &mut NvmeQueue<Self>);
}

pub struct NvmeQueue<T> {
    /// The transport's own state.
    pub(super) t: T,
    pub(super) target: Arc<NvmfTarget>,
    pub(super) opts: Arc<TransportOpts>,
    pub(super) listen: ListenAddr,
    pub peer: String,
    pub(super) reactor: usize,
    pub(super) slots: Vec<Slot>,
    free: Vec<u16>,
    pub(super) retry: VecDeque<u16>,
    aers: Vec<u16>,
    pub(super) ns: NsTable,
    pub(super) ctrl: Option<Arc<Controller>>,
    pub(super) qid: u16,
    sqsize: u16,
    sqhd: u16,
    epoch: u32,
    /// When the connection was accepted.
    pub(super) born_ms: u64,
    /// Slots waiting for the host's write data (AwaitData).
    pub(super) awaiting_data: u16,
    /// Commands waiting, in arrival order, for the data budget (AwaitBuf).
    pub(super) buf_waiting: VecDeque<u16>,
    last_timer_check: u64,
    /// This reactor's poll-group counters.
    pub(super) pg: Arc<crate::nvmf::PollGroupStats>,
}

impl<T: Transport> NvmeQueue<T> {
    pub(super) fn with_transport(
        t: T,
        target: Arc<NvmfTarget>,
        opts: Arc<TransportOpts>,
        listen: ListenAddr,
        peer: String,
        reactor: usize,
    ) -> NvmeQueue<T> {
        let pg = target.poll_group_stats(reactor);
        let mut q = NvmeQueue {
            t,
            target,
            opts,
            listen,
            peer,
            reactor,
            slots: Vec::new(),
            free: Vec::new(),
            retry: VecDeque::new(),
            aers: Vec::with_capacity(MAX_AERS),
            ns: NsTable::default(),
            ctrl: None,
            qid: 0,
            sqsize: PRE_CONNECT_SLOTS as u16,
            sqhd: 0,
            epoch: 0,
            born_ms: controller::now_ms(),
            awaiting_data: 0,
            buf_waiting: VecDeque::new(),
            last_timer_check: 0,
            pg,
        };
        q.grow_slots(PRE_CONNECT_SLOTS);
        q
    }

    fn grow_slots(&mut self, n: usize) {
        let old = self.slots.len();
        if n <= old {
            return;
        }
        self.slots.resize_with(n, Slot::default);
        self.free.reserve(n - old);
        // Lowest indices on top, so a light load reuses the same few slots.
        let mut fresh: Vec<u16> = (old as u16..n as u16).rev().collect();
        fresh.append(&mut self.free);
        self.free = fresh;
    }

    pub(super) fn check_controller(&mut self) {
        let Some(c) = self.ctrl.as_ref() else { return };
        if c.is_failed() || (self.qid != 0 && c.epoch() != self.epoch) {
            T::close(self);
            return;
        }
        if self.qid != 0 {
            return;
        }
        let event = if self.aers.is_empty() {
            None
        } else {
            c.take_event()
        };
        let now = controller::now_ms();
        let mut expired = false;
        if now.saturating_sub(self.last_timer_check) >= 100 {
            self.last_timer_check = now;
            if c.keep_alive_expired(now) {
                c.fail("keep-alive timeout");
                expired = true;
            }
            c.subsys.check_resized();
        }
        if let Some(dw0) = event {
            if let Some(si) = self.aers.pop() {
                self.complete(si, Status::SUCCESS, dw0);
            }
        }
        if expired {
            T::close(self);
        }
    }

    // ---- commands ----

    /// Whether a command arriving now would find a slot.
    pub(super) fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// A command capsule arrived: takes a slot for it. None when the host sent more commands
    /// than its queue holds; that one is answered at once, without a slot.
    pub(super) fn take_slot(&mut self, cmd: Command) -> Option<u16> {
        let Some(si) = self.free.pop() else {
            crate::log_limited!(
                WARN,
                "{} {}: more commands than the queue size",
                T::NAME,
                self.peer
            );
            crate::bdev::bump(&self.pg.commands_past_queue_size, 1);
            let cqe = self.cqe(cmd.cid(), Status::COMMAND_SEQUENCE_ERROR.with_dnr());
            T::send_cqe(self, cqe);
            return None;
        };
        self.sqhd = (self.sqhd + 1) % self.sqsize.max(1);
        // A preempt-and-abort after this point aborts the command if it has not run yet.
        let abort_seen = if self.qid != 0 && !cmd.is_fabrics() {
            self.ns.get(cmd.nsid()).map_or(0, |n| n.ns.resv.abort_gen())
        } else {
            0
        };
        self.slots[si as usize] = Slot {
            cmd,
            dir: data_direction(&cmd),
            state: SlotState::RecvData,
            abort_seen,
            ..Slot::default()
        };
        Some(si)
    }

    /// Starts command `si` once the transport has read its SGL: `xfer_len` bytes of data,
    /// `in_capsule` if they came with the capsule, `refused` what the transport found wrong
    /// with the SGL. Returns true when the slot now holds a buffer for the in-capsule data,
    /// which the transport fills and then reports with [`Self::data_arrived`] (a transport
    /// that put the data in the slot's buffer beforehand only reports it). Otherwise the
    /// command is answered, running, or waiting for the data budget or the host's data.
    pub(super) fn start_command(
        &mut self,
        si: u16,
        xfer_len: u32,
        in_capsule: bool,
        refused: Option<Status>,
    ) -> bool {
        let s = &mut self.slots[si as usize];
        let (cmd, dir) = (s.cmd, s.dir);
        s.xfer_len = xfer_len;
        let mut fail = refused;
        if fail.is_none() && xfer_len > 0 {
            if in_capsule {
                if dir != DataDirection::HostToController {
                    fail = Some(Status::INVALID_FIELD);
                }
            } else if xfer_len > self.opts.max_io_size {
                fail = Some(Status::SGL_INVALID_DATA_LENGTH);
            } else if !matches!(
                dir,
                DataDirection::HostToController | DataDirection::ControllerToHost
            ) {
                fail = Some(Status::INVALID_FIELD);
            }
        }
        let is_connect = cmd.is_fabrics() && cmd.fctype() == fctype::CONNECT;
        if fail.is_none() && self.ctrl.is_none() && !is_connect {
            fail = Some(Status::COMMAND_SEQUENCE_ERROR);
        }
        // In-capsule data is already here and small (in_capsule_data_size): it gets a
        // buffer at once, unless the transport lent it one. Transfers wait for the data
        // budget below.
        let lent = self.slots[si as usize].buf.is_some();
        if fail.is_none() && in_capsule && xfer_len > 0 && !lent {
            match BufView::new(xfer_len as usize) {
                Ok(b) => self.slots[si as usize].buf = Some(b),
                Err(e) => {
                    crate::log_limited!(WARN, "{}: no buffer for {xfer_len} bytes: {e}", T::NAME);
                    fail = Some(Status::INTERNAL);
                }
            }
        }
        if let Some(st) = fail {
            self.complete(si, st.with_dnr(), 0);
            return false;
        }
        if in_capsule && xfer_len > 0 {
            return true;
        }
        if xfer_len > 0 {
            // Check what we can before asking for data the command would not use.
            if dir == DataDirection::HostToController {
                if let Some(st) = self.precheck_write(si) {
                    self.complete(si, st, 0);
                    return false;
                }
            }
            self.slots[si as usize].state = SlotState::AwaitBuf;
            // With nobody waiting ahead of it, it need not queue to start.
            let started = self.buf_waiting.is_empty() && self.start_transfer(si);
            if !started {
                self.buf_waiting.push_back(si);
                self.admit_waiting();
            }
            return false;
        }
        self.exec(si);
        false
    }

    /// All of slot `si`'s write data is in: runs the command, or answers the failure the
    /// transport recorded in its status while the data arrived.
    pub(super) fn data_arrived(&mut self, si: u16) {
        let s = &self.slots[si as usize];
        if s.status.is_success() {
            self.exec(si);
        } else {
            let st = s.status;
            self.complete(si, st, 0);
        }
    }

    /// Starts waiting transfers, in arrival order, while the data budget lends them
    /// buffers: a write gets its R2T, a read is executed. Returns whether any started.
    pub(super) fn admit_waiting(&mut self) -> bool {
        let mut started = false;
        while let Some(si) = self.buf_waiting.pop_front() {
            if self.slots[si as usize].state != SlotState::AwaitBuf {
                // Ended while it waited (an abort, a reset): nothing to start.
                continue;
            }
            if !self.start_transfer(si) {
                self.buf_waiting.push_front(si);
                break;
            }
            started = true;
        }
        started
    }

    /// Lends slot `si` its buffer from the data budget and starts its transfer (a write's
    /// R2T, a read's execution). False, with nothing changed, while the budget or the memory
    /// is short.
    fn start_transfer(&mut self, si: u16) -> bool {
        let len = self.slots[si as usize].xfer_len;
        let budget = &self.target.data_budget;
        // Connect's data (1 KiB) comes before there is a controller to charge; it is the only
        // command let through without one (`start_command`).
        let charged = match self.ctrl.as_ref() {
            Some(ctrl) => {
                if !budget.try_take(&ctrl.data_held, u64::from(len)) {
                    return false;
                }
                len
            }
            None => 0,
        };
        let buf = match BufView::new(len as usize) {
            Ok(b) => b,
            Err(e) => {
                // The memory itself is short: wait for buffers to come back, as when the
                // budget is.
                if let Some(ctrl) = self.ctrl.as_ref() {
                    budget.give_back(&ctrl.data_held, u64::from(charged));
                }
                crate::log_limited!(WARN, "{}: no buffer for {len} bytes yet: {e}", T::NAME);
                return false;
            }
        };
        let s = &mut self.slots[si as usize];
        s.buf = Some(buf);
        s.charged = charged;
        if s.dir == DataDirection::HostToController {
            self.await_data(si);
            T::fetch_data(self, si);
        } else {
            self.exec(si);
        }
        true
    }

    /// Slot `si` waits for the host's write data from now.
    pub(super) fn await_data(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        s.state = SlotState::AwaitData;
        s.waiting_since_ms = controller::now_ms();
        self.awaiting_data += 1;
    }

    /// An I/O write's namespace and range, checked before its R2T.
    fn precheck_write(&mut self, si: u16) -> Option<Status> {
        let cmd = self.slots[si as usize].cmd;
        if self.qid == 0 || cmd.is_fabrics() || cmd.opcode != io::WRITE {
            return None;
        }
        let xfer = self.slots[si as usize].xfer_len;
        let rw = ReadWrite::from_command(&cmd);
        let ns = match self.ns.get(rw.nsid) {
            Some(n) => n,
            None => return Some(Status::INVALID_NAMESPACE.with_dnr()),
        };
        if rw.end_lba().is_none_or(|e| e > ns.ns.num_blocks()) {
            return Some(Status::LBA_OUT_OF_RANGE.with_dnr());
        }
        if u64::from(rw.nblocks) << ns.block_shift != u64::from(xfer) {
            return Some(Status::SGL_INVALID_DATA_LENGTH.with_dnr());
        }
        // No point asking for data a reservation will refuse (it is checked again at exec).
        let host = self.ctrl.as_ref()?.hostid;
        ns.resv_refusal(&host, cmd.opcode, self.slots[si as usize].abort_seen)
    }

    // ---- responses ----

    /// A response to `cid` as this queue sends it now.
    fn cqe(&self, cid: u16, status: Status) -> Completion {
        let mut cqe = Completion::new(cid, status);
        cqe.sqhd.set(self.sqhd);
        cqe.sqid.set(self.qid);
        cqe
    }

    fn complete64(&mut self, si: u16, v: u64) {
        let mut cqe = self.cqe(self.slots[si as usize].cmd.cid(), Status::SUCCESS);
        cqe.set_result64(v);
        T::respond(self, si, cqe, false);
    }

    /// Finishes a command: its read data (if any) then the response, or just the response.
    pub(super) fn complete(&mut self, si: u16, status: Status, dw0: u32) {
        if self.qid != 0 {
            crate::bdev::bump(&self.pg.completed_nvme_io, 1);
        }
        let s = &self.slots[si as usize];
        let with_data = status.is_success()
            && s.dir == DataDirection::ControllerToHost
            && s.xfer_len > 0
            && s.buf.is_some();
        let mut cqe = self.cqe(s.cmd.cid(), status);
        cqe.result.set(dw0);
        T::respond(self, si, cqe, with_data);
    }

    pub(super) fn free_slot(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        if s.state == SlotState::Free {
            return;
        }
        if s.state == SlotState::AwaitData {
            self.awaiting_data -= 1;
        }
        if s.charged > 0 {
            self.uncharge(si);
        }
        let s = &mut self.slots[si as usize];
        s.state = SlotState::Free;
        s.buf = None;
        self.free.push(si);
    }
}

impl<T> NvmeQueue<T> {
    /// Gives slot `si`'s share of the data budget back.
    fn uncharge(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        if s.charged == 0 {
            return;
        }
        let len = u64::from(std::mem::take(&mut s.charged));
        if let Some(c) = self.ctrl.as_ref() {
            self.target.data_budget.give_back(&c.data_held, len);
        }
    }

    /// Unhooks the queue from its controller.
    pub(super) fn release_queue(&mut self) {
        for si in 0..self.slots.len() as u16 {
            self.uncharge(si);
        }
        if let Some(c) = self.ctrl.take() {
            self.pg.qpair_closed(self.qid == 0);
            if self.qid == 0 {
                c.destroy();
            } else {
                c.qpair_closed(self.qid);
            }
        }
    }
}

/// The connection's own buffer back from a bdev. A bdev must hand back the whole buffer it was
/// given; one that kept a share would be a bug, and the command then fails for want of its
/// buffer rather than sending bytes someone else may still change.
fn whole_buf(b: BufView) -> Option<BufView> {
    match b.into_dma() {
        Ok(b) => Some(b.into()),
        Err(v) => {
            tracing::error!("nvmf: a bdev kept a share of an I/O buffer ({v:?})");
            None
        }
    }
}

impl<T> Drop for NvmeQueue<T> {
    fn drop(&mut self) {
        self.release_queue();
    }
}

mod exec;
