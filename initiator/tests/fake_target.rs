//! The host against a scripted NVMe/TCP controller written here: real bytes over loopback.
//!
//! The fake controller is deliberately picky (it checks what the host sends with
//! nvme-spec's validating parser) and can misbehave on request (a response for a CID that does
//! not exist) to exercise the host's failure handling and reconnect.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dma::DmaBuf;
use initiator::discovery;
use initiator::qpair::IoCompletion;
use initiator::trid::DISCOVERY_NQN;
use initiator::{Controller, CtrlrEvent, CtrlrOpts, CtrlrState, IoError, TransportId};
use nvme_spec::tcp::{C2HData, PduBody, PduHeader, R2T};
use nvme_spec::{Command, IntoBytes, Status};

use common::{accept_icreq, identify_data, read_pdu, Conn, BS, MAXH2C, NBLOCKS};

#[derive(Default)]
struct Knobs {
    /// After this many I/O completions, answer with a CID that does not exist (once).
    bogus_after: AtomicUsize,
    bogus_done: AtomicBool,
    io_done: AtomicUsize,
    /// I/O responses written whole to the socket (counted after the write, where `io_done`
    /// counts before it).
    io_answered: AtomicUsize,
    connects: AtomicUsize,
    term_reqs: AtomicUsize,
    ka: AtomicUsize,
    /// Keep I/O commands without ever answering them (a controller that stopped responding).
    hold_io: AtomicBool,
    io_held: AtomicUsize,
    /// The target is gone: new connections are closed as soon as they arrive.
    gone: AtomicBool,
    /// Connections closed on arrival because the target is gone (the host's reconnect attempts).
    refused: AtomicUsize,
    /// The acceptor exits at its next connection.
    stop: AtomicBool,
}

/// One connection the fake served: a handle to cut it, and the thread serving it.
struct Served {
    stream: TcpStream,
    thread: JoinHandle<std::io::Result<()>>,
}

/// The fake controller. When dropped (after the test's host, declared after it, is gone) it
/// stops and checks how every connection ended: a failed check in a serving thread (a panic)
/// or an I/O error other than a hang-up fails the test.
struct Fake {
    port: u16,
    knobs: Arc<Knobs>,
    disk: Arc<Mutex<Vec<u8>>>,
    served: Arc<Mutex<Vec<Served>>>,
    acceptor: Option<JoinHandle<()>>,
}

fn start_fake() -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let knobs = Arc::new(Knobs::default());
    knobs.bogus_after.store(usize::MAX, Ordering::Relaxed);
    let disk = Arc::new(Mutex::new(vec![0u8; NBLOCKS as usize * BS]));
    let served = Arc::new(Mutex::new(Vec::new()));
    let (k, d, sv) = (knobs.clone(), disk.clone(), served.clone());
    let acceptor = std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            if k.stop.load(Ordering::SeqCst) {
                return;
            }
            if k.gone.load(Ordering::SeqCst) {
                k.refused.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let stream = s.try_clone().expect("clone of an accepted stream");
            let (k, d) = (k.clone(), d.clone());
            let thread = std::thread::spawn(move || serve_until_hang_up(s, &k, &d));
            sv.lock().unwrap().push(Served { stream, thread });
        }
    });
    Fake {
        port,
        knobs,
        disk,
        served,
        acceptor: Some(acceptor),
    }
}

impl Fake {
    /// The target goes away: every connection is cut, and new ones are closed on arrival.
    fn take_away(&self) {
        self.knobs.gone.store(true, Ordering::SeqCst);
        for s in self.served.lock().unwrap().iter() {
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }

    /// Stops accepting, cuts every connection, and returns how the serving threads failed.
    fn stop(&mut self) -> Vec<String> {
        let Some(acceptor) = self.acceptor.take() else {
            return Vec::new();
        };
        self.knobs.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, blocked in accept(), so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let mut failures = Vec::new();
        if acceptor.join().is_err() {
            failures.push("the acceptor thread panicked".to_string());
        }
        for s in std::mem::take(&mut *self.served.lock().unwrap()) {
            let _ = s.stream.shutdown(Shutdown::Both);
            match s.thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("I/O error: {e}")),
                Err(panic) => failures.push(format!(
                    "failed check: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                )),
            }
        }
        failures
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let failures = self.stop();
        if failures.is_empty() {
            return;
        }
        if std::thread::panicking() {
            // The test failed already; this may be why.
            eprintln!("the fake target also saw: {failures:?}");
        } else {
            panic!("the fake target saw: {failures:?}");
        }
    }
}

/// `serve`, with the connection's end by either side (EOF, reset, broken pipe) counted as a
/// normal end: only failed checks and other I/O errors are failures.
fn serve_until_hang_up(s: TcpStream, k: &Knobs, disk: &Mutex<Vec<u8>>) -> std::io::Result<()> {
    use std::io::ErrorKind::*;
    match serve(s, k, disk) {
        Err(e)
            if matches!(
                e.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

impl Conn {
    fn c2h(&mut self, cid: u16, data: &[u8], success: bool) -> std::io::Result<()> {
        // Two PDUs when there is enough data, to exercise offsets.
        let half = if data.len() >= 1024 {
            data.len() / 2
        } else {
            data.len()
        };
        let mut off = 0;
        while off < data.len() {
            let n = half.min(data.len() - off);
            let last = off + n == data.len();
            let h = C2HData::new(
                cid,
                off as u32,
                n as u32,
                last,
                last && success,
                self.hd,
                self.dd,
                0,
            )
            .unwrap();
            self.send(h.as_bytes(), Some(&data[off..off + n]))?;
            off += n;
        }
        Ok(())
    }
}

struct PendingWrite {
    slba: u64,
    data: Vec<u8>,
    len: usize,
    r2t_end: usize,
}

fn serve(s: TcpStream, k: &Knobs, disk: &Mutex<Vec<u8>>) -> std::io::Result<()> {
    // Every digest the host asks for is granted.
    let (mut c, mut s2, opts) = accept_icreq(s, true, true)?;
    let mut writes: HashMap<u16, PendingWrite> = HashMap::new();
    loop {
        let pdu = read_pdu(&mut s2)?;
        let h = PduHeader::parse(&pdu, &opts).expect("host PDU must be valid");
        let data = &pdu[h.data_range()];
        if let Some(r) = h.data_digest_range() {
            assert_eq!(
                &pdu[r],
                &crc32c::crc32c(data).to_le_bytes(),
                "host data digest"
            );
        }
        match h.body {
            PduBody::TermReq(_) => {
                k.term_reqs.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            PduBody::CapsuleCmd(cap) => {
                let cmd = cap.cmd;
                if cmd.is_fabrics() {
                    c.fabrics(&cmd, data, |con| {
                        k.connects.fetch_add(1, Ordering::Relaxed);
                        // SQ flow control off on I/O queues only (CATTR bit 2).
                        let want = if con.qid == 0 { 0 } else { 1 << 2 };
                        assert_eq!(con.cattr, want, "Connect CATTR of queue {}", con.qid);
                    })?;
                } else if c.qid == 0 {
                    admin(&mut c, &cmd, k)?;
                } else {
                    io(&mut c, &cmd, data, k, disk, &mut writes)?;
                }
            }
            PduBody::H2CData(d) => {
                let cid = d.cccid.get();
                let w = writes
                    .get_mut(&cid)
                    .expect("H2CData for a write we asked for");
                assert_eq!(
                    d.datao.get() as usize,
                    w.data.len(),
                    "H2CData offset in order"
                );
                assert!(data.len() <= MAXH2C as usize);
                w.data.extend_from_slice(data);
                assert!(w.data.len() <= w.r2t_end);
                if w.data.len() == w.r2t_end {
                    if w.r2t_end < w.len {
                        // Second R2T for the rest: hosts must handle several per command.
                        let off = w.r2t_end;
                        w.r2t_end = w.len;
                        let r = R2T::new(cid, 7, off as u32, (w.len - off) as u32, c.hd);
                        c.send(r.as_bytes(), None)?;
                    } else {
                        let w = writes.remove(&cid).unwrap();
                        let at = w.slba as usize * BS;
                        disk.lock().unwrap()[at..at + w.len].copy_from_slice(&w.data);
                        finish_io(&mut c, cid, k)?;
                    }
                }
            }
            other => panic!("unexpected PDU from host: {other:?}"),
        }
    }
}

fn finish_io(c: &mut Conn, cid: u16, k: &Knobs) -> std::io::Result<()> {
    let n = k.io_done.fetch_add(1, Ordering::Relaxed);
    if n >= k.bogus_after.load(Ordering::Relaxed) && !k.bogus_done.swap(true, Ordering::Relaxed) {
        // Misbehave once: a completion for a CID the host never used.
        return c.resp(cid ^ 0x4000, Status::SUCCESS, 0, 0);
    }
    c.resp(cid, Status::SUCCESS, 0, 0)?;
    k.io_answered.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn admin(c: &mut Conn, cmd: &Command, k: &Knobs) -> std::io::Result<()> {
    let cid = cmd.cid();
    match cmd.opcode {
        0x06 => {
            let Some(b) = identify_data(cmd.cdw10.get() as u8, "fake", "1234") else {
                return c.resp(cid, Status::INVALID_FIELD, 0, 0);
            };
            c.c2h(cid, &b, false)?;
            c.resp(cid, Status::SUCCESS, 0, 0)
        }
        0x09 => c.resp(cid, Status::SUCCESS, (3 << 16) | 3, 0),
        0x18 => {
            k.ka.fetch_add(1, Ordering::Relaxed);
            c.resp(cid, Status::SUCCESS, 0, 0)
        }
        0x0c => Ok(()), // AER: held forever
        0x02 => {
            // Discovery log: 2 entries.
            let numd = ((cmd.cdw10.get() >> 16) | (cmd.cdw11.get() << 16)) as usize + 1;
            let off = (cmd.cdw12.get() as usize) | ((cmd.cdw13.get() as usize) << 32);
            let mut log = vec![0u8; 3 * 1024];
            log[0..8].copy_from_slice(&5u64.to_le_bytes());
            log[8..16].copy_from_slice(&2u64.to_le_bytes());
            for i in 0..2 {
                let nqn = format!("nqn.2024-01.io.fake:sub{i}");
                let e =
                    nvme_spec::log::DiscoveryLogEntry::tcp(2, &nqn, "127.0.0.1", "4420", false, 1)
                        .unwrap();
                log[1024 * (i + 1)..1024 * (i + 2)].copy_from_slice(e.as_bytes());
            }
            let want = numd * 4;
            let mut out = log.get(off..).unwrap_or(&[]).to_vec();
            out.resize(want, 0);
            c.c2h(cid, &out, true)
        }
        _ => c.resp(cid, Status::INVALID_OPCODE, 0, 0),
    }
}

fn io(
    c: &mut Conn,
    cmd: &Command,
    data: &[u8],
    k: &Knobs,
    disk: &Mutex<Vec<u8>>,
    writes: &mut HashMap<u16, PendingWrite>,
) -> std::io::Result<()> {
    let cid = cmd.cid();
    let slba = u64::from(cmd.cdw10.get()) | (u64::from(cmd.cdw11.get()) << 32);
    let nlb = (cmd.cdw12.get() & 0xffff) as usize + 1;
    let len = nlb * BS;
    assert!(slba + nlb as u64 <= NBLOCKS);
    let sgl = cmd.sgl1();
    assert_eq!(sgl.len() as usize, len, "SGL length = transfer length");
    if k.hold_io.load(Ordering::SeqCst) {
        k.io_held.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    match cmd.opcode {
        0x01 if sgl.is_in_capsule() => {
            assert_eq!(data.len(), len);
            let at = slba as usize * BS;
            disk.lock().unwrap()[at..at + len].copy_from_slice(data);
            finish_io(c, cid, k)
        }
        0x01 => {
            assert!(sgl.is_tcp_transport() && data.is_empty());
            assert!(
                len > 4096,
                "writes that fit in-capsule must be sent in-capsule"
            );
            let half = (len / 2).next_multiple_of(BS);
            writes.insert(
                cid,
                PendingWrite {
                    slba,
                    data: Vec::new(),
                    len,
                    r2t_end: half,
                },
            );
            let r = R2T::new(cid, 3, 0, half as u32, c.hd);
            c.send(r.as_bytes(), None)
        }
        0x02 => {
            let at = slba as usize * BS;
            let d = disk.lock().unwrap()[at..at + len].to_vec();
            // Even CIDs get the SUCCESS flag (no CapsuleResp), odd ones a CapsuleResp.
            let success =
                cid.is_multiple_of(2) && k.bogus_after.load(Ordering::Relaxed) == usize::MAX;
            c.c2h(cid, &d, success)?;
            if success {
                k.io_done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            } else {
                finish_io(c, cid, k)
            }
        }
        _ => c.resp(cid, Status::INVALID_OPCODE, 0, 0),
    }
}

// ------------------------------------------------------------------------------ tests

fn trid(port: u16, nqn: &str) -> TransportId {
    format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}")
        .parse()
        .unwrap()
}

fn opts(digests: bool) -> CtrlrOpts {
    CtrlrOpts {
        hdgst: digests,
        ddgst: digests,
        keep_alive_timeout: Duration::from_millis(400),
        reconnect_delay: Duration::from_millis(50),
        ctrlr_loss_timeout: Some(Duration::from_secs(5)),
        ..CtrlrOpts::default()
    }
}

fn pattern(len: usize, seed: u8) -> DmaBuf {
    let mut b = DmaBuf::zeroed(len).expect("DMA buffer");
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

/// A deadline for conditions that come within milliseconds, far beyond any scheduling delay.
const DEADLINE: Duration = Duration::from_secs(30);

/// Polls until `n` completions arrive (or panics at the deadline), polling the controller too.
fn wait(
    c: &mut Controller,
    q: &mut initiator::IoQpair<DmaBuf>,
    n: usize,
) -> Vec<IoCompletion<DmaBuf>> {
    let mut out = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while out.len() < n {
        q.poll(|d| out.push(d));
        c.poll();
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {n}",
            out.len()
        );
    }
    out
}

/// Polls `cond` until it holds, or panics at the deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn round_trip(digests: bool) {
    let f = start_fake();
    let mut c =
        Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &opts(digests)).unwrap();
    assert_eq!(c.state(), CtrlrState::Connected);
    assert_eq!(c.info().model, "fake");
    assert_eq!(c.info().in_capsule_data, 4096);
    assert_eq!(c.info().max_transfer, 128 * 1024);
    assert_eq!((c.info().hdgst, c.info().ddgst), (digests, digests));
    assert_eq!(c.namespaces().len(), 1);
    assert_eq!(c.namespaces()[0].block_size, 512);
    assert_eq!(c.namespaces()[0].blocks, NBLOCKS);
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();

    // In-capsule (512, 4096), one R2T split in two with several H2CData each (12 KiB, 64 KiB).
    let sizes = [512usize, 4096, 12288, 65536];
    let mut lba = 0u64;
    for (i, &sz) in sizes.iter().enumerate() {
        q.write(1, lba, (sz / BS) as u32, pattern(sz, i as u8), i as u64)
            .map_err(|e| e.kind)
            .unwrap();
        lba += (sz / BS) as u64;
    }
    let done = wait(&mut c, &mut q, sizes.len());
    assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");
    let mut lba = 0u64;
    for (i, &sz) in sizes.iter().enumerate() {
        q.read(
            1,
            lba,
            (sz / BS) as u32,
            DmaBuf::zeroed(sz).expect("DMA buffer"),
            i as u64,
        )
        .map_err(|e| e.kind)
        .unwrap();
        lba += (sz / BS) as u64;
    }
    let mut done = wait(&mut c, &mut q, sizes.len());
    done.sort_by_key(|d| d.tag);
    for (i, d) in done.iter().enumerate() {
        assert!(d.result.is_ok());
        assert_eq!(
            &d.buf.as_ref().unwrap()[..],
            &pattern(sizes[i], i as u8)[..],
            "read back size {}",
            sizes[i]
        );
    }
    assert_eq!(&f.disk.lock().unwrap()[..512], &pattern(512, 0)[..]);
    drop(q);
    c.detach().unwrap();
}

#[test]
fn bring_up_write_read_in_capsule_r2t_c2h() {
    round_trip(false);
}

#[test]
fn with_header_and_data_digests() {
    round_trip(true);
}

/// Reads of sizes that alternate between small and large, all in flight at once, so their
/// C2HData PDUs arrive back to back: large payloads are read into place and the headers
/// between them staged a little at a time; small ones are staged many per read. Every byte
/// must land in its own read's buffer.
fn mixed_reads(digests: bool) {
    let f = start_fake();
    let disk: Vec<u8> = (0..NBLOCKS as usize * BS)
        .map(|i| (i as u8) ^ (i >> 9) as u8 ^ (i >> 17) as u8)
        .collect();
    f.disk.lock().unwrap().copy_from_slice(&disk);
    let mut c =
        Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &opts(digests)).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();
    let sizes = [
        131072usize,
        512,
        65536,
        4096,
        16384,
        1024,
        131072,
        8192,
        32768,
        512,
        20480,
    ];
    for round in 0..3 {
        let mut wanted = Vec::new();
        let mut lba = round * 7;
        for (i, &sz) in sizes.iter().cycle().take(30).enumerate() {
            let blocks = (sz / BS) as u64;
            if lba + blocks > NBLOCKS {
                lba = 0;
            }
            let buf = DmaBuf::zeroed(sz).expect("DMA buffer");
            q.read(1, lba, blocks as u32, buf, i as u64)
                .map_err(|e| e.kind)
                .unwrap();
            wanted.push(lba as usize * BS..lba as usize * BS + sz);
            lba += blocks + 3;
        }
        let done = wait(&mut c, &mut q, wanted.len());
        for d in &done {
            let range = wanted[d.tag as usize].clone();
            assert!(d.result.is_ok(), "read {}: {:?}", d.tag, d.result);
            assert!(
                d.buf.as_ref().unwrap()[..] == disk[range.clone()],
                "round {round}: read {} of {} bytes at byte {} came back with other bytes",
                d.tag,
                range.len(),
                range.start
            );
        }
    }
    drop(q);
    c.detach().unwrap();
}

#[test]
fn small_and_large_reads_in_flight_together_each_read_back_whole() {
    mixed_reads(false);
}

#[test]
fn small_and_large_reads_with_digests_each_read_back_whole() {
    mixed_reads(true);
}

#[test]
fn keep_alive_goes_out_from_poll() {
    let f = start_fake();
    let mut c =
        Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &opts(false)).unwrap();
    let polling_since = Instant::now();
    // Only poll() sends them: three answered keep-alives keep the controller connected.
    wait_until("three keep-alives", || {
        c.poll();
        f.knobs.ka.load(Ordering::SeqCst) >= 3
    });
    assert_eq!(c.state(), CtrlrState::Connected);
    // KATO 400 ms: one every 200 ms, not one per poll. Three need at least two intervals,
    // a lower bound that load cannot break.
    assert!(polling_since.elapsed() >= Duration::from_millis(400));
}

#[test]
fn unknown_cid_fails_connection_then_reconnects_and_resends() {
    let f = start_fake();
    let mut c =
        Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &opts(false)).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();
    f.knobs.bogus_after.store(2, Ordering::Relaxed);
    for i in 0..4u64 {
        q.write(1, i * 8, 8, pattern(4096, i as u8), i)
            .map_err(|e| e.kind)
            .unwrap();
    }
    let mut states = Vec::new();
    let mut done = Vec::new();
    let t = Instant::now();
    while done.len() < 4 {
        q.poll(|d| done.push(d));
        c.poll();
        while let Some(ev) = c.next_event() {
            states.push(ev);
        }
        assert!(
            t.elapsed() < DEADLINE,
            "stuck: {} done, states {states:?}",
            done.len()
        );
    }
    assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort();
    assert_eq!(tags, [0, 1, 2, 3]);
    assert!(
        states.contains(&initiator::CtrlrEvent::State(CtrlrState::Resetting)),
        "{states:?}"
    );
    assert_eq!(c.state(), CtrlrState::Connected);
    // The bad PDU was answered with a TermReq; admin + I/O queue connected twice.
    wait_until("the host's TermReq", || {
        f.knobs.term_reqs.load(Ordering::Relaxed) > 0
    });
    assert_eq!(f.knobs.term_reqs.load(Ordering::Relaxed), 1);
    assert!(f.knobs.connects.load(Ordering::Relaxed) >= 4);
}

/// What the host saw after the target went away, in order.
/// A command the controller never answers times out, is aborted (this controller refuses
/// Abort), and the controller is reset for it. After the reset that command fails as timed
/// out instead of being sent again (where it would time out again, and reset the controller
/// again, forever), while the path works on.
#[test]
fn a_command_that_outlives_its_abort_fails_after_the_reset_instead_of_being_resent() {
    let f = start_fake();
    let o = CtrlrOpts {
        io_timeout: Some(Duration::from_millis(200)),
        ..opts(false)
    };
    let mut c = Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &o).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();
    f.knobs.hold_io.store(true, Ordering::SeqCst);
    q.read(1, 0, 8, DmaBuf::zeroed(4096).expect("DMA buffer"), 7)
        .map_err(|e| e.kind)
        .unwrap();
    let done = wait(&mut c, &mut q, 1);
    assert!(
        matches!(done[0].result, Err(IoError::TimedOut)) && done[0].tag == 7,
        "{done:?}"
    );
    f.knobs.hold_io.store(false, Ordering::SeqCst);
    q.write(1, 0, 8, pattern(4096, 3), 8)
        .map_err(|e| e.kind)
        .unwrap();
    let done = wait(&mut c, &mut q, 1);
    assert!(done[0].result.is_ok(), "the path works after: {done:?}");
    assert!(
        f.knobs.connects.load(Ordering::SeqCst) >= 4,
        "the controller was reset: admin and I/O queue connected twice"
    );
    // Sent once, before the reset; never again after it.
    assert_eq!(f.knobs.io_held.load(Ordering::SeqCst), 1);
}

#[test]
fn poll_max_hands_over_at_most_max_and_keeps_the_rest_for_the_next_poll() {
    let f = start_fake();
    let mut c =
        Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &opts(false)).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();
    // Eight writes per round; a round with limit 3 takes polls of 3, 3 and 2 once all eight
    // answers are in; a round with 0 (no limit) takes one poll.
    for (round, limit) in [(0u64, 3usize), (1, 0)] {
        let tags: Vec<u64> = (round * 8..round * 8 + 8).collect();
        for &tag in &tags {
            q.write(1, tag * 8, 8, pattern(4096, tag as u8), tag)
                .map_err(|e| e.kind)
                .unwrap();
        }
        let mut got = Vec::new();
        let per_poll = if limit == 0 { usize::MAX } else { limit };
        // The first poll sends the eight; their answers may or may not be back yet.
        let first = q.poll_max(limit, |d| got.push((d.tag, d.result.is_ok())));
        assert!(
            first <= per_poll,
            "{first} completions from a poll of at most {limit}"
        );
        // Loopback has every answer in the host's socket once the fake's write returned:
        // from then on each poll takes exactly what the limit lets through.
        wait_until("eight answers written", || {
            f.knobs.io_answered.load(Ordering::SeqCst) == 8 * (round as usize + 1)
        });
        let mut left = 8 - first;
        while left > 0 {
            let n = q.poll_max(limit, |d| got.push((d.tag, d.result.is_ok())));
            assert_eq!(
                n,
                left.min(per_poll),
                "{left} answers waiting, limit {limit}"
            );
            left -= n;
        }
        assert_eq!(q.poll_max(limit, |_| {}), 0);
        got.sort();
        assert_eq!(got, tags.iter().map(|&t| (t, true)).collect::<Vec<_>>());
    }
    drop(q);
    c.detach().unwrap();
}

#[derive(Debug, PartialEq)]
enum Seen {
    State(CtrlrState),
    PathFailed(u64),
    OtherCompletion(u64),
}

#[test]
fn target_gone_fails_io_after_ctrlr_loss_timeout() {
    let f = start_fake();
    let loss_timeout = Duration::from_secs(1);
    let o = CtrlrOpts {
        reconnect_delay: Duration::from_millis(50),
        ctrlr_loss_timeout: Some(loss_timeout),
        // Only the loss timeout may fail the I/O here.
        fast_io_fail_timeout: None,
        io_timeout: None,
        ..opts(false)
    };
    let mut c = Controller::connect(&trid(f.port, "nqn.2024-01.io.fake:sub0"), &o).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(32)).unwrap();
    q.write(1, 0, 8, pattern(4096, 1), 100)
        .map_err(|e| e.kind)
        .unwrap();
    let done = wait(&mut c, &mut q, 1);
    assert!(done[0].result.is_ok(), "the path works first: {done:?}");

    // The target stops answering with four reads in flight, then goes away.
    f.knobs.hold_io.store(true, Ordering::SeqCst);
    for tag in 0..4u64 {
        q.read(
            1,
            tag * 8,
            8,
            DmaBuf::zeroed(4096).expect("DMA buffer"),
            tag,
        )
        .map_err(|e| e.kind)
        .unwrap();
    }
    wait_until("the target to hold the four reads", || {
        q.poll(|d| panic!("a held read completed: {d:?}"));
        c.poll();
        f.knobs.io_held.load(Ordering::SeqCst) == 4
    });
    let gone_at = Instant::now();
    f.take_away();

    let mut seen = Vec::new();
    let mut failed_after = None;
    let deadline = Instant::now() + DEADLINE;
    while seen.iter().filter(|s| !matches!(s, Seen::State(_))).count() < 4 {
        q.poll(|d| {
            seen.push(match d.result {
                Err(IoError::PathFailed) => Seen::PathFailed(d.tag),
                _ => Seen::OtherCompletion(d.tag),
            })
        });
        c.poll();
        while let Some(ev) = c.next_event() {
            if let CtrlrEvent::State(s) = ev {
                if s == CtrlrState::Failed {
                    failed_after = Some(gone_at.elapsed());
                }
                seen.push(Seen::State(s));
            }
        }
        assert!(
            Instant::now() < deadline,
            "stuck after the target went: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Reset, at least one failed reconnect, give up; only then do the held reads fail.
    assert_eq!(
        seen,
        [
            Seen::State(CtrlrState::Resetting),
            Seen::State(CtrlrState::Reconnecting),
            Seen::State(CtrlrState::Failed),
            Seen::PathFailed(0),
            Seen::PathFailed(1),
            Seen::PathFailed(2),
            Seen::PathFailed(3),
        ]
    );
    // Not before the timeout: the controller's clock started after `gone_at`, so this lower
    // bound holds however slow the machine is.
    let failed_after = failed_after.unwrap();
    assert!(
        failed_after >= loss_timeout,
        "failed after {failed_after:?}"
    );
    wait_until(
        "the host's reconnect attempt to reach the gone target",
        || f.knobs.refused.load(Ordering::SeqCst) > 0,
    );
    assert_eq!(c.state(), CtrlrState::Failed);
    let refused = q.read(1, 0, 8, DmaBuf::zeroed(4096).expect("DMA buffer"), 9);
    assert!(
        matches!(refused, Err(ref e) if e.kind == initiator::SubmitErrorKind::PathFailed),
        "new I/O on a failed controller"
    );
}

#[test]
fn connect_to_a_closed_port_fails_cleanly() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let o = CtrlrOpts {
        connect_timeout: Duration::from_millis(200),
        ..opts(false)
    };
    let e = Controller::connect(&trid(port, "nqn.2024-01.io.fake:sub0"), &o);
    assert!(e.is_err(), "connect to a closed port must fail");
}

#[test]
fn discovery_log() {
    let f = start_fake();
    let mut c = Controller::connect(&trid(f.port, DISCOVERY_NQN), &opts(false)).unwrap();
    let log = discovery::get_log(&mut c).unwrap();
    assert_eq!(log.genctr, 5);
    assert_eq!(log.entries.len(), 2);
    let t = log.entries[1].trid().unwrap();
    assert_eq!(t.subnqn, "nqn.2024-01.io.fake:sub1");
    assert_eq!(t.trsvcid, 4420);
    assert_eq!(t.traddr, "127.0.0.1");
}

#[test]
fn garbage_from_target_never_panics() {
    // A "target" that answers ICReq with noise of every length.
    for n in [0usize, 1, 7, 8, 127, 128, 300] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 128];
                let _ = s.read_exact(&mut b);
                let noise: Vec<u8> = (0..n).map(|i| (i * 73 + 1) as u8).collect();
                let _ = s.write_all(&noise);
            }
        });
        let o = CtrlrOpts {
            connect_timeout: Duration::from_millis(300),
            ..opts(false)
        };
        assert!(Controller::connect(&trid(port, "nqn.x"), &o).is_err());
    }
}
