//! One NVMe/TCP queue (admin or I/O): the socket, the per-command slots and the PDU state
//! machines.
//!
//! Everything here runs on the owner's thread when the owner polls; there is no thread, lock or
//! timer. Slots are preallocated and indexed by command ID; each holds the caller's buffer, the
//! encoded capsule header and the R2T/C2H progress, so the I/O path allocates nothing. Sends
//! are gathered into one `writev` per poll; receives go into one staging buffer (one `read` can
//! carry many PDUs; a poll reads until a read comes back short) and from there into the
//! caller's buffer — the only copy — except that a large C2HData payload whose bytes have not
//! arrived yet is read straight into the caller's buffer.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nvme_spec::cmd::flags::PSDT_SGL_MPTR_CONTIG;
use nvme_spec::{Command, SglDescriptor, Status};
use smallvec::SmallVec;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use nvme_spec::fabrics::{Connect, ConnectData};
use nvme_spec::tcp::{fes, IcReq, IcResp, ParseOptions, PduBody, PduHeader, PduType, Role};
use nvme_spec::IntoBytes;

use super::pdu::{self, Wire, MAX_HDR};
use crate::buf::IoBuf;
use crate::ctrlr::Digests;
use crate::error::{Error, Result};
use crate::slots::{SlotPart, Slots};
use crate::transport::{still_pending, ConnParams, ConnectProgress, Dir, Done};

mod connect;
mod receive;
mod transmit;

/// Where a TCP queue connects, and the digests it asks for.
#[derive(Debug, Clone)]
pub(crate) struct TcpEndpoint {
    pub addr: SocketAddr,
    pub hdgst: bool,
    pub ddgst: bool,
}

/// Where a queue's connection stands. A (re)connection walks these steps in order, each
/// advanced only by non-blocking calls from [`TcpQueue::poll_connect`], so the owner's thread
/// (a reactor) never waits on the network. Every step carries its deadline: the connect
/// timeout from when the step began; a step still unfinished then fails the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// No socket: never connected, connection lost, or a failed attempt.
    Down,
    /// TCP handshake in flight (connect returned EINPROGRESS): waiting for writability.
    /// `cntlid` is the controller ID the Fabrics Connect will ask for.
    TcpHandshake { cntlid: u16, deadline: Instant },
    /// Sending ICReq; `sent` of its bytes have gone out.
    SendingIcReq {
        cntlid: u16,
        sent: usize,
        deadline: Instant,
    },
    /// Collecting ICResp, which may arrive in pieces; `got` bytes are in so far.
    AwaitingIcResp {
        cntlid: u16,
        got: usize,
        deadline: Instant,
    },
    /// Sending the Fabrics Connect capsule; `sent` of its bytes have gone out.
    SendingConnect { sent: usize, deadline: Instant },
    /// Waiting for the Fabrics Connect response.
    AwaitingConnectResp { deadline: Instant },
    /// Connected: commands flow.
    Up,
}

/// What one read from the socket brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    /// Nothing (EAGAIN or EINTR).
    Nothing,
    /// Bytes, as many as there was room for: more may be waiting.
    More,
    /// Fewer bytes than there was room for: the socket was empty after them.
    Drained,
}

/// How far ICResp has arrived.
enum IcRespRead {
    Partial { got: usize },
    Complete(IcResp),
}

/// What a TCP queue keeps per command besides the common slot (`crate::slots`).
struct TcpSlot {
    in_capsule: bool,
    /// Transmit items of this slot still queued; a response before they are gone is an error.
    tx_pending: u8,
    hdr: [u8; MAX_HDR],
    hdr_len: u8,
    ddgst: [u8; 4],
    h2c_hdr: [u8; MAX_HDR],
    h2c_hdr_len: u8,
    h2c_ddgst: [u8; 4],
    r2t_ttag: u16,
    /// Next byte to send for the current R2T and its end; equal when no R2T is open.
    r2t_next: u32,
    r2t_end: u32,
    chunk_len: u32,
    /// Bytes of C2HData received so far (they must arrive in order).
    c2h_got: u32,
    /// A data digest failed: the command completes with Data Transfer Error.
    xfer_err: bool,
}

impl SlotPart for TcpSlot {
    fn finished(&mut self) {
        // Its PDUs left the transmit queue before its response could count.
        self.tx_pending = 0;
    }
}

impl Default for TcpSlot {
    fn default() -> Self {
        TcpSlot {
            in_capsule: false,
            tx_pending: 0,
            hdr: [0; MAX_HDR],
            hdr_len: 0,
            ddgst: [0; 4],
            h2c_hdr: [0; MAX_HDR],
            h2c_hdr_len: 0,
            h2c_ddgst: [0; 4],
            r2t_ttag: 0,
            r2t_next: 0,
            r2t_end: 0,
            chunk_len: 0,
            c2h_got: 0,
            xfer_err: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct TxItem {
    cid: u16,
    h2c: bool,
}

#[derive(Debug, Clone, Copy)]
enum Rx {
    Hdr,
    Data {
        cid: u16,
        left: u32,
        flags: u8,
        crc: u32,
    },
    Ddgst {
        cid: u16,
        flags: u8,
        crc: u32,
    },
}

/// Largest H2CData chunk we send (MAXH2CDATA from the wire is clamped to it).
const MAX_CHUNK: u32 = 1 << 20;
/// Staging buffer for received bytes; large enough for many small PDUs per read.
const RX_BUF: usize = 128 * 1024;
/// A payload at least this large whose bytes are not staged yet is read directly into place.
const DIRECT_MIN: u32 = 16 * 1024;
/// How much is staged per read while large payloads arrive: room for the next PDU header and
/// a little, so the payload behind it is read into place rather than staged and copied.
const RX_SMALL: usize = 1024;
/// Segments per writev.
const IOV_BATCH: usize = 64;
/// Connect CATTR bit 2: ask the controller to disable SQ flow control. This host never looks
/// at SQHD (a command slot is its flow control), so the target may skip tracking the head.
/// Only on I/O queues, as the Linux host does; plexd's target and nvmet both accept it.
const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

const fn connect_cattr(qid: u16) -> u8 {
    if qid == 0 {
        0
    } else {
        CATTR_DISABLE_SQFLOW
    }
}

pub(crate) struct TcpQueue<B> {
    pub params: ConnParams,
    tcp: TcpEndpoint,
    /// Present from the start of a connection attempt until disconnection.
    sock: Option<TcpStream>,
    conn: ConnState,
    /// ICReq or the Fabrics Connect capsule while either is being sent.
    handshake_tx: Vec<u8>,
    wire: Wire,
    popts: ParseOptions,
    maxh2cdata: u32,
    slots: Slots<B, TcpSlot>,
    txq: VecDeque<TxItem>,
    tx_off: usize,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_state: Rx,
    /// The last C2HData payload was at least `DIRECT_MIN`: stage only `RX_SMALL` per read.
    rx_large: bool,
    internal_done: Option<(Status, u32)>,
    /// Controller ID this queue is connected with.
    pub cntlid: u16,
}

fn nonfatal(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

impl<B: IoBuf> TcpQueue<B> {
    /// A disconnected queue with `params.qsize - 1` command slots.
    pub fn new(params: ConnParams, tcp: TcpEndpoint) -> Self {
        let depth = params.qsize.saturating_sub(1).max(1);
        TcpQueue {
            params,
            tcp,
            sock: None,
            conn: ConnState::Down,
            handshake_tx: Vec::new(),
            wire: Wire {
                hdgst: false,
                ddgst: false,
                cpda: 0,
            },
            popts: ParseOptions::new(Role::Host),
            maxh2cdata: 0,
            slots: Slots::new(depth),
            txq: VecDeque::with_capacity(2 * usize::from(depth) + 4),
            tx_off: 0,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_state: Rx::Hdr,
            rx_large: false,
            internal_done: None,
            cntlid: 0xffff,
        }
    }

    /// Digests asked for and granted on the current (or last) connection.
    pub fn digests(&self) -> Digests {
        Digests {
            hdgst: self.wire.hdgst,
            ddgst: self.wire.ddgst,
            hdgst_requested: self.tcp.hdgst,
            ddgst_requested: self.tcp.ddgst,
        }
    }

    pub fn depth(&self) -> u16 {
        self.slots.depth()
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots.outstanding()
    }

    pub fn is_connected(&self) -> bool {
        self.conn == ConnState::Up
    }

    pub fn raw_fd(&self) -> Option<i32> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    /// Whether a poll has anything to do (lets an idle owner skip the recv syscall).
    pub fn busy(&self) -> bool {
        self.slots.outstanding() > 0 || !self.txq.is_empty() || self.slots.has_given_up()
    }

    fn start_cmd(
        &mut self,
        cid: u16,
        mut sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
        internal: bool,
    ) {
        sqe.flags = (sqe.flags & !nvme_spec::cmd::flags::PSDT_MASK) | PSDT_SGL_MPTR_CONTIG;
        let s = self.slots.start(cid, sqe, dir, buf, tag, internal);
        s.t.xfer_err = false;
    }

    /// Encodes the capsule for an active slot and queues it for sending.
    fn requeue(&mut self, cid: u16) {
        let in_cap_max = self.params.in_capsule_max;
        let wire = self.wire;
        let s = &mut self.slots[cid as usize];
        s.t.in_capsule = s.dir == Dir::ToCtrl && s.len as usize <= in_cap_max && s.len > 0;
        let sgl = if s.t.in_capsule {
            SglDescriptor::in_capsule(0, s.len)
        } else {
            SglDescriptor::tcp_transport(s.len)
        };
        s.sqe.set_sgl1(sgl);
        let data_len = if s.t.in_capsule { s.len as usize } else { 0 };
        s.t.hdr_len = wire.capsule_cmd(&mut s.t.hdr, &s.sqe, data_len) as u8;
        if s.t.in_capsule && wire.ddgst {
            let d = pdu::crc(s.buf.as_deref().unwrap_or(&[]));
            s.t.ddgst = d.to_le_bytes();
        }
        s.t.r2t_next = 0;
        s.t.r2t_end = 0;
        s.t.c2h_got = 0;
        s.t.tx_pending = 1;
        self.txq.push_back(TxItem { cid, h2c: false });
    }

    /// Queues a command; it goes out on the next [`TcpQueue::flush`]. `buf`'s length is the
    /// transfer length. Returns the buffer back if no slot is free.
    pub fn submit(
        &mut self,
        sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
    ) -> Result<u16, Option<B>> {
        let Some(cid) = self.slots.take() else {
            return Err(buf);
        };
        self.start_cmd(cid, sqe, dir, buf, tag, false);
        // While connecting, it waits in its slot: connection completion sends every active one.
        if self.is_connected() {
            self.requeue(cid);
        }
        Ok(cid)
    }

    /// Completes active command `cid` with `status` now (`Queue::fail_aborted`).
    pub fn fail_one(&mut self, cid: u16, status: Status) -> Done<B> {
        self.slots.finish(cid, status, 0, 0)
    }

    /// Tag and start time of every active user command (timeout scans).
    pub fn for_each_active(&mut self, f: impl FnMut(u16, &mut u64, &mut bool, u64)) {
        self.slots.for_each_active(f)
    }

    /// Completes every active user command with `status` (path failure, detach).
    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        self.slots.fail_all(status, on_done);
        self.txq.clear();
        self.tx_off = 0;
    }
}
