//! rdma-check: proves the bindings against a real RDMA device (soft-RoCE in the test guest).
//!
//! One process plays both ends of a connection on ADDR, the way NVMe/RDMA uses them:
//! connect and accept carrying NVMe/RDMA private data, a capsule by SEND into a posted
//! receive, host memory read by RDMA READ and written by RDMA WRITE, the response by SEND,
//! a completion channel waking a sleeping poller, a bad remote key failing only its work,
//! a rejected connect carrying its reason, and disconnects seen by both ends.
//!
//! Usage: rdma-check ADDR [PORT]. Prints one TAP line per step ("ok - …" / "not ok - …").
//!
//! rdma-check --connect-with HEX ADDR PORT: a probe for targets. Connects to ADDR:PORT with
//! HEX as the connect request's private data and prints what came back: "rejected: STATUS
//! private data HEX", "established: private data HEX" or "failed: EVENT". Exits 0 once it has
//! an answer.
//!
//! rdma-check --bad-transfer MODE ADDR PORT: connects an admin queue and sends a Fabrics
//! Connect whose data the target must RDMA READ, named by a keyed SGL that is wrong in one way:
//! MODE `bad-key` (a key the host never registered), `out-of-range` (runs 512 bytes past the
//! host's registration), or `disconnect` (valid, but the host disconnects right after sending).
//! Prints "closed by the target: EVENT", "answered: STATUS" or "disconnected".
//!
//! rdma-check --overrun EXTRA ADDR PORT SUBNQN: a host with EXTRA more commands in flight
//! than its I/O queue holds (see `overrun.rs`). Prints "ok: …" or what went wrong.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::verbs::CompletedOp;
use rdma::{
    Access, CmEvent, CmEventKind, CmId, CompletionChannel, CompletionQueue, ConnParam,
    EventChannel, MemoryRegion, ProtectionDomain, QueueCaps, SendOp, WorkCompletion,
};

const STEPS: &[&str] = &[
    "rdma-core libraries load",
    "listen on the device's address",
    "client resolves address and route",
    "connect request carries the host's private data",
    "accept carries the target's private data; both ends established",
    "capsule by SEND lands in the posted receive",
    "an armed completion channel wakes the idle poller",
    "RDMA READ fetches the host's data intact",
    "RDMA WRITE then SEND: the host sees data before the response",
    "a bad remote key fails that work only, with an error status",
    "work after the error is flushed, not lost",
    "disconnect reaches both ends",
    "a rejected connect carries the target's reason",
    "a connect to a port with no listener fails cleanly",
];

const DATA_LEN: usize = 256 * 1024;
const CAPSULE_LEN: usize = 64;
const WAIT: Duration = Duration::from_secs(10);

type Step<T> = Result<T, String>;

mod overrun;

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let probe = args.peek().cloned();
    if probe.as_deref() == Some("--overrun") {
        let rest: Vec<String> = args.skip(1).collect();
        let parsed = match &rest[..] {
            [extra, ip, port, nqn] => extra
                .parse::<usize>()
                .ok()
                .zip(ip.parse::<IpAddr>().ok())
                .zip(port.parse::<u16>().ok())
                .map(|((extra, ip), port)| (extra, SocketAddr::new(ip, port), nqn.clone())),
            _ => None,
        };
        let Some((extra, addr, nqn)) = parsed else {
            eprintln!("usage: rdma-check --overrun EXTRA ADDR PORT SUBNQN");
            std::process::exit(2);
        };
        print_answer(overrun::overrun(extra, addr, &nqn));
        return;
    }
    if matches!(probe.as_deref(), Some("--connect-with" | "--bad-transfer")) {
        let transfer = probe.as_deref() == Some("--bad-transfer");
        let probe: Vec<String> = args.skip(1).collect();
        let parsed = match &probe[..] {
            [arg, ip, port] => {
                let data = if transfer {
                    Some(Vec::new())
                } else {
                    unhex(arg)
                };
                match (data, ip.parse::<IpAddr>(), port.parse::<u16>()) {
                    (Some(data), Ok(ip), Ok(port)) => {
                        Some((arg.clone(), data, SocketAddr::new(ip, port)))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((hex, data, addr)) = parsed else {
            eprintln!(
                "usage: rdma-check --connect-with HEX ADDR PORT | --bad-transfer MODE ADDR PORT"
            );
            std::process::exit(2);
        };
        print_answer(if data.is_empty() {
            bad_transfer(&hex, addr)
        } else {
            connect_with(addr, &data)
        });
        return;
    }
    let Some(ip) = args.next().and_then(|a| a.parse::<IpAddr>().ok()) else {
        eprintln!("usage: rdma-check ADDR [PORT]  (ADDR: an RDMA device's IP address)");
        std::process::exit(2);
    };
    let port = args
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4791 + 100);
    let mut done = 0;
    let result = run(SocketAddr::new(ip, port), &mut done);
    if let Err(why) = &result {
        println!("not ok - {}: {why}", STEPS[done]);
        for step in &STEPS[done + 1..] {
            println!("not ok - {step}: not reached");
        }
    }
    std::process::exit(i32::from(result.is_err()));
}

/// Prints a probe's answer, or its error and exits 1.
fn print_answer(answer: Step<String>) {
    match answer {
        Ok(answer) => println!("{answer}"),
        Err(why) => {
            println!("error: {why}");
            std::process::exit(1);
        }
    }
}

/// Runs the steps in order, printing each that passes; stops at the first failure.
fn run(addr: SocketAddr, done: &mut usize) -> Step<()> {
    let mut pass = || {
        println!("ok - {}", STEPS[*done]);
        *done += 1;
    };

    rdma::available().map_err(|e| e.to_string())?;
    pass();

    let server_events = EventChannel::new().map_err(|e| e.to_string())?;
    let client_events = EventChannel::new().map_err(|e| e.to_string())?;
    let listener = CmId::listen(&server_events, addr, 16).map_err(|e| e.to_string())?;
    if listener.local_addr() != Some(addr) {
        return Err(format!("bound to {:?}, not {addr}", listener.local_addr()));
    }
    pass();

    let mut client = resolved_on(&client_events, addr)?;
    pass();

    // The host: a queue pair, a receive for the response, then connect.
    let queues_of = queues(&mut client, None)?;
    let mut host = End::new(&client, queues_of)?;
    host.post_recv()?;
    let request = nvme_cm_request(1, 32, 31);
    client
        .connect(ConnParam {
            private_data: &request,
            // The target reads the host's memory; the host reads none of the target's.
            responder_resources: 16,
            initiator_depth: 0,
            retry_count: 7,
            rnr_retry_count: 7,
        })
        .map_err(|e| e.to_string())?;
    let connect = expect(&server_events, CmEventKind::ConnectRequest)?;
    if connect.private_data.get(..request.len()) != Some(&request[..]) {
        return Err(format!("private data {:02x?}", connect.private_data));
    }
    // Seen from the target: how many RDMA READs the host lets it have outstanding.
    let reads_allowed = connect.initiator_depth;
    let mut conn = connect
        .request
        .ok_or("a connect request without an identifier")?;
    pass();

    // The target: its queues on a completion channel, a receive for the capsule, accept.
    let device = conn.device().ok_or("the request has no device")?;
    let channel = CompletionChannel::new(&device).map_err(|e| e.to_string())?;
    let queues_of = queues(&mut conn, Some(&channel))?;
    let mut target = End::new(&conn, queues_of)?;
    target.post_recv()?;
    target.cq.arm().map_err(|e| e.to_string())?;
    let accept = nvme_cm_accept(32);
    conn.accept(ConnParam {
        private_data: &accept,
        initiator_depth: reads_allowed.min(16),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    // The host first: librdmacm sends the handshake's last message (RTU) while the host
    // reads the response, and only then is the target's end established.
    let established = expect(&client_events, CmEventKind::Established)?;
    expect(&server_events, CmEventKind::Established)?;
    if established.private_data.get(..accept.len()) != Some(&accept[..]) {
        return Err(format!(
            "accept's private data {:02x?}",
            established.private_data
        ));
    }
    pass();

    // The host's data and where it wants the answer, named in a capsule.
    for (i, b) in host.data_mut().iter_mut().enumerate() {
        *b = (i * 7 + i / 4096) as u8;
    }
    let mut capsule = [0u8; CAPSULE_LEN];
    capsule[0..8].copy_from_slice(&host.data.addr().to_le_bytes());
    capsule[8..12].copy_from_slice(&host.data.rkey().to_le_bytes());
    host.send_capsule(&capsule)?;
    let sent = host.wait_one()?;
    ok_op(&sent, CompletedOp::Send)?;
    let received = wait_until(|| target.poll_one())?;
    ok_op(&received, CompletedOp::Recv)?;
    if received.byte_len() as usize != CAPSULE_LEN || target.recv_bytes()[..CAPSULE_LEN] != capsule
    {
        return Err(format!(
            "received {} bytes, not the capsule",
            received.byte_len()
        ));
    }
    pass();

    // The completion arrived while the queue was armed: the channel must have fired.
    if !readable(channel.fd(), Duration::from_secs(2)) {
        return Err("the completion channel's descriptor never became readable".into());
    }
    let notified = channel.drain().map_err(|e| e.to_string())?;
    if notified == 0 {
        return Err("readable, but no notification to take".into());
    }
    pass();

    let remote_addr = u64::from_le_bytes(target.recv_bytes()[0..8].try_into().unwrap());
    let rkey = u32::from_le_bytes(target.recv_bytes()[8..12].try_into().unwrap());
    target.rdma(1, SendOp::RdmaRead { remote_addr, rkey })?;
    ok_op(&target.wait_one()?, CompletedOp::RdmaRead)?;
    if target.data() != host.data() {
        return Err("the data read differs from the host's".into());
    }
    pass();

    // Answer: transform the data, write it back over the host's, then SEND the response.
    for b in target.data_mut().iter_mut() {
        *b ^= 0x5a;
    }
    let expected: Vec<u8> = target.data().to_vec();
    host.post_recv()?;
    target.rdma(2, SendOp::RdmaWrite { remote_addr, rkey })?;
    ok_op(&target.wait_one()?, CompletedOp::RdmaWrite)?;
    target.send_capsule(&[0xc5; 16])?;
    ok_op(&target.wait_one()?, CompletedOp::Send)?;
    let response = host.wait_one()?;
    ok_op(&response, CompletedOp::Recv)?;
    if host.data() != &expected[..] {
        return Err("the host's memory does not hold what was written".into());
    }
    pass();

    target.rdma(
        3,
        SendOp::RdmaRead {
            remote_addr,
            rkey: rkey ^ 0x00ff_ff00,
        },
    )?;
    let failed = target.wait_one()?;
    match failed.result() {
        Ok(()) => return Err("an RDMA READ with a forged key succeeded".into()),
        Err(e) if e.is_flush() => return Err(format!("expected an access error, got {e}")),
        Err(e) => eprintln!("# bad key: {e}"),
    }
    pass();

    target.rdma(4, SendOp::RdmaRead { remote_addr, rkey })?;
    let flushed = target.wait_one()?;
    match flushed.result() {
        Err(e) if e.is_flush() && flushed.wr_id() == 4 => {}
        other => return Err(format!("work after the error: {other:?}")),
    }
    pass();

    conn.disconnect().map_err(|e| e.to_string())?;
    // The host answers the target's disconnect request; only that answer (or a timeout)
    // ends the target's side.
    expect(&client_events, CmEventKind::Disconnected)?;
    client.disconnect().map_err(|e| e.to_string())?;
    expect(&server_events, CmEventKind::Disconnected)?;
    drop(target);
    drop(host);
    drop(conn);
    drop(client);
    pass();

    // A host whose private data the target refuses: the reason reaches the host.
    let mut refused = resolved_on(&client_events, addr)?;
    let queues_of = queues(&mut refused, None)?;
    let refused_host = End::new(&refused, queues_of)?;
    let mut bad_request = nvme_cm_request(0, 32, 31);
    bad_request[0] = 1; // an unknown record format
    refused
        .connect(ConnParam {
            private_data: &bad_request,
            initiator_depth: 1,
            retry_count: 7,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    let request = expect(&server_events, CmEventKind::ConnectRequest)?;
    let reason = [0u8, 0, 2, 0]; // recfmt 0, status 2: invalid record format
    request
        .request
        .as_ref()
        .ok_or("no identifier")?
        .reject(&reason)
        .map_err(|e| e.to_string())?;
    let rejected = expect(&client_events, CmEventKind::Rejected)?;
    if rejected.private_data.get(..reason.len()) != Some(&reason[..]) {
        return Err(format!(
            "reject private data {:02x?}",
            rejected.private_data
        ));
    }
    drop(refused_host);
    drop(request);
    drop(refused);
    pass();

    let nobody = SocketAddr::new(addr.ip(), addr.port() + 1);
    let mut lonely = resolved_on(&client_events, nobody)?;
    let queues_of = queues(&mut lonely, None)?;
    let lonely_host = End::new(&lonely, queues_of)?;
    lonely
        .connect(ConnParam {
            private_data: &request_bytes(),
            initiator_depth: 1,
            retry_count: 7,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    let event = next(&client_events)?;
    match event.kind {
        CmEventKind::Rejected | CmEventKind::Unreachable | CmEventKind::ConnectError => {
            eprintln!(
                "# no listener: {} (status {})",
                event.kind.name(),
                event.status
            )
        }
        other => return Err(format!("expected a failure, got {}", other.name())),
    }
    drop(lonely_host);
    drop(lonely);
    pass();
    drop(listener);
    Ok(())
}

/// A host identifier whose address and route to `addr` are resolved, on its own channel.
fn resolved(addr: SocketAddr) -> Step<(Arc<EventChannel>, CmId)> {
    rdma::available().map_err(|e| e.to_string())?;
    let events = EventChannel::new().map_err(|e| e.to_string())?;
    let id = resolved_on(&events, addr)?;
    Ok((events, id))
}

/// A host identifier on `events` whose address and route to `addr` are resolved.
fn resolved_on(events: &Arc<EventChannel>, addr: SocketAddr) -> Step<CmId> {
    let id = CmId::new(events).map_err(|e| e.to_string())?;
    id.resolve_addr(addr, 2000).map_err(|e| e.to_string())?;
    expect(events, CmEventKind::AddrResolved)?;
    id.resolve_route(2000).map_err(|e| e.to_string())?;
    expect(events, CmEventKind::RouteResolved)?;
    Ok(id)
}

/// Connects with `private_data` and reports how the peer answered.
fn connect_with(addr: SocketAddr, private_data: &[u8]) -> Step<String> {
    let (events, mut id) = resolved(addr)?;
    let queues_of = queues(&mut id, None)?;
    let end = End::new(&id, queues_of)?;
    id.connect(ConnParam {
        private_data,
        responder_resources: 16,
        retry_count: 7,
        rnr_retry_count: 7,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let event = next(&events)?;
    let hex: String = event
        .private_data
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let answer = match event.kind {
        CmEventKind::Rejected => format!("rejected: status {} private data {hex}", event.status),
        CmEventKind::Established => {
            let _ = id.disconnect();
            format!("established: private data {hex}")
        }
        other => format!("failed: {} (status {})", other.name(), event.status),
    };
    drop(end);
    Ok(answer)
}

/// Sends a Fabrics Connect whose data is named wrongly (see the module's usage) and reports
/// what the target did.
fn bad_transfer(mode: &str, addr: SocketAddr) -> Step<String> {
    let (events, mut id) = resolved(addr)?;
    let queues_of = queues(&mut id, None)?;
    let mut host = End::new(&id, queues_of)?;
    host.post_recv()?;
    id.connect(ConnParam {
        private_data: &nvme_cm_request(0, 32, 31),
        responder_resources: 16,
        retry_count: 7,
        rnr_retry_count: 7,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    expect(&events, CmEventKind::Established)?;
    let (base, key) = (host.data.addr(), host.data.rkey());
    let (sgl_addr, sgl_key) = match mode {
        "bad-key" => (base, key ^ 0x00ff_ff00),
        "out-of-range" => (base + DATA_LEN as u64 - 512, key),
        "disconnect" => (base, key),
        other => return Err(format!("unknown mode {other:?}")),
    };
    // Fabrics Connect (opcode 7Fh, FCTYPE 01h) for the admin queue, its 1 KiB of data named
    // by a keyed SGL data block (type 4, subtype 0).
    let mut capsule = [0u8; CAPSULE_LEN];
    capsule[0] = 0x7f;
    capsule[2..4].copy_from_slice(&1u16.to_le_bytes());
    capsule[4] = 0x01;
    capsule[24..32].copy_from_slice(&sgl_addr.to_le_bytes());
    capsule[32..35].copy_from_slice(&1024u32.to_le_bytes()[..3]);
    capsule[35..39].copy_from_slice(&sgl_key.to_le_bytes());
    capsule[39] = 0x40;
    capsule[44..46].copy_from_slice(&31u16.to_le_bytes());
    host.send_capsule(&capsule)?;
    if mode == "disconnect" {
        id.disconnect().map_err(|e| e.to_string())?;
        return Ok("disconnected".into());
    }
    // Either the target answers the capsule (a receive completes) or it ends the connection.
    let outcome = wait_until(|| {
        while let Some(wc) = host.poll_one()? {
            if wc.op() == CompletedOp::Recv && wc.result().is_ok() {
                let status = u16::from_le_bytes([host.recv_bytes()[14], host.recv_bytes()[15]]);
                return Ok(Some(format!("answered: status {:#x}", status >> 1)));
            }
        }
        match events.next_event().map_err(|e| e.to_string())? {
            Some(ev) => Ok(Some(format!("closed by the target: {}", ev.kind.name()))),
            None => Ok(None),
        }
    })?;
    drop(host);
    Ok(outcome)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn request_bytes() -> [u8; 32] {
    nvme_cm_request(1, 32, 31)
}

/// NVMe/RDMA's connect request private data: RECFMT 0, QID, HRQSIZE, HSQSIZE, CNTLID.
fn nvme_cm_request(qid: u16, hrqsize: u16, hsqsize: u16) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[2..4].copy_from_slice(&qid.to_le_bytes());
    b[4..6].copy_from_slice(&hrqsize.to_le_bytes());
    b[6..8].copy_from_slice(&hsqsize.to_le_bytes());
    b[8..10].copy_from_slice(&0xffffu16.to_le_bytes());
    b
}

/// NVMe/RDMA's accept private data: RECFMT 0, CRQSIZE.
fn nvme_cm_accept(crqsize: u16) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[2..4].copy_from_slice(&crqsize.to_le_bytes());
    b
}

/// One end of the connection: its queue pair's identifier, its completion queue (for both
/// directions) and its registered memory.
struct End<'a> {
    id: &'a CmId,
    cq: Arc<CompletionQueue>,
    data: MemoryRegion,
    recv: MemoryRegion,
    send: MemoryRegion,
    /// The memory the regions name, freed after them (fields drop in order).
    memory: Vec<Box<[u8]>>,
}

/// Gives `id` its queue pair, one completion queue for both directions.
fn queues(
    id: &mut CmId,
    channel: Option<&Arc<CompletionChannel>>,
) -> Step<(Arc<ProtectionDomain>, Arc<CompletionQueue>)> {
    let device = id.device().ok_or("the identifier has no device")?;
    let pd = ProtectionDomain::new(&device).map_err(|e| e.to_string())?;
    let cq = CompletionQueue::new(&device, 64, channel).map_err(|e| e.to_string())?;
    let caps = QueueCaps {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    id.create_qp(&pd, &cq, &cq, None, caps)
        .map_err(|e| e.to_string())?;
    Ok((pd, cq))
}

impl<'a> End<'a> {
    fn new(id: &'a CmId, (pd, cq): (Arc<ProtectionDomain>, Arc<CompletionQueue>)) -> Step<Self> {
        let mut memory: Vec<Box<[u8]>> = vec![
            vec![0; DATA_LEN].into(),
            vec![0; 4096].into(),
            vec![0; 4096].into(),
        ];
        let access = Access::LOCAL_WRITE
            .union(Access::REMOTE_READ)
            .union(Access::REMOTE_WRITE);
        let mut register = |i: usize, access| {
            let mem = &mut memory[i];
            // SAFETY: the boxes live in `memory`, which is dropped after the regions, and are
            // touched only between completions (see the methods below).
            unsafe { MemoryRegion::register(&pd, mem.as_mut_ptr(), mem.len(), access) }
                .map_err(|e| e.to_string())
        };
        let data = register(0, access)?;
        let recv = register(1, Access::LOCAL_WRITE)?;
        let send = register(2, Access::LOCAL_WRITE)?;
        Ok(Self {
            id,
            cq,
            data,
            recv,
            send,
            memory,
        })
    }

    /// The data region's bytes; read only while no work names the region.
    fn data(&self) -> &[u8] {
        &self.memory[0]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.memory[0]
    }

    fn recv_bytes(&self) -> &[u8] {
        &self.memory[1]
    }

    fn post_recv(&self) -> Step<()> {
        let sge = self.recv.sge(0, 4096).ok_or("receive buffer")?;
        // SAFETY: the receive buffer is read only after this receive completes.
        unsafe { self.id.post_recv(0, sge) }.map_err(|e| e.to_string())
    }

    fn send_capsule(&mut self, bytes: &[u8]) -> Step<()> {
        // Written before the send is posted, and not again until its completion is polled.
        self.memory[2][..bytes.len()].copy_from_slice(bytes);
        let sge = self.send.sge(0, bytes.len() as u32).ok_or("send buffer")?;
        // SAFETY: as above.
        unsafe { self.id.post_send(0, SendOp::Send, &[sge], true) }.map_err(|e| e.to_string())
    }

    fn rdma(&self, wr_id: u64, op: SendOp) -> Step<()> {
        let sge = self.data.sge(0, DATA_LEN as u32).ok_or("data buffer")?;
        // SAFETY: the data buffer is touched again only after this work completes.
        unsafe { self.id.post_send(wr_id, op, &[sge], true) }.map_err(|e| e.to_string())
    }

    fn poll_one(&self) -> Step<Option<WorkCompletion>> {
        let mut wc = [WorkCompletion::default()];
        let n = self.cq.poll(&mut wc).map_err(|e| e.to_string())?;
        Ok((n == 1).then_some(wc[0]))
    }

    fn wait_one(&self) -> Step<WorkCompletion> {
        wait_until(|| self.poll_one())
    }
}

fn wait_until<T>(f: impl FnMut() -> Step<Option<T>>) -> Step<T> {
    wait_within(WAIT, f)
}

/// Calls `f` until it has something, for at most `limit`.
fn wait_within<T>(limit: Duration, mut f: impl FnMut() -> Step<Option<T>>) -> Step<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("nothing within {limit:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn next(channel: &Arc<EventChannel>) -> Step<CmEvent> {
    wait_until(|| channel.next_event().map_err(|e| e.to_string()))
}

fn expect(channel: &Arc<EventChannel>, kind: CmEventKind) -> Step<CmEvent> {
    let event = next(channel)?;
    if event.kind != kind {
        return Err(format!(
            "expected {}, got {} (status {})",
            kind.name(),
            event.kind.name(),
            event.status
        ));
    }
    Ok(event)
}

fn ok_op(wc: &WorkCompletion, op: CompletedOp) -> Step<()> {
    wc.result().map_err(|e| e.to_string())?;
    if wc.op() != op {
        return Err(format!("completed {:?}, expected {op:?}", wc.op()));
    }
    Ok(())
}

fn readable(fd: i32, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, within.as_millis() as i32) == 1 }
}
