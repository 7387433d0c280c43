//! Hosts that connect and then misbehave: silent, half-open, stalled in the middle of a PDU,
//! or many and idle. Each is dealt with (closed in time, or costing nothing), and a
//! well-behaved host beside them sees every I/O succeed with the right data.

mod nvmf_tcp_common;
use nvme_spec::tcp::IcReq;
use nvme_spec::{Command, IntoBytes, Status};
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
    fn new(t: &Target) -> Bystander {
        let (_admin, io) = t.io_queue(false, false);
        Bystander {
            _admin,
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
    let mut by = Bystander::new(&t);
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
    let mut by = Bystander::new(&t);
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

/// The next PDU within `within`: (type, raw bytes), or None if nothing came.
fn next_pdu(c: &mut Client, within: Duration) -> Option<(u8, Vec<u8>)> {
    c.s.set_read_timeout(Some(within)).unwrap();
    let mut ch = [0u8; 8];
    match c.s.read_exact(&mut ch) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
        Err(e) => panic!("reading from plexd: {e}"),
    }
    let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
    let mut raw = ch.to_vec();
    raw.resize(plen, 0);
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.s.read_exact(&mut raw[8..]).unwrap();
    Some((ch[0], raw))
}

const R2T: u8 = 0x09;
const CAPSULE_RESP: u8 = 0x05;

/// Counts R2Ts and responses (with their status code type and code) until nothing more comes
/// for `quiet`.
fn collect(c: &mut Client, quiet: Duration) -> (usize, Vec<(u8, u8)>) {
    let (mut r2ts, mut resps) = (0, Vec::new());
    while let Some((t, raw)) = next_pdu(c, quiet) {
        match t {
            R2T => r2ts += 1,
            CAPSULE_RESP => {
                let sf = u16::from_le_bytes([raw[8 + 14], raw[8 + 15]]) >> 1;
                resps.push((((sf >> 8) & 7) as u8, (sf & 0xff) as u8));
            }
            other => panic!("unexpected PDU type {other:#x}"),
        }
    }
    (r2ts, resps)
}

#[test]
fn a_host_that_never_answers_its_r2ts_holds_only_its_share_and_only_for_a_while() {
    // A data budget of 16 × 128 KiB = 2 MiB, and R2Ts answered within 500 ms.
    let t = Target::start_with(
        true,
        json!({"trtype": "TCP", "num_shared_buffers": 16, "io_unit_size": 131072,
               "data_timeout_ms": 500}),
    );
    let (_greedy_admin, mut greedy) = t.io_queue(false, false);
    // 24 writes of 128 KiB by R2T, none ever answered.
    for k in 0..24u64 {
        let mut cmd = Command::write_blocks(1, k * 256, 256, false).with_cid(100 + k as u16);
        cmd.set_sgl1(nvme_spec::cmd::SglDescriptor::tcp_transport(128 << 10));
        greedy.send_cmd(cmd, &[]);
    }
    // Alone, it may hold the whole budget: 16 R2Ts; the other 8 commands wait, in order.
    let (r2ts, resps) = collect(&mut greedy, Duration::from_millis(200));
    assert_eq!((r2ts, resps.len()), (16, 0), "{resps:?}");

    // Meanwhile a neighbour's verified I/O goes on (its reads take buffers too).
    let mut by = Bystander::new(&t);
    for _ in 0..5 {
        by.check();
    }

    // Past the data timeout, the unanswered writes fail with a transport error and give their
    // buffers back; the waiting 8 then get their R2Ts, and fail the same way in turn.
    let mut r2ts = 0;
    let mut resps = Vec::new();
    let t0 = std::time::Instant::now();
    while resps.len() < 24 && t0.elapsed() < Duration::from_secs(30) {
        let (r, s) = collect(&mut greedy, Duration::from_millis(100));
        r2ts += r;
        resps.extend(s);
    }
    assert_eq!(r2ts, 8, "the waiting commands' R2Ts");
    let transient = (
        Status::TRANSIENT_TRANSPORT_ERROR.sct,
        Status::TRANSIENT_TRANSPORT_ERROR.sc,
    );
    assert_eq!(resps.len(), 24, "{resps:?}");
    assert!(resps.iter().all(|r| *r == transient), "{resps:?}");
    by.check();
}

#[test]
fn a_host_that_never_reads_its_data_is_cut_off_and_nobody_else_notices() {
    let t = Target::start_with(true, json!({"trtype": "TCP", "data_timeout_ms": 500}));
    let mut by = Bystander::new(&t);
    let (_deaf_admin, mut deaf) = t.io_queue(false, false);
    let qpairs = || {
        t.rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(qpairs(), 4);
    // 12 MiB of reads it never takes: more than the socket buffers hold (a send buffer grows
    // to tcp_wmem's 4 MiB, and 4 MiB sometimes fitted whole), so plexd's sends stop.
    for k in 0..96u64 {
        let mut cmd = Command::read_blocks(1, k % 32 * 256, 256).with_cid(200 + k as u16);
        cmd.set_sgl1(nvme_spec::cmd::SglDescriptor::tcp_transport(128 << 10));
        deaf.send_cmd(cmd, &[]);
    }
    by.check();
    // Past the data timeout its I/O queue is closed; its admin queue and the bystander stay.
    wait_until("the deaf host's I/O queue closed", || qpairs() == 3);
    by.check();
    assert!(
        matches!(deaf.ending(Duration::from_secs(10)), Ending::Closed),
        "closed without a termination request"
    );
}

/// A host that streams commands and reads none of the answers. Past its queue's slots each
/// command is refused, and every answer waits in plexd for the host to take it; if plexd went
/// on reading, the host would fill its memory at the rate it can send. Instead plexd stops
/// reading while that many answers wait, so TCP's flow control stops the host: the host can
/// get no more than socket buffers' worth of commands in. Once it reads, every command is
/// answered (served, or refused with Command Sequence Error, as `nvmf_get_stats` counts),
/// and the queue works on.
#[test]
fn a_host_that_sends_and_never_reads_is_held_back_by_tcp_not_by_plexd_memory() {
    use nvme_spec::cmd::SglDescriptor;
    use nvme_spec::tcp::PduBody;
    // Far above what the two sockets' buffers hold (tcp_rmem and tcp_wmem allow some MiB).
    const LIMIT: usize = 64 << 20;
    let t = Target::start(true);
    let (_admin, mut io) = t.io_queue(false, false);
    let chunk: Vec<u8> = (0..1024u16)
        .flat_map(|cid| {
            let mut cmd = Command::read_blocks(1, u64::from(cid % 64), 1).with_cid(cid);
            cmd.set_sgl1(SglDescriptor::tcp_transport(512));
            io.capsule_bytes(cmd, &[])
        })
        .collect();
    let capsule = chunk.len() / 1024;

    // Send until nothing more goes for 2 s.
    io.s.set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut sent, mut pos) = (0usize, 0usize);
    loop {
        match io.s.write(&chunk[pos..]) {
            Ok(n) => {
                sent += n;
                pos = (pos + n) % chunk.len();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("sending: {e}"),
        }
        assert!(
            sent < LIMIT,
            "plexd took {} MiB of commands from a host that reads none of its answers",
            sent >> 20
        );
    }
    // The last capsule may have gone in part: the rest goes once the host reads.
    let rest = chunk[pos..pos + (capsule - pos % capsule) % capsule].to_vec();
    let mut tail = io.s.try_clone().unwrap();
    tail.set_write_timeout(None).unwrap();
    let writer = std::thread::spawn(move || tail.write_all(&rest).unwrap());
    let commands = sent.div_ceil(capsule);

    let (mut served, mut refused) = (0usize, 0usize);
    while served + refused < commands {
        let p = io.recv().expect("plexd closed the connection");
        match p.hdr.body {
            PduBody::C2HData(_) if p.hdr.success() => served += 1,
            PduBody::C2HData(_) => continue,
            PduBody::CapsuleResp(r) => {
                let s = r.cqe.status();
                assert!(
                    s.same_code(Status::COMMAND_SEQUENCE_ERROR) && s.dnr,
                    "cid {}: {s}",
                    r.cqe.cid()
                );
                refused += 1;
            }
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(
        t.commands_past_queue_size(),
        refused as u64,
        "{commands} commands, {served} served"
    );
    assert!(
        refused > 0 && served > 0,
        "{served} served, {refused} refused"
    );

    // The queue works on.
    let data = vec![0x6Bu8; 512];
    let (cqe, _) = io.run(Command::write_blocks(1, 9, 1, false), &data, 0, true);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let (_, back) = io.run(Command::read_blocks(1, 9, 1), &[], 512, false);
    assert_eq!(back, data);
}
