//! Hosts that connect and then misbehave: silent, half-open, stalled in the middle of a PDU,
//! or many and idle. Each is dealt with (closed in time, or costing nothing), and a
//! well-behaved host beside them sees every I/O succeed with the right data.

mod nvmf_tcp_common;
use nvme_spec::tcp::IcReq;
use nvme_spec::{Command, IntoBytes};
use nvmf_tcp_common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A host doing verified I/O on its own I/O queue.
struct Bystander {
    _admin: Client,
    io: Client,
    round: u8,
}

impl Bystander {
    fn new(port: u16) -> Bystander {
        let mut admin = Client::connect(port);
        let cntlid = admin.admin_up(false, false);
        let mut io = Client::connect(port);
        io.io_up(cntlid, 1, false, false);
        Bystander {
            _admin: admin,
            io,
            round: 0,
        }
    }

    /// Writes 8 blocks and reads them back; panics on any error or wrong byte.
    fn check(&mut self) {
        self.round = self.round.wrapping_add(1);
        let data = vec![self.round; 4096];
        let (cqe, _) = self
            .io
            .run(Command::write_blocks(1, 64, 8, false), &data, 0, true);
        assert!(
            cqe.status().is_success(),
            "bystander write: {}",
            cqe.status()
        );
        let (cqe, back) = self
            .io
            .run(Command::read_blocks(1, 64, 8), &[], 4096, false);
        assert!(
            cqe.status().is_success(),
            "bystander read: {}",
            cqe.status()
        );
        assert!(back == data, "bystander read back other data");
    }
}

/// Whether plexd has closed `s` (reads EOF or a reset).
fn closed_by_plexd(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // an ICResp or a response: not an ending
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_half_open_and_stalled_connections_are_closed_in_time_and_nobody_else_notices() {
    let t = Target::start_with(
        true,
        json!({"trtype": "TCP", "connect_timeout_ms": 300, "pdu_stall_timeout_ms": 300}),
    );
    let mut by = Bystander::new(t.port);
    by.check();

    // Connects and says nothing.
    let mut silent = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    // ICReq, then never a Connect.
    let mut half = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    half.write_all(IcReq::new(0, false, false, 0).as_bytes())
        .unwrap();
    // A connected admin queue that starts a capsule and stops 10 bytes in.
    let mut stalled = Client::connect(t.port);
    stalled.admin_up(false, false);
    let capsule = stalled.capsule_bytes(Command::keep_alive().with_cid(3), &[]);
    stalled.send(&capsule[..10]);
    // A connected admin queue that just idles: connected, nothing half-sent. It stays.
    let mut idle = Client::connect(t.port);
    idle.admin_up(false, false);

    wait_until("the silent connection closed", || {
        closed_by_plexd(&mut silent)
    });
    wait_until("the half-open connection closed", || {
        closed_by_plexd(&mut half)
    });
    wait_until("the stalled connection closed", || {
        closed_by_plexd(&mut stalled.s)
    });
    by.check();
    // Well past both timeouts, the idle but connected one is still served.
    let cid = idle.cid();
    idle.send_cmd(Command::keep_alive().with_cid(cid), &[]);
    let (cqe, _) = idle.wait(cid, &[]);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    by.check();

    // The timeouts are transport options, shown as set.
    let tr = t.rpc("nvmf_get_transports", json!({})).unwrap();
    assert_eq!(tr[0]["connect_timeout_ms"], 300, "{tr}");
    assert_eq!(tr[0]["pdu_stall_timeout_ms"], 300, "{tr}");
}

/// Sockets plexd holds for connections to `port` (its ends: local port `port`, not the
/// listener, not TIME_WAIT), from the kernel's table; other tests' sockets do not count.
fn plexd_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16) == Ok(port) && f[3] != "0A" && f[3] != "06"
        })
        .count()
}

#[test]
fn many_idle_connections_cost_nothing_once_closed() {
    let t = Target::start(true);
    let mut by = Bystander::new(t.port);
    by.check();
    let before = plexd_sockets(t.port);
    assert_eq!(before, 2, "the bystander's two");
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut c = Client::connect(t.port);
        c.admin_up(false, false);
        idle.push(c);
    }
    assert_eq!(plexd_sockets(t.port), 302);
    by.check();
    drop(idle);
    // plexd closes its ends once it sees the hosts gone.
    wait_until("plexd's sockets back to the bystander's", || {
        plexd_sockets(t.port) == before
    });
    by.check();
    let qp = t
        .rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
        .unwrap();
    assert_eq!(qp.as_array().unwrap().len(), 2, "the bystander's two: {qp}");
}
