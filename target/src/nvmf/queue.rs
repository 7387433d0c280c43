//! One NVMe-oF queue pair, whatever carries it: command slots, execution against the
//! controller and the bdevs, the data budget, and completions. A transport (TCP, RDMA) owns
//! the wire: it turns what arrives into commands with their data, fetches write data the
//! host holds (an R2T, an RDMA READ) and sends read data and responses. The queue is generic
//! over its transport ([`Transport`]) so the hot path has no dynamic dispatch.
//!
//! Commands live in preallocated slots (a free list); a slot's index is the tag the transport
//! uses to find its command again (TCP's R2T transfer tag, RDMA's work request id), so
//! nothing here allocates per I/O except taking a `DmaBuf` from the pool's per-thread cache.

use super::controller::{self, AdminOutcome, ConnInfo, Controller, MAX_AERS};
use super::io::{data_direction, is_reservation_opcode, nvme_status, supported_io_opcode, NsTable};
use super::subsystem::ListenAddr;
use super::{NvmfTarget, TransportOpts};
use crate::bdev::{BdevIo, IoCompletion, IoType};
use dma::DmaBuf;
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
    pub(super) buf: Option<DmaBuf>,
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
    /// which the transport fills and then reports with [`Self::data_arrived`]. Otherwise the
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
        // buffer at once. Transfers wait for the data budget below.
        if fail.is_none() && in_capsule && xfer_len > 0 {
            match DmaBuf::new(xfer_len as usize) {
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
        let buf = match DmaBuf::new(len as usize) {
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

    // ---- execution ----

    fn exec(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        s.state = SlotState::Exec;
        let cmd = s.cmd;
        if cmd.is_fabrics() {
            self.exec_fabrics(si, &cmd);
        } else if self.qid == 0 {
            self.exec_admin(si, &cmd);
        } else {
            self.exec_io(si);
        }
    }

    fn exec_fabrics(&mut self, si: u16, cmd: &Command) {
        match cmd.fctype() {
            fctype::CONNECT => {
                if self.ctrl.is_some() {
                    return self.complete(si, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
                }
                let (hdgst, ddgst) = self.t.digests();
                let info = ConnInfo {
                    listen: &self.listen,
                    peer: &self.peer,
                    reactor: self.reactor,
                    opts: &self.opts,
                    hdgst,
                    ddgst,
                };
                let data = self.slots[si as usize]
                    .buf
                    .as_ref()
                    .map(|b| &b[..])
                    .unwrap_or(&[]);
                match controller::connect(&self.target, &info, cmd, data) {
                    Ok(c) => {
                        let cntlid = c.ctrl.cntlid;
                        self.qid = c.qid;
                        self.sqsize = c.sqsize as u16;
                        self.epoch = c.ctrl.epoch();
                        if c.qid != 0 {
                            self.ns.refresh(&c.ctrl.subsys);
                        }
                        self.ctrl = Some(c.ctrl);
                        self.pg.qpair_opened(self.qid == 0);
                        self.complete(si, Status::SUCCESS, u32::from(cntlid));
                        self.grow_slots(c.sqsize as usize + EXTRA_SLOTS);
                    }
                    Err((status, dw0)) => {
                        crate::log_limited!(
                            INFO,
                            "{} {}: Connect rejected: {}",
                            T::NAME,
                            self.peer,
                            status.name_in(true)
                        );
                        self.complete(si, status, dw0);
                    }
                }
            }
            fctype::PROPERTY_GET if self.qid == 0 => {
                let ctrl = self.ctrl.clone().expect("checked at capsule");
                match PropertyGet::from_command(cmd).map(|p| ctrl.property_get(&p)) {
                    Some(Ok(v)) => {
                        self.complete64(si, v);
                    }
                    Some(Err(s)) => self.complete(si, s, 0),
                    None => self.complete(si, Status::INVALID_FIELD.with_dnr(), 0),
                }
            }
            fctype::PROPERTY_SET if self.qid == 0 => {
                let ctrl = self.ctrl.clone().expect("checked at capsule");
                let st = match PropertySet::from_command(cmd) {
                    Some(p) => ctrl.property_set(&p),
                    None => Status::INVALID_FIELD.with_dnr(),
                };
                self.complete(si, st, 0);
            }
            fctype::DISCONNECT => {
                self.complete(si, Status::SUCCESS, 0);
                T::close(self);
            }
            _ => self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    fn exec_admin(&mut self, si: u16, cmd: &Command) {
        let ctrl = self.ctrl.clone().expect("checked at capsule");
        let mut empty: [u8; 0] = [];
        let out = {
            let s = &mut self.slots[si as usize];
            let data: &mut [u8] = match s.buf.as_mut() {
                Some(b) => &mut b[..],
                None => &mut empty,
            };
            ctrl.admin(&self.target, cmd, data)
        };
        match out {
            AdminOutcome::Done { status, dw0 } => self.complete(si, status, dw0),
            AdminOutcome::HoldAer => {
                if self.aers.len() >= MAX_AERS {
                    self.complete(si, Status::ASYNC_EVENT_LIMIT_EXCEEDED.with_dnr(), 0);
                } else {
                    self.slots[si as usize].state = SlotState::HeldAer;
                    self.aers.push(si);
                }
            }
        }
    }

    fn exec_io(&mut self, si: u16) {
        let cmd = self.slots[si as usize].cmd;
        if !supported_io_opcode(cmd.opcode) {
            return self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0);
        }
        let nsid = cmd.nsid();
        let Some(host) = self.ctrl.as_ref().map(|c| c.hostid) else {
            return self.complete(si, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        let Some(ns) = self.ns.get(nsid) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        if is_reservation_opcode(cmd.opcode) {
            return self.exec_reservation(si, &cmd);
        }
        // Checked here, at the last step before the bdev, so commands that waited (for data,
        // for a full queue) see a preempt that happened meanwhile.
        if let Some(st) = ns.resv_refusal(&host, cmd.opcode, self.slots[si as usize].abort_seen) {
            return self.complete(si, st, 0);
        }
        let nblocks_dev = ns.ns.num_blocks();
        let shift = ns.block_shift;
        let s = &mut self.slots[si as usize];
        let tag = u64::from(si);
        let io = match cmd.opcode {
            io::READ | io::WRITE => {
                let rw = ReadWrite::from_command(&cmd);
                if rw.end_lba().is_none_or(|e| e > nblocks_dev) {
                    return self.complete(si, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                if u64::from(rw.nblocks) << shift != u64::from(s.xfer_len) {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                }
                let Some(buf) = s.buf.take() else {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                };
                let n = u64::from(rw.nblocks);
                if cmd.opcode == io::READ {
                    BdevIo::read(rw.slba, n, smallvec![buf.into()], tag)
                } else {
                    BdevIo::write(rw.slba, n, smallvec![buf.into()], tag)
                }
            }
            io::FLUSH => BdevIo::no_data(IoType::Flush, 0, 0, tag),
            io::WRITE_ZEROES => {
                let wz = WriteZeroes::from_command(&cmd);
                let end = wz.slba.checked_add(u64::from(wz.nblocks));
                if end.is_none_or(|e| e > nblocks_dev) {
                    return self.complete(si, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                BdevIo::no_data(IoType::WriteZeroes, wz.slba, u64::from(wz.nblocks), tag)
            }
            io::DATASET_MANAGEMENT => {
                let dsm = DatasetManagement::from_command(&cmd);
                if !dsm.deallocate {
                    // Attribute hints only: nothing to do.
                    return self.complete(si, Status::SUCCESS, 0);
                }
                if (s.xfer_len as usize) < dsm.data_len() {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                }
                s.status = Status::SUCCESS;
                s.next_range = 0;
                s.pending = 0;
                return self.submit_dsm(si);
            }
            _ => return self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0),
        };
        s.pending = 1;
        let ns = self.ns.get(nsid).expect("looked up above");
        if let Err(io) = ns.chan.submit(io) {
            let s = &mut self.slots[si as usize];
            s.pending = 0;
            s.buf = io.bufs.into_iter().next().and_then(whole_buf);
            crate::bdev::bump(&self.pg.pending_bdev_io, 1);
            self.retry.push_back(si);
        }
    }

    /// Submits the remaining deallocate ranges of a DSM command as unmaps.
    fn submit_dsm(&mut self, si: u16) {
        let cmd = self.slots[si as usize].cmd;
        let dsm = DatasetManagement::from_command(&cmd);
        let nsid = cmd.nsid();
        let Some(ns) = self.ns.get(nsid) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        let dev_blocks = ns.ns.num_blocks();
        // Ranges resubmitted after a full queue must not slip past a preempt either.
        let refusal = match self.ctrl.as_ref() {
            Some(c) => ns.resv_refusal(&c.hostid, cmd.opcode, self.slots[si as usize].abort_seen),
            None => Some(Status::COMMAND_SEQUENCE_ERROR.with_dnr()),
        };
        let s = &mut self.slots[si as usize];
        let Some(buf) = s.buf.as_ref() else {
            return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
        };
        let Some(ranges) = DsmRange::slice_from(&buf[..dsm.data_len()]) else {
            return self.complete(si, Status::INTERNAL, 0);
        };
        let mut i = s.next_range as usize;
        if let Some(st) = refusal {
            s.status = st;
            i = ranges.len();
        }
        let mut stalled = false;
        while i < ranges.len() {
            let r = ranges[i];
            let (slba, nlb) = (r.slba.get(), u64::from(r.nlb.get()));
            if nlb > 0 {
                if slba.checked_add(nlb).is_none_or(|e| e > dev_blocks) {
                    s.status = Status::LBA_OUT_OF_RANGE.with_dnr();
                    break;
                }
                let io = BdevIo::no_data(IoType::Unmap, slba, nlb, u64::from(si));
                if ns.chan.submit(io).is_err() {
                    stalled = true;
                    break;
                }
                s.pending += 1;
            }
            i += 1;
        }
        s.next_range = i as u16;
        if stalled {
            crate::bdev::bump(&self.pg.pending_bdev_io, 1);
            self.retry.push_back(si);
            return;
        }
        if s.pending == 0 {
            let st = s.status;
            self.complete(si, st, 0);
        } else {
            // The last completion finishes the command.
            s.next_range = u16::MAX;
        }
    }

    /// Reservation Register, Acquire, Release or Report: run at once on the namespace's
    /// reservation state, never at the bdev.
    fn exec_reservation(&mut self, si: u16, cmd: &Command) {
        use nvme_spec::resv::{ResvAcquire, ResvRegister, ResvRelease, ResvReport};
        let (Some(ctrl), Some(ns)) = (self.ctrl.as_ref(), self.ns.get(cmd.nsid())) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        let host = ctrl.hostid;
        let resv = &ns.ns.resv;
        let s = &mut self.slots[si as usize];
        let mut empty: [u8; 0] = [];
        let data: &mut [u8] = match s.buf.as_mut() {
            Some(b) => &mut b[..],
            None => &mut empty,
        };
        let status = match cmd.opcode {
            io::RESERVATION_REGISTER => {
                resv.register(&host, &ResvRegister::from_command(cmd), data)
            }
            io::RESERVATION_ACQUIRE => resv.acquire(&host, &ResvAcquire::from_command(cmd), data),
            io::RESERVATION_RELEASE => resv.release(&host, &ResvRelease::from_command(cmd), data),
            io::RESERVATION_REPORT => resv.report(&ResvReport::from_command(cmd), data),
            _ => Status::INVALID_OPCODE.with_dnr(),
        };
        if !status.is_success() {
            tracing::debug!(
                "{} {}: {} on namespace {}: {status}",
                T::NAME,
                self.peer,
                cmd.opcode_name(false),
                cmd.nsid()
            );
        }
        self.complete(si, status, 0);
    }

    /// Polls bdev completions and retries I/O that found a queue full.
    pub(super) fn poll_io(&mut self) -> bool {
        if self.qid == 0 {
            return false;
        }
        if let Some(c) = &self.ctrl {
            self.ns.refresh(&c.subsys);
        }
        let mut n = 0;
        // Collect completions first: the slots and the output queue are borrowed by the
        // handler while the channel is borrowed by the poll.
        let mut batch: smallvec::SmallVec<[IoCompletion; 32]> = smallvec::SmallVec::new();
        loop {
            let got = self.ns.poll(&mut |c| batch.push(c));
            if got == 0 && batch.is_empty() {
                break;
            }
            n += got;
            for c in batch.drain(..) {
                self.io_done(c);
            }
            if got < 32 {
                break;
            }
        }
        while let Some(&si) = self.retry.front() {
            self.retry.pop_front();
            let before = self.retry.len();
            let cmd = self.slots[si as usize].cmd;
            if cmd.opcode == io::DATASET_MANAGEMENT {
                self.submit_dsm(si);
            } else {
                self.exec_io(si);
            }
            if self.retry.len() > before {
                break; // still full
            }
            n += 1;
        }
        n > 0
    }

    fn io_done(&mut self, c: IoCompletion) {
        let si = c.tag as u16;
        let Some(s) = self.slots.get_mut(si as usize) else {
            return;
        };
        if s.state != SlotState::Exec {
            return;
        }
        let st = nvme_status(c.io_type, c.status);
        if !st.is_success() && s.status.is_success() {
            s.status = st;
        }
        if let Some(b) = c.bufs.into_iter().next().and_then(whole_buf) {
            s.buf = Some(b);
        }
        s.pending = s.pending.saturating_sub(1);
        if s.pending == 0 && (c.io_type != IoType::Unmap || s.next_range == u16::MAX) {
            let st = s.status;
            self.complete(si, st, 0);
        }
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
fn whole_buf(b: crate::bdev::BufView) -> Option<DmaBuf> {
    match b.into_dma() {
        Ok(b) => Some(b),
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
