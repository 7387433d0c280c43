//! NVMe reservations at plexd, driven by our own host driver (two hosts with different Host
//! Identifiers) and by raw PDUs where a command must be held half-sent: the fencing the
//! mirror relies on (a new owner preempts the old one, whose writes then fail), a write still
//! waiting for its data when a preempt-and-abort arrives, and the state surviving a restart
//! through `ptpl_file`.

mod nvmf_tcp_common;
mod plexd_proc;

use dma::DmaBuf;
use initiator::{Controller, CtrlrOpts, IoCompletion, IoError, IoQpair, TransportId};
use nvme_spec::cmd::{Command, SglDescriptor};
use nvme_spec::opcode::io;
use nvme_spec::resv::{cptpl, racqa, rrega, ResvAcquire, ResvRegister, ResvStatus, ResvType};
use nvme_spec::tcp::{H2CData, PduBody};
use nvme_spec::{IntoBytes, Status};
use nvmf_tcp_common::{Client, Target, NQN};
use plexd_proc::{free_port, write_json, Plexd};
use serde_json::json;
use std::time::{Duration, Instant};

/// One host: its own Host Identifier, a controller and one I/O queue.
struct Host {
    id: [u8; 16],
    c: Controller,
    q: IoQpair<DmaBuf>,
}

impl Host {
    fn connect(port: u16, id: u8) -> Host {
        let trid: TransportId =
            format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}")
                .parse()
                .unwrap();
        let hostid = [id; 16];
        let opts = CtrlrOpts {
            hostid,
            hostnqn: initiator::opts::default_hostnqn(&hostid),
            connect_timeout: Duration::from_secs(5),
            ..CtrlrOpts::default()
        };
        let mut c = Controller::connect(&trid, &opts).expect("host connects");
        let q = c.alloc_io_qpair::<DmaBuf>(Some(16)).expect("I/O queue");
        Host { id: hostid, c, q }
    }

    /// Submits with `f` and polls until the completion arrives.
    fn run(
        &mut self,
        f: impl FnOnce(&mut IoQpair<DmaBuf>, DmaBuf) -> Result<(), initiator::SubmitError<DmaBuf>>,
        len: usize,
    ) -> IoCompletion<DmaBuf> {
        let buf = DmaBuf::zeroed(len).unwrap();
        f(&mut self.q, buf).map_err(|e| e.kind).expect("submitted");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = None;
            self.q.poll(|d| got = Some(d));
            if let Some(d) = got {
                return d;
            }
            self.c.poll();
            assert!(Instant::now() < deadline, "no completion within 10 s");
            std::thread::yield_now();
        }
    }

    fn register(&mut self, key: u64, persist: bool) -> Result<(), IoError> {
        let r = ResvRegister {
            nsid: 1,
            rrega: rrega::REGISTER,
            iekey: false,
            cptpl: if persist {
                cptpl::PERSIST
            } else {
                cptpl::NO_CHANGE
            },
        };
        self.run(|q, b| q.resv_register(r, 0, key, b, 1), 16).result
    }

    fn acquire(&mut self, action: u8, t: ResvType, key: u64, prkey: u64) -> Result<(), IoError> {
        let a = ResvAcquire {
            nsid: 1,
            racqa: action,
            iekey: false,
            rtype: t as u8,
        };
        self.run(|q, b| q.resv_acquire(a, key, prkey, b, 2), 16)
            .result
    }

    fn report(&mut self) -> ResvStatus {
        let d = self.run(|q, b| q.resv_report(1, b, 3), 4096);
        assert!(d.result.is_ok(), "report: {:?}", d.result);
        ResvStatus::parse_extended(&d.buf.unwrap()).expect("a report")
    }

    fn write(&mut self, lba: u64, fill: u8) -> Result<(), IoError> {
        self.run(
            |q, mut b| {
                b.fill(fill);
                q.write(1, lba, 1, b, 4)
            },
            512,
        )
        .result
    }

    fn read(&mut self, lba: u64) -> Result<u8, IoError> {
        let d = self.run(|q, b| q.read(1, lba, 1, b, 5), 512);
        d.result.map(|()| d.buf.unwrap()[0])
    }
}

#[track_caller]
fn assert_conflict(r: Result<(), IoError>, what: &str) {
    match r {
        Err(e) if e.is_reservation_conflict() => {}
        other => panic!("{what}: expected Reservation Conflict, got {other:?}"),
    }
}

/// The mirror's fencing: A owns the namespace (Write Exclusive); B takes over with a
/// preempt-and-abort naming A's key; from then on A's writes fail with Reservation Conflict
/// and B's go through.
#[test]
fn host_b_preempts_host_a_whose_writes_then_conflict() {
    let t = Target::start(true);
    let mut a = Host::connect(t.port, 0xA);
    let mut b = Host::connect(t.port, 0xB);
    a.register(0xAAAA, false).unwrap();
    a.acquire(racqa::ACQUIRE, ResvType::WriteExclusive, 0xAAAA, 0)
        .unwrap();
    a.write(0, 0xA1).unwrap();
    // B, neither registered nor holding, may read but not write.
    assert_conflict(b.write(0, 0xB0), "B's write before registering");
    assert_eq!(b.read(0), Ok(0xA1));
    b.register(0xBBBB, false).unwrap();
    assert_conflict(b.write(0, 0xB0), "B's write as a mere registrant");
    // Acquiring what A holds is a conflict; A's key is needed to take it.
    assert_conflict(
        b.acquire(racqa::ACQUIRE, ResvType::WriteExclusive, 0xBBBB, 0),
        "B's acquire",
    );
    let s = b.report();
    assert_eq!(s.rtype, Some(ResvType::WriteExclusive));
    assert_eq!(
        s.registrants,
        vec![(a.id, 0xAAAA, true), (b.id, 0xBBBB, false)]
    );

    b.acquire(
        racqa::PREEMPT_AND_ABORT,
        ResvType::WriteExclusive,
        0xBBBB,
        0xAAAA,
    )
    .unwrap();
    assert_conflict(a.write(0, 0xA2), "A's write after the preempt");
    assert_conflict(a.write(7, 0xA2), "A's write elsewhere after the preempt");
    b.write(0, 0xB1).unwrap();
    // Write Exclusive still lets A read: it sees B's data, never its refused write.
    assert_eq!(a.read(0), Ok(0xB1));
    assert_eq!(b.read(7), Ok(0));
    let s = a.report();
    assert_eq!(s.registrants, vec![(b.id, 0xBBBB, true)]);
    // A's key is gone: it can neither acquire nor preempt back.
    assert_conflict(
        a.acquire(racqa::PREEMPT, ResvType::WriteExclusive, 0xAAAA, 0xBBBB),
        "A preempting back with its old key",
    );
    // Exclusive Access (B preempting itself to change type) also fences A's reads.
    b.acquire(racqa::PREEMPT, ResvType::ExclusiveAccess, 0xBBBB, 0xBBBB)
        .unwrap();
    match a.read(0) {
        Err(e) if e.is_reservation_conflict() => {}
        other => panic!("A's read under Exclusive Access: {other:?}"),
    }
}

/// Raw Reservation command over a hand-driven connection, data in the capsule.
fn raw_resv(c: &mut Client, cmd: Command, data: &[u8]) -> Status {
    c.run(cmd, data, 0, true).0.status()
}

/// A write whose data is still on its way (R2T sent, H2CData not yet) when another host
/// preempts-and-aborts its host: when the data arrives the write is aborted, and the block
/// keeps what it had.
#[test]
fn a_write_waiting_for_its_data_is_aborted_by_preempt_and_abort() {
    let t = Target::start(true);
    let (_adm, mut a) = t.io_queue(false, false);
    let reg = ResvRegister {
        nsid: 1,
        rrega: rrega::REGISTER,
        iekey: false,
        cptpl: 0,
    };
    let mut keys = [0u8; 16];
    keys[8..].copy_from_slice(&0x1111u64.to_le_bytes());
    assert!(raw_resv(&mut a, reg.to_command(), &keys).is_success());
    let acq = ResvAcquire {
        nsid: 1,
        racqa: racqa::ACQUIRE,
        iekey: false,
        rtype: ResvType::WriteExclusive as u8,
    };
    keys[..8].copy_from_slice(&0x1111u64.to_le_bytes());
    keys[8..].fill(0);
    assert!(raw_resv(&mut a, acq.to_command(), &keys).is_success());
    // Background the held write must not overwrite.
    let old = vec![0x11u8; 16 * 512];
    let (cqe, _) = a.run(Command::write_blocks(1, 100, 16, false), &old, 0, false);
    assert!(cqe.status().is_success());

    // 8 KiB by R2T: plexd asks for the data and waits.
    let cid = a.cid();
    let mut w = Command::write_blocks(1, 100, 16, false);
    w.set_cid(cid);
    w.set_sgl1(SglDescriptor::tcp_transport(8192));
    a.send_cmd(w, &[]);
    let r2t = match a.recv().expect("R2T").hdr.body {
        PduBody::R2T(r) => r,
        other => panic!("expected an R2T, got {other:?}"),
    };

    let mut b = Host::connect(t.port, 0xB);
    b.register(0x2222, false).unwrap();
    b.acquire(
        racqa::PREEMPT_AND_ABORT,
        ResvType::WriteExclusive,
        0x2222,
        0x1111,
    )
    .unwrap();

    // Now the data: one H2CData PDU carrying all of it.
    let new = vec![0xEEu8; 8192];
    let h = H2CData::new(cid, r2t.ttag.get(), 0, 8192, true, false, false, 0).unwrap();
    let mut pdu = h.as_bytes().to_vec();
    pdu.extend_from_slice(&new);
    a.send(&pdu);
    let (cqe, _) = a.wait(cid, &[]);
    assert!(
        cqe.status().same_code(Status::ABORTED_PREEMPT),
        "held write ended with {}",
        cqe.status()
    );
    // A later write of A is simply refused; B's reads see the old background.
    let (cqe, _) = a.run(
        Command::write_blocks(1, 100, 1, false),
        &new[..512],
        0,
        true,
    );
    assert!(cqe.status().same_code(Status::RESERVATION_CONFLICT));
    assert!(cqe.status().dnr);
    for lba in [100, 115] {
        assert_eq!(b.read(lba), Ok(0x11), "block {lba}");
    }
    // A Reservation Report without the extended structure is refused: host IDs are 128-bit.
    let mut rep = Command::new(io::RESERVATION_REPORT);
    rep.set_nsid(1);
    rep.cdw10.set(1023);
    let (cqe, _) = a.run(rep, &[], 4096, false);
    assert!(cqe.status().same_code(Status::HOST_ID_INCONSISTENT_FORMAT));
}

/// With a ptpl_file the registrations and the reservation survive plexd restarting from its
/// saved configuration; a damaged file stops plexd from starting, naming the file.
#[test]
fn reservations_persist_through_a_restart_and_a_bad_file_is_refused() {
    let d = plexd_proc::temp_dir();
    let ptpl = d.path().join("ns1.ptpl");
    let port = free_port();
    let p = Plexd::start(&[]);
    p.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 2048, "block_size": 512}),
    );
    p.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    p.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": true}),
    );
    p.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "M0", "ptpl_file": ptpl}}),
    );
    p.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let mut a = Host::connect(port, 0xA);
    a.register(0xAAAA, true).unwrap();
    a.acquire(racqa::ACQUIRE, ResvType::WriteExclusive, 0xAAAA, 0)
        .unwrap();
    let before = a.report();
    assert!(before.ptpl);
    drop(a);
    let config = p.ok("save_config", json!(null));
    let text = config.to_string();
    assert!(
        text.contains(&ptpl.display().to_string()),
        "save_config keeps ptpl_file: {text}"
    );
    let cfg = write_json(d.path(), "plexd.json", &config);
    drop(p);

    let p = Plexd::start(&["-c", cfg.to_str().unwrap()]);
    let mut b = Host::connect(port, 0xB);
    let after = b.report();
    assert_eq!(after.registrants, before.registrants);
    assert_eq!(after.rtype, Some(ResvType::WriteExclusive));
    assert!(after.ptpl);
    assert_conflict(b.write(0, 1), "B's write against A's restored reservation");
    drop(b);
    drop(p);

    let good = std::fs::read_to_string(&ptpl).unwrap();
    std::fs::write(&ptpl, &good[..good.len() / 2]).unwrap();
    let (st, log) = plexd_proc::run_to_exit(&["-c", cfg.to_str().unwrap()]);
    assert_eq!(st.code(), Some(1), "plexd must refuse to start: {log}");
    assert!(
        log.contains("nvmf_subsystem_add_ns") && log.contains(&ptpl.display().to_string()),
        "the error names the call and the file: {log}"
    );
}
