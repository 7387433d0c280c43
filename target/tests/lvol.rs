//! Volume stores on one real plexd, over a file (uring) base, driven through JSON-RPC with
//! SPDK's method names and read and written over NVMe/TCP: thin allocation, zeroes where
//! nothing was written, snapshots and clones, a full store, and the store found again after
//! plexd is killed with `kill -9`.

mod bdev_nvme_common;

use bdev_nvme_common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = MIB;

struct Node {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Node {
    fn new(bytes: u64) -> Node {
        let dir = temp_dir();
        let file = dir.path().join("base.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        Node { dir, file }
    }

    fn start(&self, tag: &str) -> Plexd {
        let p = Plexd::start(self.dir.path(), tag, &["-m", "0x1"]);
        p.ok(
            "bdev_uring_create",
            json!({"name": "base", "filename": self.file.to_str().unwrap(), "block_size": 512}),
        );
        p
    }
}

fn lvols(p: &Plexd) -> Vec<Value> {
    p.ok("bdev_lvol_get_lvols", json!({}))
        .as_array()
        .unwrap()
        .clone()
}

fn lvol(p: &Plexd, name: &str) -> Value {
    lvols(p)
        .into_iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no lvol {name}: {:?}", lvols(p)))
}

fn store(p: &Plexd) -> Value {
    p.ok("bdev_lvol_get_lvstores", json!({}))[0].clone()
}

/// A store named `name` on the node's base, with the tests' cluster size.
fn create_store(p: &Plexd, name: &str) -> Value {
    p.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "base", "lvs_name": name, "cluster_sz": CLUSTER}),
    )
}

/// Waits (10 s at most, then fails showing plexd's log) until `cond` holds.
fn wait_for(p: &Plexd, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Exports bdev `bdev` as its own subsystem on a free port; returns the port and NQN.
fn export(p: &Plexd, bdev: &str, n: u32) -> (u16, String) {
    let nqn = format!("nqn.2024-01.io.plexstor:lvol-{n}");
    let port = free_port();
    let _ = p.call("nvmf_create_transport", json!({"trtype": "TCP"}));
    p.ok(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true, "serial_number": format!("SN{n}")}),
    );
    p.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
    );
    p.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (port, nqn)
}

#[test]
fn thin_lvols_snapshots_and_clones_keep_their_data_across_a_kill() {
    let node = Node::new(96 * MIB);
    let mut p = node.start("a");
    let lvs = create_store(&p, "lvs");
    let s = store(&p);
    assert_eq!(s["uuid"], lvs);
    let total = s["total_data_clusters"].as_u64().unwrap();
    assert_eq!(s["free_clusters"], total);
    assert!(total > 64 && total < 96, "{s}");

    // A thin lvol: nothing allocated until written; a thick one: everything at once.
    let v1 = p.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "v1", "size_in_mib": 32, "thin_provision": true, "lvs_name": "lvs"}),
    );
    p.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "thick", "size_in_mib": 4, "thin_provision": false, "lvs_name": "lvs"}),
    );
    assert_eq!(lvol(&p, "v1")["num_allocated_clusters"], 0);
    assert_eq!(lvol(&p, "thick")["num_allocated_clusters"], 4);
    assert_eq!(store(&p)["free_clusters"], total - 4);
    let b = &p.ok("bdev_get_bdevs", json!({"name": "lvs/v1"}))[0];
    assert_eq!(b["name"], v1);
    assert_eq!(b["num_blocks"], 32 * MIB / 512);

    let (port, nqn) = export(&p, "lvs/v1", 1);
    let mut host = Driver::connect(port, &nqn);
    assert!(
        host.read(0, 8192).unwrap().iter().all(|&b| b == 0),
        "never written reads zeroes"
    );
    // Writes: one inside a cluster, one across a cluster boundary.
    let across = CLUSTER / 512 - 8;
    let w1 = pattern(1, 100, 64 << 10, 512);
    let w2 = pattern(2, across, 8192, 512);
    host.write(100, w1.clone()).unwrap();
    host.write(across, w2.clone()).unwrap();
    assert_eq!(host.read(100, w1.len()).unwrap(), w1);
    assert_eq!(host.read(across, w2.len()).unwrap(), w2);
    // The rest of a newly allocated cluster reads zeroes.
    assert!(host.read(0, 100 * 512).unwrap().iter().all(|&b| b == 0));
    assert_eq!(lvol(&p, "v1")["num_allocated_clusters"], 2);

    // Snapshot: a point in time; the lvol goes on writing over it.
    let snap = p.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs/v1", "snapshot_name": "snap1"}),
    );
    let w3 = pattern(3, 100, 4096, 512);
    host.write(100, w3.clone()).unwrap();
    let mut now = w1.clone();
    now[..4096].copy_from_slice(&w3);
    assert_eq!(host.read(100, now.len()).unwrap(), now);
    let sn = lvol(&p, "snap1");
    assert_eq!(sn["is_snapshot"], true);
    assert_eq!(sn["uuid"], snap);
    assert_eq!(sn["num_allocated_clusters"], 2);
    assert_eq!(lvol(&p, "v1")["is_clone"], true);
    assert_eq!(
        lvol(&p, "v1")["num_allocated_clusters"],
        1,
        "copied on write"
    );

    // A clone of the snapshot sees the snapshot's data, and its writes stay its own.
    p.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs/snap1", "clone_name": "c1"}),
    );
    let (cport, cnqn) = export(&p, "lvs/c1", 2);
    let mut chost = Driver::connect(cport, &cnqn);
    assert_eq!(chost.read(100, w1.len()).unwrap(), w1);
    assert_eq!(chost.read(across, w2.len()).unwrap(), w2);
    let w4 = pattern(4, across, 4096, 512);
    chost.write(across, w4.clone()).unwrap();
    assert_eq!(
        host.read(across, w2.len()).unwrap(),
        w2,
        "the origin is untouched"
    );

    // The snapshot cannot go while clones depend on it, and says which.
    let (_, msg) = p
        .call("bdev_lvol_delete", json!({"name": "lvs/snap1"}))
        .unwrap_err();
    assert!(msg.contains("c1") && msg.contains("v1"), "{msg}");

    // Writes to a snapshot are refused.
    let (sport, snqn) = export(&p, "lvs/snap1", 3);
    let mut shost = Driver::connect(sport, &snqn);
    assert!(shost.write(0, vec![1u8; 512]).is_err());
    assert_eq!(shost.read(100, w1.len()).unwrap(), w1);
    drop((host, chost, shost));

    // kill -9, then the base comes back: examine finds the store and every lvol.
    p.kill();
    let p = node.start("b");
    wait_for(&p, || {
        !p.ok("bdev_lvol_get_lvstores", json!({}))[0].is_null()
    });
    let names: Vec<String> = lvols(&p)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    for n in ["v1", "thick", "snap1", "c1"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
    let (port, nqn) = export(&p, "lvs/v1", 1);
    let mut host = Driver::connect(port, &nqn);
    assert_eq!(host.read(100, now.len()).unwrap(), now);
    assert_eq!(host.read(across, w2.len()).unwrap(), w2);
    let (cport, cnqn) = export(&p, "lvs/c1", 2);
    let mut chost = Driver::connect(cport, &cnqn);
    let mut cexp = w2.clone();
    cexp[..4096].copy_from_slice(&w4);
    assert_eq!(chost.read(across, cexp.len()).unwrap(), cexp);
    assert_eq!(chost.read(100, w1.len()).unwrap(), w1);
}

#[test]
fn a_full_store_fails_the_write_that_needs_a_cluster_and_nothing_else() {
    let node = Node::new(32 * MIB);
    let p = node.start("a");
    create_store(&p, "lvs");
    let total = store(&p)["total_data_clusters"].as_u64().unwrap();
    // Two thin lvols, each as large as the whole store.
    for n in ["a", "b"] {
        p.ok(
            "bdev_lvol_create",
            json!({"lvol_name": n, "size_in_mib": total, "thin_provision": true, "lvs_name": "lvs"}),
        );
    }
    let (pa, na) = export(&p, "lvs/a", 1);
    let (pb, nb) = export(&p, "lvs/b", 2);
    let mut a = Driver::connect(pa, &na);
    let mut b = Driver::connect(pb, &nb);
    b.write(0, vec![7u8; 4096]).unwrap();
    // a takes every cluster left.
    for i in 0..total - 1 {
        a.write(i * CLUSTER / 512, vec![1u8; 4096])
            .unwrap_or_else(|e| panic!("cluster {i}: {e}"));
    }
    assert_eq!(store(&p)["free_clusters"], 0);
    let e = a
        .write((total - 1) * CLUSTER / 512, vec![1u8; 4096])
        .unwrap_err();
    assert!(
        format!("{e:?}").contains("sct: 0, sc: 129"),
        "Capacity Exceeded, not {e:?}"
    );
    // Writes into allocated clusters go on, in both lvols; reads too.
    a.write(8, vec![2u8; 4096]).unwrap();
    b.write(8, vec![3u8; 4096]).unwrap();
    assert!(b.read(0, 4096).unwrap().iter().all(|&x| x == 7));
    // Unmapping a whole cluster gives it back, and the failed write then succeeds.
    p.ok("bdev_lvol_get_lvols", json!({}));
    let freed = p.call(
        "bdev_lvol_resize",
        json!({"name": "lvs/a", "size_in_mib": total - 2}),
    );
    assert!(freed.is_ok(), "{freed:?}");
    assert_eq!(store(&p)["free_clusters"], 1);
    b.write(5 * CLUSTER / 512, vec![4u8; 4096]).unwrap();
    assert!(b
        .read(5 * CLUSTER / 512, 4096)
        .unwrap()
        .iter()
        .all(|&x| x == 4));
    assert_eq!(store(&p)["free_clusters"], 0);
}

#[test]
fn damaged_metadata_is_refused_at_examine_naming_the_block() {
    let node = Node::new(32 * MIB);
    let mut p = node.start("a");
    create_store(&p, "lvs");
    p.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "v", "size_in_mib": 4, "thin_provision": true, "lvs_name": "lvs"}),
    );
    p.kill();
    // Flip a byte in the current superblock (slot 1, page 1) and in the other slot.
    let mut bytes = std::fs::read(&node.file).unwrap();
    bytes[4096 + 20] ^= 0xff;
    bytes[20] ^= 0xff;
    std::fs::write(&node.file, &bytes).unwrap();
    let p = node.start("b");
    wait_for(&p, || p.log_text().contains("store not loaded"));
    let log = p.log_text();
    assert!(
        log.contains("slot 1 (page 1)") && log.contains("checksum"),
        "{log}"
    );
    assert!(p
        .ok("bdev_lvol_get_lvstores", json!({}))
        .as_array()
        .unwrap()
        .is_empty());
    // The base was not claimed: it can be used (or a store made on it again).
    create_store(&p, "lvs2");
}

#[test]
fn inflate_and_decouple_give_a_clone_its_own_copy_of_what_it_reads() {
    let node = Node::new(96 * MIB);
    let p = node.start("a");
    create_store(&p, "lvs");
    p.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "v", "size_in_mib": 8, "thin_provision": true, "lvs_name": "lvs"}),
    );
    let (port, nqn) = export(&p, "lvs/v", 1);
    let mut host = Driver::connect(port, &nqn);
    let at = |cluster: u64| cluster * CLUSTER / 512 + 16;
    let a = pattern(1, at(0), 8192, 512);
    let b = pattern(2, at(2), 8192, 512);
    let c = pattern(3, at(3), 8192, 512);
    let d = pattern(4, at(5), 8192, 512);
    host.write(at(0), a.clone()).unwrap();
    host.write(at(2), b.clone()).unwrap();
    // A chain: s1 holds clusters 0 and 2, s2 cluster 3, and c1, a clone of s2, cluster 5.
    p.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs/v", "snapshot_name": "s1"}),
    );
    host.write(at(3), c.clone()).unwrap();
    p.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs/v", "snapshot_name": "s2"}),
    );
    p.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs/s2", "clone_name": "c1"}),
    );
    let (cport, cnqn) = export(&p, "lvs/c1", 2);
    let mut chost = Driver::connect(cport, &cnqn);
    chost.write(at(5), d.clone()).unwrap();
    let expect = |h: &mut Driver| {
        for (lba, data) in [(at(0), &a), (at(2), &b), (at(3), &c), (at(5), &d)] {
            assert_eq!(&h.read(lba, data.len()).unwrap(), data, "lba {lba}");
        }
        for cluster in [1, 4, 6, 7] {
            let z = h.read(at(cluster), 8192).unwrap();
            assert!(z.iter().all(|&x| x == 0), "cluster {cluster} reads zeroes");
        }
    };
    expect(&mut chost);
    let free0 = store(&p)["free_clusters"].as_u64().unwrap();

    // Decouple: c1 copies what s2 itself holds (cluster 3) and hangs from s1 instead.
    assert_eq!(
        p.ok("bdev_lvol_decouple_parent", json!({"name": "lvs/c1"})),
        true
    );
    let l = lvol(&p, "c1");
    assert_eq!(
        (
            l["base_snapshot"].as_str(),
            l["num_allocated_clusters"].as_u64()
        ),
        (Some("s1"), Some(2))
    );
    assert_eq!(
        lvol(&p, "s2")["clones"],
        json!(["v"]),
        "c1 is no longer a clone of s2"
    );
    assert_eq!(store(&p)["free_clusters"], free0 - 1);
    expect(&mut chost);

    // Inflate: every cluster its own, thick, no parent; what it read is unchanged.
    assert_eq!(p.ok("bdev_lvol_inflate", json!({"name": "lvs/c1"})), true);
    let l = lvol(&p, "c1");
    assert_eq!(l["is_clone"], false, "{l}");
    assert_eq!(l["is_thin_provisioned"], false, "{l}");
    assert_eq!(l["num_allocated_clusters"], 8, "{l}");
    assert!(l.get("base_snapshot").is_none(), "{l}");
    assert_eq!(store(&p)["free_clusters"], free0 - 7);
    expect(&mut chost);
    // Writes to the inflated clone stay its own; the origin still reads its data.
    let e = pattern(5, at(0), 8192, 512);
    chost.write(at(0), e.clone()).unwrap();
    assert_eq!(host.read(at(0), a.len()).unwrap(), a);
    let (_, msg) = p
        .call("bdev_lvol_decouple_parent", json!({"name": "lvs/c1"}))
        .unwrap_err();
    assert!(msg.contains("no parent"), "{msg}");
    let check = p.ok("bdev_lvol_check_lvstore", json!({"lvs_name": "lvs"}));
    assert_eq!(check["problems"], json!([]), "{check}");
    drop((host, chost));

    // On disk: after kill -9 the clone is still whole and on its own.
    let mut p = p;
    p.kill();
    let p = node.start("b");
    wait_for(&p, || lvols(&p).len() >= 4);
    let l = lvol(&p, "c1");
    assert_eq!(
        (
            l["is_clone"].as_bool(),
            l["num_allocated_clusters"].as_u64()
        ),
        (Some(false), Some(8))
    );
    let (cport, cnqn) = export(&p, "lvs/c1", 2);
    let mut chost = Driver::connect(cport, &cnqn);
    assert_eq!(chost.read(at(0), e.len()).unwrap(), e);
    for (lba, data) in [(at(2), &b), (at(3), &c), (at(5), &d)] {
        assert_eq!(&chost.read(lba, data.len()).unwrap(), data, "lba {lba}");
    }
}

/// Polls the host's controller (so it takes the namespace-changed event) until namespace 1
/// has `blocks`.
fn wait_ns_blocks(p: &Plexd, host: &mut Driver, blocks: u64) {
    wait_for(p, || {
        host.ctrlr.poll();
        host.ctrlr.namespace(1).map(|n| n.blocks) == Some(blocks)
    });
}

#[test]
fn a_mirror_on_lvols_grows_once_every_plex_has_and_its_host_sees_the_size() {
    let node = Node::new(160 * MIB);
    let p = node.start("a");
    create_store(&p, "lvs");
    for n in ["p0", "p1"] {
        p.ok(
            "bdev_lvol_create",
            json!({"lvol_name": n, "size_in_mib": 34, "thin_provision": true, "lvs_name": "lvs"}),
        );
    }
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["lvs/p0", "lvs/p1"]}),
    );
    // 512-byte blocks: the mirror's metadata takes the first MiB of each plex.
    let old_blocks = 33 * MIB / 512;
    let (port, nqn) = export(&p, "m", 1);
    let mut host = Driver::connect(port, &nqn);
    assert_eq!(host.ctrlr.namespace(1).unwrap().blocks, old_blocks);
    let tail = pattern(1, old_blocks - 8, 4096, 512);
    host.write(old_blocks - 8, tail.clone()).unwrap();

    let grow = |mib: u64| {
        p.call(
            "bdev_mirror_resize",
            json!({"name": "m", "size_in_mib": mib}),
        )
    };
    // Not before every plex has the room, naming the one that lacks it.
    let e = grow(65).unwrap_err();
    assert!(
        e.1.contains("lvs/p0") && e.1.contains("grow it first"),
        "{e:?}"
    );
    p.ok(
        "bdev_lvol_resize",
        json!({"name": "lvs/p0", "size_in_mib": 66}),
    );
    let e = grow(65).unwrap_err();
    assert!(e.1.contains("lvs/p1"), "{e:?}");
    p.ok(
        "bdev_lvol_resize",
        json!({"name": "lvs/p1", "size_in_mib": 66}),
    );
    let e = grow(31).unwrap_err();
    assert!(e.1.contains("cannot shrink"), "{e:?}");
    let e = grow(8 << 10).unwrap_err();
    assert!(e.1.contains("covers at most 3840 MiB"), "{e:?}");
    let generation = |p: &Plexd| {
        p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0]["generation"]
            .as_u64()
            .unwrap()
    };
    let g0 = generation(&p);
    grow(65).unwrap();
    assert!(generation(&p) > g0, "a resize is a new generation");
    let new_blocks = 65 * MIB / 512;
    let bdev = &p.ok("bdev_get_bdevs", json!({"name": "m"}))[0];
    assert_eq!(bdev["num_blocks"], new_blocks, "{bdev:#}");
    let m = &p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0];
    assert_eq!(m["regions"], 65, "{m:#}");

    // The connected host learns the size from the namespace-changed event, no reconnect,
    // and writes where there was no mirror before.
    wait_ns_blocks(&p, &mut host, new_blocks);
    let end = pattern(2, new_blocks - 8, 4096, 512);
    host.write(new_blocks - 8, end.clone()).unwrap();
    assert!(host.read(old_blocks - 8, 4096).unwrap() == tail);
    assert!(host.read(new_blocks - 8, 4096).unwrap() == end);
    drop(host);

    // The superblocks carry the size: reassembled after kill -9, the mirror has it, and each
    // plex alone holds both writes.
    let mut p = p;
    p.kill();
    let p = node.start("b");
    wait_for(&p, || {
        p.call("bdev_get_bdevs", json!({"name": "lvs/p1"})).is_ok()
    });
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["lvs/p0", "lvs/p1"]}),
    );
    let bdev = &p.ok("bdev_get_bdevs", json!({"name": "m"}))[0];
    assert_eq!(bdev["num_blocks"], new_blocks, "{bdev:#}");
    p.ok("bdev_mirror_delete", json!({"name": "m"}));
    for (n, plex) in ["lvs/p0", "lvs/p1"].iter().enumerate() {
        let (port, nqn) = export(&p, plex, 2 + n as u32);
        let mut h = Driver::connect(port, &nqn);
        let data = MIB / 512;
        assert!(
            h.read(data + old_blocks - 8, 4096).unwrap() == tail,
            "{plex}"
        );
        assert!(
            h.read(data + new_blocks - 8, 4096).unwrap() == end,
            "{plex}"
        );
    }
}

/// Submits a write on the host's queue without waiting; true once it completed (Ok).
fn poll_write_done(p: &Plexd, host: &mut Driver, tag: u64, within: Duration) -> bool {
    let t0 = Instant::now();
    let mut done = None;
    while done.is_none() && t0.elapsed() < within {
        host.ctrlr.poll();
        host.qp.poll(|c| {
            if c.tag == tag {
                done = Some(c.result.is_ok());
            }
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    match done {
        Some(ok) => {
            assert!(ok, "the held write failed\n{}", p.log_text());
            true
        }
        None => false,
    }
}

#[test]
fn a_quiesced_mirror_holds_writes_while_its_plexes_are_snapshotted() {
    let node = Node::new(128 * MIB);
    let p = node.start("a");
    create_store(&p, "lvs");
    for n in ["p0", "p1"] {
        p.ok(
            "bdev_lvol_create",
            json!({"lvol_name": n, "size_in_mib": 8, "thin_provision": true, "lvs_name": "lvs"}),
        );
    }
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["lvs/p0", "lvs/p1"]}),
    );
    let (port, nqn) = export(&p, "m", 1);
    let mut host = Driver::connect(port, &nqn);
    let old = pattern(1, 0, 4096, 512);
    host.write(0, old.clone()).unwrap();

    let q = p.ok("bdev_mirror_quiesce", json!({"name": "m"}));
    let in_sync: Vec<&str> = q["plexes_in_sync"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["bdev"].as_str().unwrap())
        .collect();
    assert_eq!(in_sync, ["lvs/p0", "lvs/p1"], "{q:#}");
    let e = p
        .call("bdev_mirror_quiesce", json!({"name": "m"}))
        .unwrap_err();
    assert!(e.1.contains("already quiesced"), "{e:?}");
    // A write now waits; reads go on.
    let new = pattern(2, 0, 4096, 512);
    host.qp.write(1, 0, 8, new.clone(), 77).unwrap();
    assert!(
        !poll_write_done(&p, &mut host, 77, Duration::from_millis(300)),
        "held"
    );
    for n in ["p0", "p1"] {
        p.ok(
            "bdev_lvol_snapshot",
            json!({"lvol_name": format!("lvs/{n}"), "snapshot_name": format!("{n}-snap")}),
        );
    }
    assert_eq!(p.ok("bdev_mirror_resume", json!({"name": "m"})), true);
    assert!(
        poll_write_done(&p, &mut host, 77, Duration::from_secs(10)),
        "released"
    );
    assert!(host.read(0, 4096).unwrap() == new);
    // Each snapshot holds the data from before the quiesce, not the held write.
    for (i, n) in ["p0", "p1"].iter().enumerate() {
        let (port, nqn) = export(&p, &format!("lvs/{n}-snap"), 2 + i as u32);
        let mut h = Driver::connect(port, &nqn);
        assert!(h.read(MIB / 512, 4096).unwrap() == old, "{n}");
    }

    // A lease that runs out lets writes go on by itself, and resume says so.
    p.ok(
        "bdev_mirror_quiesce",
        json!({"name": "m", "timeout_ms": 200}),
    );
    host.qp.write(1, 8, 8, new.clone(), 78).unwrap();
    assert!(
        poll_write_done(&p, &mut host, 78, Duration::from_secs(10)),
        "lease ended"
    );
    let m = &p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0];
    assert_eq!(m["quiesced"], false, "{m:#}");
    assert_eq!(p.ok("bdev_mirror_resume", json!({"name": "m"})), false);
}

#[test]
fn a_plex_that_missed_a_growth_is_left_out_of_assembly_until_it_grows() {
    let node = Node::new(256 * MIB);
    let p = node.start("a");
    create_store(&p, "lvs");
    for n in ["p0", "p1", "p2"] {
        p.ok(
            "bdev_lvol_create",
            json!({"lvol_name": n, "size_in_mib": 34, "thin_provision": true, "lvs_name": "lvs"}),
        );
    }
    let all = json!(["lvs/p0", "lvs/p1", "lvs/p2"]);
    p.ok("bdev_mirror_create", json!({"name": "m", "plexes": all}));
    p.ok("bdev_mirror_delete", json!({"name": "m"}));
    // p2 is away while the mirror grows.
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["lvs/p0", "lvs/p1"], "allow_degraded": true}),
    );
    for n in ["p0", "p1"] {
        p.ok(
            "bdev_lvol_resize",
            json!({"name": format!("lvs/{n}"), "size_in_mib": 66}),
        );
    }
    p.ok(
        "bdev_mirror_resize",
        json!({"name": "m", "size_in_mib": 65}),
    );
    p.ok("bdev_mirror_delete", json!({"name": "m"}));

    // Offered again, still small: the mirror assembles without it and says why.
    p.ok("bdev_mirror_create", json!({"name": "m", "plexes": all}));
    let m = &p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0];
    assert_eq!(m["num_blocks"], 65 * MIB / 512, "{m:#}");
    assert!(
        m["assembly_notes"].to_string().contains("missed a growth"),
        "{m:#}"
    );
    assert_eq!(m["plexes"][2]["state"], "Down", "{m:#}");
    assert_eq!(m["actual_plexes"], 2, "{m:#}");

    // Grown, it is taken back as stale and resynced.
    p.ok("bdev_mirror_delete", json!({"name": "m"}));
    p.ok(
        "bdev_lvol_resize",
        json!({"name": "lvs/p2", "size_in_mib": 66}),
    );
    p.ok("bdev_mirror_create", json!({"name": "m", "plexes": all}));
    wait_for(&p, || {
        let m = &p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0];
        m["plexes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["state"] == "Up" && x["condition"] == "InUse")
    });
}
