//! The mirror's life on one real plexd, over file plexes: adding, removing, deleting and
//! reassembling; refusing plexes it must not use; surviving its owner's kill -9 (unclean
//! shutdown, and a resync cut short). Every test ends comparing the plexes' files block by block.

mod bdev_nvme_common;
mod mirror_common;

use bdev_nvme_common::*;
use mirror_common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NQN_M: &str = "nqn.2024-01.io.plexstor:mirror-ops";
const PLEX_BYTES: u64 = 64 << 20;
const REGION: u64 = 1 << 20;
const HEADER_SLOTS_BYTES: usize = 8192;

struct Node {
    dir: tempfile::TempDir,
    files: Vec<PathBuf>,
}

impl Node {
    fn new(plexes: usize) -> Node {
        let dir = temp_dir();
        let files = (0..plexes)
            .map(|i| {
                let p = dir.path().join(format!("u{i}.img"));
                std::fs::File::create(&p)
                    .unwrap()
                    .set_len(PLEX_BYTES)
                    .unwrap();
                p
            })
            .collect();
        Node { dir, files }
    }

    /// plexd with one uring bdev `u<i>` per file.
    fn start(&self, tag: &str) -> Plexd {
        let p = Plexd::start(self.dir.path(), tag, &["-m", "0x3"]);
        for (i, f) in self.files.iter().enumerate() {
            p.ok(
                "bdev_uring_create",
                json!({"name": format!("u{i}"), "filename": f.to_str().unwrap(), "block_size": 512}),
            );
        }
        p
    }

    fn file(&self, i: usize) -> &Path {
        &self.files[i]
    }
}

/// Exports the mirror and writes 64 KiB into each region of `regions`; returns what went where.
fn write_regions(p: &Plexd, port: u16, seed: u64, regions: &[u64]) -> Vec<(u64, Vec<u8>)> {
    let mut host = Driver::connect(port, NQN_M);
    let bs = host.block_size as u64;
    regions
        .iter()
        .map(|&r| {
            let lba = r * REGION / bs + 16;
            let data = pattern(seed + r, lba, 64 << 10, bs as usize);
            host.write(lba, data.clone())
                .unwrap_or_else(|e| panic!("write to region {r}: {e}\n{}", p.log_text()));
            (lba, data)
        })
        .collect()
}

fn read_back(port: u16, written: &[(u64, Vec<u8>)]) {
    let mut host = Driver::connect(port, NQN_M);
    for (lba, data) in written {
        assert!(
            host.read(*lba, data.len()).unwrap() == *data,
            "LBA {lba} reads back"
        );
    }
}

fn export(p: &Plexd) -> u16 {
    let port = free_port();
    p.export(NQN_M, "m", port, json!({"trtype": "TCP"}));
    port
}

#[test]
fn plexes_are_added_removed_and_the_mirror_reassembled_from_its_superblocks() {
    let node = Node::new(3);
    let p = node.start("p");
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["u0", "u1"], "region_size": REGION}),
    );
    let port = export(&p);
    let written = write_regions(&p, port, 1, &[0, 7, 40]);

    // A third plex gets everything.
    p.ok(
        "bdev_mirror_add_plex",
        json!({"name": "m", "bdev": "u2", "node": "n3"}),
    );
    let m = wait_mirror(&p, "in sync on 3 plexes", Duration::from_secs(60), |m| {
        m["plexes"].as_array().unwrap().len() == 3 && all_in_use(m)
    });
    let last = &m["plexes"][2]["last_resync"];
    assert_eq!(last["full"], true, "{m:#}");
    assert_eq!(last["regions"], m["regions"], "{m:#}");
    assert_eq!(
        (m["scheduled_plexes"].clone(), m["actual_plexes"].clone()),
        (json!(3), json!(3))
    );
    let g_added = m["generation"].as_u64().unwrap();
    read_back(port, &written);
    assert_plexes_match(&[node.file(0), node.file(1), node.file(2)], &m);

    p.ok(
        "bdev_mirror_set_options",
        json!({"name": "m", "resync_rate_mb_per_sec": 3}),
    );
    assert_eq!(mirror(&p)["resync_rate_bytes_per_sec"], 3 << 20);
    let e = p
        .call(
            "bdev_mirror_set_options",
            json!({"name": "m", "region_size": 65536}),
        )
        .unwrap_err();
    assert!(e.1.contains("fixed at creation"), "{e:?}");

    // Removing a plex erases its superblock and lets its bdev go.
    p.ok(
        "bdev_mirror_remove_plex",
        json!({"name": "m", "plex": "u1"}),
    );
    let m = mirror(&p);
    assert_eq!(m["plexes"].as_array().unwrap().len(), 2, "{m:#}");
    assert!(m["generation"].as_u64().unwrap() > g_added);
    let head = std::fs::read(node.file(1)).unwrap();
    assert!(
        head[..HEADER_SLOTS_BYTES].iter().all(|&b| b == 0),
        "u1's superblock is erased"
    );
    p.ok("bdev_uring_delete", json!({"name": "u1"}));

    // Deleted cleanly and built again from the same plexes: assembled, nothing to copy.
    let e = p
        .call("bdev_mirror_delete", json!({"name": "m"}))
        .unwrap_err();
    assert!(e.1.contains("in use"), "exported, so not deleted: {e:?}");
    p.ok("nvmf_subsystem_remove_ns", json!({"nqn": NQN_M, "nsid": 1}));
    p.ok("bdev_mirror_delete", json!({"name": "m"}));
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["u0", "u2"]}),
    );
    let m = mirror(&p);
    assert!(all_in_use(&m), "a clean mirror needs no resync: {m:#}");
    assert!(m["generation"].as_u64().unwrap() > g_added, "{m:#}");
    p.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN_M, "namespace": {"bdev_name": "m"}}),
    );
    read_back(port, &written);
    assert_plexes_match(&[node.file(0), node.file(2)], &m);
}

#[test]
fn assembly_refuses_damaged_foreign_and_stale_plexes_and_touches_nothing() {
    let node = Node::new(3);
    let p = node.start("p");
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["u0", "u1"]}),
    );
    let gen = mirror(&p)["generation"].as_u64().unwrap();
    p.ok("bdev_mirror_delete", json!({"name": "m"}));
    p.ok(
        "bdev_mirror_create",
        json!({"name": "other", "plexes": ["u2"]}),
    );
    p.ok("bdev_mirror_delete", json!({"name": "other"}));
    let u0_before = std::fs::read(node.file(0)).unwrap();

    let e = p
        .call(
            "bdev_mirror_create",
            json!({"name": "m", "plexes": ["u0", "u2"]}),
        )
        .unwrap_err();
    assert!(e.1.contains("belongs to mirror \"other\""), "{e:?}");

    // Damage both header slots of u1 (one byte each, past the magic).
    let mut f = std::fs::read(node.file(1)).unwrap();
    f[100] ^= 0xff;
    f[4096 + 100] ^= 0xff;
    std::fs::write(node.file(1), &f).unwrap();
    let e = p
        .call(
            "bdev_mirror_create",
            json!({"name": "m", "plexes": ["u0", "u1"]}),
        )
        .unwrap_err();
    assert!(e.1.contains("superblock unusable"), "{e:?}");

    // A control plane that saw a newer generation: what is offered is stale.
    let e = p
        .call(
            "bdev_mirror_create",
            json!({"name": "m", "plexes": ["u0"], "min_generation": gen + 5}),
        )
        .unwrap_err();
    assert!(e.1.contains("stale"), "{e:?}");

    assert!(
        std::fs::read(node.file(0)).unwrap() == u0_before,
        "a refused assembly wrote nothing"
    );
    // Every plex is free again after each refusal.
    for u in ["u0", "u1", "u2"] {
        let b = &p.ok("bdev_get_bdevs", json!({"name": u}))[0];
        assert_eq!(b["claimed"], false, "{u}: {b:#}");
    }
    // The undamaged plex alone: not unasked (its partner was in sync, and might have gone on
    // without it), but when the caller says the others are fenced: degraded, the other
    // plex listed as down.
    let e = p
        .call("bdev_mirror_create", json!({"name": "m", "plexes": ["u0"]}))
        .unwrap_err();
    assert!(
        e.1.contains("missing") && e.1.contains("allow_degraded"),
        "{e:?}"
    );
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["u0"], "allow_degraded": true}),
    );
    let m = mirror(&p);
    assert_eq!(m["state"], "degraded", "{m:#}");
    assert_eq!(
        (
            m["plexes"][0]["condition"].clone(),
            m["plexes"][1]["state"].clone()
        ),
        (json!("InUse"), json!("Down")),
        "{m:#}"
    );
    assert_eq!(
        (m["scheduled_plexes"].clone(), m["actual_plexes"].clone()),
        (json!(2), json!(1)),
        "{m:#}"
    );
}

#[test]
fn an_owner_killed_mid_resync_resumes_and_an_unclean_stop_resyncs_marked_regions() {
    let node = Node::new(3);
    let cfg = node.dir.path().join("config.json");
    let mut p = node.start("p1");
    p.ok(
        "bdev_mirror_create",
        json!({"name": "m", "plexes": ["u0", "u1"]}),
    );
    // Nothing is cleared from the bitmap before the kill.
    p.ok(
        "bdev_mirror_set_options",
        json!({"name": "m", "bitmap_clear_interval_ms": 3_600_000}),
    );
    let port = export(&p);
    let mut written = write_regions(&p, port, 1, &[2, 3, 50]);
    assert_eq!(mirror(&p)["dirty_regions"], 3);
    std::fs::write(&cfg, p.ok("save_config", json!({})).to_string()).unwrap();
    p.kill();

    // Unclean: the regions marked at the kill are copied from one plex to the other.
    let p = Plexd::start(
        node.dir.path(),
        "p2",
        &["-m", "0x3", "-c", cfg.to_str().unwrap()],
    );
    let m = wait_mirror(
        &p,
        "in sync after the unclean stop",
        Duration::from_secs(60),
        all_in_use,
    );
    let last = &m["plexes"][1]["last_resync"];
    assert_eq!(last["full"], false, "{m:#}");
    assert_eq!(last["regions"], 3, "{m:#}");
    assert!(m["assembly_notes"].to_string().contains("unclean"), "{m:#}");
    read_back(port, &written);
    assert_plexes_match(&[node.file(0), node.file(1)], &m);

    // A third plex, copied slowly; plexd is killed once its progress is on disk.
    p.ok(
        "bdev_mirror_set_options",
        json!({"name": "m", "resync_rate_mb_per_sec": 2}),
    );
    p.ok("bdev_mirror_add_plex", json!({"name": "m", "bdev": "u2"}));
    let m = wait_mirror(
        &p,
        "past region 8 of the copy",
        Duration::from_secs(30),
        |m| {
            m["plexes"][2]["resync"]["regions_done"]
                .as_u64()
                .unwrap_or(0)
                >= 8
        },
    );
    let total = m["plexes"][2]["resync"]["regions_total"].as_u64().unwrap();
    written.extend(write_regions(&p, port, 200, &[1, 60]));
    std::fs::write(&cfg, p.ok("save_config", json!({})).to_string()).unwrap();
    drop(p);

    let p = Plexd::start(
        node.dir.path(),
        "p3",
        &["-m", "0x3", "-c", cfg.to_str().unwrap()],
    );
    let m = wait_mirror(
        &p,
        "in sync on 3 plexes",
        Duration::from_secs(60),
        all_in_use,
    );
    let last = &m["plexes"][2]["last_resync"];
    let resumed = last["regions"].as_u64().unwrap();
    assert!(
        resumed < total,
        "resumed where it stood, not from zero: {resumed} of {total}: {m:#}"
    );
    read_back(port, &written);
    assert_plexes_match(&[node.file(0), node.file(1), node.file(2)], &m);
}
