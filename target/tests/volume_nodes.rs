//! Volumes across three real plexd processes on loopback, driven through the
//! `plexstor-volume` library as `plexctl volume` drives it: create, write through the
//! volume's NVMe/TCP export, lose or move the owner, read everything back through the new
//! owner, delete.

mod bdev_nvme_common;
mod mirror_common;

use bdev_nvme_common::*;
use plexstor_volume::{Cluster, CreateOpts, Error};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Nodes {
    procs: Vec<Plexd>,
    ports: Vec<u16>,
    file: PathBuf,
}

impl Nodes {
    fn start(dir: &Path, backend: &str) -> Nodes {
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        let mut entries = Vec::new();
        for i in 1..=3 {
            let name = format!("n{i}");
            let p = Plexd::start(dir, &name, &["-m", "0x1"]);
            let port = free_port();
            entries.push(json!({
                "name": name, "rpc_socket": p.sock, "storage_addr": "127.0.0.1",
                "port": port, "data_dir": dir.join(format!("{name}-data")),
            }));
            procs.push(p);
            ports.push(port);
        }
        let file = dir.join("nodes.json");
        let text = json!({"backend": backend, "nodes": entries});
        std::fs::write(&file, serde_json::to_string_pretty(&text).unwrap()).unwrap();
        Nodes { procs, ports, file }
    }

    fn cluster(&self) -> Cluster {
        let mut c = Cluster::open(&self.file).unwrap();
        c.timeout = Duration::from_secs(30);
        c.progress = Box::new(|m| eprintln!("volume: {m}"));
        c
    }

    fn node(&self, i: usize) -> &Plexd {
        &self.procs[i - 1]
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .enumerate()
            .map(|(i, p)| format!("--- n{} ---\n{}", i + 1, p.log_text()))
            .collect()
    }
}

fn create(c: &mut Cluster, name: &str, size: u64, nodes: &[&str]) -> Result<(), Error> {
    c.create(&CreateOpts {
        name: name.into(),
        size,
        mirror_count: nodes.len(),
        nodes: Some(nodes.iter().map(|n| n.to_string()).collect()),
        region_size: None,
    })
    .map(|_| ())
}

fn subsystem(p: &Plexd, nqn: &str) -> Option<Value> {
    p.call("nvmf_get_subsystems", json!({"nqn": nqn}))
        .ok()
        .map(|v| v[0].clone())
}

fn hosts(s: &Value) -> Vec<String> {
    s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["nqn"].as_str().unwrap().to_string())
        .collect()
}

fn names_on(p: &Plexd, vol: &str) -> Vec<String> {
    let mut v: Vec<String> = p
        .ok("bdev_get_bdevs", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with(vol))
        .collect();
    v.extend(
        p.ok("nvmf_get_subsystems", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["nqn"].as_str().unwrap().to_string())
            .filter(|n| n.contains(&format!("vol-{vol}"))),
    );
    v
}

/// Writes 64 KiB patterns spread over the volume; returns what each acknowledged write put.
fn write_spread(host: &mut Driver, seed: u64, blocks: u64, n: u64) -> Vec<(u64, Vec<u8>)> {
    let bs = host.block_size;
    let len = 64 << 10;
    (0..n)
        .map(|k| {
            let lba = (blocks - (len / bs) as u64) * k / n;
            let data = pattern(seed + k, lba, len, bs);
            host.write(lba, data.clone())
                .unwrap_or_else(|e| panic!("write at LBA {lba}: {e}"));
            (lba, data)
        })
        .collect()
}

fn read_back(host: &mut Driver, written: &[(u64, Vec<u8>)]) {
    for (lba, data) in written {
        let got = host
            .read(*lba, data.len())
            .unwrap_or_else(|e| panic!("read at LBA {lba}: {e}"));
        assert!(
            got == *data,
            "LBA {lba} does not read back what was written"
        );
    }
}

#[test]
fn a_volume_outlives_its_owner_killed_and_is_read_back_through_the_new_owner() {
    let dir = temp_dir();
    let mut nodes = Nodes::start(dir.path(), "uring");
    let mut c = nodes.cluster();
    let nqn = plexstor_volume::volume_nqn("vol1");

    // Bad requests change nothing and say why.
    let e = create(&mut c, "vol1", 32 * MIB, &["n1", "n1"]).unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
    let e = create(&mut c, "vol1", 32 * MIB, &["n1", "n9"]).unwrap_err();
    assert!(e.to_string().contains("no node \"n9\""), "{e}");
    let e = create(&mut c, "vol 1", 32 * MIB, &["n1"]).unwrap_err();
    assert!(e.to_string().contains("must be 1-48"), "{e}");

    create(&mut c, "vol1", 32 * MIB, &["n1", "n2"])
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let e = create(&mut c, "vol1", 32 * MIB, &["n2", "n3"]).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");

    // n2's plex is exported to n1's host alone; n1 runs the mirror over both.
    let p1 = subsystem(nodes.node(2), &plexstor_volume::plex_nqn("vol1", 1)).expect("plex export");
    assert_eq!(p1["allow_any_host"], false, "{p1:#}");
    assert_eq!(hosts(&p1), ["nqn.2024-01.io.plexstor:node:n1"]);
    let m = nodes
        .node(1)
        .ok("bdev_mirror_get_mirrors", json!({"name": "vol1"}))[0]
        .clone();
    assert_eq!(m["state"], "online", "{m:#}");
    let blocks = m["num_blocks"].as_u64().unwrap();
    assert!(blocks * 512 >= 32 * MIB, "{m:#}");
    let generation_at_create = m["generation"].as_u64().unwrap();

    // The new owner must hold a plex.
    let e = c.attach("vol1", "n3").unwrap_err();
    assert!(e.to_string().contains("holds no plex"), "{e}");

    let mut host = Driver::connect(nodes.ports[0], &nqn);
    let written = write_spread(&mut host, 7, blocks, 24);
    drop(host);

    // The owner dies without a word; the volume moves to n2, which holds the other plex.
    nodes.procs[0].kill();
    // Had the mirror been seen at a later generation than n2's plex holds, that plex is
    // stale and the move is refused; a failed move can simply be run again.
    let state_file = dir.path().join("nodes.state.json");
    let good = std::fs::read_to_string(&state_file).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["volumes"]["vol1"]["generation"] = json!(generation_at_create + 5);
    std::fs::write(&state_file, v.to_string()).unwrap();
    let e = c.attach("vol1", "n2").unwrap_err();
    assert!(e.to_string().contains("stale"), "{e}");
    std::fs::write(&state_file, good).unwrap();
    let report = c
        .attach("vol1", "n2")
        .unwrap_or_else(|e| panic!("attach: {e}\n{}", nodes.logs()));
    assert!(
        report.warnings.iter().any(|w| w.contains("old owner")),
        "the dead owner is reported: {:?}",
        report.warnings
    );

    let mut host = Driver::connect(nodes.ports[1], &nqn);
    read_back(&mut host, &written);
    // Still writable on one plex.
    let more = write_spread(&mut host, 99, blocks, 4);
    read_back(&mut host, &more);
    drop(host);

    let d = c.describe("vol1").unwrap();
    assert_eq!(d.record.owner, "n2");
    assert!(d.record.generation > generation_at_create, "{:?}", d.record);
    let plexes = d.mirror["plexes"].as_array().unwrap();
    let by_node = |n: &str| plexes.iter().find(|p| p["node"] == n).unwrap().clone();
    assert_eq!(by_node("n1")["state"], "Down", "{:#}", d.mirror);
    assert_eq!(by_node("n1")["name"], "vol1.p0", "{:#}", d.mirror);
    // Known on n2 by the bdev its controller will make once n1 is back, so that attaching
    // that controller on n2 gives the plex back to the mirror (the examine step).
    assert_eq!(by_node("n1")["bdev"], "vol1.p0n1", "{:#}", d.mirror);
    assert_eq!(by_node("n2")["state"], "Up", "{:#}", d.mirror);
    assert_eq!(by_node("n2")["condition"], "InUse", "{:#}", d.mirror);
    let text = plexstor_volume::table::describe(&d.mirror).unwrap();
    let p0_line = text.lines().find(|l| l.contains("vol1.p0")).unwrap();
    assert!(
        p0_line.contains(" n1 ") && p0_line.contains(" Down "),
        "{text}"
    );
    assert!(
        text.ends_with("Scheduled Plexes / Actual Plexes: 2/1\n"),
        "{text}"
    );

    // The same through plexctl.
    let plexctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_plexctl"))
            .arg("volume")
            .arg("-f")
            .arg(&nodes.file)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = plexctl(&["describe", "vol1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("Plexes:\n  NAME "), "{out}");
    assert!(out.contains(" Down "), "{out}");
    // Nothing resyncs (n1's plex is gone): --watch says so and stops after one table.
    let (ok, out, err) = plexctl(&["describe", "vol1", "--watch"]);
    assert!(
        ok && err.contains("no resync running: stopped watching"),
        "{err}"
    );
    assert_eq!(out.matches("Plexes:\n").count(), 1, "{out}");
    let (ok, out, err) = plexctl(&["describe", "vol1", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["volume"]["owner"], "n2", "{v:#}");
    assert_eq!(v["mirror"]["plexes"][0]["state"], "Down", "{v:#}");
    let (ok, out, err) = plexctl(&["list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("vol1") && l.contains("n1,n2")),
        "{out}"
    );
    let (ok, _, err) = plexctl(&["create", "x", "--size", "10Q"]);
    assert!(!ok && err.contains("unknown unit"), "{err}");
    let (ok, _, err) = plexctl(&["attach", "nosuch", "--node", "n2"]);
    assert!(!ok && err.contains("no volume nosuch"), "{err}");

    let rows = c.list().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].owner.as_str(), rows[0].state.as_str()),
        ("n2", "degraded")
    );

    // n1 cannot be reached: delete cleans n2, keeps the record, and --force forgets it.
    let e = c.delete("vol1", false).unwrap_err();
    assert!(e.to_string().contains("n1"), "{e}");
    assert_eq!(names_on(nodes.node(2), "vol1"), Vec::<String>::new());
    assert!(!dir.path().join("n2-data/vol1.p1.img").exists());
    c.delete("vol1", true).unwrap();
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn a_planned_move_fences_the_old_owner_and_delete_leaves_nothing() {
    let dir = temp_dir();
    let nodes = Nodes::start(dir.path(), "malloc");
    let mut c = nodes.cluster();
    let nqn = plexstor_volume::volume_nqn("v3");
    // Three plexes, on the least-used nodes (all of them).
    c.create(&CreateOpts {
        name: "v3".into(),
        size: 16 * MIB,
        mirror_count: 3,
        nodes: None,
        region_size: Some(256 << 10),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let d = c.describe("v3").unwrap();
    assert_eq!(d.record.owner, "n1");
    let blocks = d.mirror["num_blocks"].as_u64().unwrap();
    assert_eq!(d.mirror["region_size"], 256 << 10);
    let mut host = Driver::connect(nodes.ports[0], &nqn);
    let written = write_spread(&mut host, 3, blocks, 8);
    drop(host);

    c.attach("v3", "n3")
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    // The old owner let go of everything and its plex went to n3; n2's plex admits n3 and
    // no longer n1.
    assert!(subsystem(nodes.node(1), &nqn).is_none());
    assert!(nodes
        .node(1)
        .call("bdev_mirror_get_mirrors", json!({"name": "v3"}))
        .is_err());
    for (i, node) in [(0, 1), (1, 2)] {
        let s = subsystem(nodes.node(node), &plexstor_volume::plex_nqn("v3", i)).unwrap();
        assert_eq!(hosts(&s), ["nqn.2024-01.io.plexstor:node:n3"], "{s:#}");
    }
    // n3's own plex is no longer exported: the mirror there holds it.
    assert!(subsystem(nodes.node(3), &plexstor_volume::plex_nqn("v3", 2)).is_none());

    let mut host = Driver::connect(nodes.ports[2], &nqn);
    read_back(&mut host, &written);
    drop(host);
    let d = c.describe("v3").unwrap();
    assert_eq!(
        d.mirror["actual_plexes"],
        3,
        "{:#}\n{}",
        d.mirror,
        nodes.logs()
    );

    c.delete("v3", false).unwrap();
    for i in 1..=3 {
        assert_eq!(names_on(nodes.node(i), "v3"), Vec::<String>::new(), "n{i}");
        let ctrls = nodes.node(i).ok("bdev_nvme_get_controllers", Value::Null);
        assert_eq!(ctrls, json!([]), "n{i}");
    }
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn the_dead_owner_returns_and_its_plex_rejoins_with_only_what_it_missed() {
    let dir = temp_dir();
    let mut nodes = Nodes::start(dir.path(), "uring");
    let mut c = nodes.cluster();
    let nqn = plexstor_volume::volume_nqn("vol1");
    create(&mut c, "vol1", 32 * MIB, &["n1", "n2"])
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let d = c.describe("vol1").unwrap();
    let blocks = d.mirror["num_blocks"].as_u64().unwrap();
    let regions = d.mirror["regions"].as_u64().unwrap();
    let region = d.mirror["region_size"].as_u64().unwrap();
    nodes.node(1).ok(
        "bdev_mirror_set_options",
        json!({"name": "vol1", "bitmap_clear_interval_ms": 200}),
    );
    let mut host = Driver::connect(nodes.ports[0], &nqn);
    let mut written = write_spread(&mut host, 11, blocks, 16);
    drop(host);
    // Both plexes hold all of it and the bitmap has emptied, on disk too (n2 assembles from
    // what its plex's bitmap says): what follows counts only what n1 misses.
    let t0 = std::time::Instant::now();
    while {
        let m = c.describe("vol1").unwrap().mirror;
        m["dirty_regions"] != 0 || m["bitmap_writes_pending"] != 0
    } {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", nodes.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The owner dies; n2 takes the volume over and is written to while n1 is away.
    nodes.procs[0].kill();
    c.attach("vol1", "n2")
        .unwrap_or_else(|e| panic!("attach: {e}\n{}", nodes.logs()));
    let mut host = Driver::connect(nodes.ports[1], &nqn);
    let missed = write_spread(&mut host, 77, blocks, 4);
    drop(host);
    let mut touched: Vec<u64> = missed
        .iter()
        .flat_map(|(lba, data)| {
            let (first, end) = (lba * 512, lba * 512 + data.len() as u64);
            first / region..end.div_ceil(region)
        })
        .collect();
    touched.dedup();

    // While n1 is down, rejoin says so and changes nothing.
    let r = c.rejoin("vol1").unwrap();
    assert!(
        r.warnings.iter().any(|w| w.contains("vol1.p0 stays out")),
        "{:?}",
        r.warnings
    );

    // n1 comes back knowing nothing but its plex file; plexctl brings its plex back.
    nodes.procs[0] = Plexd::start(dir.path(), "n1", &["-m", "0x1"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plexctl"))
        .args(["volume", "-f"])
        .arg(&nodes.file)
        .args(["rejoin", "vol1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", nodes.logs());
    assert!(err.contains("n1: plex vol1.p0 opened again"), "{err}");
    assert!(err.contains("plex vol1.p0 is back"), "{err}");

    let t0 = std::time::Instant::now();
    let m = loop {
        let m = c.describe("vol1").unwrap().mirror;
        if m["state"] == "online" {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never online again: {m:#}\n{}",
            nodes.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let p0 = &m["plexes"][0];
    let last = &p0["last_resync"];
    assert_eq!(last["full"], false, "{m:#}");
    // Only the regions written while n1 was away were copied.
    let n = touched.len() as u64;
    assert_eq!(last["regions"], n, "{touched:?} {m:#}");
    assert_eq!(last["bytes_copied"], n * region, "{m:#}");
    assert!(n < regions / 4, "{m:#}");

    // A second rejoin finds nothing to do.
    let r = c.rejoin("vol1").unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Every acknowledged write reads back, and the plexes match block by block.
    let mut host = Driver::connect(nodes.ports[1], &nqn);
    // (Earlier writes that the later ones overwrote are left out.)
    let overlaps = |(a, x): &(u64, Vec<u8>), (b, y): &(u64, Vec<u8>)| {
        a * 512 < b * 512 + y.len() as u64 && b * 512 < a * 512 + x.len() as u64
    };
    written.retain(|w| !missed.iter().any(|m| overlaps(w, m)));
    written.extend(missed);
    read_back(&mut host, &written);
    drop(host);
    let files = [
        dir.path().join("n1-data/vol1.p0.img"),
        dir.path().join("n2-data/vol1.p1.img"),
    ];
    mirror_common::assert_plexes_match(&[&files[0], &files[1]], &m);
    c.delete("vol1", false).unwrap();
}

#[test]
fn plexes_on_lvols_take_clusters_as_written_and_give_them_back_on_delete() {
    let dir = temp_dir();
    let nodes = Nodes::start(dir.path(), "lvol");
    // Each node's disk: a file, a volume store on it with 1 MiB clusters.
    for i in 1..=3 {
        let disk = dir.path().join(format!("n{i}-disk.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(128 * MIB)
            .unwrap();
        let p = nodes.node(i);
        p.ok(
            "bdev_uring_create",
            json!({"name": "disk", "filename": disk, "block_size": 512}),
        );
        p.ok(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "disk", "lvs_name": "lvs", "cluster_sz": MIB}),
        );
    }
    let store = |i: usize| nodes.node(i).ok("bdev_lvol_get_lvstores", json!({}))[0].clone();
    let lvol_on = |i: usize, lvol: &str| -> Value {
        let all = nodes.node(i).ok("bdev_lvol_get_lvols", json!({}));
        let l = all.as_array().unwrap().iter().find(|l| l["name"] == lvol);
        l.unwrap_or_else(|| panic!("no lvol {lvol} on n{i}: {all:#}"))
            .clone()
    };
    let allocated = |i: usize, lvol: &str| -> u64 {
        let l = lvol_on(i, lvol);
        assert_eq!(l["is_thin_provisioned"], true, "{l:#}");
        l["num_allocated_clusters"].as_u64().unwrap()
    };
    let mut c = nodes.cluster();
    create(&mut c, "lv1", 32 * MIB, &["n1", "n2"])
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let d = c.describe("lv1").unwrap();
    assert_eq!(d.record.plexes[0].bdev, "lvs/lv1.p0");
    assert_eq!(d.mirror["actual_plexes"], 2, "{:#}", d.mirror);
    let blocks = d.mirror["num_blocks"].as_u64().unwrap();
    // Thin: only the mirror's own metadata has clusters yet.
    let before = (allocated(1, "lv1.p0"), allocated(2, "lv1.p1"));
    assert!(before.0 < 8 && before.1 < 8, "{before:?}");

    let nqn = plexstor_volume::volume_nqn("lv1");
    let mut host = Driver::connect(nodes.ports[0], &nqn);
    let written = write_spread(&mut host, 7, blocks, 16);
    read_back(&mut host, &written);
    drop(host);
    // Every write reached both plexes: the same clusters were taken on each node.
    let after = (allocated(1, "lv1.p0"), allocated(2, "lv1.p1"));
    assert!(after.0 >= before.0 + 8, "{before:?} -> {after:?}");
    assert_eq!(after.0, after.1, "both plexes hold the same clusters");

    // The mirror moves to n2, whose own plex is an lvol it opens by its alias.
    c.attach("lv1", "n2")
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let mut host = Driver::connect(nodes.ports[1], &nqn);
    read_back(&mut host, &written);

    // Grown while the host stays connected: both lvols (n1's reaches the owner with its
    // namespace-changed event), then the mirror, whose namespace tells the host.
    let e = c.resize("lv1", 16 * MIB).unwrap_err();
    assert!(e.to_string().contains("only grow"), "{e}");
    c.resize("lv1", 48 * MIB)
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    let d = c.describe("lv1").unwrap();
    let grown = d.mirror["num_blocks"].as_u64().unwrap();
    assert_eq!(grown * 512, 48 * MIB, "{:#}", d.mirror);
    assert_eq!(d.record.size, 48 * MIB);
    let t0 = std::time::Instant::now();
    while host.ctrlr.namespace(1).unwrap().blocks != grown {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the host never saw the new size"
        );
        host.ctrlr.poll();
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = vec![(grown - 8, pattern(9, grown - 8, 4096, 512))];
    host.write(tail[0].0, tail[0].1.clone()).unwrap();
    read_back(&mut host, &written);
    read_back(&mut host, &tail);
    for (i, lvol) in [(1, "lv1.p0"), (2, "lv1.p1")] {
        let l = lvol_on(i, lvol);
        assert!(
            l["num_clusters"].as_u64().unwrap() * MIB >= 49 * MIB,
            "n{i}: {l:#}"
        );
    }

    // A snapshot while the host stays connected, then writes over what it holds.
    let s = c
        .snapshot("lv1", "s1")
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    assert_eq!(s.plexes.len(), 2, "both plexes were in sync: {s:?}");
    let over: Vec<(u64, Vec<u8>)> = written
        .iter()
        .take(4)
        .map(|(lba, d)| (*lba, pattern(11, *lba, d.len(), 512)))
        .collect();
    for (lba, d) in &over {
        host.write(*lba, d.clone()).unwrap();
    }
    drop(host);
    // Its clone is a new mirrored volume holding the snapshot's data, in sync at once.
    let cl = c
        .clone_volume("lv1", "s1", "lv2")
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
    assert_eq!(cl.owner, "n2", "the source's owner holds a snapshot plex");
    let d2 = c.describe("lv2").unwrap();
    assert_eq!(d2.mirror["num_blocks"], grown, "{:#}", d2.mirror);
    assert_eq!(d2.mirror["state"], "online", "{:#}", d2.mirror);
    assert_ne!(d2.mirror["uuid"], d.mirror["uuid"], "a mirror of its own");
    for p in d2.mirror["plexes"].as_array().unwrap() {
        assert_eq!(p["condition"], "InUse", "no resync for a copy: {p:#}");
    }
    let mut h2 = Driver::connect(nodes.ports[1], &plexstor_volume::volume_nqn("lv2"));
    read_back(&mut h2, &written);
    read_back(&mut h2, &tail);
    // Writes to the clone leave the source alone, and the other way round.
    h2.write(0, pattern(12, 0, 4096, 512)).unwrap();
    drop(h2);
    let mut host = Driver::connect(nodes.ports[1], &nqn);
    read_back(&mut host, &over);
    read_back(&mut host, &written[4..]);
    drop(host);
    let e = c.delete("lv1", false).unwrap_err();
    assert!(e.to_string().contains("lv2 is a clone"), "{e}");
    c.delete("lv2", false).unwrap();

    c.delete("lv1", false).unwrap();
    for i in 1..=2 {
        let lvols = nodes.node(i).ok("bdev_lvol_get_lvols", json!({}));
        assert_eq!(lvols, json!([]), "n{i}");
        let s = store(i);
        assert_eq!(s["free_clusters"], s["total_data_clusters"], "n{i}: {s:#}");
    }
}
