//! What the mirror tests share: reading a mirror's state, waiting for it, and comparing its
//! plexes' files block by block.
#![allow(dead_code)]

use crate::bdev_nvme_common::Plexd;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Mirror `m` as `bdev_mirror_get_mirrors` shows it.
pub fn mirror(p: &Plexd) -> Value {
    p.ok("bdev_mirror_get_mirrors", json!({"name": "m"}))[0].clone()
}

/// Polls mirror `m` until `cond` holds; panics with its state and plexd's log after `within`.
pub fn wait_mirror(
    p: &Plexd,
    what: &str,
    within: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        let m = mirror(p);
        if cond(&m) {
            return m;
        }
        assert!(
            t0.elapsed() < within,
            "mirror never {what} in {within:?}: {m:#}\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn all_in_use(m: &Value) -> bool {
    m["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["condition"] == "InUse")
}

/// The data areas of the plex files (512-byte blocks; data is the last `num_blocks` of each
/// file, as the mirror `m` reports it) are the same, block by block.
pub fn assert_plexes_match(files: &[&Path], m: &Value) {
    let blocks = m["num_blocks"].as_u64().unwrap() as usize;
    let read = |p: &Path| {
        let all = std::fs::read(p).unwrap();
        let off = all.len() - blocks * 512;
        all[off..].to_vec()
    };
    let first = read(files[0]);
    for f in &files[1..] {
        let other = read(f);
        if let Some(b) =
            (0..blocks).find(|&b| first[b * 512..(b + 1) * 512] != other[b * 512..(b + 1) * 512])
        {
            panic!(
                "{} and {} differ at mirror block {b}",
                files[0].display(),
                f.display()
            );
        }
    }
}
