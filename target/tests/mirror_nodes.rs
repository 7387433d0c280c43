//! The mirror across two real plexd processes on loopback: A owns the mirror over a local file
//! plex and B's file plex (exported by B over NVMe/TCP, attached by A with bdev_nvme); a host
//! writes through A's export. Every test ends comparing the plexes block by block, straight
//! from their files.

mod bdev_nvme_common;
mod mirror_common;

use bdev_nvme_common::*;
use mirror_common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NQN_M: &str = "nqn.2024-01.io.plexstor:mirror-m";
const PLEX_BYTES: u64 = 64 << 20;
const REGION: u64 = 1 << 20;

fn plex_file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(PLEX_BYTES).unwrap();
    p
}

/// A UUID that stays the same for `file` (FNV-1a of its path).
fn uuid_for(file: &Path) -> String {
    let h = file
        .to_str()
        .unwrap()
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 4) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

/// B: a file plex exported on a fresh port (or `port`, to come back where it was).
fn start_b(dir: &Path, file: &Path, tag: &str, port: Option<u16>) -> (Plexd, u16) {
    let b = Plexd::start(dir, tag, &["-m", "0x1"]);
    // The same UUID on every start, as a restart from save_config keeps it: the namespace's
    // reservation file names the bdev it belongs to.
    b.ok(
        "bdev_uring_create",
        json!({"name": "plexB", "filename": file.to_str().unwrap(), "block_size": 512,
               "uuid": uuid_for(file)}),
    );
    let port = port.unwrap_or_else(free_port);
    // The namespace keeps its reservations beside the plex, so a restart keeps the fence.
    let ptpl = file.with_extension("ptpl");
    b.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    b.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN_A, "allow_any_host": true, "serial_number": "SN0001"}),
    );
    b.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN_A, "namespace": {"bdev_name": "plexB", "ptpl_file": ptpl.to_str().unwrap()}}),
    );
    b.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN_A, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (b, port)
}

/// Attaches a plex node's export on `a` as controller `name` (bdev `<name>n1`): I/O fails
/// fast while the node is away, and the controller keeps reconnecting.
fn attach_plex(a: &Plexd, name: &str, port: u16) {
    a.ok(
        "bdev_nvme_attach_controller",
        json!({"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
               "trsvcid": port.to_string(), "subnqn": NQN_A,
               "ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 1,
               "fast_io_fail_timeout_sec": 1}),
    );
}

/// A: its own file plex, B's plex attached (I/O fails fast while B is away, the controller
/// keeps reconnecting), and the mirror exported for the host.
fn start_a(dir: &Path, file: &Path, port_b: u16) -> (Plexd, u16) {
    let a = Plexd::start(dir, "a", &["-m", "0x3"]);
    a.ok(
        "bdev_uring_create",
        json!({"name": "plexA", "filename": file.to_str().unwrap(), "block_size": 512}),
    );
    attach_plex(&a, "B", port_b);
    a.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": [{"bdev": "plexA", "node": "a"}, {"bdev": "Bn1", "node": "b"}]}),
    );
    // Clear idle regions quickly, so the test need not wait md's 5 s.
    a.ok(
        "bdev_mirror_set_options",
        json!({"name": "m", "bitmap_clear_interval_ms": 200}),
    );
    let port = free_port();
    a.export(NQN_M, "m", port, json!({"trtype": "TCP"}));
    (a, port)
}

/// Writes one MiB-sized pattern into each region of `regions` (at its start), checks they read back.
fn write_regions(a: &Plexd, host: &mut Driver, seed: u64, regions: &[u64]) -> Vec<(u64, Vec<u8>)> {
    let bs = host.block_size as u64;
    let mut written = Vec::new();
    for &r in regions {
        let lba = r * REGION / bs + 8;
        let data = pattern(seed + r, lba, 64 << 10, bs as usize);
        host.write(lba, data.clone())
            .unwrap_or_else(|e| panic!("write to region {r}: {e}\n{}", a.log_text()));
        written.push((lba, data));
    }
    written
}

#[test]
fn a_killed_plex_node_leaves_the_mirror_writable_and_returns_to_a_partial_resync() {
    let dir = temp_dir();
    let (fa, fb) = (
        plex_file(dir.path(), "a.img"),
        plex_file(dir.path(), "b.img"),
    );
    let (mut b, port_b) = start_b(dir.path(), &fb, "b", None);
    let (a, port_a) = start_a(dir.path(), &fa, port_b);
    let m = mirror(&a);
    assert_eq!(m["state"], "online", "{m:#}");
    assert_eq!(
        (m["scheduled_plexes"].clone(), m["actual_plexes"].clone()),
        (json!(2), json!(2))
    );
    let blocks = m["num_blocks"].as_u64().unwrap();
    assert!(blocks > 32 * REGION / 512, "{m:#}");

    let mut host = Driver::connect(port_a, NQN_M);
    let mut written = write_regions(&a, &mut host, 1, &[0, 5, 9, 20]);
    // Lazy clearing: once nothing is in flight and both plexes hold everything, the bitmap
    // empties, so what follows counts only what B will miss.
    wait_mirror(&a, "clean", Duration::from_secs(30), |m| {
        m["dirty_regions"] == 0
    });
    drop(host);
    assert_plexes_match(&[&fa, &fb], &mirror(&a));

    // B dies. Writes go on, to A alone, once the failed plex is on record.
    b.kill();
    let mut host = Driver::connect(port_a, NQN_M);
    let missed = [3u64, 9, 17, 30];
    written.extend(write_regions(&a, &mut host, 100, &missed));
    let m = wait_mirror(&a, "degraded", Duration::from_secs(5), |m| {
        m["state"] == "degraded"
    });
    let p1 = &m["plexes"][1];
    assert_eq!(p1["condition"], "Faulted", "{m:#}");
    assert_eq!(
        m["dirty_regions"],
        missed.len(),
        "exactly the regions B missed are marked: {m:#}"
    );

    // B comes back with its data; A's controller reconnects, the mirror finds its plex
    // readable and copies only what B missed.
    let (_b2, _) = start_b(dir.path(), &fb, "b2", Some(port_b));
    let m = wait_mirror(&a, "in sync again", Duration::from_secs(60), |m| {
        m["state"] == "online" && m["plexes"][1]["condition"] == "InUse"
    });
    let last = &m["plexes"][1]["last_resync"];
    assert_eq!(last["full"], false, "{m:#}");
    assert_eq!(last["regions"], missed.len(), "{m:#}");
    assert_eq!(last["bytes_copied"], missed.len() as u64 * REGION, "{m:#}");
    // The newest data of each place written, before and during B's absence.
    let newest: std::collections::BTreeMap<u64, Vec<u8>> = written.into_iter().collect();
    for (lba, data) in &newest {
        assert!(
            host.read(*lba, data.len()).unwrap() == *data,
            "LBA {lba} reads back"
        );
    }
    wait_mirror(&a, "clean", Duration::from_secs(30), |m| {
        m["dirty_regions"] == 0
    });
    drop(host);
    assert_plexes_match(&[&fa, &fb], &mirror(&a));
}

#[test]
fn a_new_owner_fences_the_old_one_which_can_no_longer_acknowledge_a_write() {
    let dir = temp_dir();
    let (fa, fb) = (
        plex_file(dir.path(), "a.img"),
        plex_file(dir.path(), "b.img"),
    );
    let (mut b, port_b) = start_b(dir.path(), &fb, "b", None);
    let (a, port_a) = start_a(dir.path(), &fa, port_b);
    let mut host = Driver::connect(port_a, NQN_M);
    let mut written = write_regions(&a, &mut host, 7, &[1, 2, 33]);
    assert!(
        a.log_text()
            .contains("plex Bn1 reserved (Acquired { persistent: true })"),
        "{}",
        a.log_text()
    );

    // B restarts: its namespace brings A's reservation back from its ptpl_file.
    // What A acknowledges meanwhile reaches B's plex by resync.
    b.kill();
    written.extend(write_regions(&a, &mut host, 70, &[40]));
    let (_b2, _) = start_b(dir.path(), &fb, "b2", Some(port_b));
    wait_mirror(&a, "whole again", Duration::from_secs(60), |m| {
        m["state"] == "online"
    });

    // C takes the volume over from B's plex alone (A is, as far as C knows, gone).
    let c = Plexd::start(dir.path(), "c", &["-m", "0x1"]);
    c.ok(
        "bdev_nvme_attach_controller",
        json!({"name": "B", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
               "trsvcid": port_b.to_string(), "subnqn": NQN_A}),
    );
    c.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["Bn1"], "allow_degraded": true}),
    );
    assert!(
        c.log_text().contains("was held by another owner"),
        "A's reservation survived B's restart, and C preempted it: {}",
        c.log_text()
    );
    let mc = c.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0].clone();
    assert_eq!(mc["state"], "degraded", "A's plex is not C's: {mc:#}");

    // A's next write reaches B's plex, is refused, and A acknowledges nothing from now on.
    let bs = host.block_size;
    let lba = 5 * REGION / 512;
    let r = host.write(lba, pattern(99, lba, 4096, bs));
    assert!(
        matches!(&r, Err(e) if e.is_reservation_conflict()),
        "{r:?}\n{}",
        a.log_text()
    );
    let r = host.write(0, pattern(98, 0, 4096, bs));
    assert!(
        r.is_err(),
        "a fenced owner refuses even writes its local plex could take: {r:?}"
    );

    // Everything A acknowledged is on C's volume.
    let port_c = free_port();
    c.export(NQN_M, "m", port_c, json!({"trtype": "TCP"}));
    let mut host_c = Driver::connect(port_c, NQN_M);
    for (lba, data) in &written {
        assert!(
            host_c.read(*lba, data.len()).unwrap() == *data,
            "LBA {lba} on the new owner"
        );
    }
}

#[test]
fn a_three_plex_mirror_losing_two_plexes_in_turn_serves_from_the_last_and_rebuilds_both() {
    let dir = temp_dir();
    let files: Vec<PathBuf> = ["a.img", "b.img", "c.img"]
        .iter()
        .map(|f| plex_file(dir.path(), f))
        .collect();
    let (mut b, port_b) = start_b(dir.path(), &files[1], "b", None);
    let (mut c, port_c) = start_b(dir.path(), &files[2], "c", None);
    let a = Plexd::start(dir.path(), "a", &["-m", "0x3"]);
    a.ok(
        "bdev_uring_create",
        json!({"name": "plexA", "filename": files[0].to_str().unwrap(), "block_size": 512}),
    );
    for (name, port) in [("B", port_b), ("C", port_c)] {
        attach_plex(&a, name, port);
    }
    a.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["plexA", "Bn1", "Cn1"]}),
    );
    a.ok(
        "bdev_mirror_set_options",
        json!({"name": "m", "bitmap_clear_interval_ms": 200}),
    );
    let port_a = free_port();
    a.export(NQN_M, "m", port_a, json!({"trtype": "TCP"}));

    let mut host = Driver::connect(port_a, NQN_M);
    let mut written = write_regions(&a, &mut host, 1, &[0, 4]);
    wait_mirror(&a, "clean", Duration::from_secs(30), |m| {
        m["dirty_regions"] == 0
    });

    // B goes, then C: the last plex serves alone.
    b.kill();
    written.extend(write_regions(&a, &mut host, 10, &[10]));
    wait_mirror(&a, "without B", Duration::from_secs(10), |m| {
        m["plexes"][1]["condition"] == "Faulted"
    });
    c.kill();
    written.extend(write_regions(&a, &mut host, 20, &[20]));
    let m = wait_mirror(&a, "on its last plex", Duration::from_secs(10), |m| {
        m["plexes"][2]["condition"] == "Faulted"
    });
    assert_eq!(
        (m["state"].clone(), m["actual_plexes"].clone()),
        (json!("degraded"), json!(1)),
        "{m:#}"
    );
    let newest: std::collections::BTreeMap<u64, Vec<u8>> = written.iter().cloned().collect();
    for (lba, data) in &newest {
        assert!(
            host.read(*lba, data.len()).unwrap() == *data,
            "LBA {lba} from the last plex"
        );
    }

    // Both return and are rebuilt, each with the regions marked since the first left.
    let _b2 = start_b(dir.path(), &files[1], "b2", Some(port_b));
    let _c2 = start_b(dir.path(), &files[2], "c2", Some(port_c));
    let m = wait_mirror(&a, "in sync on 3 plexes", Duration::from_secs(90), |m| {
        m["state"] == "online" && m["actual_plexes"] == 3
    });
    for p in [1, 2] {
        let last = &m["plexes"][p]["last_resync"];
        assert_eq!(
            (last["full"].clone(), last["regions"].clone()),
            (json!(false), json!(2)),
            "plex {p}: {m:#}"
        );
    }
    for (lba, data) in &newest {
        assert!(
            host.read(*lba, data.len()).unwrap() == *data,
            "LBA {lba} after the rebuild"
        );
    }
    wait_mirror(&a, "clean", Duration::from_secs(30), |m| {
        m["dirty_regions"] == 0
    });
    drop(host);
    assert_plexes_match(&[&files[0], &files[1], &files[2]], &mirror(&a));
}
