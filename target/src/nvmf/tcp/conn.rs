//! One NVMe/TCP connection (a queue pair): PDU receive, command execution, responses.
//!
//! Receive: the socket is read greedily into `rbuf` so one syscall brings many small PDUs;
//! PDU data (in-capsule or H2CData) goes into the command's `DmaBuf`, copied from `rbuf` for
//! the bytes already there and read straight from the socket (readv: rest of the data, then
//! `rbuf` for what follows) for the rest — each byte is copied at most once.
//!
//! Send: responses queue as `OutPdu`s (header bytes inline, data by reference to the slot's
//! buffer) and go out in one `writev` per batch.
//!
//! Commands live in preallocated slots (a free list); R2T transfer tags are slot indices so
//! H2CData finds its command in O(1). Nothing here allocates per I/O except taking a
//! `DmaBuf` from the pool's per-thread cache.

use super::super::controller::{self, AdminOutcome, ConnInfo, Controller, MAX_AERS};
use super::super::io::{
    data_direction, is_reservation_opcode, nvme_status, supported_io_opcode, NsTable,
};
use super::super::subsystem::ListenAddr;
use super::super::{NvmfTarget, TransportOpts};
use crate::bdev::{BdevIo, IoCompletion, IoType};
use dma::DmaBuf;
use nvme_spec::cmd::{sgl_subtype, sgl_type, DatasetManagement, DsmRange, ReadWrite, WriteZeroes};
use nvme_spec::fabrics::{PropertyGet, PropertySet};
use nvme_spec::opcode::{fctype, io, DataDirection};
use nvme_spec::tcp::{
    fes, header_digest, C2HData, CapsuleResp, IcResp, ParseOptions, PduBody, PduError, PduHeader,
    PduType, Role, TermReq, R2T,
};
use nvme_spec::{Command, Completion, IntoBytes, Status};
use smallvec::smallvec;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

const NO_SLOT: u16 = u16::MAX;
/// Receive buffer: room for many small PDUs per read.
const RBUF_LEN: usize = 128 << 10;
/// Receive buffers a reactor keeps for its connections between bursts (16 MiB at most).
const SPARE_RBUFS_MAX: usize = 128;

thread_local! {
    /// This reactor's receive buffers not held by any connection.
    static SPARE_RBUFS: std::cell::RefCell<Vec<Box<[u8]>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}
/// Largest header we send inline: a termination request with 128 bytes of offending header.
const OUT_HDR_MAX: usize = 24 + 128;
/// Slots before Connect (Connect itself, maybe a few more in flight).
const PRE_CONNECT_SLOTS: usize = 4;
/// Slots beyond the queue size, for commands whose response is still being sent when the
/// host (legitimately) reuses their cid.
const EXTRA_SLOTS: usize = 32;
/// PDUs handled per poll of one connection, so one busy connection cannot starve others.
const RX_BUDGET: usize = 256;
/// iovecs per writev: room for QD128's worth of 4 KiB C2H PDUs (header, data) in one call,
/// under the kernel's IOV_MAX of 1024.
const MAX_IOV: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Receiving in-capsule or H2C data.
    RecvData,
    /// R2T sent, waiting for H2CData.
    AwaitH2C,
    /// Waiting in `buf_waiting` for the data budget to lend it a buffer.
    AwaitBuf,
    /// At the bdev.
    Exec,
    /// An AER held until an event.
    HeldAer,
    /// Its C2HData is queued; freed once sent.
    Sending,
}

struct Slot {
    state: SlotState,
    cmd: Command,
    buf: Option<DmaBuf>,
    dir: DataDirection,
    xfer_len: u32,
    /// H2C bytes received so far.
    recvd: u32,
    /// Sub-I/O outstanding (DSM fans out).
    pending: u16,
    /// Next DSM range to submit.
    next_range: u16,
    status: Status,
    /// The namespace's preempt-and-abort count when the command arrived.
    abort_seen: u64,
    /// When it last began waiting for the host (an R2T sent or answered in part).
    waiting_since_ms: u64,
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

/// One PDU waiting to be sent.
struct OutPdu {
    hdr: [u8; OUT_HDR_MAX],
    hlen: u16,
    slot: u16,
    data_len: u32,
    ddgst: [u8; 4],
    dlen: u8,
    sent: u32,
    /// Free `slot` once this PDU is fully written.
    free_slot: bool,
}

impl OutPdu {
    fn total(&self) -> u32 {
        u32::from(self.hlen) + self.data_len + u32::from(self.dlen)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKind {
    Capsule,
    H2C,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    Header,
    /// Data of the current PDU goes to `slot`'s buffer at `off..end` (`NO_SLOT`: discard).
    Data {
        slot: u16,
        off: u32,
        end: u32,
        ddgst: bool,
        crc: u32,
        kind: DataKind,
    },
    /// Waiting for the 4-byte data digest.
    Digest {
        slot: u16,
        crc: u32,
        kind: DataKind,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitIcReq,
    Ready,
    /// Flushing what is queued (a termination request, a last response), then closing.
    Closing,
    /// Socket shut; waiting for bdev I/O to drain.
    Draining,
}

/// Why the connection ends.
enum Fatal {
    /// Peer closed or the socket failed: just close.
    Gone,
    /// Protocol error: send a C2HTermReq with (fes, fei), then close.
    Term { fes: u16, fei: u32, why: String },
}

impl Fatal {
    fn term(fes: u16, fei: u32, why: impl Into<String>) -> Fatal {
        Fatal::Term {
            fes,
            fei,
            why: why.into(),
        }
    }
}

pub struct Conn {
    sock: TcpStream,
    fd: RawFd,
    target: Arc<NvmfTarget>,
    opts: Arc<TransportOpts>,
    listen: ListenAddr,
    pub peer: String,
    reactor: usize,
    state: State,
    popts: ParseOptions,
    hdgst: bool,
    ddgst: bool,
    hpda: u8,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    rx: Rx,
    /// The header of the PDU being handled, for termination requests.
    cur_hdr: [u8; 128],
    cur_hdr_len: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    out: VecDeque<OutPdu>,
    retry: VecDeque<u16>,
    aers: Vec<u16>,
    ns: NsTable,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    sqsize: u16,
    sqhd: u16,
    epoch: u32,
    /// The socket may have bytes to read: set by the poll group when the kernel says so,
    /// cleared when a read finds nothing. No read is tried while it is clear.
    rx_ready: bool,
    /// The socket may take more bytes: cleared when a write would block, set again by the
    /// poll group when the kernel says there is room.
    tx_ready: bool,
    /// When the connection was accepted, and when a byte last arrived (`now_ms`).
    born_ms: u64,
    last_rx_ms: u64,
    /// When bytes last left for the host.
    last_tx_ms: u64,
    /// Slots waiting for H2CData after an R2T (AwaitH2C).
    awaiting_h2c: u16,
    /// Commands waiting, in arrival order, for the data budget (AwaitBuf).
    buf_waiting: VecDeque<u16>,
    close_deadline: u64,
    last_timer_check: u64,
    /// This reactor's poll-group counters.
    pg: Arc<crate::nvmf::PollGroupStats>,
}

impl Conn {
    pub fn new(
        sock: TcpStream,
        target: Arc<NvmfTarget>,
        opts: Arc<TransportOpts>,
        listen: ListenAddr,
        reactor: usize,
    ) -> std::io::Result<Conn> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let fd = sock.as_raw_fd();
        let pg = target.poll_group_stats(reactor);
        let mut c = Conn {
            sock,
            fd,
            target,
            opts,
            listen,
            peer,
            reactor,
            state: State::AwaitIcReq,
            popts: ParseOptions::new(Role::Controller),
            hdgst: false,
            ddgst: false,
            hpda: 0,
            // Taken when bytes arrive, given back when idle (`take_rbuf`, `release_rbuf`).
            rbuf: Box::default(),
            rpos: 0,
            rlen: 0,
            rx: Rx::Header,
            cur_hdr: [0; 128],
            cur_hdr_len: 0,
            slots: Vec::new(),
            free: Vec::new(),
            // Grows to what the connection's load needs; an idle one keeps none.
            out: VecDeque::new(),
            retry: VecDeque::new(),
            aers: Vec::with_capacity(MAX_AERS),
            ns: NsTable::default(),
            ctrl: None,
            qid: 0,
            sqsize: PRE_CONNECT_SLOTS as u16,
            sqhd: 0,
            epoch: 0,
            rx_ready: true,
            tx_ready: true,
            born_ms: controller::now_ms(),
            last_rx_ms: controller::now_ms(),
            last_tx_ms: controller::now_ms(),
            awaiting_h2c: 0,
            buf_waiting: VecDeque::new(),
            close_deadline: 0,
            last_timer_check: 0,
            pg,
        };
        c.grow_slots(PRE_CONNECT_SLOTS);
        Ok(c)
    }

    /// Gives the connection a receive buffer before a read: a spare one of this reactor's
    /// if there is one.
    fn take_rbuf(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = SPARE_RBUFS
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| vec![0u8; RBUF_LEN].into_boxed_slice());
        }
    }

    /// Gives the receive buffer back while the connection has nothing buffered and nothing
    /// to read, so an idle connection holds none.
    fn release_rbuf(&mut self) {
        if self.rbuf.is_empty()
            || self.rx_ready
            || self.rpos != self.rlen
            || !matches!(self.rx, Rx::Header)
        {
            return;
        }
        let b = std::mem::take(&mut self.rbuf);
        self.rpos = 0;
        self.rlen = 0;
        SPARE_RBUFS.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_RBUFS_MAX {
                s.push(b);
            }
        });
    }

    pub fn fd(&self) -> RawFd {
        self.fd
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

    /// What the kernel reported for the socket: bytes to read (or a hang-up, which a read
    /// finds), room to write.
    pub fn set_ready(&mut self, rx: bool, tx: bool) {
        self.rx_ready |= rx;
        self.tx_ready |= tx;
    }

    /// Whether the next loop must poll this connection: it has bytes to read or send, I/O in
    /// flight, or is closing. An idle connection is not polled until its socket has news
    /// (or the poll group's timer sweep, for keep-alive and controller events). Commands
    /// waiting for the data budget do not count: they are tried again whenever the
    /// connection is polled (its own I/O completing frees budget) and at every sweep.
    pub fn wants_poll(&self) -> bool {
        self.rx_ready
            || (self.tx_ready && !self.out.is_empty())
            || !self.retry.is_empty()
            || self.ns.in_flight() > 0
            || matches!(self.state, State::Closing | State::Draining)
    }

    /// The work of one poll (the poll group and the fuzz harness drive it).
    /// Returns (did work, finished for good).
    pub fn step(&mut self) -> (bool, bool) {
        let mut busy = false;
        match self.state {
            State::AwaitIcReq | State::Ready => {
                match self.poll_rx() {
                    Ok(b) => busy |= b,
                    Err(f) => self.fatal(f),
                }
                if matches!(self.state, State::Ready) {
                    if !self.buf_waiting.is_empty() {
                        busy |= self.admit_waiting();
                    }
                    busy |= self.poll_io();
                    self.check_controller();
                }
            }
            State::Closing | State::Draining => {
                busy |= self.ns.poll(&mut |_| {}) > 0;
            }
        }
        // Keep the reactor awake while a bdev owes us completions: it does not wake us.
        // (I/O held back by a rate limit does not count: its channel sets the wake-up.)
        if self.qid != 0 && (!self.retry.is_empty() || self.ns.awaiting_device() > 0) {
            busy = true;
        }
        match self.flush() {
            Ok(b) => busy |= b,
            Err(_) => self.begin_drain(),
        }
        if self.state == State::Closing
            && (self.out.is_empty() || controller::now_ms() > self.close_deadline)
        {
            self.begin_drain();
        }
        if self.state == State::Draining && self.ns.in_flight() == 0 {
            self.release_queue();
            return (true, true);
        }
        self.release_rbuf();
        (busy, false)
    }

    /// The poll group's periodic look at a connection, news or not: what the host has left
    /// too long. A connection that has not finished connecting in time, whose host stopped
    /// in the middle of a PDU, or that has not taken data we send for `data_timeout_ms`, is
    /// closed; a write whose R2T the host has not answered in that time fails with a
    /// transport error and frees its buffer.
    pub fn sweep(&mut self) {
        if !matches!(self.state, State::AwaitIcReq | State::Ready) {
            return;
        }
        let connecting = self.ctrl.is_none();
        let partial = self.rpos != self.rlen || !matches!(self.rx, Rx::Header);
        let blocked = !self.tx_ready && !self.out.is_empty();
        if !(connecting || partial || blocked || self.awaiting_h2c > 0) {
            return;
        }
        let now = controller::now_ms();
        let data = u64::from(self.opts.data_timeout_ms);
        if data > 0 && self.awaiting_h2c > 0 {
            self.fail_unanswered_r2ts(now, data);
        }
        let (connect, stall) = (
            u64::from(self.opts.connect_timeout_ms),
            u64::from(self.opts.pdu_stall_timeout_ms),
        );
        let why = if connecting && connect > 0 && now.saturating_sub(self.born_ms) > connect {
            format!("no ICReq and Connect within {connect} ms")
        } else if partial && stall > 0 && now.saturating_sub(self.last_rx_ms) > stall {
            format!("a PDU stalled for {stall} ms")
        } else if blocked && data > 0 && now.saturating_sub(self.last_tx_ms) > data {
            format!("the host took none of the data sent to it for {data} ms")
        } else {
            return;
        };
        crate::log_limited!(INFO, "nvmf/tcp {}: {why}; closing", self.peer);
        self.close();
    }

    /// Ends the writes whose R2T went unanswered for `timeout` ms, so their buffers go back.
    fn fail_unanswered_r2ts(&mut self, now: u64, timeout: u64) {
        let receiving = match self.rx {
            Rx::Data { slot, .. } | Rx::Digest { slot, .. } => slot,
            Rx::Header => NO_SLOT,
        };
        for si in 0..self.slots.len() as u16 {
            let s = &self.slots[si as usize];
            if s.state != SlotState::AwaitH2C
                || si == receiving
                || now.saturating_sub(s.waiting_since_ms) <= timeout
            {
                continue;
            }
            crate::log_limited!(
                WARN,
                "nvmf/tcp {}: R2T for cid {} unanswered for {timeout} ms; failing the command",
                self.peer,
                s.cmd.cid()
            );
            self.slots[si as usize].state = SlotState::Exec;
            self.awaiting_h2c -= 1;
            self.slots[si as usize].buf = None;
            self.complete(si, Status::TRANSIENT_TRANSPORT_ERROR, 0);
        }
    }

    /// Closes without a termination request (controller failed, host closed).
    pub fn close(&mut self) {
        if matches!(self.state, State::AwaitIcReq | State::Ready) {
            self.state = State::Closing;
            self.close_deadline = controller::now_ms() + 1000;
        }
    }

    fn begin_drain(&mut self) {
        if self.state != State::Draining {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            self.out.clear();
            self.state = State::Draining;
        }
    }

    /// Unhooks the queue from its controller.
    fn release_queue(&mut self) {
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

    fn fatal(&mut self, f: Fatal) {
        match f {
            Fatal::Gone => self.begin_drain(),
            Fatal::Term { fes, fei, why } => {
                crate::log_limited!(
                    WARN,
                    "nvmf/tcp {}: protocol error ({}): {why}; terminating",
                    self.peer,
                    fes::name(fes)
                );
                let dl = self.cur_hdr_len.min(128);
                let t = TermReq::new(PduType::C2HTermReq, fes, fei, dl);
                let mut p = OutPdu::empty();
                p.hdr[..24].copy_from_slice(t.as_bytes());
                p.hdr[24..24 + dl].copy_from_slice(&self.cur_hdr[..dl]);
                p.hlen = (24 + dl) as u16;
                // Anything else queued is moot; the termination request goes alone.
                self.out.clear();
                self.out.push_back(p);
                self.state = State::Closing;
                self.close_deadline = controller::now_ms() + 1000;
            }
        }
    }

    fn check_controller(&mut self) {
        let Some(c) = self.ctrl.as_ref() else { return };
        if c.is_failed() || (self.qid != 0 && c.epoch() != self.epoch) {
            self.close();
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
            self.close();
        }
    }

    // ---- receive ----

    /// Reads more bytes into `rbuf` so that at least `need` are available from `rpos`.
    /// Returns false when the socket has nothing now.
    fn fill(&mut self, need: usize) -> Result<bool, Fatal> {
        if !self.rx_ready {
            return Ok(false);
        }
        self.take_rbuf();
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rbuf.len() - self.rpos < need {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        let room = self.rbuf.len() - self.rlen;
        match self.sock.read(&mut self.rbuf[self.rlen..]) {
            Ok(0) => Err(Fatal::Gone),
            Ok(n) => {
                // A short read emptied the socket: the next byte to arrive raises a new
                // edge, so no read that would only say EAGAIN is needed.
                if n < room {
                    self.rx_ready = false;
                }
                self.rlen += n;
                self.last_rx_ms = controller::now_ms();
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.rx_ready = false;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(_) => Err(Fatal::Gone),
        }
    }

    fn poll_rx(&mut self) -> Result<bool, Fatal> {
        let mut busy = false;
        for _ in 0..RX_BUDGET {
            match self.rx {
                Rx::Header => {
                    let avail = &self.rbuf[self.rpos..self.rlen];
                    let need = match PduHeader::bytes_needed(avail, &self.popts) {
                        Ok(n) => n,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    if avail.len() < need {
                        if !self.fill(need)? {
                            break;
                        }
                        continue;
                    }
                    let hdr = match PduHeader::parse(avail, &self.popts) {
                        Ok(h) => h,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    let hl = hdr.header_len().min(128).min(avail.len());
                    self.cur_hdr[..hl].copy_from_slice(&avail[..hl]);
                    self.cur_hdr_len = hl;
                    busy = true;
                    self.handle_pdu(&hdr)?;
                }
                Rx::Data { .. } => {
                    if !self.rx_data()? {
                        break;
                    }
                    busy = true;
                }
                Rx::Digest { slot, crc, kind } => {
                    if self.rlen - self.rpos < 4 {
                        if !self.fill(4)? {
                            break;
                        }
                        continue;
                    }
                    let d = &self.rbuf[self.rpos..self.rpos + 4];
                    let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    self.rpos += 4;
                    self.rx = Rx::Header;
                    busy = true;
                    self.data_done(slot, kind, got == crc);
                }
            }
            if self.state != State::Ready && self.state != State::AwaitIcReq {
                break;
            }
        }
        Ok(busy)
    }

    fn pdu_error(&mut self, e: &PduError) -> Fatal {
        let avail = &self.rbuf[self.rpos..self.rlen];
        let n = avail.len().min(128);
        self.cur_hdr[..n].copy_from_slice(&avail[..n]);
        self.cur_hdr_len = n;
        match e.fes() {
            Some(f) => Fatal::term(f, e.fei(), e.to_string()),
            None => Fatal::Gone,
        }
    }

    /// Moves PDU data into its slot's buffer. Returns false when the socket is dry.
    fn rx_data(&mut self) -> Result<bool, Fatal> {
        let Rx::Data {
            slot,
            mut off,
            end,
            ddgst,
            mut crc,
            kind,
        } = self.rx
        else {
            return Ok(false);
        };
        let mut progressed = false;
        // Bytes already read.
        let have = self.rlen - self.rpos;
        if have > 0 {
            let n = have.min((end - off) as usize);
            let src = &self.rbuf[self.rpos..self.rpos + n];
            if slot != NO_SLOT {
                if let Some(b) = self.slots[slot as usize].buf.as_mut() {
                    b[off as usize..off as usize + n].copy_from_slice(src);
                }
            }
            if ddgst {
                crc = crc32c::crc32c_append(crc, src);
            }
            self.rpos += n;
            off += n as u32;
            progressed = true;
        }
        if off < end && self.rpos == self.rlen {
            // Straight from the socket into the buffer, and whatever follows into rbuf.
            self.rpos = 0;
            self.rlen = 0;
            let want = (end - off) as usize;
            let dst: *mut u8 = match self
                .slots
                .get_mut(slot as usize)
                .and_then(|s| s.buf.as_mut())
            {
                Some(b) => b[off as usize..].as_mut_ptr(),
                // Discarding: read into rbuf and drop below.
                None => std::ptr::null_mut(),
            };
            let n = if dst.is_null() {
                match self.fill(1) {
                    Ok(true) => {
                        let n = self.rlen.min(want);
                        if ddgst {
                            crc = crc32c::crc32c_append(crc, &self.rbuf[..n]);
                        }
                        self.rpos = n;
                        n
                    }
                    Ok(false) => 0,
                    Err(e) => return Err(e),
                }
            } else if !self.rx_ready {
                0
            } else {
                self.take_rbuf();
                let iov = [
                    libc::iovec {
                        iov_base: dst as *mut libc::c_void,
                        iov_len: want,
                    },
                    libc::iovec {
                        iov_base: self.rbuf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: self.rbuf.len(),
                    },
                ];
                // SAFETY: both iovecs point into buffers we own mutably (the slot's DmaBuf has
                // at least `off + want` bytes, checked when the transfer was set up) and
                // outlive the call.
                let r = unsafe { libc::readv(self.fd, iov.as_ptr(), 2) };
                if r == 0 {
                    return Err(Fatal::Gone);
                }
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == ErrorKind::WouldBlock {
                        self.rx_ready = false;
                        0
                    } else if e.kind() == ErrorKind::Interrupted {
                        0
                    } else {
                        return Err(Fatal::Gone);
                    }
                } else {
                    self.last_rx_ms = controller::now_ms();
                    let r = r as usize;
                    if r < want + self.rbuf.len() {
                        self.rx_ready = false; // short: the socket is empty (see `fill`)
                    }
                    let n = r.min(want);
                    if ddgst {
                        if let Some(b) = self.slots[slot as usize].buf.as_ref() {
                            crc = crc32c::crc32c_append(crc, &b[off as usize..off as usize + n]);
                        }
                    }
                    self.rlen = r - n;
                    n
                }
            };
            if n > 0 {
                off += n as u32;
                progressed = true;
            }
        }
        if off == end {
            if ddgst {
                self.rx = Rx::Digest { slot, crc, kind };
            } else {
                self.rx = Rx::Header;
                self.data_done(slot, kind, true);
            }
            return Ok(true);
        }
        self.rx = Rx::Data {
            slot,
            off,
            end,
            ddgst,
            crc,
            kind,
        };
        Ok(progressed)
    }

    /// A PDU's data has fully arrived (and its digest matched if `digest_ok`).
    fn data_done(&mut self, slot: u16, kind: DataKind, digest_ok: bool) {
        if slot == NO_SLOT {
            return;
        }
        let si = slot;
        if !digest_ok {
            crate::log_limited!(
                WARN,
                "nvmf/tcp {}: data digest mismatch in {} data of cid {}; failing the command",
                self.peer,
                if kind == DataKind::H2C {
                    "H2CData"
                } else {
                    "in-capsule"
                },
                self.slots[si as usize].cmd.cid()
            );
            // The PDU framing is intact, so this is not fatal to the connection (the spec has no
            // FES for it): as SPDK does, the command fails with a transport error the host may
            // retry, and its data never reaches the bdev. The status is held until the rest of
            // the transfer has arrived, so later H2CData PDUs of this command still find it.
            self.slots[si as usize].status = Status::TRANSIENT_TRANSPORT_ERROR;
        }
        let s = &self.slots[si as usize];
        if kind == DataKind::H2C && s.recvd < s.xfer_len {
            self.await_h2c(si);
            return;
        }
        if s.status.is_success() {
            self.exec(si);
        } else {
            let st = s.status;
            self.complete(si, st, 0);
        }
    }

    fn handle_pdu(&mut self, hdr: &PduHeader) -> Result<(), Fatal> {
        let hlen = hdr.header_len();
        match (self.state, hdr.body) {
            (State::AwaitIcReq, PduBody::IcReq(req)) => {
                self.rpos += hdr.plen() as usize;
                self.hpda = req.hpda;
                self.hdgst = req.hdgst();
                self.ddgst = req.ddgst();
                let resp = IcResp::new(0, self.hdgst, self.ddgst, self.opts.max_h2c_data());
                let mut p = OutPdu::empty();
                p.hdr[..128].copy_from_slice(resp.as_bytes());
                p.hlen = 128;
                self.out.push_back(p);
                self.popts = ParseOptions {
                    receiver: Role::Controller,
                    hdgst: self.hdgst,
                    ddgst: self.ddgst,
                    pda: 0,
                    max_h2c_data: self.opts.max_h2c_data(),
                    max_in_capsule_data: self.opts.in_capsule_data_size,
                };
                self.state = State::Ready;
                Ok(())
            }
            (_, PduBody::TermReq(t)) => {
                tracing::info!(
                    "nvmf/tcp {}: host terminated the connection ({})",
                    self.peer,
                    fes::name(t.fes.get())
                );
                Err(Fatal::Gone)
            }
            (State::Ready, PduBody::CapsuleCmd(c)) => {
                self.rpos += hdr.data_offset.max(hlen as u32) as usize;
                if hdr.data_len == 0 {
                    self.rpos = self.rpos.min(self.rlen);
                }
                self.handle_capsule(c.cmd, hdr.data_len, hdr.ddgst);
                Ok(())
            }
            (State::Ready, PduBody::H2CData(d)) => {
                let ttag = d.ttag.get();
                let si = ttag as usize;
                let ok = self.slots.get(si).is_some_and(|s| {
                    s.state == SlotState::AwaitH2C && s.cmd.cid() == d.cccid.get()
                });
                if !ok {
                    return Err(Fatal::term(
                        fes::INVALID_HEADER_FIELD,
                        10,
                        format!("H2CData for unknown transfer tag {ttag}"),
                    ));
                }
                let s = &mut self.slots[si];
                let datao = d.datao.get();
                let datal = d.datal.get();
                if datao != s.recvd || u64::from(datao) + u64::from(datal) > u64::from(s.xfer_len) {
                    return Err(Fatal::term(
                        fes::DATA_OUT_OF_RANGE,
                        0,
                        format!(
                            "H2CData offset {datao} length {datal} outside the {}-byte transfer",
                            s.xfer_len
                        ),
                    ));
                }
                s.recvd += datal;
                s.state = SlotState::RecvData;
                self.awaiting_h2c -= 1;
                self.rpos += hdr.data_offset.max(hlen as u32) as usize;
                self.rx = Rx::Data {
                    slot: ttag,
                    off: datao,
                    end: datao + datal,
                    ddgst: hdr.ddgst,
                    crc: 0,
                    kind: DataKind::H2C,
                };
                if datal == 0 {
                    self.rx = Rx::Header;
                    self.data_done(ttag, DataKind::H2C, true);
                }
                Ok(())
            }
            (st, _) => Err(Fatal::term(
                fes::PDU_SEQUENCE_ERROR,
                0,
                format!(
                    "{} PDU not expected {}",
                    hdr.pdu_type.name(),
                    if st == State::AwaitIcReq {
                        "before ICReq"
                    } else {
                        "now"
                    }
                ),
            )),
        }
    }

    fn handle_capsule(&mut self, cmd: Command, data_len: u32, ddgst: bool) {
        let Some(si) = self.free.pop() else {
            // The host exceeded its queue size: answer without a slot.
            crate::log_limited!(
                WARN,
                "nvmf/tcp {}: more commands than the queue size",
                self.peer
            );
            self.send_resp(cmd.cid(), Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
            self.discard(data_len, ddgst);
            return;
        };
        self.sqhd = (self.sqhd + 1) % self.sqsize.max(1);
        let dir = data_direction(&cmd);
        // A preempt-and-abort after this point aborts the command if it has not run yet.
        let abort_seen = if self.qid != 0 && !cmd.is_fabrics() {
            self.ns.get(cmd.nsid()).map_or(0, |n| n.ns.resv.abort_gen())
        } else {
            0
        };
        let s = &mut self.slots[si as usize];
        *s = Slot {
            cmd,
            dir,
            state: SlotState::RecvData,
            abort_seen,
            ..Slot::default()
        };
        let sgl = cmd.sgl1();
        let mut fail: Option<Status> = None;
        let xfer_len;
        if data_len > 0 {
            xfer_len = data_len;
            if sgl.desc_type() != sgl_type::DATA_BLOCK || sgl.subtype() != sgl_subtype::OFFSET {
                fail = Some(Status::SGL_INVALID_TYPE);
            } else if sgl.addr() != 0 {
                fail = Some(Status::SGL_INVALID_OFFSET);
            } else if sgl.len() != data_len {
                fail = Some(Status::SGL_INVALID_DATA_LENGTH);
            } else if dir != DataDirection::HostToController {
                fail = Some(Status::INVALID_FIELD);
            }
        } else {
            xfer_len = sgl.len();
            if xfer_len > 0 {
                if sgl.desc_type() != sgl_type::TRANSPORT_DATA_BLOCK
                    || sgl.subtype() != sgl_subtype::TRANSPORT_A
                {
                    fail = Some(Status::SGL_INVALID_TYPE);
                } else if xfer_len > self.opts.max_io_size {
                    fail = Some(Status::SGL_INVALID_DATA_LENGTH);
                } else if !matches!(
                    dir,
                    DataDirection::HostToController | DataDirection::ControllerToHost
                ) {
                    fail = Some(Status::INVALID_FIELD);
                }
            }
        }
        let is_connect = cmd.is_fabrics() && cmd.fctype() == fctype::CONNECT;
        if fail.is_none() && self.ctrl.is_none() && !is_connect {
            fail = Some(Status::COMMAND_SEQUENCE_ERROR);
        }
        // In-capsule data is already on its way and small (in_capsule_data_size): it gets a
        // buffer at once. Transfers by R2T or C2H wait for the data budget below.
        if fail.is_none() && data_len > 0 {
            match DmaBuf::new(xfer_len as usize) {
                Ok(b) => s.buf = Some(b),
                Err(e) => {
                    crate::log_limited!(WARN, "nvmf/tcp: no buffer for {xfer_len} bytes: {e}");
                    fail = Some(Status::INTERNAL);
                }
            }
        }
        s.xfer_len = xfer_len;
        if let Some(st) = fail {
            self.complete(si, st.with_dnr(), 0);
            self.discard(data_len, ddgst);
            return;
        }
        if data_len > 0 {
            self.rx = Rx::Data {
                slot: si,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
            return;
        }
        if xfer_len > 0 {
            // Check what we can before asking for data the command would not use.
            if dir == DataDirection::HostToController {
                if let Some(st) = self.precheck_write(si) {
                    self.complete(si, st, 0);
                    return;
                }
            }
            self.slots[si as usize].state = SlotState::AwaitBuf;
            // With nobody waiting ahead of it, it need not queue to start.
            let started = self.buf_waiting.is_empty() && self.start_transfer(si);
            if !started {
                self.buf_waiting.push_back(si);
                self.admit_waiting();
            }
            return;
        }
        self.exec(si);
    }

    /// Starts waiting transfers, in arrival order, while the data budget lends them
    /// buffers: a write gets its R2T, a read is executed. Returns whether any started.
    fn admit_waiting(&mut self) -> bool {
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
        let Some(ctrl) = self.ctrl.as_ref() else {
            return false;
        };
        let len = self.slots[si as usize].xfer_len;
        let budget = &self.target.data_budget;
        if !budget.try_take(&ctrl.data_held, u64::from(len)) {
            return false;
        }
        let buf = match DmaBuf::new(len as usize) {
            Ok(b) => b,
            Err(e) => {
                // The memory itself is short: wait for buffers to come back, as when the
                // budget is.
                budget.give_back(&ctrl.data_held, u64::from(len));
                crate::log_limited!(WARN, "nvmf/tcp: no buffer for {len} bytes yet: {e}");
                return false;
            }
        };
        let s = &mut self.slots[si as usize];
        s.buf = Some(buf);
        s.charged = len;
        if s.dir == DataDirection::HostToController {
            let cid = s.cmd.cid();
            self.await_h2c(si);
            let r2t = R2T::new(cid, si, 0, len, self.hdgst);
            let mut p = OutPdu::empty();
            p.hdr[..24].copy_from_slice(r2t.as_bytes());
            p.hlen = 24;
            self.push_out(p);
        } else {
            self.exec(si);
        }
        true
    }

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

    /// Slot `si` waits for the host's H2CData from now.
    fn await_h2c(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        s.state = SlotState::AwaitH2C;
        s.waiting_since_ms = controller::now_ms();
        self.awaiting_h2c += 1;
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

    /// Skips `data_len` bytes of PDU data (and its digest) that no command wants.
    fn discard(&mut self, data_len: u32, ddgst: bool) {
        if data_len > 0 {
            self.rx = Rx::Data {
                slot: NO_SLOT,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        }
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
                let info = ConnInfo {
                    listen: &self.listen,
                    peer: &self.peer,
                    reactor: self.reactor,
                    opts: &self.opts,
                    hdgst: self.hdgst,
                    ddgst: self.ddgst,
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
                            "nvmf/tcp {}: Connect rejected: {}",
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
                self.close();
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
                "nvmf/tcp {}: {} on namespace {}: {status}",
                self.peer,
                cmd.opcode_name(false),
                cmd.nsid()
            );
        }
        self.complete(si, status, 0);
    }

    /// Polls bdev completions and retries I/O that found a queue full.
    fn poll_io(&mut self) -> bool {
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

impl OutPdu {
    fn empty() -> OutPdu {
        OutPdu {
            hdr: [0; OUT_HDR_MAX],
            hlen: 0,
            slot: NO_SLOT,
            data_len: 0,
            ddgst: [0; 4],
            dlen: 0,
            sent: 0,
            free_slot: false,
        }
    }
}

impl Conn {
    /// Queues a PDU whose first 24 bytes are a header needing the header digest if enabled.
    fn push_out(&mut self, mut p: OutPdu) {
        if self.hdgst && p.hlen == 24 {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            p.hlen = 28;
        }
        self.out.push_back(p);
    }

    fn send_resp(&mut self, cid: u16, status: Status, dw0: u32) {
        let mut cqe = Completion::new(cid, status);
        cqe.result.set(dw0);
        self.send_cqe(cqe);
    }

    fn send_cqe(&mut self, mut cqe: Completion) {
        cqe.sqhd.set(self.sqhd);
        cqe.sqid.set(self.qid);
        let r = CapsuleResp::new(cqe, self.hdgst);
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(r.as_bytes());
        p.hlen = 24;
        self.push_out(p);
    }

    fn complete64(&mut self, si: u16, v: u64) {
        let cid = self.slots[si as usize].cmd.cid();
        self.free_slot(si);
        let mut cqe = Completion::new(cid, Status::SUCCESS);
        cqe.set_result64(v);
        self.send_cqe(cqe);
    }

    /// Finishes a command: read data (if any) then the response, or just the response.
    fn complete(&mut self, si: u16, status: Status, dw0: u32) {
        if self.qid != 0 {
            crate::bdev::bump(&self.pg.completed_nvme_io, 1);
        }
        let s = &mut self.slots[si as usize];
        let cid = s.cmd.cid();
        let with_data = status.is_success()
            && s.dir == DataDirection::ControllerToHost
            && s.xfer_len > 0
            && s.buf.is_some();
        if !with_data {
            self.free_slot(si);
            self.send_resp(cid, status, dw0);
            return;
        }
        let len = s.xfer_len;
        // The SUCCESS flag saves the response PDU; it cannot carry a result dword.
        let success_flag = self.opts.c2h_success && dw0 == 0;
        let Some(h) = C2HData::new(
            cid,
            0,
            len,
            true,
            success_flag,
            self.hdgst,
            self.ddgst,
            self.hpda,
        ) else {
            self.free_slot(si);
            self.send_resp(cid, Status::INTERNAL, 0);
            return;
        };
        s.state = SlotState::Sending;
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(h.as_bytes());
        let mut hl = 24;
        if self.hdgst {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            hl = 28;
        }
        // Padding up to PDO (zeros already).
        let pdo = usize::from(h.ch.pdo).max(hl);
        p.hlen = pdo as u16;
        p.slot = si;
        p.data_len = len;
        if self.ddgst {
            let b = s.buf.as_ref().expect("checked");
            let d = crc32c::crc32c(&b[..len as usize]);
            p.ddgst = d.to_le_bytes();
            p.dlen = 4;
        }
        if success_flag {
            p.free_slot = true;
            self.out.push_back(p);
        } else {
            self.out.push_back(p);
            // The data PDU still references the slot; free it after the response is sent.
            let mut cqe = Completion::new(cid, status);
            cqe.result.set(dw0);
            cqe.sqhd.set(self.sqhd);
            cqe.sqid.set(self.qid);
            let r = CapsuleResp::new(cqe, self.hdgst);
            let mut q = OutPdu::empty();
            q.hdr[..24].copy_from_slice(r.as_bytes());
            q.hlen = 24;
            q.slot = si;
            q.free_slot = true;
            self.push_out(q);
        }
    }

    fn free_slot(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        if s.state == SlotState::Free {
            return;
        }
        if s.state == SlotState::AwaitH2C {
            self.awaiting_h2c -= 1;
        }
        if s.charged > 0 {
            self.uncharge(si);
        }
        let s = &mut self.slots[si as usize];
        s.state = SlotState::Free;
        s.buf = None;
        self.free.push(si);
    }

    /// Writes queued PDUs with as few writev calls as the socket allows.
    fn flush(&mut self) -> std::io::Result<bool> {
        let mut busy = false;
        while self.tx_ready && !self.out.is_empty() {
            // Filled from the front; only the first `n` are passed to the kernel, so the
            // rest need no zeroing on every flush.
            let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MAX_IOV];
            let mut n = 0;
            for p in self.out.iter() {
                if n + 3 > MAX_IOV {
                    break;
                }
                let mut pos = p.sent as usize;
                let hl = usize::from(p.hlen);
                if pos < hl {
                    iov[n].write(libc::iovec {
                        iov_base: p.hdr[pos..hl].as_ptr() as *mut libc::c_void,
                        iov_len: hl - pos,
                    });
                    n += 1;
                    pos = hl;
                }
                let dl = p.data_len as usize;
                if dl > 0 && pos < hl + dl {
                    let b = self.slots[p.slot as usize]
                        .buf
                        .as_ref()
                        .expect("a queued data PDU keeps its buffer");
                    let o = pos - hl;
                    iov[n].write(libc::iovec {
                        iov_base: b[o..dl].as_ptr() as *mut libc::c_void,
                        iov_len: dl - o,
                    });
                    n += 1;
                    pos = hl + dl;
                }
                let gl = usize::from(p.dlen);
                if gl > 0 && pos < hl + dl + gl {
                    let o = pos - hl - dl;
                    iov[n].write(libc::iovec {
                        iov_base: p.ddgst[o..gl].as_ptr() as *mut libc::c_void,
                        iov_len: gl - o,
                    });
                    n += 1;
                }
            }
            // SAFETY: the first `n` iovecs were written above; each points into memory owned
            // by `self.out` or by the slots' buffers, which are not touched until writev
            // returns.
            let r = unsafe { libc::writev(self.fd, iov.as_ptr().cast::<libc::iovec>(), n as i32) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => {
                        self.tx_ready = false;
                        break;
                    }
                    ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            busy = true;
            self.last_tx_ms = controller::now_ms();
            let mut left = r as u32;
            while left > 0 {
                let Some(p) = self.out.front_mut() else { break };
                let rem = p.total() - p.sent;
                if left >= rem {
                    left -= rem;
                    let (slot, free) = (p.slot, p.free_slot);
                    self.out.pop_front();
                    if free {
                        self.free_slot(slot);
                    }
                } else {
                    p.sent += left;
                    left = 0;
                }
            }
            // Completed PDUs with zero remaining (should not happen) are popped next pass.
            while self.out.front().is_some_and(|p| p.sent == p.total()) {
                let p = self.out.pop_front().expect("front exists");
                if p.free_slot {
                    self.free_slot(p.slot);
                }
            }
        }
        Ok(busy)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.release_queue();
    }
}
