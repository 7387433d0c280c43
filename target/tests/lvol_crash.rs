//! Crash consistency of a volume store, the hard way: plexd is killed with `kill -9` at a
//! random moment while a host writes to an lvol and snapshots, clones, resizes, deletes,
//! inflates and decouples run, then restarted, again and again. After each restart:
//! - the store loads, and its checker (the one `plexctl lvstore check` runs) finds nothing;
//! - every acknowledged write reads back with its data (a write in flight at the kill may
//!   read as its new data or as what was acknowledged before it, nothing else);
//! - every object whose creation was acknowledged is there, every one whose deletion was
//!   acknowledged is gone, and one cut off mid-way is one or the other.
//!
//! `PLEXSTOR_LVOL_CRASH_ROUNDS` sets the number of kills (default 40; the closing notes cite
//! runs of several hundred).

mod bdev_nvme_common;

use bdev_nvme_common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
const DATA_MIB: u64 = 16;
const BLOCK: usize = 4096;

/// A small xorshift: the test needs varied choices, not a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a 4 KiB unit may hold: the generation acknowledged last, and one whose write was in
/// flight (or failed) when plexd died.
#[derive(Default, Clone, Copy)]
struct Unit {
    acked: Option<u64>,
    maybe: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Exp {
    Present,
    Absent,
    Unknown,
}

fn data(gen: u64, unit: u64) -> Vec<u8> {
    pattern(gen, unit * (BLOCK as u64 / 512), BLOCK, 512)
}

fn start(dir: &Path, file: &Path, round: usize) -> Plexd {
    let p = Plexd::start(dir, &format!("r{round}"), &["-m", "0x1"]);
    p.ok(
        "bdev_uring_create",
        json!({"name": "base", "filename": file.to_str().unwrap(), "block_size": 512}),
    );
    p
}

fn names(p: &Plexd) -> Vec<String> {
    p.ok("bdev_lvol_get_lvols", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

fn export(p: &Plexd, round: usize) -> Driver {
    let nqn = format!("nqn.2024-01.io.plexstor:crash-{round}");
    let port = free_port();
    p.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    p.ok(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true, "serial_number": "SN1"}),
    );
    p.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "lvs/data"}}),
    );
    p.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    Driver::connect(port, &nqn)
}

#[test]
fn kill_9_at_random_points_never_loses_an_acknowledged_write_or_half_makes_an_object() {
    let rounds: usize = std::env::var("PLEXSTOR_LVOL_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let dir = temp_dir();
    let file = dir.path().join("base.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(160 * MIB)
        .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    eprintln!("seed {:#x}", rng.0);
    let units = DATA_MIB * MIB / BLOCK as u64;
    let model = Arc::new(Mutex::new(vec![Unit::default(); units as usize]));
    let mut objects: BTreeMap<String, Exp> = BTreeMap::new();
    let mut gen = 1u64;
    let mut next_name = 0u32;
    let mut answered: BTreeMap<&'static str, usize> = BTreeMap::new();

    let mut p = start(dir.path(), &file, 0);
    p.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "base", "lvs_name": "lvs", "cluster_sz": CLUSTER}),
    );
    p.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "data", "size_in_mib": DATA_MIB, "thin_provision": true,
               "lvs_name": "lvs"}),
    );
    objects.insert("data".into(), Exp::Present);

    for round in 1..=rounds {
        // ---- load and verify --------------------------------------------------------------
        if round > 1 {
            p = start(dir.path(), &file, round);
            let t0 = Instant::now();
            while p
                .ok("bdev_lvol_get_lvstores", json!({}))
                .as_array()
                .unwrap()
                .is_empty()
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "round {round}: the store did not load\n{}",
                    p.log_text()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let check = p.ok("bdev_lvol_check_lvstore", json!({"lvs_name": "lvs"}));
        assert_eq!(check["problems"], json!([]), "round {round}: {check}");
        let present = names(&p);
        for (name, exp) in objects.iter_mut() {
            let there = present.contains(name);
            match *exp {
                Exp::Present => assert!(there, "round {round}: {name} was created, now gone"),
                Exp::Absent => assert!(!there, "round {round}: {name} was deleted, now back"),
                Exp::Unknown => {}
            }
            *exp = if there { Exp::Present } else { Exp::Absent };
        }
        let mut host = export(&p, round);
        {
            let mut m = model.lock().unwrap();
            for (u, unit) in m.iter_mut().enumerate() {
                if unit.acked.is_none() && unit.maybe.is_none() {
                    continue;
                }
                let got = host
                    .read(u as u64 * (BLOCK as u64 / 512), BLOCK)
                    .unwrap_or_else(|e| panic!("round {round}: read unit {u}: {e}"));
                let acked = unit.acked.map(|g| data(g, u as u64));
                let maybe = unit.maybe.map(|g| data(g, u as u64));
                let zero = unit.acked.is_none() && got.iter().all(|&b| b == 0);
                if maybe.as_ref() == Some(&got) {
                    unit.acked = unit.maybe;
                } else {
                    assert!(
                        acked.as_ref() == Some(&got) || zero,
                        "round {round}: unit {u} holds neither its acknowledged write \
                         (gen {:?}) nor the one in flight (gen {:?})",
                        unit.acked,
                        unit.maybe
                    );
                }
                unit.maybe = None;
            }
        }

        // ---- load, then kill -9 -------------------------------------------------------------
        let killed = AtomicBool::new(false);
        let objs = Mutex::new(std::mem::take(&mut objects));
        let pid = p.child.id() as i32;
        let delay = Duration::from_millis(20 + rng.below(300));
        let mut crng = Rng(rng.next() | 1);
        let mut wrng = Rng(rng.next() | 1);
        let first_gen = gen;
        let last_gen = std::thread::scope(|sc| {
            let writer = sc.spawn(|| {
                let mut g = first_gen;
                loop {
                    let u = wrng.below(units);
                    model.lock().unwrap()[u as usize].maybe = Some(g);
                    if let Err(e) = host.write(u * (BLOCK as u64 / 512), data(g, u)) {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "round {round}: write failed while plexd ran: {e}"
                        );
                        return g;
                    }
                    let mut m = model.lock().unwrap();
                    m[u as usize].acked = Some(g);
                    m[u as usize].maybe = None;
                    g += 1;
                }
            });
            sc.spawn(|| {
                while !killed.load(Ordering::SeqCst) {
                    control_step(
                        &p,
                        &mut crng,
                        &objs,
                        &mut next_name,
                        &mut answered,
                        &killed,
                        round,
                    );
                }
            });
            std::thread::sleep(delay);
            killed.store(true, Ordering::SeqCst);
            // SAFETY: kill(2) on plexd's pid, a child this test spawned and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            writer.join().unwrap()
        });
        p.kill();
        objects = objs.into_inner().unwrap();
        gen = last_gen + 1;
    }
    eprintln!(
        "{rounds} kills, {gen} writes, {} objects named; answered: {answered:?}",
        objects.len()
    );
}

/// One snapshot, clone, delete, resize, inflate or decouple, recorded in `objs` so that an answer lost to the
/// kill leaves the object's fate unknown (to be read after the restart) rather than guessed.
fn control_step(
    p: &Plexd,
    rng: &mut Rng,
    objs: &Mutex<BTreeMap<String, Exp>>,
    next_name: &mut u32,
    answered: &mut BTreeMap<&'static str, usize>,
    killed: &AtomicBool,
    round: usize,
) {
    let (snaps, clones) = {
        let o = objs.lock().unwrap();
        let of = |prefix: &str| -> Vec<String> {
            o.iter()
                .filter(|(n, e)| n.starts_with(prefix) && **e == Exp::Present)
                .map(|(n, _)| n.clone())
                .collect()
        };
        (of("snap"), of("clone"))
    };
    let pick = |rng: &mut Rng, v: &[String]| v[rng.below(v.len() as u64) as usize].clone();
    let (name, call, params, makes) = match rng.below(7) {
        0 if snaps.len() < 6 => {
            *next_name += 1;
            let n = format!("snap{next_name}");
            let params = json!({"lvol_name": "lvs/data", "snapshot_name": n});
            (n, "bdev_lvol_snapshot", params, Some(Exp::Present))
        }
        1 if !snaps.is_empty() && clones.len() < 6 => {
            *next_name += 1;
            let n = format!("clone{next_name}");
            let s = pick(rng, &snaps);
            let params = json!({"snapshot_name": format!("lvs/{s}"), "clone_name": n});
            (n, "bdev_lvol_clone", params, Some(Exp::Present))
        }
        2 if !clones.is_empty() => {
            let n = pick(rng, &clones);
            let params = json!({"name": format!("lvs/{n}")});
            (n, "bdev_lvol_delete", params, Some(Exp::Absent))
        }
        3 if !clones.is_empty() => {
            let n = pick(rng, &clones);
            let mib = 1 + rng.below(DATA_MIB * 2);
            let params = json!({"name": format!("lvs/{n}"), "size_in_mib": mib});
            // A resize leaves the object there either way.
            (n, "bdev_lvol_resize", params, None)
        }
        // The written lvol copies its parents' clusters while the host writes to it.
        4 if !snaps.is_empty() => {
            let params = json!({"name": "lvs/data"});
            ("data".to_string(), "bdev_lvol_inflate", params, None)
        }
        5 if !snaps.is_empty() => {
            let params = json!({"name": "lvs/data"});
            (
                "data".to_string(),
                "bdev_lvol_decouple_parent",
                params,
                None,
            )
        }
        // Refused while clones depend on it (as data does on its last snapshot until
        // inflated or decoupled); making room for new snapshots otherwise.
        6 if !snaps.is_empty() => {
            let n = pick(rng, &snaps);
            let params = json!({"name": format!("lvs/{n}")});
            (n, "bdev_lvol_delete", params, Some(Exp::Absent))
        }
        _ => {
            std::thread::sleep(Duration::from_millis(2));
            return;
        }
    };
    if makes.is_some() {
        objs.lock().unwrap().insert(name.clone(), Exp::Unknown);
    }
    match p.try_call(call, params) {
        Ok(Ok(_)) => {
            *answered.entry(call).or_default() += 1;
            if let Some(e) = makes {
                objs.lock().unwrap().insert(name, e);
            }
        }
        // Refusals that change nothing: inflated already, or not snapshotted since, so
        // nothing to decouple from; a snapshot that clones still depend on.
        Ok(Err(e)) if e.1.contains("no parent") || e.1.contains("depend on it") => {
            *answered.entry("refused").or_default() += 1;
            if makes.is_some() {
                objs.lock().unwrap().insert(name, Exp::Present);
            }
        }
        Ok(Err(e)) => panic!("round {round}: {call} {name}: {e:?}\n{}", p.log_text()),
        Err(e) => assert!(
            killed.load(Ordering::SeqCst),
            "round {round}: {call} {name} failed while plexd ran: {e:?}\n{}",
            p.log_text()
        ),
    }
}
