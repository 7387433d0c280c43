//! The host's NVMe/TCP digests against a small scripted controller written here: it can
//! decline digests the host asks for, and corrupt one C2HData PDU's data or header digest.
//!
//! What must hold: the host (and plexperf's report) says which digests the ICResp granted,
//! and calls a declined one declined; a C2HData data digest mismatch fails that read with
//! Data Transfer Error (never success with the corrupt data) and keeps the connection; a
//! header digest mismatch ends the connection with an H2CTermReq (FES Header Digest Error).

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dma::DmaBuf;
use initiator::qpair::IoCompletion;
use initiator::{Controller, CtrlrOpts, Digests, IoError, IoQpair, TransportId};
use nvme_spec::tcp::{fes, C2HData, PduBody, PduHeader};
use nvme_spec::{Command, IntoBytes, Status};

use common::{accept_icreq, identify_data, read_pdu, Conn, BS, NBLOCKS};

const NQN: &str = "nqn.2024-01.io.fake:digests";
/// No LBA: nothing to corrupt.
const NONE: u64 = u64::MAX;

/// What the fake grants and breaks, and what it saw.
struct Knobs {
    grant_hdgst: bool,
    grant_ddgst: bool,
    /// The next read of this LBA gets a C2HData PDU with a wrong data digest (once).
    bad_ddgst_lba: AtomicU64,
    /// The next read of this LBA gets a C2HData PDU with a wrong header digest (once).
    bad_hdgst_lba: AtomicU64,
    connects: AtomicUsize,
    /// FES of every H2CTermReq the host sent.
    host_term_fes: Mutex<Vec<u16>>,
}

fn start_fake(grant_hdgst: bool, grant_ddgst: bool) -> (u16, Arc<Knobs>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let knobs = Arc::new(Knobs {
        grant_hdgst,
        grant_ddgst,
        bad_ddgst_lba: AtomicU64::new(NONE),
        bad_hdgst_lba: AtomicU64::new(NONE),
        connects: AtomicUsize::new(0),
        host_term_fes: Mutex::new(Vec::new()),
    });
    let k = knobs.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let k = k.clone();
            std::thread::spawn(move || {
                let _ = serve(s, &k);
            });
        }
    });
    (port, knobs)
}

/// Every block's contents, so a read can be checked.
fn block_byte(lba: u64, i: usize) -> u8 {
    (lba as u8).wrapping_mul(7) ^ (i as u8)
}

fn disk(slba: u64, nlb: usize) -> Vec<u8> {
    (0..nlb)
        .flat_map(|b| (0..BS).map(move |i| block_byte(slba + b as u64, i)))
        .collect()
}

impl Conn {
    /// The whole read in one C2HData PDU, with the SUCCESS flag or followed by a response.
    fn c2h(
        &mut self,
        cid: u16,
        data: &[u8],
        success_flag: bool,
        bad: (bool, bool),
    ) -> std::io::Result<()> {
        let h = C2HData::new(
            cid,
            0,
            data.len() as u32,
            true,
            success_flag,
            self.hd,
            self.dd,
            0,
        )
        .expect("C2HData header");
        self.send_with(h.as_bytes(), Some(data), bad.0, bad.1)?;
        if success_flag {
            Ok(())
        } else {
            self.resp(cid, Status::SUCCESS, 0, 0)
        }
    }
}

fn serve(s: TcpStream, k: &Knobs) -> std::io::Result<()> {
    // Grant a digest only if asked for it and the knob allows it.
    let (mut c, mut rd, opts) = accept_icreq(s, k.grant_hdgst, k.grant_ddgst)?;
    loop {
        let pdu = read_pdu(&mut rd)?;
        if pdu[0] == 0x02 {
            // H2CTermReq (never has digests): note why, then the connection is over.
            let fes = u16::from_le_bytes([pdu[8], pdu[9]]);
            k.host_term_fes.lock().unwrap().push(fes);
            return Ok(());
        }
        let h = PduHeader::parse(&pdu, &opts).expect("host PDU must be valid");
        let data = &pdu[h.data_range()];
        let PduBody::CapsuleCmd(cap) = h.body else {
            panic!("unexpected PDU from host: {:?}", h.pdu_type)
        };
        let cmd = cap.cmd;
        if cmd.is_fabrics() {
            c.fabrics(&cmd, data, |_| {
                k.connects.fetch_add(1, Ordering::Relaxed);
            })?;
        } else if c.qid == 0 {
            admin(&mut c, &cmd)?;
        } else {
            io(&mut c, &cmd, k)?;
        }
    }
}

fn admin(c: &mut Conn, cmd: &Command) -> std::io::Result<()> {
    let cid = cmd.cid();
    match cmd.opcode {
        0x06 => {
            let Some(b) = identify_data(cmd.cdw10.get() as u8, "digests", "1") else {
                return c.resp(cid, Status::INVALID_FIELD, 0, 0);
            };
            c.c2h(cid, &b, false, (false, false))
        }
        0x09 => c.resp(cid, Status::SUCCESS, (3 << 16) | 3, 0),
        0x18 => c.resp(cid, Status::SUCCESS, 0, 0),
        0x0c => Ok(()), // AER: held
        _ => c.resp(cid, Status::INVALID_OPCODE, 0, 0),
    }
}

fn io(c: &mut Conn, cmd: &Command, k: &Knobs) -> std::io::Result<()> {
    let cid = cmd.cid();
    if cmd.opcode != 0x02 {
        return c.resp(cid, Status::INVALID_OPCODE, 0, 0);
    }
    let slba = u64::from(cmd.cdw10.get()) | (u64::from(cmd.cdw11.get()) << 32);
    let nlb = (cmd.cdw12.get() & 0xffff) as usize + 1;
    if slba + nlb as u64 > NBLOCKS {
        return c.resp(cid, Status::LBA_OUT_OF_RANGE, 0, 0);
    }
    let take = |knob: &AtomicU64| {
        knob.compare_exchange(slba, NONE, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    };
    let bad = (take(&k.bad_hdgst_lba), take(&k.bad_ddgst_lba));
    // Even LBAs get the SUCCESS flag (no response PDU), odd ones a CapsuleResp.
    c.c2h(cid, &disk(slba, nlb), slba % 2 == 0, bad)
}

// ------------------------------------------------------------------------------ host side

fn trid(port: u16) -> TransportId {
    format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}")
        .parse()
        .unwrap()
}

fn opts(hdgst: bool, ddgst: bool) -> CtrlrOpts {
    CtrlrOpts {
        hdgst,
        ddgst,
        connect_timeout: Duration::from_secs(5),
        reconnect_delay: Duration::from_millis(50),
        ctrlr_loss_timeout: Some(Duration::from_secs(5)),
        ..CtrlrOpts::default()
    }
}

/// Reads 8 blocks at `slba`, polling (controller too) until it completes or 10 s pass.
fn read(c: &mut Controller, q: &mut IoQpair<DmaBuf>, slba: u64) -> IoCompletion<DmaBuf> {
    let buf = DmaBuf::zeroed(8 * BS).expect("DMA buffer");
    q.read(1, slba, 8, buf, slba).map_err(|e| e.kind).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut done = None;
        q.poll(|d| done = Some(d));
        if let Some(d) = done {
            return d;
        }
        c.poll();
        assert!(
            Instant::now() < deadline,
            "read of LBA {slba} did not complete"
        );
        std::thread::yield_now();
    }
}

fn assert_read_ok(d: &IoCompletion<DmaBuf>, slba: u64) {
    assert!(d.result.is_ok(), "read of LBA {slba}: {:?}", d.result);
    assert_eq!(
        &d.buf.as_ref().unwrap()[..],
        &disk(slba, 8)[..],
        "data of LBA {slba}"
    );
}

#[test]
fn granted_and_declined_digests_are_reported_per_queue() {
    for (grant_h, grant_d) in [(true, true), (true, false), (false, false)] {
        let (port, _k) = start_fake(grant_h, grant_d);
        let mut c = Controller::connect(&trid(port), &opts(true, true)).unwrap();
        let want = Digests {
            hdgst: grant_h,
            ddgst: grant_d,
            hdgst_requested: true,
            ddgst_requested: true,
        };
        assert_eq!(c.info().digests, want, "admin queue");
        assert_eq!((c.info().hdgst, c.info().ddgst), (grant_h, grant_d));
        assert_eq!(c.info().digests.declined(), !(grant_h && grant_d));
        let mut q = c.alloc_io_qpair::<DmaBuf>(Some(8)).unwrap();
        assert_eq!(q.digests(), want, "I/O queue");
        // The queue really runs with what was granted: I/O works.
        let d = read(&mut c, &mut q, 4);
        assert_read_ok(&d, 4);
        drop(q);
        c.detach().unwrap();
    }
    let d = Digests {
        hdgst: true,
        ddgst: false,
        hdgst_requested: true,
        ddgst_requested: true,
    };
    assert_eq!(d.describe(), "header on, data requested but declined");
    let off = Digests::default();
    assert!(!off.declined());
    assert_eq!(off.describe(), "header off, data off");
}

/// Runs plexperf against the fake for no measured time; returns (exit ok, stdout, stderr).
fn plexperf(port: u16, extra: &[&str]) -> (bool, String, String) {
    let trid = format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_plexperf"))
        .args([
            "-r", &trid, "-q", "1", "-o", "4096", "-t", "0", "--warmup", "0",
        ])
        .args(["--hdgst", "--ddgst"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run plexperf");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("plexperf output"),
        Err(_) => {
            // SAFETY: signals only the child we spawned, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("plexperf did not finish within 60 s");
        }
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plexperf_reports_granted_digests_and_says_when_one_was_declined() {
    // Header granted, data declined.
    let (port, _k) = start_fake(true, false);
    let (ok, out, err) = plexperf(port, &["--json"]);
    assert!(ok, "plexperf failed:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let queues = v["digests"].as_array().expect("digests in the JSON report");
    let qids: Vec<u64> = queues.iter().map(|q| q["qid"].as_u64().unwrap()).collect();
    assert_eq!(qids, [0, 1], "admin and the one I/O queue");
    for q in queues {
        assert_eq!(q["hdgst"], true, "{q}");
        assert_eq!(q["ddgst"], false, "{q}");
        assert_eq!(q["hdgst_requested"], true, "{q}");
        assert_eq!(q["ddgst_requested"], true, "{q}");
    }
    assert!(
        err.contains("declined a requested NVMe/TCP digest"),
        "a declined digest is a warning:\n{err}"
    );

    let (ok, out, err) = plexperf(port, &[]);
    assert!(ok, "plexperf failed:\n{out}\n{err}");
    for qid in [0, 1] {
        let line = format!("qid {qid}: header on, data requested but declined");
        assert!(out.contains(&line), "text report lacks `{line}`:\n{out}");
    }

    // Both granted: reported on, no warning.
    let (port, _k) = start_fake(true, true);
    let (ok, out, err) = plexperf(port, &[]);
    assert!(ok, "plexperf failed:\n{out}\n{err}");
    assert!(out.contains("qid 1: header on, data on"), "{out}");
    assert!(!err.contains("declined"), "{err}");
}

#[test]
fn c2h_data_digest_error_fails_that_read_and_keeps_the_connection() {
    let (port, k) = start_fake(true, true);
    let mut c = Controller::connect(&trid(port), &opts(false, true)).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(8)).unwrap();
    assert!(q.digests().ddgst);
    let connects = k.connects.load(Ordering::Relaxed);
    // LBA 10 gets the SUCCESS flag (no response PDU), LBA 11 a CapsuleResp with SUCCESS:
    // either way the bad digest must turn the read into an error.
    for slba in [10u64, 11] {
        k.bad_ddgst_lba.store(slba, Ordering::Relaxed);
        let d = read(&mut c, &mut q, slba);
        match &d.result {
            Err(IoError::Nvme(s)) => {
                assert!(s.same_code(Status::DATA_TRANSFER_ERROR), "LBA {slba}: {s}")
            }
            other => panic!("LBA {slba}: read with a bad data digest ended {other:?}"),
        }
        assert_eq!(
            k.bad_ddgst_lba.load(Ordering::Relaxed),
            NONE,
            "the fake corrupted it"
        );
        // Same connection, next read is fine.
        let d = read(&mut c, &mut q, slba + 100);
        assert_read_ok(&d, slba + 100);
    }
    assert_eq!(k.connects.load(Ordering::Relaxed), connects, "no reconnect");
    assert!(k.host_term_fes.lock().unwrap().is_empty(), "no termination");
    drop(q);
    c.detach().unwrap();
}

#[test]
fn c2h_header_digest_error_ends_the_connection() {
    let (port, k) = start_fake(true, true);
    let mut c = Controller::connect(&trid(port), &opts(true, false)).unwrap();
    let mut q = c.alloc_io_qpair::<DmaBuf>(Some(8)).unwrap();
    assert!(q.digests().hdgst);
    let connects = k.connects.load(Ordering::Relaxed);
    k.bad_hdgst_lba.store(20, Ordering::Relaxed);
    let d = read(&mut c, &mut q, 20);
    // The host terminated that connection, naming the header digest.
    assert_eq!(
        k.host_term_fes.lock().unwrap().as_slice(),
        [fes::HEADER_DIGEST_ERROR]
    );
    // The read was resent on a new connection (the data PDU was never accepted), or failed;
    // it never completed from the PDU with the bad header.
    assert!(k.connects.load(Ordering::Relaxed) > connects || d.result.is_err());
    if d.result.is_ok() {
        assert_read_ok(&d, 20);
    }
    drop(q);
    let _ = c.detach();
}
