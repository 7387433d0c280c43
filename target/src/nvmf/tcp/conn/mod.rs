//! One NVMe/TCP connection (a queue pair): PDU receive, command execution, responses.
//!
//! Receive: the socket is read greedily into a window (`window.rs`) so one syscall brings many
//! small PDUs. In-capsule data that arrived whole is lent to its command from the window, not
//! copied; other PDU data goes into the command's own buffer, copied from the window for the
//! bytes already there and read straight from the socket (readv: rest of the data, then the
//! window for what follows) for the rest — each byte is copied at most once.
//!
//! Send: responses queue as `OutPdu`s (header bytes inline, data by reference to the slot's
//! buffer) and go out in one `writev` per batch.
//!
//! Commands and their execution are the transport-neutral queue's ([`NvmeQueue`]); R2T
//! transfer tags are its slot indices, so H2CData finds its command in O(1).
//!
//! Here: the connection's state and its step, sweep and teardown; `receive.rs` reads and
//! parses; `transmit.rs` queues and writes, and implements [`Transport`] for TCP.

use super::super::controller;
use super::super::queue::{NvmeQueue, Slot, SlotState, Transport};
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

mod receive;
mod transmit;
mod window;

const NO_SLOT: u16 = u16::MAX;
/// Largest header we send inline: a termination request with 128 bytes of offending header.
const OUT_HDR_MAX: usize = 24 + 128;
/// PDUs handled per poll of one connection, so one busy connection cannot starve others.
const RX_BUDGET: usize = 256;
/// PDUs a command slot may have waiting to go out at once (an R2T or C2HData, a response),
/// with room to spare. Past that many per slot, the rest can only be answers to commands
/// refused for want of a slot, and nothing more is read until the host takes some.
const OUT_PER_SLOT: usize = 4;
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
    window: window::RxWindow,
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
            // Taken when bytes arrive, given back when idle (`release_rbuf`).
            window: window::RxWindow::default(),
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
        (self.t.rx_ready && !self.rx_held_back())
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
                if !self.rx_held_back() {
                    match self.poll_rx() {
                        Ok(b) => busy |= b,
                        Err(f) => self.fatal(f),
                    }
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

    /// Whether reading from the host waits for it to take what is queued for it. A host
    /// that keeps sending commands past its queue and never reads would otherwise have plexd
    /// queue an answer for each, as fast as it can send; held back, it is stopped by TCP's
    /// flow control once the socket buffers fill, and the sweep closes it if it never reads
    /// again (`data_timeout_ms`). (A poll reads at most RX_BUDGET PDUs past the mark.)
    fn rx_held_back(&self) -> bool {
        self.t.out.len() >= OUT_PER_SLOT * self.slots.len() + RX_BUDGET
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
        let partial = self.t.window.unparsed() > 0 || !matches!(self.t.rx, Rx::Header);
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
}
