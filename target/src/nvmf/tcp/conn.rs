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
//! Commands and their execution are the transport-neutral queue's ([`NvmeQueue`]); R2T
//! transfer tags are its slot indices, so H2CData finds its command in O(1).

use super::super::controller;
use super::super::queue::{NvmeQueue, SlotState, Transport};
use super::super::subsystem::ListenAddr;
use super::super::{NvmfTarget, TransportOpts};
use nvme_spec::cmd::{sgl_subtype, sgl_type};
use nvme_spec::tcp::{
    fes, header_digest, C2HData, CapsuleResp, IcResp, ParseOptions, PduBody, PduError, PduHeader,
    PduType, Role, TermReq, R2T,
};
use nvme_spec::{Command, Completion, IntoBytes, Status};
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
/// PDUs handled per poll of one connection, so one busy connection cannot starve others.
const RX_BUDGET: usize = 256;
/// iovecs per writev: room for QD128's worth of 4 KiB C2H PDUs (header, data) in one call,
/// under the kernel's IOV_MAX of 1024.
const MAX_IOV: usize = 512;

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

/// A TCP connection's own state; the queue it carries is `NvmeQueue<Tcp>` ([`Conn`]).
pub struct Tcp {
    sock: TcpStream,
    fd: RawFd,
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
    out: VecDeque<OutPdu>,
    /// The socket may have bytes to read: set by the poll group when the kernel says so,
    /// cleared when a read finds nothing. No read is tried while it is clear.
    rx_ready: bool,
    /// The socket may take more bytes: cleared when a write would block, set again by the
    /// poll group when the kernel says there is room.
    tx_ready: bool,
    /// When a byte last arrived (`now_ms`).
    last_rx_ms: u64,
    /// When bytes last left for the host.
    last_tx_ms: u64,
    close_deadline: u64,
}

/// One NVMe/TCP connection: a queue pair carried over a socket.
pub type Conn = NvmeQueue<Tcp>;

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
        let t = Tcp {
            sock,
            fd,
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
            // Grows to what the connection's load needs; an idle one keeps none.
            out: VecDeque::new(),
            rx_ready: true,
            tx_ready: true,
            last_rx_ms: controller::now_ms(),
            last_tx_ms: controller::now_ms(),
            close_deadline: 0,
        };
        Ok(NvmeQueue::with_transport(
            t, target, opts, listen, peer, reactor,
        ))
    }

    pub fn fd(&self) -> RawFd {
        self.t.fd
    }

    /// What the kernel reported for the socket: bytes to read (or a hang-up, which a read
    /// finds), room to write.
    pub fn set_ready(&mut self, rx: bool, tx: bool) {
        self.t.rx_ready |= rx;
        self.t.tx_ready |= tx;
    }

    /// Whether the next loop must poll this connection: it has bytes to read or send, I/O in
    /// flight, or is closing. An idle connection is not polled until its socket has news
    /// (or the poll group's timer sweep, for keep-alive and controller events). Commands
    /// waiting for the data budget do not count: they are tried again whenever the
    /// connection is polled (its own I/O completing frees budget) and at every sweep.
    pub fn wants_poll(&self) -> bool {
        self.t.rx_ready
            || (self.t.tx_ready && !self.t.out.is_empty())
            || !self.retry.is_empty()
            || self.ns.in_flight() > 0
            || matches!(self.t.state, State::Closing | State::Draining)
    }

    /// The work of one poll (the poll group and the fuzz harness drive it).
    /// Returns (did work, finished for good).
    pub fn step(&mut self) -> (bool, bool) {
        let mut busy = false;
        match self.t.state {
            State::AwaitIcReq | State::Ready => {
                match self.poll_rx() {
                    Ok(b) => busy |= b,
                    Err(f) => self.fatal(f),
                }
                if matches!(self.t.state, State::Ready) {
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
        if self.t.state == State::Closing
            && (self.t.out.is_empty() || controller::now_ms() > self.t.close_deadline)
        {
            self.begin_drain();
        }
        if self.t.state == State::Draining && self.ns.in_flight() == 0 {
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
        if !matches!(self.t.state, State::AwaitIcReq | State::Ready) {
            return;
        }
        let connecting = self.ctrl.is_none();
        let partial = self.t.rpos != self.t.rlen || !matches!(self.t.rx, Rx::Header);
        let blocked = !self.t.tx_ready && !self.t.out.is_empty();
        if !(connecting || partial || blocked || self.awaiting_data > 0) {
            return;
        }
        let now = controller::now_ms();
        let data = u64::from(self.opts.data_timeout_ms);
        if data > 0 && self.awaiting_data > 0 {
            self.fail_unanswered_r2ts(now, data);
        }
        let (connect, stall) = (
            u64::from(self.opts.connect_timeout_ms),
            u64::from(self.opts.pdu_stall_timeout_ms),
        );
        let why = if connecting && connect > 0 && now.saturating_sub(self.born_ms) > connect {
            format!("no ICReq and Connect within {connect} ms")
        } else if partial && stall > 0 && now.saturating_sub(self.t.last_rx_ms) > stall {
            format!("a PDU stalled for {stall} ms")
        } else if blocked && data > 0 && now.saturating_sub(self.t.last_tx_ms) > data {
            format!("the host took none of the data sent to it for {data} ms")
        } else {
            return;
        };
        crate::log_limited!(INFO, "nvmf/tcp {}: {why}; closing", self.peer);
        self.close();
    }

    /// Ends the writes whose R2T went unanswered for `timeout` ms, so their buffers go back.
    fn fail_unanswered_r2ts(&mut self, now: u64, timeout: u64) {
        let receiving = match self.t.rx {
            Rx::Data { slot, .. } | Rx::Digest { slot, .. } => slot,
            Rx::Header => NO_SLOT,
        };
        for si in 0..self.slots.len() as u16 {
            let s = &self.slots[si as usize];
            if s.state != SlotState::AwaitData
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
            self.awaiting_data -= 1;
            self.slots[si as usize].buf = None;
            self.complete(si, Status::TRANSIENT_TRANSPORT_ERROR, 0);
        }
    }

    /// Closes without a termination request (controller failed, host closed).
    pub fn close(&mut self) {
        if matches!(self.t.state, State::AwaitIcReq | State::Ready) {
            self.t.state = State::Closing;
            self.t.close_deadline = controller::now_ms() + 1000;
        }
    }

    fn begin_drain(&mut self) {
        if self.t.state != State::Draining {
            let _ = self.t.sock.shutdown(std::net::Shutdown::Both);
            self.t.out.clear();
            self.t.state = State::Draining;
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
                let dl = self.t.cur_hdr_len.min(128);
                let t = TermReq::new(PduType::C2HTermReq, fes, fei, dl);
                let mut p = OutPdu::empty();
                p.hdr[..24].copy_from_slice(t.as_bytes());
                p.hdr[24..24 + dl].copy_from_slice(&self.t.cur_hdr[..dl]);
                p.hlen = (24 + dl) as u16;
                // Anything else queued is moot; the termination request goes alone.
                self.t.out.clear();
                self.t.out.push_back(p);
                self.t.state = State::Closing;
                self.t.close_deadline = controller::now_ms() + 1000;
            }
        }
    }

    /// Gives the connection a receive buffer before a read: a spare one of this reactor's
    /// if there is one.
    fn take_rbuf(&mut self) {
        if self.t.rbuf.is_empty() {
            self.t.rbuf = SPARE_RBUFS
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| vec![0u8; RBUF_LEN].into_boxed_slice());
        }
    }

    /// Gives the receive buffer back while the connection has nothing buffered and nothing
    /// to read, so an idle connection holds none.
    fn release_rbuf(&mut self) {
        if self.t.rbuf.is_empty()
            || self.t.rx_ready
            || self.t.rpos != self.t.rlen
            || !matches!(self.t.rx, Rx::Header)
        {
            return;
        }
        let b = std::mem::take(&mut self.t.rbuf);
        self.t.rpos = 0;
        self.t.rlen = 0;
        SPARE_RBUFS.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_RBUFS_MAX {
                s.push(b);
            }
        });
    }

    /// Reads more bytes into `rbuf` so that at least `need` are available from `rpos`.
    /// Returns false when the socket has nothing now.
    fn fill(&mut self, need: usize) -> Result<bool, Fatal> {
        if !self.t.rx_ready {
            return Ok(false);
        }
        self.take_rbuf();
        if self.t.rpos == self.t.rlen {
            self.t.rpos = 0;
            self.t.rlen = 0;
        } else if self.t.rbuf.len() - self.t.rpos < need {
            self.t.rbuf.copy_within(self.t.rpos..self.t.rlen, 0);
            self.t.rlen -= self.t.rpos;
            self.t.rpos = 0;
        }
        let room = self.t.rbuf.len() - self.t.rlen;
        match self.t.sock.read(&mut self.t.rbuf[self.t.rlen..]) {
            Ok(0) => Err(Fatal::Gone),
            Ok(n) => {
                // A short read emptied the socket: the next byte to arrive raises a new
                // edge, so no read that would only say EAGAIN is needed.
                if n < room {
                    self.t.rx_ready = false;
                }
                self.t.rlen += n;
                self.t.last_rx_ms = controller::now_ms();
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.t.rx_ready = false;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(_) => Err(Fatal::Gone),
        }
    }

    fn poll_rx(&mut self) -> Result<bool, Fatal> {
        let mut busy = false;
        for _ in 0..RX_BUDGET {
            match self.t.rx {
                Rx::Header => {
                    let avail = &self.t.rbuf[self.t.rpos..self.t.rlen];
                    let need = match PduHeader::bytes_needed(avail, &self.t.popts) {
                        Ok(n) => n,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    if avail.len() < need {
                        if !self.fill(need)? {
                            break;
                        }
                        continue;
                    }
                    let hdr = match PduHeader::parse(avail, &self.t.popts) {
                        Ok(h) => h,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    let hl = hdr.header_len().min(128).min(avail.len());
                    self.t.cur_hdr[..hl].copy_from_slice(&avail[..hl]);
                    self.t.cur_hdr_len = hl;
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
                    if self.t.rlen - self.t.rpos < 4 {
                        if !self.fill(4)? {
                            break;
                        }
                        continue;
                    }
                    let d = &self.t.rbuf[self.t.rpos..self.t.rpos + 4];
                    let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    self.t.rpos += 4;
                    self.t.rx = Rx::Header;
                    busy = true;
                    self.data_done(slot, kind, got == crc);
                }
            }
            if self.t.state != State::Ready && self.t.state != State::AwaitIcReq {
                break;
            }
        }
        Ok(busy)
    }

    fn pdu_error(&mut self, e: &PduError) -> Fatal {
        let avail = &self.t.rbuf[self.t.rpos..self.t.rlen];
        let n = avail.len().min(128);
        self.t.cur_hdr[..n].copy_from_slice(&avail[..n]);
        self.t.cur_hdr_len = n;
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
        } = self.t.rx
        else {
            return Ok(false);
        };
        let mut progressed = false;
        // Bytes already read.
        let have = self.t.rlen - self.t.rpos;
        if have > 0 {
            let n = have.min((end - off) as usize);
            let src = &self.t.rbuf[self.t.rpos..self.t.rpos + n];
            if slot != NO_SLOT {
                if let Some(b) = self.slots[slot as usize].buf.as_mut() {
                    b[off as usize..off as usize + n].copy_from_slice(src);
                }
            }
            if ddgst {
                crc = crc32c::crc32c_append(crc, src);
            }
            self.t.rpos += n;
            off += n as u32;
            progressed = true;
        }
        if off < end && self.t.rpos == self.t.rlen {
            // Straight from the socket into the buffer, and whatever follows into rbuf.
            self.t.rpos = 0;
            self.t.rlen = 0;
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
                        let n = self.t.rlen.min(want);
                        if ddgst {
                            crc = crc32c::crc32c_append(crc, &self.t.rbuf[..n]);
                        }
                        self.t.rpos = n;
                        n
                    }
                    Ok(false) => 0,
                    Err(e) => return Err(e),
                }
            } else if !self.t.rx_ready {
                0
            } else {
                self.take_rbuf();
                let iov = [
                    libc::iovec {
                        iov_base: dst as *mut libc::c_void,
                        iov_len: want,
                    },
                    libc::iovec {
                        iov_base: self.t.rbuf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: self.t.rbuf.len(),
                    },
                ];
                // SAFETY: both iovecs point into buffers we own mutably (the slot's DmaBuf has
                // at least `off + want` bytes, checked when the transfer was set up) and
                // outlive the call.
                let r = unsafe { libc::readv(self.t.fd, iov.as_ptr(), 2) };
                if r == 0 {
                    return Err(Fatal::Gone);
                }
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == ErrorKind::WouldBlock {
                        self.t.rx_ready = false;
                        0
                    } else if e.kind() == ErrorKind::Interrupted {
                        0
                    } else {
                        return Err(Fatal::Gone);
                    }
                } else {
                    self.t.last_rx_ms = controller::now_ms();
                    let r = r as usize;
                    if r < want + self.t.rbuf.len() {
                        self.t.rx_ready = false; // short: the socket is empty (see `fill`)
                    }
                    let n = r.min(want);
                    if ddgst {
                        if let Some(b) = self.slots[slot as usize].buf.as_ref() {
                            crc = crc32c::crc32c_append(crc, &b[off as usize..off as usize + n]);
                        }
                    }
                    self.t.rlen = r - n;
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
                self.t.rx = Rx::Digest { slot, crc, kind };
            } else {
                self.t.rx = Rx::Header;
                self.data_done(slot, kind, true);
            }
            return Ok(true);
        }
        self.t.rx = Rx::Data {
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
            self.await_data(si);
            return;
        }
        self.data_arrived(si);
    }

    fn handle_pdu(&mut self, hdr: &PduHeader) -> Result<(), Fatal> {
        let hlen = hdr.header_len();
        match (self.t.state, hdr.body) {
            (State::AwaitIcReq, PduBody::IcReq(req)) => {
                self.t.rpos += hdr.plen() as usize;
                self.t.hpda = req.hpda;
                self.t.hdgst = req.hdgst();
                self.t.ddgst = req.ddgst();
                let resp = IcResp::new(0, self.t.hdgst, self.t.ddgst, self.opts.max_h2c_data());
                let mut p = OutPdu::empty();
                p.hdr[..128].copy_from_slice(resp.as_bytes());
                p.hlen = 128;
                self.t.out.push_back(p);
                self.t.popts = ParseOptions {
                    receiver: Role::Controller,
                    hdgst: self.t.hdgst,
                    ddgst: self.t.ddgst,
                    pda: 0,
                    max_h2c_data: self.opts.max_h2c_data(),
                    max_in_capsule_data: self.opts.in_capsule_data_size,
                };
                self.t.state = State::Ready;
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
                self.t.rpos += hdr.data_offset.max(hlen as u32) as usize;
                if hdr.data_len == 0 {
                    self.t.rpos = self.t.rpos.min(self.t.rlen);
                }
                self.handle_capsule(c.cmd, hdr.data_len, hdr.ddgst);
                Ok(())
            }
            (State::Ready, PduBody::H2CData(d)) => {
                let ttag = d.ttag.get();
                let si = ttag as usize;
                let ok = self.slots.get(si).is_some_and(|s| {
                    s.state == SlotState::AwaitData && s.cmd.cid() == d.cccid.get()
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
                self.awaiting_data -= 1;
                self.t.rpos += hdr.data_offset.max(hlen as u32) as usize;
                self.t.rx = Rx::Data {
                    slot: ttag,
                    off: datao,
                    end: datao + datal,
                    ddgst: hdr.ddgst,
                    crc: 0,
                    kind: DataKind::H2C,
                };
                if datal == 0 {
                    self.t.rx = Rx::Header;
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

    // ---- commands ----

    fn handle_capsule(&mut self, cmd: Command, data_len: u32, ddgst: bool) {
        let Some(si) = self.take_slot(cmd) else {
            self.discard(data_len, ddgst);
            return;
        };
        let sgl = cmd.sgl1();
        let mut refused = None;
        let xfer_len = if data_len > 0 {
            if sgl.desc_type() != sgl_type::DATA_BLOCK || sgl.subtype() != sgl_subtype::OFFSET {
                refused = Some(Status::SGL_INVALID_TYPE);
            } else if sgl.addr() != 0 {
                refused = Some(Status::SGL_INVALID_OFFSET);
            } else if sgl.len() != data_len {
                refused = Some(Status::SGL_INVALID_DATA_LENGTH);
            }
            data_len
        } else {
            let len = sgl.len();
            if len > 0
                && (sgl.desc_type() != sgl_type::TRANSPORT_DATA_BLOCK
                    || sgl.subtype() != sgl_subtype::TRANSPORT_A)
            {
                refused = Some(Status::SGL_INVALID_TYPE);
            }
            len
        };
        if self.start_command(si, xfer_len, data_len > 0, refused) {
            self.t.rx = Rx::Data {
                slot: si,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        } else {
            self.discard(data_len, ddgst);
        }
    }

    /// Skips `data_len` bytes of PDU data (and its digest) that no command wants.
    fn discard(&mut self, data_len: u32, ddgst: bool) {
        if data_len > 0 {
            self.t.rx = Rx::Data {
                slot: NO_SLOT,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        }
    }

    // ---- send ----

    /// Queues a PDU whose first 24 bytes are a header needing the header digest if enabled.
    fn push_out(&mut self, mut p: OutPdu) {
        if self.t.hdgst && p.hlen == 24 {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            p.hlen = 28;
        }
        self.t.out.push_back(p);
    }

    /// Writes queued PDUs with as few writev calls as the socket allows.
    fn flush(&mut self) -> std::io::Result<bool> {
        let mut busy = false;
        while self.t.tx_ready && !self.t.out.is_empty() {
            // Filled from the front; only the first `n` are passed to the kernel, so the
            // rest need no zeroing on every flush.
            let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MAX_IOV];
            let mut n = 0;
            for p in self.t.out.iter() {
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
            // by `self.t.out` or by the slots' buffers, which are not touched until writev
            // returns.
            let r =
                unsafe { libc::writev(self.t.fd, iov.as_ptr().cast::<libc::iovec>(), n as i32) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => {
                        self.t.tx_ready = false;
                        break;
                    }
                    ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            busy = true;
            self.t.last_tx_ms = controller::now_ms();
            let mut left = r as u32;
            while left > 0 {
                let Some(p) = self.t.out.front_mut() else {
                    break;
                };
                let rem = p.total() - p.sent;
                if left >= rem {
                    left -= rem;
                    let (slot, free) = (p.slot, p.free_slot);
                    self.t.out.pop_front();
                    if free {
                        self.free_slot(slot);
                    }
                } else {
                    p.sent += left;
                    left = 0;
                }
            }
            // Completed PDUs with zero remaining (should not happen) are popped next pass.
            while self.t.out.front().is_some_and(|p| p.sent == p.total()) {
                let p = self.t.out.pop_front().expect("front exists");
                if p.free_slot {
                    self.free_slot(p.slot);
                }
            }
        }
        Ok(busy)
    }
}

impl Transport for Tcp {
    const NAME: &'static str = "nvmf/tcp";

    fn digests(&self) -> (bool, bool) {
        (self.hdgst, self.ddgst)
    }

    fn fetch_data(q: &mut Conn, si: u16) {
        let s = &q.slots[si as usize];
        let r2t = R2T::new(s.cmd.cid(), si, 0, s.xfer_len, q.t.hdgst);
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(r2t.as_bytes());
        p.hlen = 24;
        q.push_out(p);
    }

    fn respond(q: &mut Conn, si: u16, cqe: Completion, with_data: bool) {
        if !with_data {
            q.free_slot(si);
            return Self::send_cqe(q, cqe);
        }
        let s = &mut q.slots[si as usize];
        let len = s.xfer_len;
        let cid = cqe.cid.get();
        // The SUCCESS flag saves the response PDU; it cannot carry a result.
        let success_flag = q.opts.c2h_success && cqe.result.get() == 0 && cqe.dw1.get() == 0;
        let (hdgst, ddgst) = (q.t.hdgst, q.t.ddgst);
        let Some(h) = C2HData::new(cid, 0, len, true, success_flag, hdgst, ddgst, q.t.hpda) else {
            q.free_slot(si);
            let mut cqe = cqe;
            cqe.set_status(Status::INTERNAL);
            cqe.result.set(0);
            return Self::send_cqe(q, cqe);
        };
        s.state = SlotState::Sending;
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(h.as_bytes());
        let mut hl = 24;
        if hdgst {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            hl = 28;
        }
        // Padding up to PDO (zeros already).
        let pdo = usize::from(h.ch.pdo).max(hl);
        p.hlen = pdo as u16;
        p.slot = si;
        p.data_len = len;
        if ddgst {
            let b = s.buf.as_ref().expect("checked");
            let d = crc32c::crc32c(&b[..len as usize]);
            p.ddgst = d.to_le_bytes();
            p.dlen = 4;
        }
        if success_flag {
            p.free_slot = true;
            q.t.out.push_back(p);
        } else {
            q.t.out.push_back(p);
            // The data PDU still references the slot; free it after the response is sent.
            let r = CapsuleResp::new(cqe, hdgst);
            let mut r_pdu = OutPdu::empty();
            r_pdu.hdr[..24].copy_from_slice(r.as_bytes());
            r_pdu.hlen = 24;
            r_pdu.slot = si;
            r_pdu.free_slot = true;
            q.push_out(r_pdu);
        }
    }

    fn send_cqe(q: &mut Conn, cqe: Completion) {
        let r = CapsuleResp::new(cqe, q.t.hdgst);
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(r.as_bytes());
        p.hlen = 24;
        q.push_out(p);
    }

    fn close(q: &mut Conn) {
        q.close();
    }
}
