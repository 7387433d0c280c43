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
use crate::transport::{give_up, still_pending, ConnParams, ConnectProgress, Dir, Done};

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

struct Slot<B> {
    active: bool,
    internal: bool,
    sqe: Command,
    dir: Dir,
    buf: Option<B>,
    len: u32,
    tag: u64,
    started: Instant,
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
    /// Abort was requested for this command (timeout handling).
    pub abort_posted: bool,
    /// A data digest failed: the command completes with Data Transfer Error.
    xfer_err: bool,
    /// Its capsule went out whole on the current connection.
    capsule_sent: bool,
    /// Connections lost while it was out on them (`MAX_LOST_SENDS`).
    lost_sends: u8,
}

impl<B> Slot<B> {
    fn new() -> Self {
        Slot {
            active: false,
            internal: false,
            sqe: Command::default(),
            dir: Dir::None,
            buf: None,
            len: 0,
            tag: 0,
            started: Instant::now(),
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
            abort_posted: false,
            xfer_err: false,
            capsule_sent: false,
            lost_sends: 0,
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

/// The cid reserved for Fabrics Connect on (re)connection.
const fn connect_cid(depth: u16) -> u16 {
    depth
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
    slots: Box<[Slot<B>]>,
    free: Vec<u16>,
    depth: u16,
    outstanding: usize,
    txq: VecDeque<TxItem>,
    tx_off: usize,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_state: Rx,
    internal_done: Option<(Status, u32)>,
    /// Commands given up at a reconnection (`MAX_LOST_SENDS`), for the next poll to deliver.
    given_up: Vec<Done<B>>,
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
        let slots: Box<[Slot<B>]> = (0..=depth).map(|_| Slot::new()).collect();
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
            slots,
            free: (0..depth).rev().collect(),
            depth,
            outstanding: 0,
            txq: VecDeque::with_capacity(2 * depth as usize + 4),
            tx_off: 0,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_state: Rx::Hdr,
            internal_done: None,
            given_up: Vec::new(),
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
        self.depth
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    pub fn is_connected(&self) -> bool {
        self.conn == ConnState::Up
    }

    pub fn raw_fd(&self) -> Option<i32> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    /// Whether a poll has anything to do (lets an idle owner skip the recv syscall).
    pub fn busy(&self) -> bool {
        self.outstanding > 0 || !self.txq.is_empty() || !self.given_up.is_empty()
    }

    // ---------------------------------------------------------------- connection

    /// Starts a (re)connection with Fabrics Connect for `cntlid` (0xFFFF for the admin queue:
    /// dynamic controller): opens a non-blocking socket and begins the TCP handshake. Only
    /// non-blocking system calls; [`TcpQueue::poll_connect`] does the rest. Commands still
    /// active from a previous connection are sent again once connected.
    pub fn start_connect(&mut self, cntlid: u16) -> Result<()> {
        self.disconnect();
        let addr = self.tcp.addr;
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(Error::io("socket"))?;
        sock.set_nonblocking(true)
            .map_err(Error::io("O_NONBLOCK"))?;
        match sock.connect(&addr.into()) {
            // Loopback may finish at once; the writable check in TcpHandshake sees that too.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "TCP connect",
                    source: e,
                })
            }
        }
        let sock = TcpStream::from(sock);
        sock.set_nodelay(true).map_err(Error::io("TCP_NODELAY"))?;
        self.sock = Some(sock);
        self.conn = ConnState::TcpHandshake {
            cntlid,
            deadline: self.step_deadline(),
        };
        Ok(())
    }

    /// Advances a connection started by [`TcpQueue::start_connect`] as far as it goes without
    /// blocking. A step that outlives the connect timeout, or any error, fails the attempt and
    /// leaves the queue disconnected (active commands stay in their slots).
    pub fn poll_connect(&mut self) -> Result<ConnectProgress> {
        let res = self.advance_connect();
        if res.is_err() {
            self.disconnect();
        }
        res
    }

    /// Connects and waits for it (up to the connect timeout per step): for control-plane
    /// threads only, such as controller bring-up.
    pub fn connect(&mut self, cntlid: u16) -> Result<u16> {
        self.start_connect(cntlid)?;
        loop {
            if let ConnectProgress::Connected { cntlid } = self.poll_connect()? {
                return Ok(cntlid);
            }
            let waiting_to_send = matches!(
                self.conn,
                ConnState::TcpHandshake { .. }
                    | ConnState::SendingIcReq { .. }
                    | ConnState::SendingConnect { .. }
            );
            let events = if waiting_to_send {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            self.wait_fd(events, Duration::from_millis(100));
        }
    }

    /// Where the connection stands.
    #[cfg(test)]
    pub fn conn_state(&self) -> ConnState {
        self.conn
    }

    /// A connection attempt is under way (started, neither connected nor failed yet).
    pub fn is_connecting(&self) -> bool {
        !matches!(self.conn, ConnState::Down | ConnState::Up)
    }

    fn step_deadline(&self) -> Instant {
        Instant::now() + self.params.connect_timeout
    }

    fn advance_connect(&mut self) -> Result<ConnectProgress> {
        loop {
            match self.conn {
                ConnState::Down => return Err(Error::Disconnected),
                ConnState::Up => {
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    })
                }
                ConnState::TcpHandshake { cntlid, deadline } => {
                    // Writable (or in error) once the handshake has finished either way.
                    if !self.fd_ready(libc::POLLOUT) {
                        return still_pending(deadline, "TCP connect");
                    }
                    let Some(sock) = &self.sock else {
                        return Err(Error::Disconnected);
                    };
                    if let Some(e) = sock.take_error().map_err(Error::io("TCP connect"))? {
                        return Err(Error::Io {
                            what: "TCP connect",
                            source: e,
                        });
                    }
                    // HPDA 0: no padding before C2H data; MAXR2T 0: one R2T outstanding per
                    // command.
                    let t = &self.tcp;
                    let icreq = IcReq::new(0, t.hdgst, t.ddgst, 0);
                    self.handshake_tx.clear();
                    self.handshake_tx.extend_from_slice(icreq.as_bytes());
                    self.conn = ConnState::SendingIcReq {
                        cntlid,
                        sent: 0,
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::SendingIcReq {
                    cntlid,
                    sent,
                    deadline,
                } => {
                    let sent = self.send_handshake(sent, "send ICReq")?;
                    if sent < self.handshake_tx.len() {
                        self.conn = ConnState::SendingIcReq {
                            cntlid,
                            sent,
                            deadline,
                        };
                        return still_pending(deadline, "send ICReq");
                    }
                    self.conn = ConnState::AwaitingIcResp {
                        cntlid,
                        got: 0,
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::AwaitingIcResp {
                    cntlid,
                    got,
                    deadline,
                } => match self.receive_icresp(got)? {
                    IcRespRead::Partial { got } => {
                        self.conn = ConnState::AwaitingIcResp {
                            cntlid,
                            got,
                            deadline,
                        };
                        return still_pending(deadline, "ICResp");
                    }
                    IcRespRead::Complete(ic) => {
                        self.apply_icresp(&ic)?;
                        self.prepare_fabrics_connect(cntlid)?;
                        self.conn = ConnState::SendingConnect {
                            sent: 0,
                            deadline: self.step_deadline(),
                        };
                    }
                },
                ConnState::SendingConnect { sent, deadline } => {
                    let sent = self.send_handshake(sent, "send Fabrics Connect")?;
                    if sent < self.handshake_tx.len() {
                        self.conn = ConnState::SendingConnect { sent, deadline };
                        return still_pending(deadline, "send Fabrics Connect");
                    }
                    self.conn = ConnState::AwaitingConnectResp {
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::AwaitingConnectResp { deadline } => {
                    self.poll_internal()?;
                    let Some((status, dw0)) = self.internal_done.take() else {
                        return still_pending(deadline, "Fabrics Connect");
                    };
                    if !status.is_success() {
                        return Err(Error::Nvme {
                            cmd: "Fabrics Connect",
                            status,
                        });
                    }
                    self.cntlid = (dw0 & 0xffff) as u16;
                    self.conn = ConnState::Up;
                    debug!(qid = self.params.qid, cntlid = self.cntlid, ?self.wire, maxh2cdata = self.maxh2cdata, "queue connected");
                    // Re-issue commands that were in flight on the previous connection, and
                    // those submitted while connecting; give up on those lost too often.
                    for cid in 0..self.depth {
                        let s = &self.slots[cid as usize];
                        if !s.active {
                            continue;
                        }
                        if give_up(self.params.qid, s.lost_sends, s.tag, s.sqe.opcode) {
                            let d = self.finish(cid, Status::HOST_PATHING_ERROR, 0, 0);
                            self.given_up.push(d);
                        } else {
                            self.requeue(cid);
                        }
                    }
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    });
                }
            }
        }
    }

    /// Writes what the socket takes of `handshake_tx` from `sent` on; returns the new `sent`.
    fn send_handshake(&mut self, mut sent: usize, what: &'static str) -> Result<usize> {
        let Some(sock) = &self.sock else {
            return Err(Error::Disconnected);
        };
        while sent < self.handshake_tx.len() {
            match (&*sock).write(&self.handshake_tx[sent..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::Io { what, source: e }),
            }
        }
        Ok(sent)
    }

    /// Reads ICResp bytes into the front of the staging buffer (idle until connected), never
    /// past the end of the PDU the header announces.
    fn receive_icresp(&mut self, mut got: usize) -> Result<IcRespRead> {
        let opts = ParseOptions::new(Role::Host);
        loop {
            let need = PduHeader::bytes_needed(&self.rx[..got], &opts)
                .map_err(|e| Error::Protocol(format!("bad ICResp: {e}")))?;
            if got >= need {
                break;
            }
            let Some(sock) = &self.sock else {
                return Err(Error::Disconnected);
            };
            let Some(dst) = self.rx.get_mut(got..need) else {
                return Err(Error::Protocol(format!("ICResp header of {need} bytes")));
            };
            match (&*sock).read(dst) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(IcRespRead::Partial { got })
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "receive ICResp",
                        source: e,
                    })
                }
            }
        }
        match PduHeader::parse(&self.rx[..got], &opts) {
            Ok(PduHeader {
                body: PduBody::IcResp(ic),
                ..
            }) => Ok(IcRespRead::Complete(ic)),
            Ok(PduHeader {
                body: PduBody::TermReq(t),
                ..
            }) => Err(Error::TermReq {
                fes: t.fes.get(),
                fei: t.fei.get(),
            }),
            Ok(h) => Err(Error::Protocol(format!(
                "expected ICResp, got {}",
                h.pdu_type.name()
            ))),
            Err(e) => Err(Error::Protocol(format!("bad ICResp: {e}"))),
        }
    }

    /// Takes on what ICResp negotiated: digests, the controller's PDA and MAXH2CDATA.
    fn apply_icresp(&mut self, ic: &IcResp) -> Result<()> {
        let p = &self.tcp;
        // The controller may turn a digest on only if we asked for it.
        if (ic.hdgst() && !p.hdgst) || (ic.ddgst() && !p.ddgst) {
            return Err(Error::Protocol(
                "ICResp enables a digest the host did not request".into(),
            ));
        }
        if p.hdgst != ic.hdgst() || p.ddgst != ic.ddgst() {
            // Loud: whoever asked for digests believes the data is checked end to end.
            warn!(
                qid = self.params.qid,
                addr = %p.addr,
                hdgst_requested = p.hdgst,
                hdgst = ic.hdgst(),
                ddgst_requested = p.ddgst,
                ddgst = ic.ddgst(),
                "controller declined a requested NVMe/TCP digest; running without it"
            );
        }
        self.wire = Wire {
            hdgst: ic.hdgst(),
            ddgst: ic.ddgst(),
            cpda: ic.cpda,
        };
        self.popts = ParseOptions {
            hdgst: ic.hdgst(),
            ddgst: ic.ddgst(),
            ..ParseOptions::new(Role::Host)
        };
        // Smaller H2CData PDUs than allowed are fine; the clamp keeps PLEN arithmetic small.
        self.maxh2cdata = ic.maxh2cdata.get().min(MAX_CHUNK);
        // The ICResp bytes are consumed; PDUs start afresh in the staging buffer.
        self.rx_start = 0;
        self.rx_end = 0;
        self.rx_state = Rx::Hdr;
        Ok(())
    }

    /// Encodes the Fabrics Connect capsule into `handshake_tx` and opens the reserved slot
    /// its response completes.
    fn prepare_fabrics_connect(&mut self, cntlid: u16) -> Result<()> {
        let p = &self.params;
        let sqe = Connect {
            recfmt: 0,
            qid: p.qid,
            sqsize: u32::from(p.qsize),
            cattr: connect_cattr(p.qid),
            kato: p.kato_ms,
        }
        .to_command(0);
        let data = ConnectData::new(p.hostid, cntlid, &p.subnqn, &p.hostnqn)
            .ok_or_else(|| Error::Unsupported("NQN longer than 255 bytes".into()))?;
        let data = data.as_bytes();
        let cid = connect_cid(self.depth);
        self.internal_done = None;
        self.start_cmd(cid, sqe, Dir::ToCtrl, None, 0, true);
        let slot = &mut self.slots[cid as usize];
        // Connect data is always in-capsule, and larger than the slot's header area: the
        // whole capsule goes out from `handshake_tx` instead of the transmit queue.
        slot.in_capsule = false;
        slot.sqe
            .set_sgl1(SglDescriptor::in_capsule(0, data.len() as u32));
        let n = self.wire.capsule_cmd(&mut slot.hdr, &slot.sqe, data.len());
        self.handshake_tx.clear();
        self.handshake_tx.extend_from_slice(&slot.hdr[..n]);
        self.handshake_tx.extend_from_slice(data);
        if self.wire.ddgst {
            self.handshake_tx
                .extend_from_slice(&pdu::crc(data).to_le_bytes());
        }
        Ok(())
    }

    /// Waits until the socket is readable or `t` passes (control path only).
    pub fn wait_readable(&self, t: Duration) {
        self.wait_fd(libc::POLLIN, t)
    }

    fn wait_fd(&self, events: libc::c_short, t: Duration) {
        if self.raw_fd().is_none() {
            std::thread::sleep(t);
            return;
        }
        self.poll_fd(events, t.as_millis().clamp(1, 1000) as libc::c_int);
    }

    /// Whether the socket has one of `events` (or an error or hang-up) now, without waiting.
    fn fd_ready(&self, events: libc::c_short) -> bool {
        self.poll_fd(events, 0)
    }

    fn poll_fd(&self, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
        let Some(fd) = self.raw_fd() else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n > 0 && pfd.revents != 0
    }

    /// Closes the socket, abandoning any connection attempt. Active commands stay in their
    /// slots (to be re-sent once connected again, or failed by `fail_all`).
    pub fn disconnect(&mut self) {
        if let Some(s) = self.sock.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.conn = ConnState::Down;
        self.txq.clear();
        self.tx_off = 0;
        self.rx_state = Rx::Hdr;
        self.rx_start = 0;
        self.rx_end = 0;
        for s in self.slots.iter_mut() {
            s.tx_pending = 0;
            if s.active && s.capsule_sent {
                s.lost_sends = s.lost_sends.saturating_add(1);
            }
            s.capsule_sent = false;
        }
        let c = connect_cid(self.depth) as usize;
        self.slots[c].active = false;
    }

    /// Sends an H2CTermReq (best effort) and disconnects; returns the error to report.
    fn terminate(&mut self, fes: u16, fei: u32, hdr: Option<(usize, usize)>, why: String) -> Error {
        warn!(
            qid = self.params.qid,
            fes, fei, "terminating connection: {why}"
        );
        if let Some(sock) = &self.sock {
            let offending = match hdr {
                Some((a, b)) => self.rx.get(a..b).unwrap_or(&[]),
                None => &[],
            };
            let (b, n) = pdu::encode_term_req(fes, fei, offending);
            // Best effort: whatever fits in the socket buffer now.
            let _ = (&*sock).write(&b[..n]);
        }
        self.disconnect();
        Error::Protocol(why)
    }

    // ---------------------------------------------------------------- submission

    fn start_cmd(
        &mut self,
        cid: u16,
        mut sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
        internal: bool,
    ) {
        let len = buf.as_ref().map_or(0, |b| b.len()) as u32;
        sqe.set_cid(cid);
        sqe.flags = (sqe.flags & !nvme_spec::cmd::flags::PSDT_MASK) | PSDT_SGL_MPTR_CONTIG;
        let s = &mut self.slots[cid as usize];
        s.active = true;
        s.internal = internal;
        s.sqe = sqe;
        s.dir = dir;
        s.buf = buf;
        s.len = len;
        s.tag = tag;
        s.started = Instant::now();
        s.abort_posted = false;
        s.xfer_err = false;
        s.capsule_sent = false;
        s.lost_sends = 0;
        if !internal {
            self.outstanding += 1;
        }
    }

    /// Encodes the capsule for an active slot and queues it for sending.
    fn requeue(&mut self, cid: u16) {
        let in_cap_max = self.params.in_capsule_max;
        let wire = self.wire;
        let s = &mut self.slots[cid as usize];
        s.in_capsule = s.dir == Dir::ToCtrl && s.len as usize <= in_cap_max && s.len > 0;
        let sgl = if s.in_capsule {
            SglDescriptor::in_capsule(0, s.len)
        } else {
            SglDescriptor::tcp_transport(s.len)
        };
        s.sqe.set_sgl1(sgl);
        let data_len = if s.in_capsule { s.len as usize } else { 0 };
        s.hdr_len = wire.capsule_cmd(&mut s.hdr, &s.sqe, data_len) as u8;
        if s.in_capsule && wire.ddgst {
            let d = pdu::crc(s.buf.as_deref().unwrap_or(&[]));
            s.ddgst = d.to_le_bytes();
        }
        s.r2t_next = 0;
        s.r2t_end = 0;
        s.c2h_got = 0;
        s.tx_pending = 1;
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
        let Some(cid) = self.free.pop() else {
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
        self.finish(cid, status, 0, 0)
    }

    /// Tag and start time of every active user command (timeout scans).
    pub fn for_each_active(&mut self, mut f: impl FnMut(u16, &mut Instant, &mut bool, u64)) {
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if s.active && !s.internal {
                f(cid as u16, &mut s.started, &mut s.abort_posted, s.tag);
            }
        }
    }

    /// Completes every active user command with `status` (path failure, detach).
    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        for d in std::mem::take(&mut self.given_up) {
            on_done(d);
        }
        for cid in 0..self.depth {
            if self.slots[cid as usize].active {
                let d = self.finish(cid, status, 0, 0);
                on_done(d);
            }
        }
        self.txq.retain(|_| false);
        self.tx_off = 0;
    }

    fn finish(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) -> Done<B> {
        let s = &mut self.slots[cid as usize];
        s.active = false;
        s.tx_pending = 0;
        let d = Done {
            tag: s.tag,
            status,
            dw0,
            dw1,
            buf: s.buf.take(),
        };
        if !s.internal {
            self.outstanding -= 1;
            self.free.push(cid);
        }
        d
    }

    // ---------------------------------------------------------------- transmit

    fn item_segs<'a>(slots: &'a [Slot<B>], wire: &Wire, it: TxItem) -> [&'a [u8]; 3] {
        let s = &slots[it.cid as usize];
        let data = s.buf.as_deref().unwrap_or(&[]);
        if it.h2c {
            let lo = s.r2t_next as usize;
            let hi = lo + s.chunk_len as usize;
            [
                &s.h2c_hdr[..s.h2c_hdr_len as usize],
                data.get(lo..hi).unwrap_or(&[]),
                if wire.ddgst { &s.h2c_ddgst[..] } else { &[] },
            ]
        } else if s.in_capsule {
            [
                &s.hdr[..s.hdr_len as usize],
                data,
                if wire.ddgst { &s.ddgst[..] } else { &[] },
            ]
        } else {
            [&s.hdr[..s.hdr_len as usize], &[], &[]]
        }
    }

    fn item_len(&self, it: TxItem) -> usize {
        Self::item_segs(&self.slots, &self.wire, it)
            .iter()
            .map(|s| s.len())
            .sum()
    }

    /// Writes queued PDUs, as many as the socket takes, batching them into `writev`s.
    pub fn flush(&mut self) -> Result<()> {
        while !self.txq.is_empty() {
            let Some(sock) = &self.sock else {
                return Err(Error::Disconnected);
            };
            let (res, asked) = {
                let mut iov: SmallVec<[IoSlice<'_>; IOV_BATCH]> = SmallVec::new();
                let mut skip = self.tx_off;
                let mut asked = 0usize;
                for &it in self.txq.iter() {
                    for seg in Self::item_segs(&self.slots, &self.wire, it) {
                        if seg.is_empty() {
                            continue;
                        }
                        if skip >= seg.len() {
                            skip -= seg.len();
                            continue;
                        }
                        let seg = &seg[skip..];
                        skip = 0;
                        asked += seg.len();
                        iov.push(IoSlice::new(seg));
                    }
                    if iov.len() + 3 > IOV_BATCH {
                        break;
                    }
                }
                ((&*sock).write_vectored(&iov), asked)
            };
            match res {
                Ok(0) => return Err(self.lost(Error::Closed)),
                Ok(n) => {
                    self.advance(n);
                    if n < asked {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.lost(Error::Io {
                        what: "send",
                        source: e,
                    }))
                }
            }
        }
        Ok(())
    }

    fn lost(&mut self, e: Error) -> Error {
        debug!(qid = self.params.qid, "connection lost: {e}");
        self.disconnect();
        e
    }

    fn advance(&mut self, n: usize) {
        let mut n = n + self.tx_off;
        self.tx_off = 0;
        while let Some(&it) = self.txq.front() {
            let l = self.item_len(it);
            if n < l {
                self.tx_off = n;
                break;
            }
            n -= l;
            self.txq.pop_front();
            let s = &mut self.slots[it.cid as usize];
            s.tx_pending = s.tx_pending.saturating_sub(1);
            s.capsule_sent |= !it.h2c;
            if it.h2c {
                s.r2t_next += s.chunk_len;
                if s.r2t_next < s.r2t_end {
                    self.next_chunk(it.cid);
                }
            }
        }
    }

    /// Prepares the next H2CData PDU of the open R2T of `cid` and queues it.
    fn next_chunk(&mut self, cid: u16) {
        let wire = self.wire;
        let max = self.maxh2cdata;
        let s = &mut self.slots[cid as usize];
        let len = (s.r2t_end - s.r2t_next).min(max);
        s.chunk_len = len;
        let last = s.r2t_next + len == s.r2t_end;
        s.h2c_hdr_len = wire.h2c_data(&mut s.h2c_hdr, cid, s.r2t_ttag, s.r2t_next, len, last) as u8;
        if wire.ddgst {
            let lo = s.r2t_next as usize;
            let d = s
                .buf
                .as_deref()
                .and_then(|b| b.get(lo..lo + len as usize))
                .map_or(0, pdu::crc);
            s.h2c_ddgst = d.to_le_bytes();
        }
        s.tx_pending += 1;
        self.txq.push_back(TxItem { cid, h2c: true });
    }

    // ---------------------------------------------------------------- receive

    /// Reads what the socket has and processes complete PDUs; finished commands go to
    /// `on_done`. Returns the number of commands finished.
    pub fn poll(&mut self, on_done: &mut impl FnMut(Done<B>)) -> Result<usize> {
        if !self.is_connected() {
            return Err(Error::Disconnected);
        }
        let mut n = 0;
        for d in std::mem::take(&mut self.given_up) {
            n += 1;
            on_done(d);
        }
        self.flush()?;
        // Until the socket is empty: a short read says so without another read that would
        // only return EAGAIN. Skipping that read gets the finished commands to the caller,
        // and the caller's next commands onto the wire, a system call sooner (plexperf
        // against a malloc bdev, 4 KiB randread QD32: +7 % IOPS).
        while self.process(on_done, &mut n)? == Received::More {}
        // R2Ts and requeues may have queued PDUs.
        self.flush()?;
        Ok(n)
    }

    /// Polls for the Connect completion (internal slot only).
    fn poll_internal(&mut self) -> Result<()> {
        let mut sink = |_d: Done<B>| {};
        let mut n = 0;
        while self.process(&mut sink, &mut n)? == Received::More {}
        Ok(())
    }

    /// Reads once from the socket into staging (or into the pending payload's buffer) and
    /// processes what is complete.
    fn process(&mut self, on_done: &mut impl FnMut(Done<B>), n: &mut usize) -> Result<Received> {
        // Compact the staging buffer so a whole PDU header always fits.
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && RX_BUF - self.rx_end < RX_BUF / 2 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let read = {
            let Some(sock) = &self.sock else {
                return Err(Error::Disconnected);
            };
            let mut sock = sock;
            let direct = match self.rx_state {
                Rx::Data { cid, left, .. }
                    if left >= DIRECT_MIN && self.rx_start == self.rx_end =>
                {
                    Some((cid, left))
                }
                _ => None,
            };
            // Payload straight into the caller's buffer, the rest of the stream into staging.
            let dst = direct.and_then(|(cid, left)| {
                let s = &mut self.slots[cid as usize];
                let lo = s.c2h_got as usize;
                s.buf
                    .as_mut()
                    .and_then(|b| b.bytes_mut())
                    .and_then(|b| b.get_mut(lo..lo + left as usize))
            });
            // Each read reports the room it offered: filling less says the socket is empty.
            match dst {
                Some(dst) => {
                    let mut iov = [IoSliceMut::new(dst), IoSliceMut::new(&mut self.rx[..])];
                    let room = iov.iter().map(|v| v.len()).sum();
                    sock.read_vectored(&mut iov).map(|r| (r, true, room))
                }
                None => {
                    let staging = &mut self.rx[self.rx_end..];
                    let room = staging.len();
                    sock.read(staging).map(|r| (r, false, room))
                }
            }
        };
        let mut received = Received::Nothing;
        match read {
            Ok((0, ..)) => return Err(self.lost(Error::Closed)),
            Ok((r, direct, room)) => {
                received = if r < room {
                    Received::Drained
                } else {
                    Received::More
                };
                if direct {
                    let Rx::Data {
                        cid,
                        left,
                        flags,
                        crc,
                    } = self.rx_state
                    else {
                        unreachable!("direct read only in Data state")
                    };
                    let into_buf = r.min(left as usize);
                    let s = &mut self.slots[cid as usize];
                    let lo = s.c2h_got as usize;
                    let crc = if self.wire.ddgst {
                        let b = s.buf.as_deref().map_or(&[][..], |b| &b[lo..lo + into_buf]);
                        crc32c::crc32c_append(crc, b)
                    } else {
                        crc
                    };
                    s.c2h_got += into_buf as u32;
                    self.rx_state = Rx::Data {
                        cid,
                        left: left - into_buf as u32,
                        flags,
                        crc,
                    };
                    self.rx_end = r - into_buf;
                    self.rx_start = 0;
                } else {
                    self.rx_end += r;
                }
            }
            Err(e) if nonfatal(&e) => {}
            Err(e) => {
                return Err(self.lost(Error::Io {
                    what: "receive",
                    source: e,
                }))
            }
        }
        self.parse(on_done, n)?;
        Ok(received)
    }

    /// Consumes complete PDUs (and payload bytes) from the staging buffer.
    fn parse(&mut self, on_done: &mut impl FnMut(Done<B>), n: &mut usize) -> Result<()> {
        loop {
            let avail = self.rx_end - self.rx_start;
            match self.rx_state {
                Rx::Hdr => {
                    let st = self.rx_start;
                    let bytes = &self.rx[st..self.rx_end];
                    let need = match PduHeader::bytes_needed(bytes, &self.popts) {
                        Ok(n) => n,
                        Err(e) => return Err(self.bad_pdu(&e, st)),
                    };
                    if avail < need {
                        return Ok(());
                    }
                    let h = match PduHeader::parse(&bytes[..need], &self.popts) {
                        Ok(h) => h,
                        Err(e) => return Err(self.bad_pdu(&e, st)),
                    };
                    // Data (if any) starts at PDO; with HPDA 0 that is right after the header.
                    let consumed = if h.data_len > 0 && h.pdu_type == PduType::C2HData {
                        h.data_offset as usize
                    } else {
                        need
                    };
                    if consumed > need && avail < consumed {
                        return Ok(());
                    }
                    self.rx_start += consumed;
                    self.handle_pdu(h, st, on_done, n)?;
                }
                Rx::Data {
                    cid,
                    left,
                    flags,
                    crc,
                } => {
                    if left == 0 {
                        self.rx_state = Rx::Ddgst { cid, flags, crc };
                        if !self.wire.ddgst {
                            self.c2h_done(cid, flags, on_done, n);
                        }
                        continue;
                    }
                    if avail == 0 {
                        return Ok(());
                    }
                    let take = avail.min(left as usize);
                    let s = &mut self.slots[cid as usize];
                    let lo = s.c2h_got as usize;
                    let src = &self.rx[self.rx_start..self.rx_start + take];
                    // Bounds were checked against the buffer when the PDU header arrived.
                    let dst = s.buf.as_mut().and_then(|b| b.bytes_mut());
                    if let Some(dst) = dst.and_then(|b| b.get_mut(lo..lo + take)) {
                        dst.copy_from_slice(src);
                    }
                    let crc = if self.wire.ddgst {
                        crc32c::crc32c_append(crc, src)
                    } else {
                        crc
                    };
                    s.c2h_got += take as u32;
                    self.rx_start += take;
                    self.rx_state = Rx::Data {
                        cid,
                        left: left - take as u32,
                        flags,
                        crc,
                    };
                }
                Rx::Ddgst { cid, flags, crc } => {
                    if !self.wire.ddgst {
                        self.rx_state = Rx::Hdr;
                        continue;
                    }
                    if avail < 4 {
                        return Ok(());
                    }
                    let st = self.rx_start;
                    let got = u32::from_le_bytes([
                        self.rx[st],
                        self.rx[st + 1],
                        self.rx[st + 2],
                        self.rx[st + 3],
                    ]);
                    self.rx_start += 4;
                    if got != crc {
                        // The PDU framing is intact, so like Linux we fail only this command
                        // (Data Transfer Error) and keep the connection.
                        warn!(qid = self.params.qid, cid, "C2HData data digest mismatch");
                        self.slots[cid as usize].xfer_err = true;
                    }
                    self.rx_state = Rx::Hdr;
                    self.c2h_done(cid, flags, on_done, n);
                }
            }
        }
    }

    fn bad_pdu(&mut self, e: &nvme_spec::PduError, st: usize) -> Error {
        let end = (st + 128).min(self.rx_end);
        let fes = e.fes().unwrap_or(fes::INVALID_HEADER_FIELD);
        self.terminate(fes, e.fei(), Some((st, end)), format!("malformed PDU: {e}"))
    }

    fn handle_pdu(
        &mut self,
        h: PduHeader,
        st: usize,
        on_done: &mut impl FnMut(Done<B>),
        n: &mut usize,
    ) -> Result<()> {
        let hdr = Some((st, st + h.ch.hlen as usize));
        match h.body {
            PduBody::CapsuleResp(r) => {
                let cid = r.cqe.cid();
                if !self.cid_ok(cid) {
                    return Err(self.terminate(
                        fes::INVALID_HEADER_FIELD,
                        8 + 12,
                        hdr,
                        format!("CapsuleResp for unknown cid {cid}"),
                    ));
                }
                if self.slots[cid as usize].tx_pending > 0 {
                    return Err(self.terminate(
                        fes::PDU_SEQUENCE_ERROR,
                        0,
                        hdr,
                        format!("CapsuleResp for cid {cid} before its data was sent"),
                    ));
                }
                self.complete(
                    cid,
                    r.cqe.status(),
                    r.cqe.result.get(),
                    r.cqe.dw1.get(),
                    on_done,
                    n,
                );
            }
            PduBody::R2T(r) => {
                let cid = r.cccid.get();
                let (off, len) = (r.r2to.get(), r.r2tl.get());
                if !self.cid_ok(cid) || self.slots[cid as usize].dir != Dir::ToCtrl {
                    return Err(self.terminate(
                        fes::INVALID_HEADER_FIELD,
                        8,
                        hdr,
                        format!("R2T for unknown or non-write cid {cid}"),
                    ));
                }
                let s = &self.slots[cid as usize];
                if s.in_capsule || s.r2t_next != s.r2t_end || s.tx_pending > 0 {
                    return Err(self.terminate(
                        fes::R2T_LIMIT_EXCEEDED,
                        0,
                        hdr,
                        format!("R2T for cid {cid} while another is open"),
                    ));
                }
                let end = off as u64 + len as u64;
                if len == 0 || end > s.len as u64 || off != s.r2t_end {
                    return Err(self.terminate(
                        fes::DATA_OUT_OF_RANGE,
                        12,
                        hdr,
                        format!(
                            "R2T offset {off} length {len} outside the {}-byte write (next expected {})",
                            s.len, s.r2t_end
                        ),
                    ));
                }
                let s = &mut self.slots[cid as usize];
                s.r2t_ttag = r.ttag.get();
                s.r2t_next = off;
                s.r2t_end = end as u32;
                self.next_chunk(cid);
            }
            PduBody::C2HData(d) => {
                let cid = d.cccid.get();
                let (off, len) = (d.datao.get(), h.data_len);
                if !self.cid_ok(cid) || self.slots[cid as usize].dir != Dir::ToHost {
                    return Err(self.terminate(
                        fes::INVALID_HEADER_FIELD,
                        8,
                        hdr,
                        format!("C2HData for unknown or non-read cid {cid}"),
                    ));
                }
                let s = &self.slots[cid as usize];
                if off != s.c2h_got || off as u64 + len as u64 > s.len as u64 {
                    return Err(self.terminate(
                        fes::DATA_OUT_OF_RANGE,
                        12,
                        hdr,
                        format!(
                            "C2HData offset {off} length {len} for a {}-byte read at {}",
                            s.len, s.c2h_got
                        ),
                    ));
                }
                if h.success() && off + len != s.len {
                    return Err(self.terminate(
                        fes::INVALID_HEADER_FIELD,
                        1,
                        hdr,
                        format!("C2HData SUCCESS after {} of {} bytes", off + len, s.len),
                    ));
                }
                if len == 0 {
                    self.c2h_done(cid, h.ch.flags, on_done, n);
                } else {
                    self.rx_state = Rx::Data {
                        cid,
                        left: len,
                        flags: h.ch.flags,
                        crc: 0,
                    };
                }
            }
            PduBody::TermReq(t) => {
                let (fes, fei) = (t.fes.get(), t.fei.get());
                warn!(
                    qid = self.params.qid,
                    fes,
                    fei,
                    "controller sent C2HTermReq: {}",
                    fes::name(fes)
                );
                self.disconnect();
                return Err(Error::TermReq { fes, fei });
            }
            _ => {
                return Err(self.terminate(
                    fes::INVALID_HEADER_FIELD,
                    0,
                    hdr,
                    format!("unexpected {} PDU from controller", h.pdu_type.name()),
                ))
            }
        }
        Ok(())
    }

    fn cid_ok(&self, cid: u16) -> bool {
        self.slots.get(cid as usize).is_some_and(|s| s.active)
    }

    fn c2h_done(&mut self, cid: u16, flags: u8, on_done: &mut impl FnMut(Done<B>), n: &mut usize) {
        self.rx_state = Rx::Hdr;
        if flags & nvme_spec::tcp::pdu_flags::SUCCESS != 0 {
            self.complete(cid, Status::SUCCESS, 0, 0, on_done, n);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        cid: u16,
        status: Status,
        dw0: u32,
        dw1: u32,
        on_done: &mut impl FnMut(Done<B>),
        n: &mut usize,
    ) {
        let s = &self.slots[cid as usize];
        let internal = s.internal;
        let status = if s.xfer_err && status.is_success() {
            Status::DATA_TRANSFER_ERROR
        } else {
            status
        };
        let d = self.finish(cid, status, dw0, dw1);
        if internal {
            self.internal_done = Some((status, dw0));
        } else {
            *n += 1;
            on_done(d);
        }
    }
}
