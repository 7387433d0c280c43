use super::*;
use nvme_spec::resv::{ResvStatus, ResvType::*};

const A: HostId = [0xA; 16];
const B: HostId = [0xB; 16];
const C: HostId = [0xC; 16];

fn uuid() -> Uuid {
    Uuid::from_bytes([0x42; 16])
}

fn keys(crkey: u64, other: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&crkey.to_le_bytes());
    d[8..].copy_from_slice(&other.to_le_bytes());
    d
}

fn reg(r: &Reservations, h: &HostId, action: u8, iekey: bool, crkey: u64, nrkey: u64) -> Status {
    let c = ResvRegister {
        nsid: 1,
        rrega: action,
        iekey,
        cptpl: cptpl::NO_CHANGE,
    };
    r.register(h, &c, &keys(crkey, nrkey))
}

fn register(r: &Reservations, h: &HostId, key: u64) {
    ok(reg(r, h, rrega::REGISTER, false, 0, key));
}

fn acq(r: &Reservations, h: &HostId, action: u8, t: ResvType, crkey: u64, prkey: u64) -> Status {
    let c = ResvAcquire {
        nsid: 1,
        racqa: action,
        iekey: false,
        rtype: t as u8,
    };
    r.acquire(h, &c, &keys(crkey, prkey))
}

fn rel(r: &Reservations, h: &HostId, action: u8, rtype: u8, crkey: u64) -> Status {
    let c = ResvRelease {
        nsid: 1,
        rrela: action,
        iekey: false,
        rtype,
    };
    r.release(h, &c, &crkey.to_le_bytes())
}

#[track_caller]
fn ok(s: Status) {
    assert!(s.is_success(), "expected success, got {s}");
}

#[track_caller]
fn conflict(s: Status) {
    assert!(
        s.same_code(Status::RESERVATION_CONFLICT),
        "expected a conflict, got {s}"
    );
    assert!(s.dnr, "a conflict does not go away by retrying");
}

#[track_caller]
fn invalid(s: Status) {
    assert!(
        s.same_code(Status::INVALID_FIELD),
        "expected invalid field, got {s}"
    );
}

fn rw(r: &Reservations, h: &HostId) -> (bool, bool) {
    let a = r.access(h);
    (a.read, a.write)
}

fn status(r: &Reservations) -> ResvStatus {
    let mut buf = vec![0u8; 4096];
    let c = ResvReport {
        nsid: 1,
        len: 4096,
        eds: true,
    };
    ok(r.report(&c, &mut buf));
    ResvStatus::parse_extended(&buf).unwrap()
}

/// Host A holds, B is registered, C is not: each type's rule for each of them.
#[test]
fn every_type_applies_the_access_table() {
    // (type, holder A, registrant B, non-registrant C), each (read, write).
    let table = [
        (WriteExclusive, (true, true), (true, false), (true, false)),
        (
            ExclusiveAccess,
            (true, true),
            (false, false),
            (false, false),
        ),
        (
            WriteExclusiveRegistrantsOnly,
            (true, true),
            (true, true),
            (true, false),
        ),
        (
            ExclusiveAccessRegistrantsOnly,
            (true, true),
            (true, true),
            (false, false),
        ),
        (
            WriteExclusiveAllRegistrants,
            (true, true),
            (true, true),
            (true, false),
        ),
        (
            ExclusiveAccessAllRegistrants,
            (true, true),
            (true, true),
            (false, false),
        ),
    ];
    for (t, a, b, c) in table {
        let r = Reservations::new(uuid());
        register(&r, &A, 1);
        register(&r, &B, 2);
        // Registered but nothing held: no restriction at all.
        assert_eq!(rw(&r, &C), (true, true), "{t:?} before acquire");
        ok(acq(&r, &A, racqa::ACQUIRE, t, 1, 0));
        assert_eq!(rw(&r, &A), a, "{t:?} holder");
        assert_eq!(rw(&r, &B), b, "{t:?} registrant");
        assert_eq!(rw(&r, &C), c, "{t:?} non-registrant");
        let s = status(&r);
        assert_eq!(s.rtype, Some(t));
        let holds: Vec<bool> = s.registrants.iter().map(|e| e.2).collect();
        // Under All Registrants every registrant holds.
        assert_eq!(holds, vec![true, t.all_registrants()], "{t:?} report");
        // Released: everything open again.
        ok(rel(&r, &A, rrela::RELEASE, t as u8, 1));
        assert_eq!(rw(&r, &C), (true, true), "{t:?} after release");
    }
}

#[test]
fn register_unregister_and_replace_check_keys() {
    let r = Reservations::new(uuid());
    invalid(reg(&r, &A, rrega::REGISTER, false, 0, 0));
    register(&r, &A, 5);
    let g0 = status(&r).gen;
    // Same key again: fine and no change; another key: conflict.
    ok(reg(&r, &A, rrega::REGISTER, false, 0, 5));
    assert_eq!(status(&r).gen, g0);
    conflict(reg(&r, &A, rrega::REGISTER, false, 0, 6));
    // Replace needs the current key unless IEKEY.
    conflict(reg(&r, &A, rrega::REPLACE, false, 4, 7));
    ok(reg(&r, &A, rrega::REPLACE, false, 5, 7));
    ok(reg(&r, &A, rrega::REPLACE, true, 0, 8));
    assert_eq!(status(&r).registrants, vec![(A, 8, false)]);
    // Replace for a host not registered registers it only with IEKEY.
    conflict(reg(&r, &B, rrega::REPLACE, false, 0, 9));
    ok(reg(&r, &B, rrega::REPLACE, true, 0, 9));
    // Unregister: key or IEKEY.
    conflict(reg(&r, &B, rrega::UNREGISTER, false, 1, 0));
    ok(reg(&r, &B, rrega::UNREGISTER, false, 9, 0));
    ok(reg(&r, &A, rrega::UNREGISTER, true, 0, 0));
    conflict(reg(&r, &A, rrega::UNREGISTER, true, 0, 0));
    let s = status(&r);
    assert!(s.registrants.is_empty());
    assert!(s.gen > g0);
    invalid(reg(&r, &A, 3, false, 0, 1));
    // A short data buffer is an error, not a panic.
    let c = ResvRegister::default();
    invalid(r.register(&A, &c, &[0u8; 8]));
    invalid(r.acquire(&A, &ResvAcquire::default(), &[]));
    invalid(r.release(&A, &ResvRelease::default(), &[1]));
}

#[test]
fn acquire_and_release_rules() {
    let r = Reservations::new(uuid());
    // Not registered, or the wrong key: conflict.
    conflict(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 1, 0));
    register(&r, &A, 1);
    register(&r, &B, 2);
    conflict(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 2, 0));
    invalid(r.acquire(
        &A,
        &ResvAcquire {
            nsid: 1,
            racqa: racqa::ACQUIRE,
            iekey: false,
            rtype: 7,
        },
        &keys(1, 0),
    ));
    ok(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 1, 0));
    // Again, same type: fine. Another type, or another host: conflict.
    ok(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 1, 0));
    conflict(acq(&r, &A, racqa::ACQUIRE, ExclusiveAccess, 1, 0));
    conflict(acq(&r, &B, racqa::ACQUIRE, WriteExclusive, 2, 0));
    // A non-holder's release is a no-op; the holder must name the type.
    ok(rel(&r, &B, rrela::RELEASE, WriteExclusive as u8, 2));
    assert_eq!(status(&r).rtype, Some(WriteExclusive));
    invalid(rel(&r, &A, rrela::RELEASE, ExclusiveAccess as u8, 1));
    conflict(rel(&r, &A, rrela::RELEASE, WriteExclusive as u8, 9));
    ok(rel(&r, &A, rrela::RELEASE, WriteExclusive as u8, 1));
    assert_eq!(status(&r).rtype, None);
    // Unregistering the holder releases its reservation.
    ok(acq(&r, &B, racqa::ACQUIRE, ExclusiveAccess, 2, 0));
    assert_eq!(rw(&r, &A), (false, false));
    ok(reg(&r, &B, rrega::UNREGISTER, false, 2, 0));
    assert_eq!(status(&r).rtype, None);
    assert_eq!(rw(&r, &A), (true, true));
    // Clear: everyone unregistered, nothing held.
    register(&r, &B, 2);
    ok(acq(
        &r,
        &B,
        racqa::ACQUIRE,
        WriteExclusiveAllRegistrants,
        2,
        0,
    ));
    ok(rel(&r, &A, rrela::CLEAR, 0, 1));
    let s = status(&r);
    assert!(s.registrants.is_empty() && s.rtype.is_none());
}

/// The fencing the mirror relies on: B takes A's Write Exclusive reservation over.
#[test]
fn preempt_moves_the_reservation_and_fences_the_old_holder() {
    let r = Reservations::new(uuid());
    register(&r, &A, 0xA);
    ok(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 0xA, 0));
    register(&r, &B, 0xB);
    assert_eq!(rw(&r, &B), (true, false));
    let g = r.access_gen();
    ok(acq(&r, &B, racqa::PREEMPT, WriteExclusive, 0xB, 0xA));
    assert_ne!(r.access_gen(), g, "queues must notice");
    assert_eq!(rw(&r, &B), (true, true));
    assert_eq!(rw(&r, &A), (true, false), "A is no longer even registered");
    let s = status(&r);
    assert_eq!(s.registrants, vec![(B, 0xB, true)]);
    // A's old key is gone: it cannot take it back.
    conflict(acq(&r, &A, racqa::PREEMPT, WriteExclusive, 0xA, 0xB));
    // PRKEY 0 not matching the holder: invalid; a key nobody has: conflict.
    register(&r, &A, 0xA);
    invalid(acq(&r, &A, racqa::PREEMPT, WriteExclusive, 0xA, 0));
    conflict(acq(&r, &A, racqa::PREEMPT, WriteExclusive, 0xA, 0x77));
    // Preempting a non-holder's key only unregisters it.
    register(&r, &C, 0xC);
    ok(acq(&r, &B, racqa::PREEMPT, WriteExclusive, 0xB, 0xC));
    assert_eq!(status(&r).registrants.len(), 2);
    assert_eq!(status(&r).rtype, Some(WriteExclusive));
    // The holder may preempt itself to change type.
    ok(acq(&r, &B, racqa::PREEMPT, ExclusiveAccess, 0xB, 0xB));
    assert_eq!(rw(&r, &A), (false, false));
    assert_eq!(status(&r).registrants.len(), 2, "own registration stays");
}

#[test]
fn preempt_under_all_registrants() {
    let r = Reservations::new(uuid());
    register(&r, &A, 1);
    register(&r, &B, 2);
    register(&r, &C, 3);
    ok(acq(
        &r,
        &A,
        racqa::ACQUIRE,
        ExclusiveAccessAllRegistrants,
        1,
        0,
    ));
    // A key: that registrant goes, the reservation stays.
    ok(acq(
        &r,
        &B,
        racqa::PREEMPT,
        ExclusiveAccessAllRegistrants,
        2,
        3,
    ));
    assert_eq!(rw(&r, &C), (false, false));
    assert_eq!(rw(&r, &A), (true, true));
    // Key 0: everyone else goes and the issuer takes the new type.
    ok(acq(&r, &B, racqa::PREEMPT, WriteExclusive, 2, 0));
    let s = status(&r);
    assert_eq!(s.rtype, Some(WriteExclusive));
    assert_eq!(s.registrants, vec![(B, 2, true)]);
    // The last registrant of an All Registrants reservation takes it with it.
    let r = Reservations::new(uuid());
    register(&r, &A, 1);
    ok(acq(
        &r,
        &A,
        racqa::ACQUIRE,
        WriteExclusiveAllRegistrants,
        1,
        0,
    ));
    ok(reg(&r, &A, rrega::UNREGISTER, false, 1, 0));
    assert_eq!(status(&r).rtype, None);
}

/// Commands of a host that arrived before a preempt-and-abort removed it are aborted when
/// they come to execute; its later commands and other hosts' are not.
#[test]
fn preempt_and_abort_marks_the_preempted_hosts_earlier_commands() {
    let r = Reservations::new(uuid());
    register(&r, &A, 0xA);
    register(&r, &C, 0xC);
    ok(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 0xA, 0));
    register(&r, &B, 0xB);
    let before = r.abort_gen();
    // A plain preempt aborts nothing.
    ok(acq(&r, &B, racqa::PREEMPT, WriteExclusive, 0xB, 0xC));
    assert!(!r.aborted_since(&C, before));
    ok(acq(
        &r,
        &B,
        racqa::PREEMPT_AND_ABORT,
        WriteExclusive,
        0xB,
        0xA,
    ));
    assert!(r.aborted_since(&A, before));
    assert!(!r.aborted_since(&B, before));
    assert!(
        !r.aborted_since(&A, r.abort_gen()),
        "arrived after: not aborted"
    );
    assert_eq!(rw(&r, &A), (true, false));
    conflict(acq(
        &r,
        &A,
        racqa::PREEMPT_AND_ABORT,
        WriteExclusive,
        0xA,
        0xB,
    ));
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn persistence_round_trips_through_the_ptpl_file() {
    let d = tmpdir();
    let f = d.path().join("ns1.ptpl");
    let r = Reservations::with_ptpl_file(uuid(), &f).unwrap();
    assert!(r.ptpl_capable() && !r.ptpl());
    // Asking to persist on a namespace without a file is refused; with one it is kept.
    let plain = Reservations::new(uuid());
    let persist = ResvRegister {
        nsid: 1,
        rrega: rrega::REGISTER,
        iekey: false,
        cptpl: cptpl::PERSIST,
    };
    invalid(plain.register(&A, &persist, &keys(0, 1)));
    assert!(
        status(&plain).registrants.is_empty(),
        "a refused command changes nothing"
    );
    ok(r.register(&A, &persist, &keys(0, 0xA)));
    register(&r, &B, 0xB);
    ok(acq(
        &r,
        &A,
        racqa::ACQUIRE,
        WriteExclusiveRegistrantsOnly,
        0xA,
        0,
    ));
    let before = status(&r);
    assert!(before.ptpl);
    let again = Reservations::with_ptpl_file(uuid(), &f).unwrap();
    assert_eq!(status(&again).registrants, before.registrants);
    assert_eq!(status(&again).rtype, before.rtype);
    assert!(again.ptpl());
    assert_eq!(rw(&again, &C), (true, false));
    assert_eq!(rw(&again, &B), (true, true));
    // The file is SPDK's layout.
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    assert_eq!(j["rtype"], 3);
    assert_eq!(j["crkey"], 0xA);
    assert_eq!(j["holder_uuid"], Uuid::from_bytes(A).to_string());
    assert_eq!(
        j["registrants"][1]["host_uuid"],
        Uuid::from_bytes(B).to_string()
    );
    assert!(!d.path().join("ns1.ptpl.tmp").exists());
    // PTPL off (Set Features or CPTPL): nothing comes back.
    ok(again.set_ptpl(false));
    let off = Reservations::with_ptpl_file(uuid(), &f).unwrap();
    assert!(status(&off).registrants.is_empty() && !off.ptpl());
    // And an empty file (what SPDK leaves then) is a fresh start too.
    std::fs::write(&f, "").unwrap();
    assert!(Reservations::with_ptpl_file(uuid(), &f).is_ok());
}

#[test]
fn a_bad_ptpl_file_is_refused_with_the_reason() {
    let d = tmpdir();
    let f = d.path().join("ns.ptpl");
    let r = Reservations::with_ptpl_file(uuid(), &f).unwrap();
    ok(r.set_ptpl(true));
    register(&r, &A, 1);
    ok(acq(&r, &A, racqa::ACQUIRE, WriteExclusive, 1, 0));
    let good = std::fs::read_to_string(&f).unwrap();
    let cases = [
        (good[..good.len() / 2].to_string(), "EOF"),
        (good.replace("\"rtype\": 1", "\"rtype\": 9"), "rtype 9"),
        (
            good.replace("\"crkey\": 1", "\"crkey\": 2"),
            "not registered with crkey",
        ),
        (
            good.replace("\"ptpl\": true", "\"ptpl\": true, \"extra\": 1"),
            "unknown field",
        ),
        (
            good.replace(&Uuid::from_bytes(A).to_string(), "not-a-uuid"),
            "not a UUID",
        ),
    ];
    for (text, why) in cases {
        std::fs::write(&f, &text).unwrap();
        let e = Reservations::with_ptpl_file(uuid(), &f).err().expect(why);
        assert!(e.to_string().contains(why), "{e} should say {why}");
        assert!(
            e.to_string().contains("ns.ptpl"),
            "{e} should name the file"
        );
    }
    std::fs::write(&f, &good).unwrap();
    let e = Reservations::with_ptpl_file(Uuid::from_bytes([1; 16]), &f)
        .err()
        .unwrap();
    assert!(e.to_string().contains("written for bdev"), "{e}");
}

#[test]
fn a_failed_write_leaves_the_state_as_it_was() {
    let d = tmpdir();
    let f = d.path().join("gone").join("ns.ptpl");
    let r = Reservations::with_ptpl_file(uuid(), &f).unwrap();
    // The directory does not exist: the write fails, the change is refused.
    let s = r.set_ptpl(true);
    assert!(s.same_code(Status::INTERNAL), "{s}");
    assert!(!r.ptpl());
}

#[test]
fn report_needs_the_extended_structure_and_fits_the_buffer() {
    let r = Reservations::new(uuid());
    register(&r, &A, 1);
    register(&r, &B, 2);
    let mut buf = vec![0xEEu8; 96];
    let c = ResvReport {
        nsid: 1,
        len: 96,
        eds: false,
    };
    assert!(r
        .report(&c, &mut buf)
        .same_code(Status::HOST_ID_INCONSISTENT_FORMAT));
    let c = ResvReport { eds: true, ..c };
    ok(r.report(&c, &mut buf));
    let s = ResvStatus::parse_extended(&buf).unwrap();
    // Room for the header and half an entry: REGCTL still says 2, no entry is complete.
    assert_eq!(buf[5], 2);
    assert!(s.registrants.is_empty());
    let mut big = vec![0u8; 4096];
    ok(r.report(&ResvReport { len: 4096, ..c }, &mut big));
    let s = ResvStatus::parse_extended(&big).unwrap();
    assert_eq!(s.registrants, vec![(A, 1, false), (B, 2, false)]);
    assert_eq!(&big[64..66], &[0xFF, 0xFF], "dynamic controller id");
}
