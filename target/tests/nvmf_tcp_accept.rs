//! Accepting NVMe/TCP connections: no reactor is special. Connections are spread over every
//! reactor, and a reactor that is stuck does not keep new connections from the others.

mod nvmf_tcp_common;
use nvme_spec::tcp::IcReq;
use nvme_spec::IntoBytes;
use nvmf_tcp_common::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, Instant};

#[test]
fn connections_land_on_every_reactor() {
    let t = Target::start(true);
    let n = t.app.reactors.len();
    assert!(n >= 2, "the common target runs two reactors");
    let mut clients = Vec::new();
    for _ in 0..2 * n {
        let mut c = Client::connect(t.port);
        c.admin_up(false, false);
        clients.push(c);
    }
    let qpairs = t
        .rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
        .unwrap();
    let threads: BTreeSet<String> = qpairs
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["thread"].as_str().unwrap().to_string())
        .collect();
    let every: BTreeSet<String> = (0..n)
        .map(|i| format!("nvmf_tcp_poll_group_{i:03}"))
        .collect();
    assert_eq!(threads, every, "{qpairs}");
}

#[test]
fn a_stuck_reactor_0_does_not_hold_up_connections_to_the_others() {
    let t = Target::start(true);
    // Reactor 0 blocks until we let it go.
    let (release, stuck) = std::sync::mpsc::channel::<()>();
    let (entered, is_stuck) = std::sync::mpsc::channel::<()>();
    t.app.reactors.get(0).unwrap().send(move |_| {
        entered.send(()).unwrap();
        let _ = stuck.recv();
    });
    is_stuck.recv().unwrap();
    // Connections are handed out round-robin: of two in a row, one goes to reactor 1.
    let mut clients: Vec<Client> = (0..2).map(|_| Client::connect(t.port)).collect();
    for c in &mut clients {
        c.send(IcReq::new(0, false, false, 0).as_bytes());
        c.s.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
    }
    let mut answered = [false; 2];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answered.iter().any(|a| *a) {
        assert!(
            Instant::now() < deadline,
            "no connection was served while reactor 0 was stuck"
        );
        for (i, c) in clients.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            if let Ok(n) = c.s.read(&mut b) {
                assert!(n > 0, "plexd closed connection {i}");
                answered[i] = true;
            }
        }
    }
    assert!(
        answered.iter().filter(|a| **a).count() == 1,
        "the connection on the stuck reactor cannot have been answered"
    );
    // Once reactor 0 runs again, its connection is served too.
    release.send(()).unwrap();
    let late = answered.iter().position(|a| !a).unwrap();
    clients[late]
        .s
        .set_read_timeout(Some(READ_DEADLINE))
        .unwrap();
    let mut b = [0u8; 8];
    let n = clients[late]
        .s
        .read(&mut b)
        .expect("an ICResp once reactor 0 runs");
    assert!(n > 0, "plexd closed the connection");
}

#[test]
fn a_removed_listener_frees_its_port_at_once() {
    let t = Target::start(true);
    let addr = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                      "trsvcid": t.port.to_string()});
    t.rpc(
        "nvmf_subsystem_remove_listener",
        json!({"nqn": NQN, "listen_address": addr}),
    )
    .unwrap();
    // Closed when the call returns: nobody accepts there any more, and it can be added again.
    assert!(std::net::TcpStream::connect(("127.0.0.1", t.port)).is_err());
    t.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": addr}),
    )
    .unwrap();
    let mut c = Client::connect(t.port);
    c.admin_up(false, false);
}
