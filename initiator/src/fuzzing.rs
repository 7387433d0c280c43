//! Drives the host's NVMe/TCP queue with bytes from a "target" that says anything, for the
//! fuzz target `fuzz/fuzz_targets/nvme_tcp_host.rs`. plexd runs this host inside its own
//! process (a mirror's remote plex, `bdev_nvme_attach_controller`), so whatever another node
//! sends must end in an error for that connection, never in a panic, and never lose or
//! double-complete a command.
//!
//! A [`Harness`] is a queue connected over loopback to a socket the harness writes: the queue
//! takes five commands (a small and a large read, an in-capsule and an R2T write, a flush)
//! before it connects, so they go out on connection, and every byte written afterwards is
//! the target's stream. [`run`] is the fuzz entry; the tests below use the same harness with
//! well-formed streams, to show that it reaches the states the fuzzer is meant to explore.
//!
//! [`ctrlr`] goes a layer up: a whole controller against a target that frames every answer
//! correctly and lies in what it says.

pub mod ctrlr;

use std::cell::OnceCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use nvme_spec::opcode::io;
use nvme_spec::tcp::{header_digest, CapsuleResp, IcResp};
use nvme_spec::{Command, Completion, IntoBytes, Status};

use crate::tcp::queue::{TcpEndpoint, TcpQueue};
use crate::transport::{ConnParams, ConnectProgress, Dir, Done, Endpoint};

/// Queue entries: seven command slots and the Connect slot (CID 7), few enough that random
/// CIDs often name an active command.
const QSIZE: u16 = 8;
/// The CID of the queue's Fabrics Connect.
const CONNECT_CID: u16 = QSIZE - 1;
/// MAXH2CDATA of the scripted ICResp: the 64 KiB write goes out in four H2CData PDUs.
const MAXH2CDATA: u32 = 16 * 1024;
/// Controller ID the scripted Connect response grants.
const CNTLID: u16 = 1;

/// The commands every harness submits, in CID order 0..=4: (tag, opcode, direction, length).
const COMMANDS: [(u64, u8, Dir, usize); 5] = [
    (1, io::READ, Dir::ToHost, 4096),
    (2, io::WRITE, Dir::ToCtrl, 4096),
    (3, io::WRITE, Dir::ToCtrl, 64 * 1024),
    (4, io::READ, Dir::ToHost, 64 * 1024),
    (5, io::FLUSH, Dir::None, 0),
];

thread_local! {
    /// The loopback listener this thread's harnesses connect to: one per thread, so that
    /// harnesses on parallel test threads never accept each other's connections.
    static LISTENER: OnceCell<Option<TcpListener>> = const { OnceCell::new() };
}

/// `f` on this thread's listener; `None` if it could not be bound.
fn with_listener<T>(f: impl FnOnce(&TcpListener) -> Option<T>) -> Option<T> {
    LISTENER.with(|l| {
        l.get_or_init(|| TcpListener::bind("127.0.0.1:0").ok())
            .as_ref()
            .and_then(f)
    })
}

/// One queue and the target's end of its socket.
struct Harness {
    queue: TcpQueue<Vec<u8>>,
    target: TcpStream,
    /// Everything the host sent, in order (ICReq, capsules, H2CData).
    from_host: Vec<u8>,
    finished: Vec<Done<Vec<u8>>>,
    /// The queue reported an error and closed its connection.
    ended: bool,
    /// Commands one poll may finish (a reactor's budget); the rest wait staged.
    poll_max: usize,
}

impl Harness {
    /// A queue asking for the given digests, its commands submitted, its TCP connection
    /// accepted; `None` if the machine refuses the socket.
    fn new(hdgst: bool, ddgst: bool) -> Option<Harness> {
        let addr = with_listener(|l| l.local_addr().ok())?;
        let tcp = TcpEndpoint { addr, hdgst, ddgst };
        let params = ConnParams {
            endpoint: Endpoint::Tcp(tcp.clone()),
            qid: 1,
            qsize: QSIZE,
            subnqn: "nqn.2024-01.io.plexstor:fuzz".into(),
            hostnqn: "nqn.2024-01.io.plexstor:fuzz-host".into(),
            hostid: [1; 16],
            kato_ms: 0,
            connect_timeout: Duration::from_secs(5),
            in_capsule_max: 8192,
        };
        let mut queue = TcpQueue::new(params, tcp);
        for (tag, opcode, dir, len) in COMMANDS {
            let mut sqe = Command::new(opcode);
            sqe.set_nsid(1);
            let buf = (len > 0).then(|| vec![tag as u8; len]);
            queue.submit(sqe, dir, buf, tag).ok()?;
        }
        let target = Harness::start_connection(&mut queue)?;
        let mut h = Harness {
            queue,
            target,
            from_host: Vec::new(),
            finished: Vec::new(),
            ended: false,
            poll_max: usize::MAX,
        };
        h.step();
        Some(h)
    }

    /// Starts a connection and accepts it; returns the target's end.
    fn start_connection(queue: &mut TcpQueue<Vec<u8>>) -> Option<TcpStream> {
        queue.start_connect(0xFFFF).ok()?;
        let (target, _) = with_listener(|l| l.accept().ok())?;
        target.set_nonblocking(true).ok()?;
        // Each write reaches the host at once (loopback delivers inside `write`), not when
        // Nagle's algorithm lets it go.
        target.set_nodelay(true).ok()?;
        Some(target)
    }

    /// Drops the connection, as a lost one, and starts the next, as the controller's
    /// reconnect does: commands still out go again once it is up. `false` if the machine
    /// refuses the socket.
    fn reconnect(&mut self) -> bool {
        let Some(target) = Harness::start_connection(&mut self.queue) else {
            return false;
        };
        self.target = target;
        self.ended = false;
        self.step();
        true
    }

    /// Writes `bytes` as the target, `chunk` at a time (0: as much as the socket takes),
    /// polling the queue between writes, then polls until nothing moves.
    fn feed(&mut self, bytes: &[u8], chunk: usize) {
        let mut fed = 0;
        // Bounded: a queue that stops reading must not hang the fuzzer.
        for _ in 0..100_000 {
            if fed == bytes.len() || self.ended {
                break;
            }
            let end = if chunk == 0 {
                bytes.len()
            } else {
                (fed + chunk).min(bytes.len())
            };
            match self.target.write(&bytes[fed..end]) {
                Ok(n) => fed += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            self.step();
        }
        // Loopback has delivered every byte by now; what is staged may need more polls.
        for _ in 0..64 {
            if !self.step() {
                break;
            }
        }
    }

    /// One round: take what the host sent, then advance the queue once. Returns whether
    /// anything moved: bytes from the host, a finished command, a step of the connection.
    fn step(&mut self) -> bool {
        let mut moved = false;
        let mut b = [0u8; 64 * 1024];
        loop {
            match self.target.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    moved = true;
                    // Bounded, so a long fuzz input cannot grow it without end.
                    if self.from_host.len() < 1 << 20 {
                        self.from_host.extend_from_slice(&b[..n]);
                    }
                }
            }
        }
        if self.ended {
            return moved;
        }
        let res = if self.queue.is_connected() {
            let finished = &mut self.finished;
            self.queue
                .poll(self.poll_max, &mut |d| finished.push(d))
                .map(|n| n > 0)
        } else {
            self.queue
                .poll_connect()
                .map(|p| p != ConnectProgress::InProgress)
        };
        match res {
            Ok(progress) => moved || progress,
            Err(_) => {
                self.ended = true;
                true
            }
        }
    }

    /// Ends the run: commands still active fail as the owner's teardown fails them, and every
    /// command comes back. Panics if one came back twice or never (the fuzzer's finding).
    fn finish(mut self) -> Vec<Done<Vec<u8>>> {
        let finished = &mut self.finished;
        self.queue
            .fail_all(Status::ABORTED_BY_HOST, &mut |d| finished.push(d));
        let mut done = self.finished;
        done.sort_by_key(|f| f.tag);
        let tags: Vec<u64> = done.iter().map(|f| f.tag).collect();
        let want: Vec<u64> = COMMANDS.iter().map(|c| c.0).collect();
        assert_eq!(tags, want, "every command comes back exactly once");
        for (f, (_, _, _, len)) in done.iter().zip(COMMANDS) {
            let back = f.buf.as_ref().map_or(0, Vec::len);
            assert_eq!(
                back, len,
                "command {} came back with its whole buffer",
                f.tag
            );
        }
        done
    }
}

/// The target's half of a good handshake: ICResp granting the requested digests, then a
/// successful Connect response.
fn handshake(hdgst: bool, ddgst: bool) -> Vec<u8> {
    let mut s = IcResp::new(0, hdgst, ddgst, MAXH2CDATA).as_bytes().to_vec();
    s.extend(response(
        CONNECT_CID,
        Status::SUCCESS,
        u32::from(CNTLID),
        hdgst,
    ));
    s
}

/// A CapsuleResp for `cid`, with its header digest when `hdgst`.
fn response(cid: u16, status: Status, dw0: u32, hdgst: bool) -> Vec<u8> {
    let mut cqe = Completion::new(cid, status);
    cqe.result.set(dw0);
    with_digests(CapsuleResp::new(cqe, hdgst).as_bytes(), &[], hdgst, false)
}

/// A PDU from its header and data, with the digests the connection uses (no padding: the
/// harness's host asks for HPDA 0).
pub(crate) fn with_digests(hdr: &[u8], data: &[u8], hdgst: bool, ddgst: bool) -> Vec<u8> {
    let mut b = hdr.to_vec();
    if hdgst {
        b.extend_from_slice(&header_digest(hdr).to_le_bytes());
    }
    b.extend_from_slice(data);
    if ddgst && !data.is_empty() {
        b.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }
    b
}

/// Separates the streams of successive connections in a fuzz input.
const NEXT_CONNECTION: &[u8] = b"NEXT";
/// Connections a fuzz input may use: enough to pass `MAX_LOST_SENDS`, after which a command
/// still out is given up rather than sent again.
const MAX_CONNECTIONS: usize = 6;

/// Fuzz entry. The first byte: bit 0 writes a good handshake at the start of each connection
/// (bits 1 and 2: header and data digests, asked for and granted), so random bytes reach the
/// I/O path; bits 3..5 pick how each stream is cut into writes (as it comes, or 1, 3, 8, 24,
/// 100, 1000, 4096 bytes at a time), so PDUs arrive whole and in pieces; bits 6 and 7 the
/// commands one poll may finish (no limit, 1, 2, 3), so finished PDUs also wait staged for
/// the next poll, as a reactor's budget leaves them. The rest is the
/// target's stream; each [`NEXT_CONNECTION`] in it drops the connection and begins the
/// stream of the next one, so reconnection and resending are explored too.
pub fn run(input: &[u8]) {
    ignore_sigpipe();
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let (hd, dd) = (mode & 2 != 0, mode & 4 != 0);
    let chunk = [0, 1, 3, 8, 24, 100, 1000, 4096][usize::from((mode >> 3) & 7)];
    let Some(mut h) = Harness::new(hd, dd) else {
        return;
    };
    h.poll_max = [usize::MAX, 1, 2, 3][usize::from(mode >> 6)];
    for (i, stream) in split_streams(rest).take(MAX_CONNECTIONS).enumerate() {
        if i > 0 && !h.reconnect() {
            break;
        }
        if mode & 1 != 0 {
            h.feed(&handshake(hd, dd), 0);
        }
        h.feed(stream, chunk);
    }
    h.finish();
}

/// Makes a write to a socket its peer closed fail with EPIPE instead of killing the process,
/// as it does in plexd: Rust's runtime ignores SIGPIPE before `main`, but a fuzz target's
/// `main` is libFuzzer's, and the queues write with `writev`, which raises the signal.
pub(crate) fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: sets this process's disposition of SIGPIPE to "ignore"; no handler is
    // installed, so nothing can run in signal context.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// The pieces of `b` between [`NEXT_CONNECTION`] markers.
fn split_streams(mut b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let n = NEXT_CONNECTION.len();
        match b.windows(n).position(|w| w == NEXT_CONNECTION) {
            Some(i) => {
                let (head, tail) = (&b[..i], &b[i + n..]);
                b = tail;
                Some(head)
            }
            None => {
                done = true;
                Some(b)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme_spec::tcp::{C2HData, R2T};

    fn c2h(cid: u16, off: u32, data: &[u8], success: bool, hd: bool, dd: bool) -> Vec<u8> {
        let h =
            C2HData::new(cid, off, data.len() as u32, success, success, hd, dd, 0).expect("fits");
        with_digests(h.as_bytes(), data, hd, dd)
    }

    /// A harness connected by the good handshake, no digests.
    fn connected() -> Harness {
        let mut h = Harness::new(false, false).expect("loopback");
        h.feed(&handshake(false, false), 0);
        h
    }

    fn r2t(cid: u16, off: u32, len: u32, hd: bool) -> Vec<u8> {
        with_digests(R2T::new(cid, 9, off, len, hd).as_bytes(), &[], hd, false)
    }

    /// A well-behaved target's whole conversation, fed `chunk` bytes at a time.
    fn good_run(hd: bool, dd: bool, chunk: usize, poll_max: usize) -> Vec<Done<Vec<u8>>> {
        let mut h = Harness::new(hd, dd).expect("loopback");
        h.poll_max = poll_max;
        h.feed(&handshake(hd, dd), chunk);
        assert!(h.queue.is_connected(), "the scripted handshake connects");
        let small: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let large: Vec<u8> = (0..65536u32).map(|i| (i % 241) as u8).collect();
        let mut s = c2h(0, 0, &small, true, hd, dd);
        s.extend(response(1, Status::SUCCESS, 0, hd));
        s.extend(c2h(3, 0, &large[..40000], false, hd, dd));
        s.extend(c2h(3, 40000, &large[40000..], true, hd, dd));
        s.extend(response(4, Status::SUCCESS, 0, hd));
        s.extend(r2t(2, 0, 65536, hd));
        h.feed(&s, chunk);
        // The write's data must go out before its response may come.
        h.feed(&response(2, Status::SUCCESS, 0, hd), chunk);
        assert!(!h.ended, "a well-formed conversation keeps the connection");
        let sent = h.from_host.len();
        let done = h.finish();
        for f in &done {
            assert_eq!(f.status, Status::SUCCESS, "command {}", f.tag);
        }
        assert_eq!(done[0].buf.as_deref(), Some(&small[..]));
        assert_eq!(done[3].buf.as_deref(), Some(&large[..]));
        // ICReq, Connect, five capsules (one with 4 KiB in it), 64 KiB of H2CData and headers.
        assert!(
            sent > 4096 + 65536,
            "the host sent its write data ({sent} bytes)"
        );
        done
    }

    #[test]
    fn a_good_target_completes_every_command_with_its_data() {
        good_run(false, false, 0, usize::MAX);
    }

    #[test]
    fn one_command_per_poll_leaves_the_rest_staged_and_loses_none() {
        good_run(false, false, 0, 1);
    }

    #[test]
    fn with_digests_and_in_one_byte_pieces() {
        good_run(true, true, 0, usize::MAX);
        good_run(true, true, 1, usize::MAX);
    }

    #[test]
    fn a_corrupt_data_digest_fails_the_read_not_the_queue() {
        let mut h = Harness::new(false, true).expect("loopback");
        h.feed(&handshake(false, true), 0);
        let mut pdu = c2h(0, 0, &[7; 4096], true, false, true);
        let last = pdu.len() - 1;
        pdu[last] ^= 1;
        h.feed(&pdu, 0);
        let done = h.finish();
        assert_eq!(done[0].status, Status::DATA_TRANSFER_ERROR);
    }

    #[test]
    fn garbage_ends_the_connection_and_every_command_comes_back() {
        let mut h = connected();
        h.feed(&[0xA5; 300], 0);
        assert!(h.ended, "noise is a protocol error");
        let done = h.finish();
        assert!(done.iter().all(|f| f.status == Status::ABORTED_BY_HOST));
    }

    #[test]
    fn a_response_for_a_command_twice_is_refused() {
        let mut h = connected();
        let mut s = response(4, Status::SUCCESS, 0, false);
        s.extend(response(4, Status::SUCCESS, 0, false));
        h.feed(&s, 0);
        assert!(h.ended, "the second response names no active command");
        h.finish();
    }

    /// Found by the fuzzer: an answer to a user command while Connect was outstanding
    /// finished the command inside the connect steps, which dropped it: the caller never
    /// heard of it again.
    #[test]
    fn an_answer_before_connect_completes_is_refused_and_loses_no_command() {
        for early in [
            response(0, Status::SUCCESS, 0, false),
            c2h(0, 0, &[7; 4096], true, false, false),
        ] {
            let mut h = Harness::new(false, false).expect("loopback");
            let hs = handshake(false, false);
            let (icresp, connect_resp) = hs.split_at(128);
            h.feed(icresp, 0);
            h.feed(&early, 0);
            assert!(
                h.ended,
                "a PDU for a command not sent yet is a protocol error"
            );
            h.feed(connect_resp, 0);
            let done = h.finish();
            assert!(done.iter().all(|f| f.status == Status::ABORTED_BY_HOST));
        }
    }

    /// Commands out on a lost connection go again on the next; after `MAX_LOST_SENDS`
    /// connections lost under them they come back failed instead, once each.
    #[test]
    fn lost_connections_resend_then_give_up_and_every_command_comes_back_once() {
        let mut h = connected();
        let first = h.from_host.len();
        assert!(h.reconnect());
        h.feed(&handshake(false, false), 0);
        assert!(h.queue.is_connected());
        assert!(
            h.from_host.len() > first + 4096,
            "the commands went out again on the second connection"
        );
        // The flush is answered on the second connection; the rest stay out.
        h.feed(&response(4, Status::SUCCESS, 0, false), 0);
        for _ in 0..crate::transport::MAX_LOST_SENDS {
            assert!(h.reconnect());
            h.feed(&handshake(false, false), 0);
        }
        let done = h.finish();
        assert_eq!(done[4].status, Status::SUCCESS, "the flush");
        for f in &done[..4] {
            assert_eq!(f.status, Status::HOST_PATHING_ERROR, "command {}", f.tag);
        }
    }

    #[test]
    fn streams_split_at_each_marker() {
        let v: Vec<&[u8]> = split_streams(b"abNEXTNEXTcdNEXT").collect();
        assert_eq!(v, [&b"ab"[..], b"", b"cd", b""]);
        assert_eq!(split_streams(b"").count(), 1);
    }
}
