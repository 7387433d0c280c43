use super::*;
use crate::bdev::{malloc::MallocBdev, BdevRegistry};

fn setup() -> (NvmfTarget, Arc<Subsystem>, ListenAddr, Arc<TransportOpts>) {
    let t = NvmfTarget::default();
    t.create_transport(TransportOpts::default()).unwrap();
    let s = t
        .add_subsystem(
            Subsystem::new(
                "nqn.2024-01.io.plexstor:t1".into(),
                None,
                None,
                false,
                8,
                1,
                0xFFEF,
            )
            .unwrap(),
        )
        .unwrap();
    let l = ListenAddr {
        trtype: "TCP".into(),
        adrfam: "IPv4".into(),
        traddr: "127.0.0.1".into(),
        trsvcid: "4420".into(),
    };
    s.add_listener(l.clone());
    let opts = t.transport("TCP").unwrap();
    (t, s, l, opts)
}

/// The connection every test's Connect arrives on: one peer, reactor 0, no digests.
fn conn_info<'a>(l: &'a ListenAddr, opts: &'a Arc<TransportOpts>) -> ConnInfo<'a> {
    ConnInfo {
        listen: l,
        peer: "p",
        reactor: 0,
        opts,
        hdgst: false,
        ddgst: false,
    }
}

fn connect_cmd(qid: u16, sqsize: u32) -> Command {
    Connect {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato: 5000,
    }
    .to_command(1)
}

fn data(subnqn: &str, host: &str, cntlid: u16) -> Vec<u8> {
    ConnectData::new([7; 16], cntlid, subnqn, host)
        .unwrap()
        .as_bytes()
        .to_vec()
}

#[test]
fn connect_checks_subsystem_host_and_queue() {
    let (t, s, l, opts) = setup();
    let info = conn_info(&l, &opts);
    let host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
    // Unknown subsystem: invalid parameters pointing at SUBNQN in the data.
    let e = connect(
        &t,
        &info,
        &connect_cmd(0, 32),
        &data("nqn.2024-01.x:none", host, 0xFFFF),
    )
    .err()
    .unwrap();
    assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
    assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::SUBNQN));
    // Host not allowed.
    let e = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF))
        .err()
        .unwrap();
    assert!(e.0.same_code(Status::CONNECT_INVALID_HOST));
    s.add_host(host).unwrap();
    // Admin queue too deep.
    let e = connect(
        &t,
        &info,
        &connect_cmd(0, 4096),
        &data(&s.nqn, host, 0xFFFF),
    )
    .err()
    .unwrap();
    assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
    let c = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF)).unwrap();
    assert_eq!(c.qid, 0);
    let cntlid = c.ctrl.cntlid;
    // I/O queue before CC.EN: sequence error.
    let e = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid))
        .err()
        .unwrap();
    assert!(e.0.same_code(Status::COMMAND_SEQUENCE_ERROR));
    c.ctrl.property_set(&PropertySet {
        size: PropertySize::Four,
        offset: reg::CC,
        value: u64::from(Cc::enable_default().0),
    });
    let csts = c
        .ctrl
        .property_get(&PropertyGet {
            size: PropertySize::Four,
            offset: reg::CSTS,
        })
        .unwrap();
    assert_eq!(csts & 1, 1);
    let io = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid)).unwrap();
    assert_eq!(io.qid, 1);
    // Same host NQN, another host ID: not this controller's host.
    let mut other_host = data(&s.nqn, host, cntlid);
    other_host[..16].copy_from_slice(&[8; 16]);
    let e = connect(&t, &info, &connect_cmd(2, 128), &other_host)
        .err()
        .unwrap();
    assert!(e.0.same_code(Status::CONNECT_INVALID_PARAMETERS));
    assert_eq!(e.1, invalid_param(InvalidParamIn::Data, cdo::HOSTID).1);
    // Same qid twice, unknown cntlid.
    assert!(connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, host, cntlid)).is_err());
    assert!(connect(&t, &info, &connect_cmd(2, 128), &data(&s.nqn, host, 999)).is_err());
    // A second admin queue gets another cntlid.
    let c2 = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, host, 0xFFFF)).unwrap();
    assert_ne!(c2.ctrl.cntlid, cntlid);
}

/// SPDK's host leaves HOSTNQN all zero: only a subsystem allowing any host admits it, and
/// the controller's host NQN is then the empty string, as SPDK's target reports it.
#[test]
fn connect_with_an_empty_hostnqn_needs_allow_any_host() {
    let (t, s, l, opts) = setup();
    let info = conn_info(&l, &opts);
    let e = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, "", 0xFFFF))
        .err()
        .unwrap();
    assert!(e.0.same_code(Status::CONNECT_INVALID_HOST));
    s.set_allow_any_host(true);
    let c = connect(&t, &info, &connect_cmd(0, 32), &data(&s.nqn, "", 0xFFFF)).unwrap();
    assert_eq!(c.ctrl.hostnqn, "");
    // An I/O queue of that controller must carry the same (empty) host NQN.
    c.ctrl.property_set(&PropertySet {
        size: PropertySize::Four,
        offset: reg::CC,
        value: u64::from(Cc::enable_default().0),
    });
    let cntlid = c.ctrl.cntlid;
    let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
    let e = connect(
        &t,
        &info,
        &connect_cmd(1, 128),
        &data(&s.nqn, other, cntlid),
    )
    .err()
    .unwrap();
    assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::HOSTNQN));
    let io = connect(&t, &info, &connect_cmd(1, 128), &data(&s.nqn, "", cntlid)).unwrap();
    assert_eq!(io.qid, 1);
    // A HOSTNQN without its terminating NUL is still refused, pointing at the field.
    let mut bad = data(&s.nqn, "", 0xFFFF);
    bad[cdo::HOSTNQN as usize..cdo::HOSTNQN as usize + 256].fill(b'a');
    let e = connect(&t, &info, &connect_cmd(0, 32), &bad).err().unwrap();
    assert_eq!(e.1, invalid_param_dw0(InvalidParamIn::Data, cdo::HOSTNQN));
}

#[test]
fn identify_and_namespace_events() {
    let (t, s, l, opts) = setup();
    s.set_allow_any_host(true);
    let info = conn_info(&l, &opts);
    let c = connect(
        &t,
        &info,
        &connect_cmd(0, 32),
        &data(&s.nqn, "nqn.2024-01.h:1", 0xFFFF),
    )
    .unwrap()
    .ctrl;
    let mut buf = vec![0u8; 4096];
    let mut cmd = Command::identify(cns::CONTROLLER, 0, 0, 0);
    assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
    let idc = IdentifyController::read_from_bytes(&buf[..]).unwrap();
    assert_eq!(idc.model(), Some("plexstor"));
    assert_eq!(idc.firmware_rev(), Some(FIRMWARE_REVISION));
    assert_eq!(idc.mdts, 8);
    assert_eq!(idc.ioccsz.get(), (8192 + 64) / 16);
    // Enable namespace notices, then add a namespace.
    cmd = Command::set_features(fid::ASYNC_EVENT_CONFIG, features::aec::NS_ATTRIBUTE, false);
    assert_eq!(c.admin(&t, &cmd, &mut []), AdminOutcome::ok(0));
    let reg = BdevRegistry::default();
    let u = uuid::Uuid::new_v4();
    let e = reg
        .register(Arc::new(MallocBdev::new("m0".into(), 256, 512, u).unwrap()))
        .unwrap();
    assert_eq!(
        s.add_namespace(e.clone(), 0, None, None, None, None)
            .unwrap(),
        1
    );
    assert!(e.claimed_by().is_some());
    assert_eq!(c.take_event(), Some(0x0004_0002));
    assert_eq!(c.take_event(), None);
    // Namespace and its descriptors.
    cmd = Command::identify(cns::NAMESPACE, 1, 0, 0);
    assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
    let idn = IdentifyNamespace::read_from_bytes(&buf[..]).unwrap();
    assert_eq!(idn.nsze.get(), 256);
    assert_eq!(idn.block_size(), Some(512));
    assert_eq!(&idn.nguid, u.as_bytes());
    cmd = Command::identify(cns::NS_DESC_LIST, 1, 0, 0);
    assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
    let d: Vec<_> = identify::parse_ns_id_descriptors(&buf).collect();
    assert!(d.contains(&NsIdDescriptor::Uuid(*u.as_bytes())));
    cmd = Command::identify(cns::NS_DESC_LIST, 2, 0, 0);
    assert!(
        matches!(c.admin(&t, &cmd, &mut buf), AdminOutcome::Done { status, .. } if status.same_code(Status::INVALID_NAMESPACE))
    );
    // Changed namespace list, read and cleared.
    cmd = Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
    assert_eq!(c.admin(&t, &cmd, &mut buf), AdminOutcome::ok(0));
    assert_eq!(&buf[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // A resize is noticed and announced once the host has read the list.
    let _ = c.admin(
        &t,
        &Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0),
        &mut buf,
    );
    let _ = c.take_event();
    e.info().set_num_blocks(512);
    s.check_resized();
    assert_eq!(c.take_event(), Some(0x0004_0002));
    s.check_resized();
    assert_eq!(c.take_event(), None);
    let _ = c.admin(
        &t,
        &Command::get_log_page(0, lid::CHANGED_NS_LIST, 0, false, 4096, 0),
        &mut buf,
    );
    s.remove_namespace(1).unwrap();
    assert!(e.claimed_by().is_none());
    assert!(c.take_event().is_some());
    // Unknown opcode.
    assert!(
        matches!(c.admin(&t, &Command::new(0xC5), &mut buf), AdminOutcome::Done { status, .. } if status.same_code(Status::INVALID_OPCODE))
    );
}

use nvme_spec::FromBytes;
