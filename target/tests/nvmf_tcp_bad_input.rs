//! Bad input on NVMe/TCP: every protocol error gets a C2HTermReq and a closed connection,
//! every bad command an NVMe status; a bystander connection keeps working throughout and
//! plexd never panics.

mod nvmf_tcp_common;
use nvme_spec::cmd::{Command, SglDescriptor};
use nvme_spec::fabrics::{connect_data_offset, decode_invalid_param_dw0, InvalidParamIn};
use nvme_spec::tcp::{fes, header_digest, CapsuleCmd, H2CData, IcReq, PduBody};
use nvme_spec::{IntoBytes, Status};
use nvmf_tcp_common::*;
use serde_json::json;

/// A connected admin + I/O queue pair that must survive everything else.
struct Bystander {
    _admin: Client,
    io: Client,
}

impl Bystander {
    fn new(t: &Target) -> Bystander {
        let (_admin, io) = t.io_queue(false, false);
        Bystander { _admin, io }
    }

    fn still_works(&mut self) {
        let data = vec![0x5Au8; 512];
        let (cqe, _) = self
            .io
            .run(Command::write_blocks(1, 7, 1, false), &data, 0, true);
        assert!(
            cqe.status().is_success(),
            "bystander write: {}",
            cqe.status()
        );
        let (_, back) = self.io.run(Command::read_blocks(1, 7, 1), &[], 512, false);
        assert_eq!(back, data, "bystander read back");
    }
}

#[test]
fn protocol_errors_terminate_only_the_offending_connection() {
    let t = Target::start(true);
    let mut by = Bystander::new(&t);

    // Truncated PDU, then the host goes away.
    let mut c = Client::connect(t.port);
    c.send(&IcReq::new(0, false, false, 0).as_bytes()[..50]);
    drop(c);
    by.still_works();

    // Wrong HLEN on ICReq.
    let mut c = Client::connect(t.port);
    let mut ic = IcReq::new(0, false, false, 0).as_bytes().to_vec();
    ic[2] = 100;
    c.send(&ic);
    assert_eq!(
        c.expect_term(),
        Some(fes::INVALID_HEADER_FIELD),
        "wrong hlen"
    );
    by.still_works();

    // Unknown PDU type.
    let mut c = Client::connect(t.port);
    c.send(&[0x0F, 0, 8, 0, 8, 0, 0, 0]);
    assert_eq!(
        c.expect_term(),
        Some(fes::INVALID_HEADER_FIELD),
        "unknown type"
    );

    // A capsule before ICReq.
    let mut c = Client::connect(t.port);
    let b = c.capsule_bytes(Command::keep_alive(), &[]);
    c.send(&b);
    assert_eq!(
        c.expect_term(),
        Some(fes::PDU_SEQUENCE_ERROR),
        "capsule before ICReq"
    );

    // ICReq twice.
    let mut c = Client::connect(t.port);
    c.ic(false, false);
    c.send(IcReq::new(0, false, false, 0).as_bytes());
    assert_eq!(
        c.expect_term(),
        Some(fes::PDU_SEQUENCE_ERROR),
        "second ICReq"
    );
    by.still_works();

    // Wrong PDO: data offset inside the header.
    let (a, mut c) = t.io_queue(false, false);
    let mut cmd = Command::write_blocks(1, 0, 1, false);
    cmd.set_sgl1(SglDescriptor::in_capsule(0, 512));
    let mut b = c.capsule_bytes(cmd, &[0u8; 512]);
    b[3] = 40;
    c.send(&b);
    assert_eq!(c.expect_term(), Some(fes::INVALID_HEADER_FIELD), "bad pdo");
    drop(a);

    // Wrong PLEN on a PDU without data.
    let (a, mut c) = t.io_queue(false, false);
    let mut b = c.capsule_bytes(Command::flush(1), &[]);
    b[4] = 80;
    b.extend_from_slice(&[0u8; 8]);
    c.send(&b);
    assert_eq!(c.expect_term(), Some(fes::INVALID_HEADER_FIELD), "bad plen");
    drop(a);
    by.still_works();

    // Header digest mismatch.
    let (a, mut c) = t.io_queue(true, false);
    let mut b = c.capsule_bytes(Command::flush(1), &[]);
    let n = b.len();
    b[n - 1] ^= 0xFF;
    c.send(&b);
    assert_eq!(
        c.expect_term(),
        Some(fes::HEADER_DIGEST_ERROR),
        "header digest"
    );
    drop(a);

    // In-capsule data beyond what we advertised (IOCCSZ).
    let (a, mut c) = t.io_queue(false, false);
    let mut cmd = Command::write_blocks(1, 0, 32, false);
    cmd.set_sgl1(SglDescriptor::in_capsule(0, 16384));
    let b = c.capsule_bytes(cmd, &vec![0u8; 16384]);
    c.send(&b);
    assert_eq!(
        c.expect_term(),
        Some(fes::DATA_LIMIT_EXCEEDED),
        "in-capsule too big"
    );
    drop(a);
    by.still_works();

    // H2CData for a transfer tag nobody gave out.
    let (a, mut c) = t.io_queue(false, false);
    let h = H2CData::new(3, 77, 0, 512, true, false, false, 0).unwrap();
    let mut b = h.as_bytes().to_vec();
    b.extend_from_slice(&[0u8; 512]);
    c.send(&b);
    assert_eq!(
        c.expect_term(),
        Some(fes::INVALID_HEADER_FIELD),
        "bogus ttag"
    );
    drop(a);

    // H2CData beyond the R2T'd range.
    let (a, mut c) = t.io_queue(false, false);
    let mut cmd = Command::write_blocks(1, 0, 1, false).with_cid(9);
    cmd.set_sgl1(SglDescriptor::tcp_transport(512));
    c.send_cmd(cmd, &[]);
    let p = c.recv().unwrap();
    let nvme_spec::tcp::PduBody::R2T(r2t) = p.hdr.body else {
        panic!("expected R2T")
    };
    let h = H2CData::new(9, r2t.ttag.get(), 256, 512, true, false, false, 0).unwrap();
    let mut b = h.as_bytes().to_vec();
    b.extend_from_slice(&[0u8; 512]);
    c.send(&b);
    assert_eq!(
        c.expect_term(),
        Some(fes::DATA_OUT_OF_RANGE),
        "H2C out of range"
    );
    drop(a);

    by.still_works();
    // The offenders' controllers are gone; the bystander's remains.
    wait_until("only the bystander's controller to be left", || {
        let c = t
            .rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
            .unwrap();
        c.as_array().unwrap().len() == 1
    });
}

#[test]
fn bad_commands_get_nvme_status() {
    let t = Target::start(true);
    let (_admin, mut io) = t.io_queue(false, true);

    // LBA past the end.
    let (cqe, _) = io.run(Command::read_blocks(1, BLOCKS - 1, 2), &[], 1024, false);
    assert!(is(&cqe, Status::LBA_OUT_OF_RANGE), "{}", cqe.status());
    let (cqe, _) = io.run(
        Command::write_blocks(1, BLOCKS, 1, false),
        &[0u8; 512],
        0,
        true,
    );
    assert!(is(&cqe, Status::LBA_OUT_OF_RANGE), "{}", cqe.status());
    // ... and by R2T: refused before any data moves.
    let (cqe, _) = io.run(
        Command::write_blocks(1, u64::MAX, 1, false),
        &[0u8; 512],
        0,
        false,
    );
    assert!(is(&cqe, Status::LBA_OUT_OF_RANGE), "{}", cqe.status());

    // Unknown opcode, unknown namespace.
    let (cqe, _) = io.run(Command::new(0x7E), &[], 0, false);
    assert!(is(&cqe, Status::INVALID_OPCODE), "{}", cqe.status());
    let (cqe, _) = io.run(Command::read_blocks(9, 0, 1), &[], 512, false);
    assert!(is(&cqe, Status::INVALID_NAMESPACE), "{}", cqe.status());

    // Data beyond MDTS (1 MiB).
    let (cqe, _) = io.run(Command::read_blocks(1, 0, 4096), &[], 2 << 20, false);
    assert!(
        is(&cqe, Status::SGL_INVALID_DATA_LENGTH),
        "{}",
        cqe.status()
    );
    // Transfer length that does not match the block count.
    let (cqe, _) = io.run(Command::read_blocks(1, 0, 2), &[], 512, false);
    assert!(
        is(&cqe, Status::SGL_INVALID_DATA_LENGTH),
        "{}",
        cqe.status()
    );

    // Data digest mismatch: the command fails, the connection stays.
    let mut cmd = Command::write_blocks(1, 0, 1, false).with_cid(4242);
    cmd.set_sgl1(SglDescriptor::in_capsule(0, 512));
    let mut b = io.capsule_bytes(cmd, &[1u8; 512]);
    let n = b.len();
    b[n - 1] ^= 0xFF;
    io.send(&b);
    let (cqe, _) = io.wait(4242, &[]);
    assert!(
        is(&cqe, Status::TRANSIENT_TRANSPORT_ERROR),
        "{}",
        cqe.status()
    );
    let (cqe, _) = io.run(Command::read_blocks(1, 0, 1), &[], 512, false);
    assert!(cqe.status().is_success());

    // Unknown admin opcode.
    let mut admin = _admin;
    let (cqe, _) = admin.run(Command::new(0xC1), &[], 0, false);
    assert!(is(&cqe, Status::INVALID_OPCODE), "{}", cqe.status());
}

/// A host that keeps more commands in flight than its queue holds. plexd keeps 32 command
/// slots past a queue's size (for cids a host reuses before the response's send is done);
/// commands past those, arriving while every slot is busy, are answered at once with Command
/// Sequence Error. The writes go to a quiesced mirror, which holds them (and so their slots)
/// until it is resumed: exactly the 24 past the slots are refused, before any other answer,
/// and none of their data lands. Every command is answered exactly once, the connection stays
/// up, and the queue works afterwards.
#[test]
fn a_host_past_its_queue_size_gets_command_sequence_errors_for_the_excess() {
    const QUEUE: usize = 128;
    const SPARE_SLOTS: usize = 32;
    const PAST: usize = 24;
    const HELD_NSID: u32 = 2;
    let t = Target::start(true);
    t.rpc(
        "bdev_malloc_create",
        json!({"name": "Held0", "num_blocks": 16384, "block_size": 512}),
    )
    .unwrap();
    t.rpc(
        "bdev_mirror_create",
        json!({"name": "Held", "plexes": ["Held0"]}),
    )
    .unwrap();
    t.rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "Held", "nsid": HELD_NSID}}),
    )
    .unwrap();
    t.rpc(
        "bdev_mirror_quiesce",
        json!({"name": "Held", "timeout_ms": 60_000}),
    )
    .unwrap();
    let (_admin, mut io) = t.io_queue(false, false);
    let n = QUEUE + SPARE_SLOTS + PAST;
    let block = |i: usize| vec![i as u8 ^ 0x3c; 512];
    let mut burst = Vec::new();
    for i in 0..n {
        let mut cmd = Command::write_blocks(HELD_NSID, i as u64, 1, false).with_cid(i as u16);
        cmd.set_sgl1(SglDescriptor::in_capsule(0, 512));
        burst.extend_from_slice(&io.capsule_bytes(cmd, &block(i)));
    }
    io.send(&burst);

    let mut answered = vec![false; n];
    let mut answer = |io: &mut Client| {
        let p = io.recv().expect("plexd closed the connection");
        let PduBody::CapsuleResp(r) = p.hdr.body else {
            panic!("unexpected PDU {:?}", p.hdr.pdu_type)
        };
        let cid = usize::from(r.cqe.cid());
        assert!(cid < n, "an answer for cid {cid}, never sent");
        assert!(
            !std::mem::replace(&mut answered[cid], true),
            "cid {cid} answered twice"
        );
        (cid, r.cqe.status())
    };
    // While the mirror holds the first 160, only the refusals come back: the last 24.
    for _ in 0..PAST {
        let (cid, status) = answer(&mut io);
        assert!(
            cid >= QUEUE + SPARE_SLOTS,
            "cid {cid} answered while its write is held"
        );
        assert!(
            status.same_code(Status::COMMAND_SEQUENCE_ERROR) && status.dnr,
            "cid {cid}: {status}"
        );
    }
    assert_eq!(t.commands_past_queue_size(), PAST as u64);
    t.rpc("bdev_mirror_resume", json!({"name": "Held"}))
        .unwrap();
    for _ in 0..QUEUE + SPARE_SLOTS {
        let (cid, status) = answer(&mut io);
        assert!(status.is_success(), "cid {cid}: {status}");
    }

    // The queue carries on: what was held landed, what was refused did not.
    for i in [
        0,
        QUEUE,
        QUEUE + SPARE_SLOTS - 1,
        QUEUE + SPARE_SLOTS,
        n - 1,
    ] {
        let (cqe, back) = io.run(
            Command::read_blocks(HELD_NSID, i as u64, 1),
            &[],
            512,
            false,
        );
        assert!(cqe.status().is_success(), "read {i}: {}", cqe.status());
        let want = if i < QUEUE + SPARE_SLOTS {
            block(i)
        } else {
            vec![0; 512]
        };
        assert_eq!(back, want, "block {i}");
    }
}

#[test]
fn commands_before_connect_and_bad_connects() {
    let t = Target::start(false);
    t.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST}))
        .unwrap();

    // An I/O command on a queue that never connected.
    let mut c = Client::connect(t.port);
    c.ic(false, false);
    let (cqe, _) = c.run(Command::read_blocks(1, 0, 1), &[], 512, false);
    assert!(is(&cqe, Status::COMMAND_SEQUENCE_ERROR), "{}", cqe.status());

    // Connect to a subsystem that does not exist.
    let cqe = c.fabrics_connect(0, 0xFFFF, "nqn.2024-01.io.plexstor:nope", HOST);
    assert!(
        is(&cqe, Status::CONNECT_INVALID_PARAMETERS),
        "{}",
        cqe.status()
    );
    assert!(cqe.status().dnr);
    assert_eq!(
        decode_invalid_param_dw0(cqe.result.get()),
        (InvalidParamIn::Data, connect_data_offset::SUBNQN)
    );

    // From a host that is not allowed.
    let cqe = c.fabrics_connect(0, 0xFFFF, NQN, "nqn.2024-01.io.plexstor:intruder");
    assert!(is(&cqe, Status::CONNECT_INVALID_HOST), "{}", cqe.status());

    // I/O queue naming a controller that does not exist.
    let cqe = c.fabrics_connect(1, 777, NQN, HOST);
    assert!(
        is(&cqe, Status::CONNECT_INVALID_PARAMETERS),
        "{}",
        cqe.status()
    );

    // The allowed host gets in on the same connection.
    let cqe = c.fabrics_connect(0, 0xFFFF, NQN, HOST);
    assert!(cqe.status().is_success(), "{}", cqe.status());

    // An I/O queue from another host NQN for that controller is refused.
    let cntlid = cqe.result.get() as u16;
    let mut d = Client::connect(t.port);
    d.ic(false, false);
    let cqe = d.fabrics_connect(1, cntlid, NQN, "nqn.2024-01.io.plexstor:other");
    assert!(!cqe.status().is_success());
}

#[test]
fn garbage_never_panics() {
    let t = Target::start(true);
    let mut by = Bystander::new(&t);
    // Deterministic pseudo-random PDUs after a valid ICReq, and without one.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..40 {
        let mut c = Client::connect(t.port);
        if round % 2 == 0 {
            c.ic(round % 4 == 0, false);
        }
        let mut b = Vec::new();
        let n = 8 + (x % 300) as usize;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        // Sometimes keep a plausible common header so deeper parsing is reached.
        if round % 3 == 0 {
            let cap = CapsuleCmd::new(Command::new(x as u8), 0, false, false, 0).unwrap();
            b[..8].copy_from_slice(&cap.as_bytes()[..8]);
        }
        let _ = std::io::Write::write_all(&mut c.s, &b);
        // Any ending is fine, even none (plexd may wait for the rest of a long PDU): what
        // matters is that plexd survives, which the bystander shows.
        let _ = c.ending(std::time::Duration::from_millis(500));
    }
    by.still_works();
    let _ = header_digest(&[]);
}
