//! NVMe/TCP digests at plexd: what each connection negotiated is visible (ICResp, the
//! `nvmf_subsystem_get_qpairs` RPC, our own host's report), and a digest that does not match
//! never lets its data reach the bdev.
//!
//! Data digest errors are not fatal (the PDU framing is intact and the NVMe/TCP spec has no
//! FES for them): the command fails with Transient Transport Error, as in SPDK, and the
//! connection stays. A header digest error is fatal: C2HTermReq with FES Header Digest Error.

mod nvmf_tcp_common;
use dma::DmaBuf;
use initiator::{Controller, CtrlrOpts, Digests, TransportId};
use nvme_spec::cmd::{Command, SglDescriptor};
use nvme_spec::tcp::{fes, header_digest, H2CData, PduBody};
use nvme_spec::{IntoBytes, Status};
use nvmf_tcp_common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Background every test writes first; a rejected write must leave it in place.
const OLD: u8 = 0xAA;
/// What a rejected write tried to put there.
const BAD: u8 = 0x55;

fn qpairs(t: &Target) -> Vec<Value> {
    let v = t
        .rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
        .unwrap();
    v.as_array().expect("array of qpairs").clone()
}

/// The (hdgst, ddgst) that `nvmf_subsystem_get_qpairs` shows for one queue.
fn rpc_digests(t: &Target, cntlid: u16, qid: u16) -> (bool, bool) {
    let all = qpairs(t);
    let q = all
        .iter()
        .find(|q| q["cntlid"] == json!(cntlid) && q["qid"] == json!(qid))
        .unwrap_or_else(|| panic!("qpair {cntlid}/{qid} not in {all:?}"));
    (
        q["hdgst"].as_bool().expect("hdgst is a boolean"),
        q["ddgst"].as_bool().expect("ddgst is a boolean"),
    )
}

/// An admin queue with digests (hdgst, ddgst) and an I/O queue 1 with (io_hdgst, io_ddgst).
fn queues(t: &Target, admin: (bool, bool), io: (bool, bool)) -> (Client, Client, u16) {
    let mut a = Client::connect(t.port);
    let cntlid = a.admin_up(admin.0, admin.1);
    let mut q = Client::connect(t.port);
    q.io_up(cntlid, 1, io.0, io.1);
    (a, q, cntlid)
}

/// Writes `blocks` blocks of `fill` at `slba` on a clean connection.
fn fill(t: &Target, slba: u64, blocks: u32, fill: u8) {
    let (_a, mut q, _) = queues(t, (false, false), (false, false));
    let data = vec![fill; blocks as usize * 512];
    let (cqe, _) = q.run(
        Command::write_blocks(1, slba, blocks, false),
        &data,
        0,
        false,
    );
    assert!(cqe.status().is_success(), "fill write: {}", cqe.status());
}

/// Reads `blocks` blocks at `slba` on a new connection (so nothing of the one under test is
/// involved).
fn read_back(t: &Target, slba: u64, blocks: u32) -> Vec<u8> {
    let (_a, mut q, _) = queues(t, (false, false), (false, false));
    let (cqe, data) = q.run(
        Command::read_blocks(1, slba, blocks),
        &[],
        blocks * 512,
        false,
    );
    assert!(cqe.status().is_success(), "read back: {}", cqe.status());
    data
}

/// One H2CData PDU with the digests `c` negotiated; `bad_hdgst`/`bad_ddgst` flip a digest.
#[allow(clippy::too_many_arguments)] // each knob is one field a test sets wrong
fn h2c_pdu(
    c: &Client,
    cid: u16,
    ttag: u16,
    off: u32,
    chunk: &[u8],
    last: bool,
    bad_hdgst: bool,
    bad_ddgst: bool,
) -> Vec<u8> {
    let h = H2CData::new(
        cid,
        ttag,
        off,
        chunk.len() as u32,
        last,
        c.hdgst,
        c.ddgst,
        0,
    )
    .unwrap();
    let mut b = h.as_bytes().to_vec();
    if c.hdgst {
        let d = header_digest(&b) ^ u32::from(bad_hdgst);
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(chunk);
    if c.ddgst {
        let d = crc32c::crc32c(chunk) ^ u32::from(bad_ddgst);
        b.extend_from_slice(&d.to_le_bytes());
    }
    b
}

/// Sends a write of `data` at `slba` by R2T, split into H2CData PDUs of `chunk` bytes; the
/// PDU with index `corrupt` gets a wrong data digest. Returns the response's status.
fn r2t_write_with_bad_ddgst(
    c: &mut Client,
    slba: u64,
    data: &[u8],
    chunk: usize,
    corrupt: usize,
) -> Status {
    let cid = c.cid();
    let mut cmd = Command::write_blocks(1, slba, (data.len() / 512) as u32, false).with_cid(cid);
    cmd.set_sgl1(SglDescriptor::tcp_transport(data.len() as u32));
    c.send_cmd(cmd, &[]);
    let p = c.recv().expect("R2T");
    let PduBody::R2T(r) = p.hdr.body else {
        panic!("expected R2T, got {:?}", p.hdr.pdu_type)
    };
    assert_eq!(
        r.r2tl.get() as usize,
        data.len(),
        "one R2T for the whole write"
    );
    let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let off = (i * chunk) as u32;
        let last = i + 1 == pieces.len();
        let b = h2c_pdu(c, cid, r.ttag.get(), off, piece, last, false, i == corrupt);
        c.send(&b);
    }
    let (cqe, _) = c.wait(cid, &[]);
    cqe.status()
}

#[test]
fn get_qpairs_and_icresp_show_the_digests_each_queue_negotiated() {
    let t = Target::start(true);
    // Every combination on some queue: admin and I/O queues of one controller may differ.
    let (_a1, _q1, c1) = queues(&t, (true, true), (true, false));
    let (_a2, _q2, c2) = queues(&t, (false, false), (false, true));
    assert_eq!(rpc_digests(&t, c1, 0), (true, true));
    assert_eq!(rpc_digests(&t, c1, 1), (true, false));
    assert_eq!(rpc_digests(&t, c2, 0), (false, false));
    assert_eq!(rpc_digests(&t, c2, 1), (false, true));

    // ICResp grants exactly what was asked (plexd supports both digests).
    for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut c = Client::connect(t.port);
        let r = c.ic(hd, dd);
        assert_eq!(
            (r.hdgst(), r.ddgst()),
            (hd, dd),
            "ICResp for ICReq {hd}/{dd}"
        );
    }
}

fn host_opts(digests: bool) -> CtrlrOpts {
    CtrlrOpts {
        hdgst: digests,
        ddgst: digests,
        connect_timeout: Duration::from_secs(5),
        ..CtrlrOpts::default()
    }
}

fn poll_until(
    q: &mut initiator::IoQpair<DmaBuf>,
    c: &mut Controller,
) -> initiator::IoCompletion<DmaBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = None;
        q.poll(|d| got = Some(d));
        if let Some(d) = got {
            return d;
        }
        c.poll();
        assert!(Instant::now() < deadline, "no completion within 10 s");
        std::thread::yield_now();
    }
}

#[test]
fn our_host_reports_what_plexd_granted_and_plexd_agrees() {
    let t = Target::start(true);
    let trid: TransportId = format!(
        "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{} subnqn:{NQN}",
        t.port
    )
    .parse()
    .unwrap();
    for digests in [false, true] {
        let mut c = Controller::connect(&trid, &host_opts(digests)).unwrap();
        let want = Digests {
            hdgst: digests,
            ddgst: digests,
            hdgst_requested: digests,
            ddgst_requested: digests,
        };
        assert_eq!(c.info().digests, want, "admin queue");
        assert!(!c.info().digests.declined());
        let mut q = c.alloc_io_qpair::<DmaBuf>(Some(16)).unwrap();
        assert_eq!(q.digests(), want, "I/O queue");
        let cntlid = c.info().cntlid;
        assert_eq!(rpc_digests(&t, cntlid, 0), (digests, digests));
        assert_eq!(rpc_digests(&t, cntlid, q.qid()), (digests, digests));

        // And I/O works with them in force.
        let buf = DmaBuf::zeroed(4096).unwrap();
        q.read(1, 0, 8, buf, 1).map_err(|e| e.kind).unwrap();
        let d = poll_until(&mut q, &mut c);
        assert!(
            d.result.is_ok(),
            "read with digests={digests}: {:?}",
            d.result
        );
        drop(q);
        c.detach().unwrap();
    }
}

#[test]
fn data_digest_errors_fail_the_write_keep_the_connection_and_never_reach_the_bdev() {
    let t = Target::start(true);
    fill(&t, 0, 64, OLD);
    for hdgst in [false, true] {
        let (_a, mut io, _) = queues(&t, (false, false), (hdgst, true));
        let bad = vec![BAD; 8192];

        // Two H2CData PDUs, the first corrupt: the command must still take the second PDU
        // (the host sends it before it can know) and then fail.
        let st = r2t_write_with_bad_ddgst(&mut io, 0, &bad, 4096, 0);
        assert!(
            st.same_code(Status::TRANSIENT_TRANSPORT_ERROR),
            "first of two: {st}"
        );
        // The last PDU corrupt.
        let st = r2t_write_with_bad_ddgst(&mut io, 16, &bad, 4096, 1);
        assert!(
            st.same_code(Status::TRANSIENT_TRANSPORT_ERROR),
            "last of two: {st}"
        );
        // A single PDU.
        let st = r2t_write_with_bad_ddgst(&mut io, 32, &bad[..4096], 4096, 0);
        assert!(
            st.same_code(Status::TRANSIENT_TRANSPORT_ERROR),
            "single PDU: {st}"
        );

        // In-capsule data with a wrong digest.
        let cid = io.cid();
        let mut cmd = Command::write_blocks(1, 48, 8, false).with_cid(cid);
        cmd.set_sgl1(SglDescriptor::in_capsule(0, 4096));
        let mut b = io.capsule_bytes(cmd, &bad[..4096]);
        let n = b.len();
        b[n - 1] ^= 0xFF;
        io.send(&b);
        let (cqe, _) = io.wait(cid, &[]);
        assert!(
            cqe.status().same_code(Status::TRANSIENT_TRANSPORT_ERROR),
            "in-capsule: {}",
            cqe.status()
        );

        // The connection is still good: a correct write and read go through on it.
        let good = vec![0x11u8; 512];
        let (cqe, _) = io.run(Command::write_blocks(1, 100, 1, false), &good, 0, false);
        assert!(cqe.status().is_success(), "write after: {}", cqe.status());
        let (cqe, back) = io.run(Command::read_blocks(1, 100, 1), &[], 512, false);
        assert!(cqe.status().is_success(), "read after: {}", cqe.status());
        assert_eq!(back, good);

        // None of the corrupt data reached the bdev.
        let disk = read_back(&t, 0, 64);
        assert!(
            disk.iter().all(|&b| b == OLD),
            "hdgst={hdgst}: a write with a bad data digest reached the bdev (first changed byte at {:?})",
            disk.iter().position(|&b| b != OLD)
        );
    }
}

#[test]
fn header_digest_error_on_h2c_data_terminates_and_writes_nothing() {
    let t = Target::start(true);
    fill(&t, 0, 16, OLD);
    let (_a, mut io, _) = queues(&t, (false, false), (true, true));
    let cid = io.cid();
    let mut cmd = Command::write_blocks(1, 0, 16, false).with_cid(cid);
    cmd.set_sgl1(SglDescriptor::tcp_transport(8192));
    io.send_cmd(cmd, &[]);
    let p = io.recv().expect("R2T");
    let PduBody::R2T(r) = p.hdr.body else {
        panic!("expected R2T, got {:?}", p.hdr.pdu_type)
    };
    let bad = vec![BAD; 8192];
    let b = h2c_pdu(&io, cid, r.ttag.get(), 0, &bad, true, true, false);
    io.send(&b);
    assert_eq!(io.expect_term(), Some(fes::HEADER_DIGEST_ERROR));
    let disk = read_back(&t, 0, 16);
    assert!(
        disk.iter().all(|&b| b == OLD),
        "data behind a bad header digest was written"
    );
}
