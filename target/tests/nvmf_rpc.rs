//! The nvmf_* JSON-RPC methods: SPDK's names and shapes, and clear refusals.

mod nvmf_tcp_common;
use nvme_spec::cmd::Command;
use nvme_spec::features::{aec, fid};
use nvmf_tcp_common::*;
use serde_json::json;

#[test]
fn transport_and_subsystem_errors_are_clear() {
    let t = Target::start(true);
    // A second TCP transport, an unknown transport type, unknown and unsupported parameters.
    assert_eq!(
        t.rpc("nvmf_create_transport", json!({"trtype": "TCP"}))
            .unwrap_err()
            .code,
        -libc::EEXIST
    );
    assert!(t
        .rpc("nvmf_create_transport", json!({"trtype": "FC"}))
        .is_err());
    assert!(t
        .rpc(
            "nvmf_create_transport",
            json!({"trtype": "TCP", "max_queue_dept": 64})
        )
        .is_err());
    let tr = t.rpc("nvmf_get_transports", json!({})).unwrap();
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_queue_depth"], 128);
    assert_eq!(tr[0]["max_io_size"], 1 << 20);
    // RDMA beside TCP, with SPDK's RDMA defaults and its RDMA-only options.
    t.rpc(
        "nvmf_create_transport",
        json!({"trtype": "rdma", "num_cqe": 2048, "no_srq": true}),
    )
    .unwrap();
    let tr = t
        .rpc("nvmf_get_transports", json!({"trtype": "RDMA"}))
        .unwrap();
    assert_eq!(tr.as_array().unwrap().len(), 1);
    assert_eq!(tr[0]["in_capsule_data_size"], 4096);
    assert_eq!(tr[0]["max_io_size"], 131072);
    assert_eq!(tr[0]["num_cqe"], 2048);
    assert_eq!(tr[0]["no_srq"], true);
    assert_eq!(
        t.rpc("nvmf_get_transports", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Each poll group lists both transports; RDMA's with its devices (none has carried a
    // queue pair yet), TCP's with its type alone.
    let stats = t.rpc("nvmf_get_stats", json!({})).unwrap();
    for g in stats["poll_groups"].as_array().unwrap() {
        assert_eq!(
            g["transports"],
            json!([{"trtype": "TCP"}, {"trtype": "RDMA", "devices": []}]),
            "{g}"
        );
    }
    // An RDMA listener where no RDMA device has the address fails, saying so.
    let e = t
        .rpc(
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": {"trtype": "RDMA", "adrfam": "IPv4",
                "traddr": "127.0.0.1", "trsvcid": "4420"}}),
        )
        .unwrap_err();
    assert!(e.message.contains("RDMA"), "{}", e.message);
    // Subsystems: duplicate, bad NQN, unknown NQN.
    assert_eq!(
        t.rpc("nvmf_create_subsystem", json!({"nqn": NQN}))
            .unwrap_err()
            .code,
        -libc::EEXIST
    );
    assert!(t
        .rpc("nvmf_create_subsystem", json!({"nqn": "not-an-nqn"}))
        .is_err());
    assert_eq!(
        t.rpc(
            "nvmf_delete_subsystem",
            json!({"nqn": "nqn.2024-01.x:none"})
        )
        .unwrap_err()
        .code,
        -libc::ENODEV
    );
    // Namespaces: the bdev is claimed, NSIDs are unique, unknown bdevs are refused.
    assert!(t
        .rpc("bdev_malloc_delete", json!({"name": "Malloc0"}))
        .is_err());
    assert!(t
        .rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "nope"}})
        )
        .is_err());
    t.rpc(
        "bdev_malloc_create",
        json!({"name": "Malloc1", "num_blocks": 64, "block_size": 512}),
    )
    .unwrap();
    assert!(t
        .rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc1", "nsid": 1}})
        )
        .is_err());
    let nsid = t
        .rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc1",
                   "nguid": "000102030405060708090A0B0C0D0E0F", "eui64": "0011223344556677"}}),
        )
        .unwrap();
    assert_eq!(nsid, 2);
    let subs = t.rpc("nvmf_get_subsystems", json!({"nqn": NQN})).unwrap();
    assert_eq!(
        subs[0]["namespaces"][1]["nguid"],
        "000102030405060708090A0B0C0D0E0F"
    );
    assert_eq!(subs[0]["namespaces"][1]["eui64"], "0011223344556677");
    assert_eq!(subs[0]["model_number"], "plexstor");
    t.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2}))
        .unwrap();
    t.rpc("bdev_malloc_delete", json!({"name": "Malloc1"}))
        .unwrap();
    // Listeners: duplicate, bad address; the discovery subsystem is listed first.
    let port = t.port.to_string();
    let la = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port});
    assert!(t
        .rpc(
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": la})
        )
        .is_err());
    assert!(t
        .rpc(
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address":
            {"trtype": "TCP", "traddr": "not-an-ip", "trsvcid": "4420"}})
        )
        .is_err());
    let all = t.rpc("nvmf_get_subsystems", json!({})).unwrap();
    assert_eq!(all[0]["subtype"], "Discovery");
    assert_eq!(all[1]["subtype"], "NVMe");
    // Hosts.
    t.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST}))
        .unwrap();
    assert!(t
        .rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST}))
        .is_err());
    t.rpc(
        "nvmf_subsystem_remove_host",
        json!({"nqn": NQN, "host": HOST}),
    )
    .unwrap();
    t.rpc(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": NQN, "allow_any_host": false}),
    )
    .unwrap();
    // Removing the listener stops new connections.
    t.rpc(
        "nvmf_subsystem_remove_listener",
        json!({"nqn": NQN, "listen_address": la}),
    )
    .unwrap();
    // The listener closes on its reactor, a moment after the RPC returns.
    wait_until("the removed listener to refuse connections", || {
        std::net::TcpStream::connect(("127.0.0.1", t.port)).is_err()
    });
}

#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let t = Target::start(true);
    let mut c = Client::connect(t.port);
    c.ic(false, false);
    let cqe = c.fabrics_connect_kato(0, 0xFFFF, NQN, HOST, 300);
    assert!(cqe.status().is_success());
    // KATO 300 ms and no keep-alive: plexd closes well within expect_term's deadline.
    assert_eq!(
        c.expect_term(),
        None,
        "closed without a termination request"
    );
    let ctrls = t
        .rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
        .unwrap();
    assert_eq!(ctrls, json!([]));
}

#[test]
fn namespace_changes_complete_an_aer() {
    let t = Target::start(true);
    let mut admin = Client::connect(t.port);
    admin.admin_up(false, false);
    let (cqe, _) = admin.run(
        Command::set_features(fid::ASYNC_EVENT_CONFIG, aec::NS_ATTRIBUTE, false),
        &[],
        0,
        false,
    );
    assert!(cqe.status().is_success());
    let cid = admin.cid();
    admin.send_cmd(Command::async_event_request().with_cid(cid), &[]);
    t.rpc(
        "bdev_malloc_create",
        json!({"name": "Malloc1", "num_blocks": 64, "block_size": 512}),
    )
    .unwrap();
    t.rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc1"}}),
    )
    .unwrap();
    let (cqe, _) = admin.wait(cid, &[]);
    assert_eq!(
        cqe.result.get(),
        0x0004_0002,
        "notice: namespace attribute changed"
    );
    let (_, log) = admin.run(
        Command::get_log_page(0, 0x04, 0, false, 4096, 0),
        &[],
        4096,
        false,
    );
    assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 2);
}

/// What SPDK's client (`spdk-rpc` 26.x) sends with its default arguments is taken; a feature we
/// lack, asked for, is refused by name and value; a misspelt name stays an error.
#[test]
fn spdk_client_parameters_are_taken_or_refused_clearly() {
    let t = Target::start(true);
    let invalid = plexd::rpc::INVALID_PARAMS;
    // `spdk-rpc nvmf_create_transport -t TCP`: accepted, then refused only because the
    // transport exists.
    let spdk_transport = json!({"trtype": "TCP", "c2h_success": true,
        "dif_insert_or_strip": false, "disable_adaptive_irq": false,
        "disable_command_passthru": false, "disable_mappable_bar0": false,
        "disable_shadow_doorbells": false, "no_srq": false, "no_wr_batching": false,
        "zcopy": false});
    let e = t
        .rpc("nvmf_create_transport", spdk_transport.clone())
        .unwrap_err();
    assert_eq!(e.code, -libc::EEXIST, "{e}");
    let mut asks_dif = spdk_transport.clone();
    asks_dif["dif_insert_or_strip"] = json!(true);
    let e = t.rpc("nvmf_create_transport", asks_dif).unwrap_err();
    assert_eq!(e.code, invalid);
    assert!(
        e.message
            .contains("dif_insert_or_strip=true is not supported by plexd"),
        "{e}"
    );
    let mut misspelt = spdk_transport;
    misspelt["no_sqr"] = json!(false);
    let e = t.rpc("nvmf_create_transport", misspelt).unwrap_err();
    assert_eq!(e.code, invalid);
    assert!(e.message.contains("unknown field `no_sqr`"), "{e}");

    // `spdk-rpc nvmf_create_subsystem NQN -a`, then a namespace and a listener as it sends them.
    let nqn = "nqn.2016-06.io.spdk:spdk-client";
    t.rpc(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true, "ana_reporting": false,
            "enable_nssr": false, "passthrough": false}),
    )
    .unwrap();
    let e = t
        .rpc(
            "nvmf_create_subsystem",
            json!({"nqn": "nqn.2016-06.io.spdk:x", "passthrough": true}),
        )
        .unwrap_err();
    assert!(e.message.contains("passthrough=true"), "{e}");
    let e = t
        .rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": nqn, "namespace": {"bdev_name": "Malloc0", "no_auto_visible": true}}),
        )
        .unwrap_err();
    assert!(e.message.contains("namespace.no_auto_visible=true"), "{e}");

    // `spdk-rpc bdev_nvme_attach_controller`: accepted up to the connection (nothing listens
    // on port 1), refused with a key it cannot use.
    let attach = json!({"name": "R", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "1",
        "subnqn": nqn, "allow_unrecognized_csi": false, "disable_sq_flow_control": false,
        "hdgst": false, "ddgst": false, "prchk_guard": false, "prchk_reftag": false});
    let e = t
        .rpc("bdev_nvme_attach_controller", attach.clone())
        .unwrap_err();
    assert_ne!(e.code, invalid, "{e}");
    let mut with_psk = attach;
    with_psk["psk"] = json!("key0");
    let e = t.rpc("bdev_nvme_attach_controller", with_psk).unwrap_err();
    assert_eq!(e.code, invalid);
    assert!(
        e.message.contains("psk=\"key0\" is not supported by plexd"),
        "{e}"
    );
}
