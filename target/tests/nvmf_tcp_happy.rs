//! NVMe/TCP happy path against an in-process plexd: ICReq, admin Connect, properties,
//! Identify, I/O Connect, writes in-capsule and by R2T, 1 MiB reads, other NVM commands; with
//! and without digests. Also the RPC view of the connection and save_config.

mod nvmf_tcp_common;
use nvme_spec::cmd::{Command, DsmRange};
use nvme_spec::fabrics::{PropertyGet, PropertySize};
use nvme_spec::identify::{cns, IdentifyController, IdentifyNamespace};
use nvme_spec::regs::{offset as reg, Cap};
use nvme_spec::tcp::PduBody;
use nvme_spec::{FromBytes, IntoBytes, Status};
use nvmf_tcp_common::*;
use serde_json::json;
use std::collections::HashMap;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn happy(hdgst: bool, ddgst: bool) {
    let t = Target::start(true);
    let mut admin = Client::connect(t.port);
    let cntlid = admin.admin_up(hdgst, ddgst);
    assert_eq!(admin.hdgst, hdgst);
    assert_eq!(admin.ddgst, ddgst);

    // CAP: queue size and a sensible timeout.
    let cid = admin.cid();
    admin.send_cmd(
        PropertyGet {
            size: PropertySize::Eight,
            offset: reg::CAP,
        }
        .to_command(cid),
        &[],
    );
    let (cqe, _) = admin.wait(cid, &[]);
    let cap = Cap(cqe.result64());
    assert_eq!(cap.max_queue_entries(), 128);

    // Identify Controller and Namespace.
    let (cqe, data) = admin.run(
        Command::identify(cns::CONTROLLER, 0, 0, 0),
        &[],
        4096,
        false,
    );
    assert!(cqe.status().is_success());
    let idc = IdentifyController::read_from_bytes(&data[..]).unwrap();
    assert_eq!(idc.model(), Some("plexstor"));
    assert_eq!(idc.serial(), Some("SN1"));
    assert_eq!(idc.cntlid.get(), cntlid);
    assert_eq!(idc.subnqn_str(), Some(NQN));
    assert_eq!(idc.mdts, 8);
    let (cqe, data) = admin.run(Command::identify(cns::NAMESPACE, 1, 0, 0), &[], 4096, false);
    assert!(cqe.status().is_success());
    let idn = IdentifyNamespace::read_from_bytes(&data[..]).unwrap();
    assert_eq!(idn.nsze.get(), BLOCKS);
    assert_eq!(idn.block_size(), Some(512));

    // Number of queues, then an I/O queue on another connection.
    let (cqe, _) = admin.run(
        Command::set_features(
            nvme_spec::features::fid::NUMBER_OF_QUEUES,
            0x0003_0003,
            false,
        ),
        &[],
        0,
        false,
    );
    assert!(cqe.status().is_success());
    let mut ioq = Client::connect(t.port);
    ioq.io_up(cntlid, 1, hdgst, ddgst);

    // 4 KiB write in-capsule, read back.
    let a = pattern(4096, 1);
    let (cqe, _) = ioq.run(Command::write_blocks(1, 0, 8, false), &a, 0, true);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let (cqe, back) = ioq.run(Command::read_blocks(1, 0, 8), &[], 4096, false);
    assert!(cqe.status().is_success());
    assert_eq!(back, a);

    // 64 KiB write through R2T/H2CData, read back.
    let b = pattern(65536, 7);
    let (cqe, _) = ioq.run(Command::write_blocks(1, 100, 128, false), &b, 0, false);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let (_, back) = ioq.run(Command::read_blocks(1, 100, 128), &[], 65536, false);
    assert_eq!(back, b);

    // 1 MiB write and read (MDTS).
    let c = pattern(1 << 20, 3);
    let (cqe, _) = ioq.run(Command::write_blocks(1, 2048, 2048, false), &c, 0, false);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let (cqe, back) = ioq.run(Command::read_blocks(1, 2048, 2048), &[], 1 << 20, false);
    assert!(cqe.status().is_success());
    assert!(back == c, "1 MiB read back differs");

    // Flush, write zeroes, deallocate.
    let (cqe, _) = ioq.run(Command::flush(1), &[], 0, false);
    assert!(cqe.status().is_success());
    let (cqe, _) = ioq.run(Command::write_zeroes(1, 0, 8, false), &[], 0, false);
    assert!(cqe.status().is_success());
    let (_, back) = ioq.run(Command::read_blocks(1, 0, 8), &[], 4096, false);
    assert!(back.iter().all(|&x| x == 0));
    let ranges = [DsmRange::new(100, 64), DsmRange::new(2048, 8)];
    let (cqe, _) = ioq.run(
        Command::dataset_management(1, 2, true),
        ranges.as_bytes(),
        0,
        true,
    );
    assert!(cqe.status().is_success());
    let st = t
        .rpc("bdev_get_iostat", json!({"name": "Malloc0"}))
        .unwrap();
    assert_eq!(st["bdevs"][0]["num_unmap_ops"], 2, "{st}");

    // Many commands in flight at once on one queue: 64 reads of 4 KiB, each of a range
    // written with bytes of its own first (a seed per range, so a mix-up shows).
    let blocks: Vec<u8> = (0..64u8).flat_map(|i| pattern(4096, 100 + i)).collect();
    let (cqe, _) = ioq.run(Command::write_blocks(1, 0, 512, false), &blocks, 0, false);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let reads: Vec<(u16, u64)> = (0..64u64)
        .map(|i| {
            let cid = ioq.cid();
            let mut cmd = Command::read_blocks(1, i * 8, 8);
            cmd.set_cid(cid);
            cmd.set_sgl1(nvme_spec::SglDescriptor::tcp_transport(4096));
            ioq.send_cmd(cmd, &[]);
            (cid, i)
        })
        .collect();
    let mut data: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut completed: HashMap<u16, Status> = HashMap::new();
    while completed.len() < reads.len() {
        let p = ioq.recv().expect("a PDU before plexd closes");
        let (cid, status) = match p.hdr.body {
            PduBody::C2HData(d) => {
                let cid = d.cccid.get();
                let got = data.entry(cid).or_default();
                assert_eq!(
                    d.datao.get() as usize,
                    got.len(),
                    "C2HData offset, CID {cid}"
                );
                got.extend_from_slice(&p.data);
                if !p.hdr.success() {
                    continue;
                }
                (cid, Status::SUCCESS)
            }
            PduBody::CapsuleResp(r) => (r.cqe.cid(), r.cqe.status()),
            other => panic!("unexpected PDU {other:?}"),
        };
        assert!(
            completed.insert(cid, status).is_none(),
            "CID {cid} completed twice"
        );
    }
    for (cid, i) in reads {
        let status = completed
            .get(&cid)
            .unwrap_or_else(|| panic!("CID {cid} never completed"));
        assert!(status.is_success(), "read {i} (CID {cid}): {status}");
        let at = i as usize * 4096;
        assert!(
            data.get(&cid).map(Vec::as_slice) == Some(&blocks[at..at + 4096]),
            "read {i} (CID {cid}) returned other bytes"
        );
    }

    // RPC: one controller with one I/O queue.
    let ctrls = t
        .rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
        .unwrap();
    assert_eq!(ctrls[0]["cntlid"], cntlid);
    assert_eq!(ctrls[0]["num_io_qpairs"], 1);
    let qps = t
        .rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
        .unwrap();
    assert_eq!(qps.as_array().unwrap().len(), 2);

    // Disconnecting the admin queue tears the controller down and closes the I/O queue.
    drop(admin);
    assert_eq!(ioq.expect_term(), None, "the I/O queue just closes");
    wait_until("the controller to leave the list", || {
        let c = t
            .rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
            .unwrap();
        c.as_array().unwrap().is_empty()
    });
}

#[test]
fn happy_path_without_digests() {
    happy(false, false);
}

#[test]
fn happy_path_with_digests() {
    happy(true, true);
}

/// A host may send Connect's data by R2T rather than in the capsule (the Linux RDMA host's
/// admin Connect asks the target to read it): it arrives before there is a controller, and
/// must still be fetched and the queue connected.
#[test]
fn connect_data_fetched_from_the_host() {
    use nvme_spec::fabrics::{Connect, ConnectData};
    let t = Target::start(true);
    let mut c = Client::connect(t.port);
    c.ic(false, false);
    let cmd = Connect {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 10000,
    }
    .to_command(0);
    let data = ConnectData::new([7; 16], 0xFFFF, NQN, HOST).unwrap();
    let (cqe, _) = c.run(cmd, data.as_bytes(), 0, false);
    assert!(cqe.status().is_success(), "Connect by R2T: {cqe:?}");
    let cid = c.cid();
    c.send_cmd(
        PropertyGet {
            size: PropertySize::Eight,
            offset: reg::CAP,
        }
        .to_command(cid),
        &[],
    );
    let (cqe, _) = c.wait(cid, &[]);
    assert!(cqe.status().is_success(), "the admin queue works: {cqe:?}");
}

#[test]
fn discovery_log_lists_the_listener() {
    let t = Target::start(true);
    let mut c = Client::connect(t.port);
    c.ic(false, false);
    let cqe = c.fabrics_connect(0, 0xFFFF, nvme_spec::fabrics::DISCOVERY_NQN, HOST);
    assert!(cqe.status().is_success());
    let (cqe, log) = c.run(
        Command::get_log_page(0, 0x70, 0, false, 2048, 0),
        &[],
        2048,
        false,
    );
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let numrec = u64::from_le_bytes(log[8..16].try_into().unwrap());
    assert_eq!(numrec, 1);
    let e = &log[1024..];
    assert_eq!(e[0], 3, "TCP");
    assert_eq!(&e[256..256 + NQN.len()], NQN.as_bytes());
    assert_eq!(
        std::str::from_utf8(&e[32..64]).unwrap().trim(),
        t.port.to_string()
    );
    // The exact bytes the kernel host has always read: SPDK's space-padded TRSVCID and
    // TRADDR, NUL-padded SUBNQN, dynamic cntlid, ASQSZ 32, TREQ "not required".
    assert_eq!(&e[1..4], &[1, 2, 2]);
    assert_eq!(&e[6..10], &[0xFF, 0xFF, 32, 0]);
    let port = t.port.to_string();
    let mut trsvcid = [b' '; 32];
    trsvcid[..port.len()].copy_from_slice(port.as_bytes());
    assert_eq!(&e[32..64], &trsvcid[..]);
    let mut traddr = [b' '; 256];
    traddr[..9].copy_from_slice(b"127.0.0.1");
    assert_eq!(&e[512..768], &traddr[..]);
    assert!(e[256 + NQN.len()..512].iter().all(|&b| b == 0));
    assert!(e[768..1024].iter().all(|&b| b == 0), "TSAS: no security");
    // An I/O queue to the discovery subsystem is refused.
    let mut io = Client::connect(t.port);
    io.ic(false, false);
    let cqe = io.fabrics_connect(1, 1, nvme_spec::fabrics::DISCOVERY_NQN, HOST);
    assert!(is(&cqe, Status::CONNECT_INVALID_PARAMETERS));
    // A new subsystem bumps the generation counter.
    let gen0 = u64::from_le_bytes(log[0..8].try_into().unwrap());
    t.rpc(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.2024-01.io.plexstor:other"}),
    )
    .unwrap();
    let (_, log) = c.run(
        Command::get_log_page(0, 0x70, 0, false, 1024, 0),
        &[],
        1024,
        false,
    );
    assert!(u64::from_le_bytes(log[0..8].try_into().unwrap()) > gen0);
}

/// The log pages `nvme smart-log`, `nvme fw-log`, `nvme error-log` and an AER's changed-ns
/// read, byte for byte, so moving their encoders cannot change what the host sees.
#[test]
fn admin_log_pages_bytes() {
    let t = Target::start(true);
    let mut admin = Client::connect(t.port);
    admin.admin_up(false, false);
    let mut get = |lid: u8, len: u32, offset: u64| {
        let (cqe, data) = admin.run(
            Command::get_log_page(0xFFFF_FFFF, lid, 0, false, len, offset),
            &[],
            len,
            false,
        );
        (cqe, data)
    };
    let (cqe, smart) = get(0x02, 512, 0);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let mut want = vec![0u8; 512];
    want[1..3].copy_from_slice(&298u16.to_le_bytes());
    want[3] = 100;
    want[4] = 10;
    assert_eq!(smart, want);
    let (cqe, fw) = get(0x03, 512, 0);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let mut want = vec![0u8; 512];
    want[0] = 1;
    let rev = env!("CARGO_PKG_VERSION");
    want[8..16].fill(b' ');
    want[8..8 + rev.len()].copy_from_slice(rev.as_bytes());
    assert_eq!(fw, want);
    let (cqe, err) = get(0x01, 64, 0);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    assert_eq!(err, vec![0u8; 64]);
    // An offset inside the page returns its tail; past the end is Invalid Field.
    let (cqe, tail) = get(0x03, 8, 8);
    assert!(cqe.status().is_success());
    assert_eq!(&tail[..], &want[8..16]);
    let (cqe, _) = get(0x03, 4, 516);
    assert!(is(&cqe, Status::INVALID_FIELD));
    let (cqe, _) = get(0x70, 1024, 0);
    assert!(is(&cqe, Status::INVALID_LOG_PAGE));
    // Adding a namespace lists it in the changed-namespace list, once.
    t.rpc(
        "bdev_malloc_create",
        json!({"name": "m2", "num_blocks": 64, "block_size": 512}),
    )
    .unwrap();
    t.rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "m2", "nsid": 7}}),
    )
    .unwrap();
    let (cqe, list) = get(0x04, 4096, 0);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    assert_eq!(&list[0..8], &[7, 0, 0, 0, 0, 0, 0, 0]);
    assert!(list[8..].iter().all(|&b| b == 0));
    let (_, list) = get(0x04, 4096, 0);
    assert!(
        list.iter().all(|&b| b == 0),
        "read without RAE clears the list"
    );
}

#[test]
fn save_config_recreates_the_target() {
    let t = Target::start(false);
    t.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST}))
        .unwrap();
    let saved = t.rpc("save_config", json!({})).unwrap();
    let subs = t.rpc("nvmf_get_subsystems", json!({})).unwrap();
    let uuid = subs[1]["namespaces"][0]["uuid"].clone();
    let port = t.port;
    drop(t);
    // A fresh plexd from the saved configuration: same namespace identity, same listener.
    let app = plexd::app::App::start(plexd::reactor::ReactorConfig {
        cores: vec![0],
        idle_poll_us: 100,
        pin: false,
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(app.load_config(&saved))
        .expect("load saved config");
    let subs = rt
        .block_on(
            app.methods
                .call(app.clone(), "nvmf_get_subsystems", json!({})),
        )
        .unwrap();
    assert_eq!(subs[1]["nqn"], NQN);
    assert_eq!(subs[1]["namespaces"][0]["uuid"], uuid);
    assert_eq!(subs[1]["hosts"][0]["nqn"], HOST);
    assert_eq!(subs[1]["listen_addresses"][0]["trsvcid"], port.to_string());
    let mut c = Client::connect(port);
    c.ic(false, false);
    assert!(c
        .fabrics_connect(0, 0xFFFF, NQN, HOST)
        .status()
        .is_success());
    app.nvmf.stop_listeners();
    app.reactors.stop();
}

/// Bursts of in-capsule writes sent in one go, so many capsules sit in plexd's receive
/// window together and their data is lent from it, across several window buffers; every
/// block then reads back as written. With data digests too (checked over lent data).
fn in_capsule_write_bursts(ddgst: bool) {
    let t = Target::start(true);
    let (_admin, mut ioq) = t.io_queue(false, ddgst);
    const BURST: u64 = 96;
    for burst in 0..4u64 {
        let mut wire = Vec::new();
        let mut cids = HashMap::new();
        for i in burst * BURST..(burst + 1) * BURST {
            let cid = ioq.cid();
            let mut cmd = Command::write_blocks(1, i * 8, 8, false);
            cmd.set_cid(cid);
            cmd.set_sgl1(nvme_spec::SglDescriptor::in_capsule(0, 4096));
            wire.extend(ioq.capsule_bytes(cmd, &pattern(4096, i as u8)));
            cids.insert(cid, i);
        }
        ioq.send(&wire);
        while !cids.is_empty() {
            let p = ioq.recv().expect("a response before plexd closes");
            let PduBody::CapsuleResp(r) = p.hdr.body else {
                panic!("unexpected PDU {:?}", p.hdr.pdu_type)
            };
            let i = cids.remove(&r.cqe.cid()).expect("a CID we sent");
            assert!(r.cqe.status().is_success(), "write {i}: {}", r.cqe.status());
        }
    }
    for i in 0..4 * BURST {
        let (cqe, back) = ioq.run(Command::read_blocks(1, i * 8, 8), &[], 4096, false);
        assert!(cqe.status().is_success(), "read {i}: {}", cqe.status());
        assert!(
            back == pattern(4096, i as u8),
            "block {i} read back other bytes"
        );
    }
}

#[test]
fn in_capsule_write_bursts_land_intact() {
    in_capsule_write_bursts(false);
}

#[test]
fn in_capsule_write_bursts_land_intact_with_data_digests() {
    in_capsule_write_bursts(true);
}
