//! An I/O queue pair rejoining its controller after a reset, against a scripted NVMe/TCP peer
//! on loopback.
//!
//! The peer holds its side of the handshake until the test lets it go, and the test lets it go
//! only after `poll` has returned. A `poll` that waited on the network would therefore never
//! return while the peer holds: the peer gives up after `PEER_PATIENCE` and the test fails on
//! what it then sees, instead of hanging; a host stuck for good trips the test's watchdog. No
//! assertion bounds elapsed time from above.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvme_spec::fabrics::{Connect, ConnectData};
use nvme_spec::tcp::{
    C2HData, CapsuleResp, IcResp, ParseOptions, PduBody, PduHeader, PduType, Role, TermReq,
};
use nvme_spec::{Completion, FromBytes, IntoBytes, Status};

use super::{IoCompletion, IoQpair};
use crate::ctrlr::{CtrlrState, Shared};
use crate::opts::CtrlrOpts;
use crate::tcp::queue::ConnState;
use crate::tcp::queue::TcpEndpoint;
use crate::transport::{ConnParams, Endpoint, Queue};

/// The controller ID of the association the queue rejoins.
const CNTLID: u16 = 7;
const BLOCK: usize = 512;
const READ_TAG: u64 = 42;
/// How long the peer waits for the test's go-ahead before concluding that the host is stuck
/// inside a `poll`.
const PEER_PATIENCE: Duration = Duration::from_secs(20);
/// Bound on anything the test waits for; only reached when something is broken.
const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on a whole test, for a host stuck where no check of the test can run (a poll
/// blocked on a peer that waits for the host).
const WATCHDOG: Duration = Duration::from_secs(120);
/// Polls the test makes, each returning, while the peer holds its ICResp.
const POLLS_WHILE_HELD: usize = 20;

/// What the peer reports to the test, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    IcReq {
        conn: usize,
    },
    /// This many ICResp bytes have been sent.
    IcRespBytes(usize),
    Connect {
        qid: u16,
        cntlid: u16,
    },
    Read,
    /// The host closed connection `conn`.
    HungUp {
        conn: usize,
    },
    /// No go-ahead within `PEER_PATIENCE`.
    GaveUp,
}

/// The peer took the queue's Fabrics Connect for I/O queue 1 of the association.
const CONNECTED: Seen = Seen::Connect {
    qid: 1,
    cntlid: CNTLID,
};

/// How the peer answers ICReq.
#[derive(Debug, Clone)]
enum Script {
    /// The whole ICResp, at the test's go-ahead.
    WholeOnGo,
    /// ICResp one byte per go-ahead.
    BytewiseOnGo,
    /// Nothing: wait for the host to hang up.
    Never,
    /// These bytes instead of an ICResp, then close.
    Reply(Vec<u8>),
    /// ICResp and Connect at once; then close the connection on the first command, as a
    /// target that the command itself brings down would.
    HangUpOnCommand,
}

struct Peer {
    port: u16,
    seen: Receiver<Seen>,
    go: Sender<()>,
    thread: JoinHandle<()>,
}

/// A peer serving `connections` connections one after the other, then ending.
fn start_peer(script: Script, connections: usize) -> Peer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (seen_tx, seen) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        for conn in 1..=connections {
            let (s, _) = l.accept().expect("accept");
            if let Err(e) = serve(s, conn, &script, &seen_tx, &go_rx) {
                use std::io::ErrorKind::*;
                assert!(
                    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe),
                    "peer I/O error: {e}"
                );
                let _ = seen_tx.send(Seen::HungUp { conn });
            }
        }
    });
    Peer {
        port,
        seen,
        go,
        thread,
    }
}

impl Peer {
    /// The next report, which must be `want` (no polling: the host acts on its own).
    fn expect(&self, want: Seen) {
        let got = self.seen.recv_timeout(TEST_DEADLINE);
        assert_eq!(got, Ok(want));
    }

    /// Joins the peer thread (once the host is gone), failing on any check it failed.
    fn finish(self) {
        drop(self.go);
        if let Err(panic) = self.thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Waits for the test's go-ahead; false (reported as `GaveUp`) if it does not come.
fn go_ahead(go: &Receiver<()>, seen: &Sender<Seen>) -> bool {
    let ok = go.recv_timeout(PEER_PATIENCE).is_ok();
    if !ok {
        let _ = seen.send(Seen::GaveUp);
    }
    ok
}

fn serve(
    mut s: TcpStream,
    conn: usize,
    script: &Script,
    seen: &Sender<Seen>,
    go: &Receiver<()>,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let opts = ParseOptions::new(Role::Controller);
    let mut icreq = [0u8; 128];
    s.read_exact(&mut icreq)?;
    let h = PduHeader::parse(&icreq, &opts).expect("a valid ICReq");
    assert!(matches!(h.body, PduBody::IcReq(_)), "expected ICReq");
    let _ = seen.send(Seen::IcReq { conn });

    let icresp = IcResp::new(0, false, false, 8192);
    match script {
        Script::Never => return drain_until_hang_up(s, conn, seen),
        Script::Reply(bytes) => {
            s.write_all(bytes)?;
            s.shutdown(Shutdown::Write)?;
            return drain_until_hang_up(s, conn, seen);
        }
        Script::WholeOnGo => {
            if !go_ahead(go, seen) {
                return Ok(());
            }
            s.write_all(icresp.as_bytes())?;
        }
        Script::HangUpOnCommand => s.write_all(icresp.as_bytes())?,
        Script::BytewiseOnGo => {
            for (i, b) in icresp.as_bytes().iter().enumerate() {
                if !go_ahead(go, seen) {
                    return Ok(());
                }
                s.write_all(&[*b])?;
                let _ = seen.send(Seen::IcRespBytes(i + 1));
            }
        }
    }

    let pdu = read_pdu(&mut s)?;
    let h = PduHeader::parse(&pdu, &opts).expect("a valid Connect capsule");
    let PduBody::CapsuleCmd(cap) = h.body else {
        panic!("expected a capsule, got {:?}", h.pdu_type)
    };
    let connect = Connect::from_command(&cap.cmd).expect("Fabrics Connect");
    let data = ConnectData::read_from_bytes(&pdu[h.data_range()]).expect("1024 bytes of data");
    let _ = seen.send(Seen::Connect {
        qid: connect.qid,
        cntlid: data.cntlid.get(),
    });
    let mut cqe = Completion::new(cap.cmd.cid(), Status::SUCCESS);
    cqe.result.set(u32::from(CNTLID));
    s.write_all(CapsuleResp::new(cqe, false).as_bytes())?;

    // The read that waited for the connection: answered with data and SUCCESS, no response.
    let pdu = read_pdu(&mut s)?;
    let h = PduHeader::parse(&pdu, &opts).expect("a valid read capsule");
    let PduBody::CapsuleCmd(cap) = h.body else {
        panic!("expected a capsule, got {:?}", h.pdu_type)
    };
    let _ = seen.send(Seen::Read);
    if matches!(script, Script::HangUpOnCommand) {
        return Ok(()); // dropping the stream closes it
    }
    let data = pattern();
    let c2h = C2HData::new(cap.cmd.cid(), 0, BLOCK as u32, true, true, false, false, 0).unwrap();
    s.write_all(c2h.as_bytes())?;
    s.write_all(&data)?;
    drain_until_hang_up(s, conn, seen)
}

fn drain_until_hang_up(mut s: TcpStream, conn: usize, seen: &Sender<Seen>) -> std::io::Result<()> {
    let mut sink = [0u8; 4096];
    while s.read(&mut sink)? > 0 {}
    let _ = seen.send(Seen::HungUp { conn });
    Ok(())
}

fn read_pdu(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch)?;
    let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
    assert!((8..=64 * 1024).contains(&plen), "host sent PLEN {plen}");
    let mut pdu = vec![0u8; plen];
    pdu[..8].copy_from_slice(&ch);
    s.read_exact(&mut pdu[8..])?;
    Ok(pdu)
}

fn pattern() -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8).wrapping_mul(31)).collect()
}

/// A queue pair of association 1 of a controller that has just come back as association 2:
/// its next poll starts rejoining. It holds one read, submitted while disconnected.
fn rejoining_qpair(
    port: u16,
    connect_timeout: Duration,
    reconnect_delay: Duration,
) -> IoQpair<Vec<u8>> {
    let opts = CtrlrOpts {
        connect_timeout,
        reconnect_delay,
        io_timeout: None,
        ..CtrlrOpts::default()
    };
    let shared = Arc::new(Shared::new(&opts));
    shared.cntlid.store(u32::from(CNTLID), Ordering::Release);
    shared.epoch.store(2, Ordering::Release);
    shared.set_state(CtrlrState::Connected);
    let params = ConnParams {
        endpoint: Endpoint::Tcp(TcpEndpoint {
            addr: ([127, 0, 0, 1], port).into(),
            hdgst: false,
            ddgst: false,
        }),
        qid: 1,
        qsize: 8,
        subnqn: "nqn.2024-01.io.plexstor:reconnect".into(),
        hostnqn: opts.hostnqn.clone(),
        hostid: opts.hostid,
        kato_ms: 0,
        connect_timeout,
        in_capsule_max: 4096,
    };
    let mut qp = IoQpair::new(Queue::new(params), shared, 1, 1 << 20);
    qp.read(1, 0, 1, vec![0u8; BLOCK], READ_TAG)
        .expect("a read waits in its slot while disconnected");
    qp
}

fn conn_state(qp: &IoQpair<Vec<u8>>) -> ConnState {
    let Queue::Tcp(q) = &qp.q else {
        panic!("these tests use TCP queues")
    };
    q.conn_state()
}

/// Polls (every poll returning) until the peer reports `want`, which must be its next report.
fn poll_until_seen(
    qp: &mut IoQpair<Vec<u8>>,
    peer: &Peer,
    want: Seen,
    done: &mut Vec<IoCompletion<Vec<u8>>>,
) {
    let deadline = Instant::now() + TEST_DEADLINE;
    loop {
        qp.poll(|c| done.push(c));
        match peer.seen.try_recv() {
            Ok(got) if got == want => return,
            Ok(Seen::GaveUp) => panic!(
                "the peer waited {PEER_PATIENCE:?} for a go-ahead the test gives after a poll \
                 returns: a poll blocked (state now {:?})",
                conn_state(qp)
            ),
            Ok(got) => panic!("peer reported {got:?} while the test waited for {want:?}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} within {TEST_DEADLINE:?}; queue {:?}",
            conn_state(qp)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls until the queue's state satisfies `cond`, and returns that state.
fn poll_until_state(
    qp: &mut IoQpair<Vec<u8>>,
    what: &str,
    cond: impl Fn(ConnState) -> bool,
    done: &mut Vec<IoCompletion<Vec<u8>>>,
) -> ConnState {
    let deadline = Instant::now() + TEST_DEADLINE;
    loop {
        qp.poll(|c| done.push(c));
        let st = conn_state(qp);
        if cond(st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "queue never {what} within {TEST_DEADLINE:?}; state {st:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls until the read has ended, one way or another.
fn poll_until_done(qp: &mut IoQpair<Vec<u8>>, done: &mut Vec<IoCompletion<Vec<u8>>>) {
    let deadline = Instant::now() + TEST_DEADLINE;
    while done.is_empty() {
        qp.poll(|c| done.push(c));
        assert!(Instant::now() < deadline, "the read never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls until the read completes, and checks it.
fn expect_read_back(qp: &mut IoQpair<Vec<u8>>, done: &mut Vec<IoCompletion<Vec<u8>>>) {
    poll_until_done(qp, done);
    assert_eq!(done.len(), 1);
    let c = done.pop().unwrap();
    assert_eq!(c.tag, READ_TAG);
    assert_eq!(c.result, Ok(()));
    assert_eq!(c.buf.as_deref(), Some(&pattern()[..]), "read data");
    assert!(qp.is_connected());
    assert_eq!(qp.outstanding(), 0);
}

/// Runs `test` on its own thread and fails if it has not finished within [`WATCHDOG`].
fn with_watchdog(test: impl FnOnce() + Send + 'static) {
    let (done_tx, done) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        test();
        let _ = done_tx.send(());
    });
    match done.recv_timeout(WATCHDOG) {
        // Finished, or panicked (which drops the sender): the join tells which.
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("still running after {WATCHDOG:?}: a poll is blocked on the network")
        }
    }
}

/// One rejoin that succeeds: the peer (following `script`, one connection) takes the ICReq,
/// `while_held` drives the queue while the peer holds the ICResp back, then the rejoin must
/// finish (Connect, the waiting read, read back), and dropping the queue hangs up.
fn rejoin_with_icresp_held(
    script: Script,
    while_held: impl FnOnce(&mut IoQpair<Vec<u8>>, &Peer, &mut Vec<IoCompletion<Vec<u8>>>),
) {
    let peer = start_peer(script, 1);
    let mut qp = rejoining_qpair(
        peer.port,
        Duration::from_secs(60),
        Duration::from_millis(50),
    );
    let mut done = Vec::new();
    poll_until_seen(&mut qp, &peer, Seen::IcReq { conn: 1 }, &mut done);
    while_held(&mut qp, &peer, &mut done);
    poll_until_seen(&mut qp, &peer, CONNECTED, &mut done);
    poll_until_seen(&mut qp, &peer, Seen::Read, &mut done);
    expect_read_back(&mut qp, &mut done);
    drop(qp);
    peer.expect(Seen::HungUp { conn: 1 });
    peer.finish();
}

#[test]
fn reconnect_advances_across_polls_that_return_while_the_target_holds_icresp() {
    with_watchdog(|| {
        rejoin_with_icresp_held(Script::WholeOnGo, |qp, peer, done| {
            for i in 0..POLLS_WHILE_HELD {
                assert_eq!(qp.poll(|c| done.push(c)), 0);
                let st = conn_state(qp);
                assert!(
                    matches!(st, ConnState::AwaitingIcResp { got: 0, .. }),
                    "poll {i} while ICResp is held: state {st:?}"
                );
                assert!(!qp.is_connected());
                assert_eq!(qp.outstanding(), 1, "the read waits for the connection");
            }
            peer.go.send(()).unwrap();
        });
    });
}

#[test]
fn icresp_arriving_byte_by_byte_is_assembled_across_polls() {
    with_watchdog(|| {
        rejoin_with_icresp_held(Script::BytewiseOnGo, |qp, peer, done| {
            const ICRESP_LEN: usize = 128;
            for sent in 1..=ICRESP_LEN {
                peer.go
                    .send(())
                    .expect("the peer is waiting for its go-ahead");
                poll_until_seen(qp, peer, Seen::IcRespBytes(sent), done);
                if sent < ICRESP_LEN {
                    poll_until_state(
                        qp,
                        &format!("holding {sent} ICResp bytes"),
                        |st| matches!(st, ConnState::AwaitingIcResp { got, .. } if got == sent),
                        done,
                    );
                }
            }
        });
    });
}

#[test]
fn a_silent_target_fails_the_attempt_at_the_connect_timeout_then_it_is_retried_after_the_delay() {
    with_watchdog(|| {
        let connect_timeout = Duration::from_millis(200);
        let reconnect_delay = Duration::from_millis(300);
        let peer = start_peer(Script::Never, 2);
        let mut qp = rejoining_qpair(peer.port, connect_timeout, reconnect_delay);
        let mut done = Vec::new();

        let first_attempt_began = Instant::now();
        poll_until_seen(&mut qp, &peer, Seen::IcReq { conn: 1 }, &mut done);
        poll_until_state(
            &mut qp,
            "gave up on the silent target",
            |st| st == ConnState::Down,
            &mut done,
        );
        assert!(
            Instant::now().duration_since(first_attempt_began) >= connect_timeout,
            "the attempt failed before the connect timeout"
        );
        // The host closed its side: the failed attempt leaves nothing behind.
        peer.expect(Seen::HungUp { conn: 1 });

        // Lower bounds only: the attempt cannot fail before its timeout, nor the next begin
        // before reconnect_delay has passed since the failure.
        let retry = poll_until_state(
            &mut qp,
            "tried again",
            |st| st != ConnState::Down,
            &mut done,
        );
        assert!(
            Instant::now().duration_since(first_attempt_began) >= connect_timeout + reconnect_delay,
            "retried ({retry:?}) before connect timeout + reconnect_delay"
        );
        poll_until_seen(&mut qp, &peer, Seen::IcReq { conn: 2 }, &mut done);

        // The controller is up, so the read is neither failed nor lost: it waits for the path.
        assert!(done.is_empty(), "no completion while reconnecting");
        assert_eq!(qp.outstanding(), 1);
        drop(qp);
        peer.expect(Seen::HungUp { conn: 2 });
        peer.finish();
    });
}

#[test]
fn a_bad_icresp_fails_the_attempt_cleanly() {
    with_watchdog(|| {
        let good = IcResp::new(0, false, false, 8192);
        let mut unknown_type = [0u8; 8];
        unknown_type[0] = 0x7f;
        unknown_type[2] = 128;
        unknown_type[4] = 128;
        let capsule_resp = CapsuleResp::new(Completion::new(0, Status::SUCCESS), false);
        let mut term_req = TermReq::new(PduType::C2HTermReq, 1, 0, 0)
            .as_bytes()
            .to_vec();
        term_req.resize(24, 0);
        let cases: [(&str, Vec<u8>); 5] = [
            ("an unknown PDU type", unknown_type.to_vec()),
            ("a CapsuleResp", capsule_resp.as_bytes().to_vec()),
            ("a C2HTermReq", term_req),
            ("half an ICResp", good.as_bytes()[..60].to_vec()),
            ("nothing", Vec::new()),
        ];
        for (what, bytes) in cases {
            let peer = start_peer(Script::Reply(bytes), 1);
            let mut qp =
                rejoining_qpair(peer.port, Duration::from_secs(60), Duration::from_secs(60));
            let mut done = Vec::new();
            poll_until_seen(&mut qp, &peer, Seen::IcReq { conn: 1 }, &mut done);
            poll_until_state(
                &mut qp,
                &format!("failed on {what}"),
                |st| st == ConnState::Down,
                &mut done,
            );
            peer.expect(Seen::HungUp { conn: 1 });
            assert!(
                done.is_empty(),
                "{what}: the read waits for the next attempt"
            );
            assert_eq!(qp.outstanding(), 1, "{what}");
            drop(qp);
            peer.finish();
        }
    });
}

/// A command whose every sending loses the connection (the target drops it, or dies, each
/// time it arrives) is not sent forever: out on `MAX_LOST_SENDS` lost connections, it fails
/// with a path error at the next reconnection instead of going out again, and the queue
/// itself stays usable.
#[test]
fn a_command_that_loses_every_connection_it_goes_out_on_fails_instead_of_going_out_forever() {
    use crate::transport::MAX_LOST_SENDS;
    with_watchdog(|| {
        let lost = usize::from(MAX_LOST_SENDS);
        let peer = start_peer(Script::HangUpOnCommand, lost + 1);
        let mut qp = rejoining_qpair(
            peer.port,
            Duration::from_secs(60),
            Duration::from_millis(10),
        );
        let mut done = Vec::new();
        for conn in 1..=lost {
            poll_until_seen(&mut qp, &peer, Seen::IcReq { conn }, &mut done);
            poll_until_seen(&mut qp, &peer, CONNECTED, &mut done);
            poll_until_seen(&mut qp, &peer, Seen::Read, &mut done);
            poll_until_state(&mut qp, "down", |st| st == ConnState::Down, &mut done);
            assert!(
                done.is_empty(),
                "the read ended after {conn} lost connection(s)"
            );
            // What the controller's reset does once the queue reports the loss: a new
            // association for the queue to join.
            assert!(qp.shared.reset_req.swap(false, Ordering::AcqRel));
            qp.shared.epoch.fetch_add(1, Ordering::AcqRel);
        }
        // Connection lost + 1: joined, and the read fails rather than going out again.
        poll_until_seen(&mut qp, &peer, Seen::IcReq { conn: lost + 1 }, &mut done);
        poll_until_seen(&mut qp, &peer, CONNECTED, &mut done);
        poll_until_done(&mut qp, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, READ_TAG);
        assert_eq!(done[0].result, Err(crate::IoError::PathFailed));
        assert!(done[0].buf.is_some(), "the buffer comes back");
        assert!(qp.is_connected());
        assert_eq!(qp.outstanding(), 0);
        drop(qp);
        peer.expect(Seen::HungUp { conn: lost + 1 });
        peer.finish();
    });
}
