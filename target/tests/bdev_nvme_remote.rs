//! bdev_nvme between two real plexd processes on loopback: A exports a malloc bdev over
//! NVMe/TCP, B attaches it with `bdev_nvme_attach_controller` and exports the resulting
//! `Nvme0n1` again on its own target, where a test host reads and writes it.

mod bdev_nvme_common;

use bdev_nvme_common::*;
use initiator::IoError;
use serde_json::json;
use std::time::Duration;

const BLOCKS: u64 = 16384; // 8 MiB of 512-byte blocks

/// A with a malloc bdev exported on a fresh port; small MDTS when `max_io_size` is set.
fn start_a(dir: &std::path::Path, max_io_size: u32) -> (Plexd, u16) {
    let a = Plexd::start(dir, "a", &["-m", "0x1"]);
    a.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": BLOCKS, "block_size": 512}),
    );
    let port = free_port();
    a.export(
        NQN_A,
        "Malloc0",
        port,
        json!({"trtype": "TCP", "max_io_size": max_io_size}),
    );
    (a, port)
}

/// A as `start_a` makes it, and its saved configuration, for `restart_a` after a kill.
fn start_a_saved(dir: &std::path::Path) -> (Plexd, u16, std::path::PathBuf) {
    let (a, port) = start_a(dir, 1 << 20);
    let cfg = dir.join("a.json");
    std::fs::write(&cfg, a.ok("save_config", json!({})).to_string()).unwrap();
    (a, port, cfg)
}

/// A again, same bdev, subsystem and port.
fn restart_a(dir: &std::path::Path, cfg: &std::path::Path) -> Plexd {
    Plexd::start(dir, "a2", &["-m", "0x1", "-c", cfg.to_str().unwrap()])
}

/// Attach parameters for A with these reconnect settings added.
fn attach_params_with(port: u16, reconnect: &serde_json::Value) -> serde_json::Value {
    let mut p = attach_params(port);
    for (k, v) in reconnect.as_object().into_iter().flatten() {
        p[k] = v.clone();
    }
    p
}

fn attach_params(port: u16) -> serde_json::Value {
    json!({"name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
           "trsvcid": port.to_string(), "subnqn": NQN_A})
}

#[test]
fn remote_namespace_reads_back_splits_large_io_saves_config_and_detaches() {
    let dir = temp_dir();
    // A's MDTS is 16 KiB, so every larger I/O through B is split into pieces.
    let (a, port_a) = start_a(dir.path(), 16384);
    let b = Plexd::start(dir.path(), "b", &["-m", "0x3"]);

    let names = b.ok("bdev_nvme_attach_controller", attach_params(port_a));
    assert_eq!(names, json!(["Nvme0n1"]));
    let bdev = &b.ok("bdev_get_bdevs", json!({"name": "Nvme0n1"}))[0];
    assert_eq!(bdev["num_blocks"], BLOCKS);
    assert_eq!(bdev["block_size"], 512);
    assert_eq!(bdev["driver_specific"]["nvme"]["nsid"], 1);

    let c = &b.ok("bdev_nvme_get_controllers", json!({}))[0];
    assert_eq!(c["name"], "Nvme0");
    let path = &c["ctrlrs"][0];
    assert_eq!(path["state"], "connected");
    assert_eq!(path["trid"]["traddr"], "127.0.0.1");
    assert_eq!(path["trid"]["trsvcid"], port_a.to_string());
    assert_eq!(path["trid"]["subnqn"], NQN_A);
    assert_eq!(path["trid"]["trtype"], "TCP");
    assert_eq!(path["max_transfer"], 16384);
    // One qpair per reactor of B.
    assert_eq!(path["io_queues"], 2);

    // B re-exports its remote namespace; a host writes and reads through B.
    let port_b = free_port();
    b.export(NQN_B, "Nvme0n1", port_b, json!({"trtype": "TCP"}));
    let mut host = Driver::connect(port_b, NQN_B);
    let bs = host.block_size;
    let cases: [(u64, usize); 5] = [
        (0, 512),
        (7, 4096),
        (100, 16384),
        (1000, 128 * 1024),       // 8 pieces of A's MDTS
        (BLOCKS - 2048, 1 << 20), // the last MiB, 64 pieces
    ];
    for (i, &(lba, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, lba, len, bs);
        host.write(lba, data.clone())
            .unwrap_or_else(|e| panic!("write {len} at {lba}: {e}\n{}", b.log_text()));
        let back = host.read(lba, len).expect("read back through B");
        assert!(back == data, "read back {len} bytes at LBA {lba} differ");
    }
    // And the bytes really are on A: read them from A's own export.
    let mut direct = Driver::connect(port_a, NQN_A);
    let (lba, len) = cases[3];
    let mut on_a = Vec::new();
    for k in 0..len / 16384 {
        // A's own MDTS bounds this host too.
        on_a.extend(direct.read(lba + (k * 16384 / bs) as u64, 16384).unwrap());
    }
    assert!(on_a == pattern(4, lba, len, bs), "A holds other bytes");
    drop(direct);

    // Past the end: the remote's own NVMe status comes back through B.
    let (r, _, _) = host.io(false, BLOCKS - 1, vec![0u8; 1024], Duration::from_secs(10));
    assert!(matches!(r, Err(IoError::Nvme(_))), "{r:?}");

    let stats = &b.ok("bdev_get_iostat", json!({"name": "Nvme0n1"}))["bdevs"][0];
    assert!(stats["num_write_ops"].as_u64().unwrap() >= cases.len() as u64);

    // save_config has the attach call; a new plexd started with it attaches again.
    let cfg = b.ok("save_config", json!({}));
    let calls = cfg["subsystems"][0]["config"].as_array().unwrap();
    let attach = calls
        .iter()
        .find(|c| c["method"] == "bdev_nvme_attach_controller")
        .expect("attach in save_config");
    assert_eq!(attach["params"]["name"], "Nvme0");
    assert_eq!(attach["params"]["subnqn"], NQN_A);
    assert!(attach["params"]["hostnqn"].as_str().is_some());
    // Only the bdev part: C must not listen on B's port.
    let only_bdev = json!({"subsystems": [cfg["subsystems"][0].clone()]});
    let cfg_path = dir.path().join("c.json");
    std::fs::write(&cfg_path, only_bdev.to_string()).unwrap();
    {
        let c = Plexd::start(
            dir.path(),
            "c",
            &["-m", "0x1", "-c", cfg_path.to_str().unwrap()],
        );
        assert_eq!(c.ctrlr_state("Nvme0"), "connected");
        let bd = &c.ok("bdev_get_bdevs", json!({"name": "Nvme0n1"}))[0];
        assert_eq!(bd["num_blocks"], BLOCKS);
        c.ok("bdev_nvme_detach_controller", json!({"name": "Nvme0"}));
    }

    // Detach is refused while B's target still uses the bdev, and names the user.
    let (code, msg) = b
        .call("bdev_nvme_detach_controller", json!({"name": "Nvme0"}))
        .unwrap_err();
    assert_eq!(code, -libc::EBUSY as i64, "{msg}");
    assert!(msg.contains("Nvme0n1"), "{msg}");
    drop(host);
    b.ok("nvmf_delete_subsystem", json!({"nqn": NQN_B}));
    assert_eq!(
        b.ok("bdev_nvme_detach_controller", json!({"name": "Nvme0"})),
        json!(true)
    );
    assert_eq!(b.ok("bdev_nvme_get_controllers", json!({})), json!([]));
    assert!(b
        .call("bdev_get_bdevs", json!({"name": "Nvme0n1"}))
        .is_err());
    // The name is free again, and A is unharmed.
    b.ok("bdev_nvme_attach_controller", attach_params(port_a));
    b.ok("bdev_nvme_detach_controller", json!({"name": "Nvme0"}));
    assert!(a
        .ok("bdev_get_bdevs", json!({"name": "Malloc0"}))
        .is_array());
    assert!(!b.log_text().contains("panicked"), "{}", b.log_text());
}

#[test]
fn target_loss_fails_io_after_fast_io_fail_then_reconnects_when_restarted() {
    let dir = temp_dir();
    let (mut a, port_a, a_cfg) = start_a_saved(dir.path());
    let b = Plexd::start(dir.path(), "b", &["-m", "0x1"]);
    let reconnect = json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 1,
                           "fast_io_fail_timeout_sec": 2});
    b.ok(
        "bdev_nvme_attach_controller",
        attach_params_with(port_a, &reconnect),
    );
    let port_b = free_port();
    b.export(NQN_B, "Nvme0n1", port_b, json!({"trtype": "TCP"}));
    let mut host = Driver::connect(port_b, NQN_B);
    let bs = host.block_size;
    host.write(0, pattern(1, 0, 4096, bs)).unwrap();

    let killed_at = std::time::Instant::now();
    a.kill();
    b.wait_state("Nvme0", "reconnecting", Duration::from_secs(30));
    // Held while the path may come back, then failed once fast_io_fail_timeout passed.
    let (r, _, _) = host.io(true, 8, pattern(2, 8, 4096, bs), Duration::from_secs(30));
    assert!(r.is_err(), "write with A down succeeded");
    // Not before the timeout (2 s): B's clock started after the kill, so this lower bound
    // holds however slow the machine is.
    let failed_after = killed_at.elapsed();
    assert!(
        failed_after >= Duration::from_secs(2),
        "failed {failed_after:?} after A died"
    );
    // New I/O fails too, while B still tries to reconnect.
    let (r, _, _) = host.io(false, 0, vec![0u8; 4096], Duration::from_secs(30));
    assert!(r.is_err(), "{r:?}");
    assert_eq!(b.ctrlr_state("Nvme0"), "reconnecting");

    // A comes back with the same configuration: B reconnects and I/O flows again.
    let a2 = restart_a(dir.path(), &a_cfg);
    b.wait_state("Nvme0", "connected", Duration::from_secs(30));
    let data = pattern(3, 64, 8192, bs);
    // The I/O queues reconnect on their first poll after the controller did, so a write may
    // still fail in between.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while host.write(64, data.clone()).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "I/O did not recover:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host.read(64, 8192).unwrap() == data);
    let log = b.log_text();
    assert!(!log.contains("panicked"), "{log}");
    drop(host);
    drop(a2);
}

#[test]
fn bad_parameters_are_clear_errors() {
    let dir = temp_dir();
    let b = Plexd::start(dir.path(), "b", &["-m", "0x1"]);
    let closed = free_port();
    let base = json!({"name": "Nvme0", "trtype": "TCP", "traddr": "127.0.0.1",
                      "trsvcid": closed.to_string(), "subnqn": NQN_A});
    let with = |k: &str, v: serde_json::Value| {
        let mut p = base.clone();
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v;
        }
        p
    };
    let cases = [
        (with("trtype", json!(null)), -32602, "trtype"),
        (with("trtype", json!("FC")), -32602, "trtype"),
        // A PCIe address that names no device: said so before any VFIO call.
        (
            json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "7fff:ee:1f.7"}),
            -(libc::ENODEV as i64),
            "no PCI device 7fff:ee:1f.7",
        ),
        (
            json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "00:04"}),
            -(libc::EINVAL as i64),
            "is not a PCI address",
        ),
        (with("traddr", json!("not an address")), -32602, "traddr"),
        (with("trsvcid", json!("70000")), -32602, "trsvcid"),
        (with("adrfam", json!("ipv6")), -32602, "adrfam"),
        (with("subnqn", json!(null)), -32602, "subnqn"),
        (with("name", json!("bad name")), -32602, "name"),
        (
            with("reconnect_delay_sec", json!(5)),
            -32602,
            "reconnect_delay_sec",
        ),
        (
            with("ctrlr_loss_timeout_sec", json!(-2)),
            -32602,
            "ctrlr_loss_timeout_sec",
        ),
        (
            with("ctrlr_loss_timeout_sec", json!(10)),
            -32602,
            "reconnect_delay_sec",
        ),
        (with("psk", json!("NVMeTLSkey-1:01:abc")), -32602, "psk"),
        (with("num_io_queues", json!(0)), -32602, "num_io_queues"),
        (with("hdgst", json!("yes")), -32602, "hdgst"),
        (with("no_such_param", json!(1)), -32602, "no_such_param"),
        (
            with("fabrics_connect_timeout_us", json!(500_000)),
            -(libc::ECONNREFUSED as i64),
            "Nvme0",
        ),
    ];
    for (params, code, word) in cases {
        let (c, msg) = b
            .call("bdev_nvme_attach_controller", params.clone())
            .expect_err(&format!("{params} was accepted"));
        assert_eq!(c, code, "{params}: {msg}");
        assert!(
            msg.contains(word),
            "{params}: message {msg:?} does not mention {word}"
        );
    }
    // RDMA to a port nobody serves: refused (or, on a machine without an RDMA device,
    // unavailable), and said so.
    let (c, msg) = b
        .call("bdev_nvme_attach_controller", with("trtype", json!("RDMA")))
        .expect_err("an RDMA attach to a closed port was accepted");
    assert!(c < 0 && msg.contains("RDMA"), "RDMA attach: {c} {msg}");
    // Nothing half-made was left behind by the failures.
    assert_eq!(b.ok("bdev_nvme_get_controllers", json!({})), json!([]));
    assert_eq!(b.ok("bdev_get_bdevs", json!({})), json!([]));

    let (c, _) = b
        .call("bdev_nvme_detach_controller", json!({"name": "Nvme9"}))
        .unwrap_err();
    assert_eq!(c, -(libc::ENODEV as i64));
    let (c, _) = b
        .call("bdev_nvme_get_controllers", json!({"name": "Nvme9"}))
        .unwrap_err();
    assert_eq!(c, -(libc::ENODEV as i64));

    // A name that is taken is refused without touching the first controller.
    let (a, port_a) = start_a(dir.path(), 1 << 20);
    let ok = with("trsvcid", json!(port_a.to_string()));
    b.ok("bdev_nvme_attach_controller", ok.clone());
    let (c, msg) = b.call("bdev_nvme_attach_controller", ok).unwrap_err();
    assert_eq!(c, -(libc::EEXIST as i64), "{msg}");
    // Detach with a transport ID that is not this controller's path.
    let (c, _) = b
        .call(
            "bdev_nvme_detach_controller",
            json!({"name": "Nvme0", "traddr": "10.9.9.9"}),
        )
        .unwrap_err();
    assert_eq!(c, -(libc::ENODEV as i64));
    assert_eq!(b.ctrlr_state("Nvme0"), "connected");
    b.ok("bdev_nvme_detach_controller", json!({"name": "Nvme0"}));
    drop(a);
}

#[test]
fn namespaces_added_and_removed_on_the_target_follow_on_the_bdevs() {
    let dir = temp_dir();
    let (a, port_a) = start_a(dir.path(), 1 << 20);
    let b = Plexd::start(dir.path(), "b", &["-m", "0x1"]);
    assert_eq!(
        b.ok("bdev_nvme_attach_controller", attach_params(port_a)),
        json!(["Nvme0n1"])
    );
    let wait_for = |present: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while b.call("bdev_get_bdevs", json!({"name": "Nvme0n2"})).is_ok() != present {
            assert!(
                std::time::Instant::now() < deadline,
                "Nvme0n2 present={} never came\n{}",
                present,
                b.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A namespace-attribute AEN from A makes B rescan.
    a.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc1", "num_blocks": 2048, "block_size": 4096}),
    );
    a.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN_A, "namespace": {"bdev_name": "Malloc1", "nsid": 2}}),
    );
    wait_for(true);
    let bd = &b.ok("bdev_get_bdevs", json!({"name": "Nvme0n2"}))[0];
    assert_eq!(
        (bd["num_blocks"].as_u64(), bd["block_size"].as_u64()),
        (Some(2048), Some(4096))
    );
    let c = &b.ok("bdev_nvme_get_controllers", json!({"name": "Nvme0"}))[0];
    assert_eq!(c["ctrlrs"][0]["bdevs"], json!(["Nvme0n1", "Nvme0n2"]));

    a.ok("nvmf_subsystem_remove_ns", json!({"nqn": NQN_A, "nsid": 2}));
    wait_for(false);
    assert!(b.call("bdev_get_bdevs", json!({"name": "Nvme0n1"})).is_ok());
    b.ok("bdev_nvme_detach_controller", json!({"name": "Nvme0"}));
}

#[test]
fn controller_lost_past_ctrlr_loss_timeout_is_deleted_once_its_bdev_is_released() {
    let dir = temp_dir();
    let (mut a, port_a, a_cfg) = start_a_saved(dir.path());
    let b = Plexd::start(dir.path(), "b", &["-m", "0x1"]);
    let p = attach_params_with(
        port_a,
        &json!({"ctrlr_loss_timeout_sec": 2, "reconnect_delay_sec": 1}),
    );
    b.ok("bdev_nvme_attach_controller", p.clone());
    let wait_deleted = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while b.ok("bdev_nvme_get_controllers", json!({})) != json!([]) {
            assert!(
                std::time::Instant::now() < deadline,
                "Nvme0 not deleted\n{}",
                b.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let held = |log: &str| log.matches("ctrlr_loss_timeout_sec passed, but").count();
    // B's target claims Nvme0n1, which holds the deletion up until it lets go.
    let port_b = free_port();
    b.export(NQN_B, "Nvme0n1", port_b, json!({"trtype": "TCP"}));

    a.kill();
    b.wait_state("Nvme0", "failed", Duration::from_secs(30));
    // The owner tried to delete it past the timeout and the claim held it: it says so (once),
    // and the controller and its bdev are still there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while held(&b.log_text()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no word of the held deletion\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = &b.ok("bdev_nvme_get_controllers", json!({"name": "Nvme0"}))[0];
    assert_eq!(c["ctrlrs"][0]["bdevs"], json!(["Nvme0n1"]));
    assert!(b.call("bdev_get_bdevs", json!({"name": "Nvme0n1"})).is_ok());
    assert_eq!(held(&b.log_text()), 1, "{}", b.log_text());

    // The claim goes: the controller and its bdev go with it, as SPDK deletes them.
    b.ok("nvmf_delete_subsystem", json!({"nqn": NQN_B}));
    wait_deleted();
    let (code, _) = b
        .call("bdev_nvme_get_controllers", json!({"name": "Nvme0"}))
        .unwrap_err();
    assert_eq!(code, -(libc::ENODEV as i64));
    assert!(b
        .call("bdev_get_bdevs", json!({"name": "Nvme0n1"}))
        .is_err());
    assert_eq!(b.ok("bdev_get_bdevs", json!({})), json!([]));
    let (code, _) = b
        .call("bdev_nvme_detach_controller", json!({"name": "Nvme0"}))
        .unwrap_err();
    assert_eq!(code, -(libc::ENODEV as i64));
    let log = b.log_text();
    assert_eq!(held(&log), 1, "{log}");
    assert!(log.contains("deleting the controller"), "{log}");

    // A comes back: the name attaches again and I/O flows.
    let a2 = restart_a(dir.path(), &a_cfg);
    assert_eq!(b.ok("bdev_nvme_attach_controller", p), json!(["Nvme0n1"]));
    assert_eq!(b.ctrlr_state("Nvme0"), "connected");
    // The transport exists already: only the subsystem again, on a fresh port.
    let port_b = free_port();
    b.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN_B, "allow_any_host": true}),
    );
    b.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN_B, "namespace": {"bdev_name": "Nvme0n1"}}),
    );
    b.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN_B, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": port_b.to_string()}}),
    );
    let mut host = Driver::connect(port_b, NQN_B);
    let bs = host.block_size;
    let data = pattern(9, 16, 4096, bs);
    host.write(16, data.clone()).unwrap();
    assert!(host.read(16, 4096).unwrap() == data);
    drop(host);
    b.ok("nvmf_delete_subsystem", json!({"nqn": NQN_B}));

    // Unclaimed, the bdev goes as soon as the timeout passes.
    let killed_at = std::time::Instant::now();
    drop(a2);
    wait_deleted();
    // Not before the timeout (2 s): B's clock started after the kill, so this lower bound
    // holds however slow the machine is.
    let deleted_after = killed_at.elapsed();
    assert!(
        deleted_after >= Duration::from_secs(2),
        "deleted {deleted_after:?} after A died"
    );
    assert_eq!(b.ok("bdev_get_bdevs", json!({})), json!([]));
    let log = b.log_text();
    assert_eq!(held(&log), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
