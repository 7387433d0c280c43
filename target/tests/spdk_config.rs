//! A configuration SPDK's own `save_config` wrote (an `nvmf_tgt` with two malloc bdevs, a TCP
//! transport, a subsystem with two namespaces and listeners, and the sections of SPDK
//! subsystems plexd does not have) loads into plexd as it is: through `plexd -c`, and call by
//! call over JSON-RPC as `spdk-rpc load_config` replays it. Options away from SPDK's defaults
//! and malformed sections are refused, naming where.

mod nvmf_tcp_common;
mod plexd_proc;

use nvme_spec::cmd::Command;
use nvmf_tcp_common::Client;
use plexd_proc::*;
use serde_json::{json, Value};

const CNODE1: &str = "nqn.2016-06.io.spdk:cnode1";
const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// The file as SPDK wrote it, with its listeners moved from 4420 to `port` (tests run side by
/// side, and something else may hold 4420).
fn spdk_config(port: u16) -> Value {
    let text = include_str!("data/spdk-save_config-nvmf_tgt.json");
    let mut v: Value = serde_json::from_str(text).unwrap();
    let mut moved = 0;
    for sub in v["subsystems"].as_array_mut().unwrap() {
        for call in sub["config"].as_array_mut().into_iter().flatten() {
            if let Some(a) = call.pointer_mut("/params/listen_address/trsvcid") {
                assert_eq!(a, "4420");
                *a = json!(port.to_string());
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 2, "the fixture's two listeners");
    v
}

/// The section named `name` of a config.
fn section<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
    v["subsystems"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["subsystem"] == name)
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// What SPDK's file describes is there, as plexd's RPCs report it.
fn check_target(d: &Plexd, port: u16) {
    let bdevs = d.ok("bdev_get_bdevs", Value::Null);
    let find = |name: &str| -> Value {
        bdevs
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no bdev {name} in {bdevs}"))
            .clone()
    };
    let m0 = find("Malloc0");
    assert_eq!(
        (&m0["num_blocks"], &m0["block_size"], &m0["uuid"]),
        (
            &json!(131072),
            &json!(512),
            &json!("ebb16a91-184a-4ace-b5c8-a60954ff4d61")
        )
    );
    let m1 = find("Malloc1");
    assert_eq!(
        (&m1["num_blocks"], &m1["block_size"]),
        (&json!(8192), &json!(4096))
    );

    let tr = d.ok("nvmf_get_transports", Value::Null);
    assert_eq!(tr.as_array().unwrap().len(), 1, "{tr}");
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_queue_depth"], 128);
    assert_eq!(tr[0]["max_io_qpairs_per_ctrlr"], 8);
    assert_eq!(tr[0]["in_capsule_data_size"], 8192);
    assert_eq!(tr[0]["max_io_size"], 131072);

    let subs = d.ok("nvmf_get_subsystems", Value::Null);
    let sub = |nqn: &str| -> Value {
        subs.as_array()
            .unwrap()
            .iter()
            .find(|s| s["nqn"] == nqn)
            .unwrap_or_else(|| panic!("no subsystem {nqn} in {subs}"))
            .clone()
    };
    // trsvcid is a string: a JSON number would not be the same port to SPDK's client.
    let trsvcid = port.to_string();
    let listens_on_port = |s: &Value| {
        s["listen_addresses"].as_array().unwrap().iter().any(|a| {
            a["traddr"] == "127.0.0.1" && a["trsvcid"] == trsvcid.as_str() && a["trtype"] == "TCP"
        })
    };
    let disc = sub(DISCOVERY);
    assert!(listens_on_port(&disc), "{disc}");
    let c1 = sub(CNODE1);
    assert!(listens_on_port(&c1), "{c1}");
    assert_eq!(c1["serial_number"], "SPDK00000000000001");
    assert_eq!(c1["allow_any_host"], true);
    let ns = c1["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 2, "{c1}");
    assert_eq!(
        (&ns[0]["nsid"], &ns[0]["bdev_name"]),
        (&json!(1), &json!("Malloc0"))
    );
    assert_eq!(
        (&ns[1]["nsid"], &ns[1]["bdev_name"]),
        (&json!(2), &json!("Malloc1"))
    );
    assert_eq!(ns[0]["nguid"], "EBB16A91184A4ACEB5C8A60954FF4D61");
}

/// A host connects to cnode1, brings its controller up, and writes and reads back a block of
/// each namespace.
fn host_connects(port: u16) {
    let mut admin = Client::connect(port);
    let cntlid = admin.admin_up_to(CNODE1, false, false);
    let mut io = Client::connect(port);
    io.io_up_to(CNODE1, cntlid, 1, false, false);
    for (nsid, block) in [(1u32, 512usize), (2, 4096)] {
        let data: Vec<u8> = (0..block).map(|i| (i as u8) ^ (nsid as u8)).collect();
        let (cqe, _) = io.run(Command::write_blocks(nsid, 7, 1, false), &data, 0, true);
        assert!(
            cqe.status().is_success(),
            "write ns {nsid}: {}",
            cqe.status()
        );
        let (cqe, back) = io.run(Command::read_blocks(nsid, 7, 1), &[], block as u32, false);
        assert!(
            cqe.status().is_success(),
            "read ns {nsid}: {}",
            cqe.status()
        );
        assert!(back == data, "ns {nsid} read back other bytes");
    }
}

#[test]
fn plexd_starts_from_spdks_save_config() {
    let port = free_port();
    let dir = temp_dir();
    let mut cfg = spdk_config(port);
    // SPDK writes `null` for a subsystem with nothing to save: as good as an empty list.
    section(&mut cfg, "nbd")["config"] = Value::Null;
    let path = write_json(dir.path(), "spdk.json", &cfg);
    let d = Plexd::start(&["-m", "0x1", "-c", path.to_str().unwrap()]);
    check_target(&d, port);
    host_connects(port);
}

/// What `spdk-rpc load_config` does: every method of the file must be listed by
/// `rpc_get_methods`, then each call is sent as it is, in order.
#[test]
fn spdks_save_config_replays_call_by_call_over_rpc() {
    let port = free_port();
    let cfg = spdk_config(port);
    let d = Plexd::start(&["-m", "0x1"]);
    let methods = d.ok("rpc_get_methods", json!({"include_aliases": false}));
    let methods: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for sub in cfg["subsystems"].as_array().unwrap() {
        for call in sub["config"].as_array().into_iter().flatten() {
            let method = call["method"].as_str().unwrap();
            assert!(methods.contains(&method), "rpc_get_methods lacks {method}");
            let params = call.get("params").cloned().unwrap_or(Value::Null);
            if let Err(e) = d.call(method, params) {
                panic!("{method} refused: {e:?}");
            }
        }
    }
    check_target(&d, port);
    host_connects(port);
}

/// Starts plexd on `cfg`, which it must refuse; returns what it said.
fn refused(cfg: &Value) -> String {
    let dir = temp_dir();
    let path = write_json(dir.path(), "bad.json", cfg);
    let (st, log) = run_to_exit(&["-m", "0x1", "-c", path.to_str().unwrap()]);
    assert!(!st.success(), "plexd took the config: {log}");
    assert_eq!(
        st.code(),
        Some(1),
        "a refused config is a start-up error: {log}"
    );
    log
}

#[test]
fn an_option_away_from_spdks_default_is_refused_naming_method_and_field() {
    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "iobuf")["config"][0]["params"]["small_pool_count"] = json!(16384);
    let log = refused(&cfg);
    assert!(
        log.contains(
            "subsystem iobuf entry 0 (iobuf_set_options): iobuf_set_options: \
             small_pool_count=16384 is not supported by plexd"
        ),
        "{log}"
    );

    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "nvmf")["config"][0]["params"]["admin_cmd_passthru"]["identify_ctrlr"] =
        json!(true);
    let log = refused(&cfg);
    assert!(
        log.contains("(nvmf_set_config): nvmf_set_config: admin_cmd_passthru.identify_ctrlr=true"),
        "{log}"
    );

    // A parameter no table knows (a newer SPDK's, or a typo) is refused by name too.
    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "sock")["config"][2]["params"]["enable_turbo"] = json!(false);
    let log = refused(&cfg);
    assert!(
        log.contains("(sock_impl_set_options)") && log.contains("enable_turbo"),
        "{log}"
    );

    // A method of a subsystem plexd lacks, beyond its defaults.
    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "keyring")["config"] =
        json!([{"method": "keyring_file_add_key", "params": {"name": "k0", "path": "/k"}}]);
    let log = refused(&cfg);
    assert!(
        log.contains("subsystem keyring entry 0 (keyring_file_add_key)"),
        "{log}"
    );
}

#[test]
fn a_section_whose_config_is_not_a_list_is_refused_naming_it() {
    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "accel")["config"] = json!({"method": "accel_set_options"});
    let log = refused(&cfg);
    assert!(
        log.contains("subsystem accel: \"config\" must be a list of calls"),
        "{log}"
    );
    assert!(!log.contains("loaded config"), "{log}");

    let mut cfg = spdk_config(free_port());
    section(&mut cfg, "bdev")["config"] = json!("bdev_malloc_create");
    let log = refused(&cfg);
    assert!(log.contains("subsystem bdev: \"config\""), "{log}");

    let cfg = json!({"subsystems": [{"config": []}]});
    let log = refused(&cfg);
    assert!(
        log.contains("subsystems[0] has no \"subsystem\" name"),
        "{log}"
    );
}
