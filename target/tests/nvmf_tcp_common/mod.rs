//! A plexd target in-process and a raw NVMe/TCP client for the nvmf_tcp_* tests.
#![allow(dead_code)]

use nvme_spec::cmd::{Command, Completion, SglDescriptor};
use nvme_spec::fabrics::{Connect, ConnectData, PropertyGet, PropertySet, PropertySize};
use nvme_spec::regs::{offset as reg, Cc};
use nvme_spec::tcp::{
    header_digest, CapsuleCmd, H2CData, IcReq, IcResp, ParseOptions, PduBody, PduHeader, Role,
};
use nvme_spec::{IntoBytes, Status};
use plexd::app::App;
use plexd::reactor::ReactorConfig;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const NQN: &str = "nqn.2024-01.io.plexstor:test";
pub const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const BLOCKS: u64 = 8192; // 4 MiB of 512-byte blocks
/// How long a client waits for plexd to say or do anything: far beyond any scheduling delay,
/// so running out of it means plexd hung.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);

/// How a connection ended, as the host saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// plexd closed it without a termination request.
    Closed,
    /// plexd sent a C2HTermReq with this FES, then closed it.
    TermReq(u16),
    /// Neither within the deadline: plexd hung (or waits for more from us).
    Silent,
}

/// Whether a read error means the peer closed the connection (rather than a timeout).
fn is_close(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Whether a read error is the read timeout running out.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

pub struct Target {
    pub app: Arc<App>,
    pub rt: tokio::runtime::Runtime,
    pub port: u16,
}

impl Target {
    /// plexd with two reactors, a malloc bdev exported as namespace 1 of NQN on a free port.
    pub fn start(allow_any_host: bool) -> Target {
        Target::start_with(allow_any_host, json!({"trtype": "TCP"}))
    }

    /// [`Target::start`] with `transport` as the `nvmf_create_transport` parameters.
    pub fn start_with(allow_any_host: bool, transport: Value) -> Target {
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        let app = App::start(ReactorConfig {
            cores: vec![0, 1 % ncpu],
            idle_poll_us: 100,
            pin: false,
        })
        .expect("reactors start");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Target { app, rt, port: 0 };
        t.rpc(
            "bdev_malloc_create",
            json!({"name": "Malloc0", "num_blocks": BLOCKS, "block_size": 512}),
        )
        .unwrap();
        t.rpc("nvmf_create_transport", transport).unwrap();
        t.rpc(
            "nvmf_create_subsystem",
            json!({"nqn": NQN, "allow_any_host": allow_any_host, "serial_number": "SN1"}),
        )
        .unwrap();
        t.rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}}),
        )
        .unwrap();
        let mut t = t;
        // A port the kernel just handed out; retried if someone takes it meanwhile.
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let r = t.rpc(
                "nvmf_subsystem_add_listener",
                json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                        "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
            );
            if r.is_ok() {
                t.port = port;
                return t;
            }
        }
        panic!("no free port");
    }

    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, plexd::rpc::RpcError> {
        self.rt
            .block_on(self.app.methods.call(self.app.clone(), method, params))
    }

    /// A connected admin queue and I/O queue 1 of one controller: (admin, io).
    pub fn io_queue(&self, hdgst: bool, ddgst: bool) -> (Client, Client) {
        let mut admin = Client::connect(self.port);
        let cntlid = admin.admin_up(hdgst, ddgst);
        let mut io = Client::connect(self.port);
        io.io_up(cntlid, 1, hdgst, ddgst);
        (admin, io)
    }

    /// `nvmf_get_stats`' commands refused for coming past a queue's size, over every poll group.
    pub fn commands_past_queue_size(&self) -> u64 {
        let stats = self.rpc("nvmf_get_stats", json!({})).unwrap();
        stats["poll_groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["commands_past_queue_size"].as_u64().unwrap())
            .sum()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.app.nvmf.stop_listeners();
        self.app.reactors.stop();
    }
}

/// A received PDU: its parsed header and its data.
pub struct Pdu {
    pub hdr: PduHeader,
    pub raw: Vec<u8>,
    pub data: Vec<u8>,
}

pub struct Client {
    pub s: TcpStream,
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2c: u32,
    next_cid: u16,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(READ_DEADLINE)).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            s,
            hdgst: false,
            ddgst: false,
            maxh2c: 4096,
            next_cid: 1,
        }
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn ic(&mut self, hdgst: bool, ddgst: bool) -> IcResp {
        self.send(IcReq::new(0, hdgst, ddgst, 0).as_bytes());
        let p = self.recv().expect("ICResp");
        let PduBody::IcResp(r) = p.hdr.body else {
            panic!("expected ICResp, got {:?}", p.hdr.pdu_type)
        };
        self.hdgst = r.hdgst();
        self.ddgst = r.ddgst();
        self.maxh2c = r.maxh2cdata.get();
        r
    }

    fn opts(&self) -> ParseOptions {
        let mut o = ParseOptions::new(Role::Host);
        o.hdgst = self.hdgst;
        o.ddgst = self.ddgst;
        o
    }

    /// Reads one PDU; `None` when plexd closed the connection. Panics when nothing comes
    /// within the read timeout: a hung plexd is a failure, not an ending.
    pub fn recv(&mut self) -> Option<Pdu> {
        let mut raw = vec![0u8; 8];
        match self.s.read_exact(&mut raw) {
            Ok(()) => {}
            Err(e) if is_close(&e) => return None,
            Err(e) if is_timeout(&e) => panic!("no PDU from plexd within the read timeout"),
            Err(e) => panic!("reading a PDU: {e}"),
        }
        let mut o = self.opts();
        // Termination requests never carry digests.
        if raw[0] == 0x03 || raw[0] == 0x01 {
            o.hdgst = false;
        }
        let need = PduHeader::bytes_needed(&raw, &o).expect("valid header from plexd");
        raw.resize(need, 0);
        self.s.read_exact(&mut raw[8..]).expect("header");
        let hdr = PduHeader::parse(&raw, &o).expect("parse");
        let plen = hdr.plen() as usize;
        raw.resize(plen, 0);
        self.s.read_exact(&mut raw[need..]).expect("rest of PDU");
        let data = raw[hdr.data_range()].to_vec();
        if let Some(r) = hdr.data_digest_range() {
            let d = u32::from_le_bytes(raw[r].try_into().unwrap());
            assert_eq!(d, crc32c::crc32c(&data), "data digest from plexd");
        }
        Some(Pdu { hdr, raw, data })
    }

    /// A capsule with optional in-capsule data, digests as negotiated.
    pub fn capsule_bytes(&self, cmd: Command, data: &[u8]) -> Vec<u8> {
        let c = CapsuleCmd::new(cmd, data.len() as u32, self.hdgst, self.ddgst, 0).unwrap();
        let mut b = c.as_bytes().to_vec();
        if self.hdgst {
            let d = header_digest(&b);
            b.extend_from_slice(&d.to_le_bytes());
        }
        if !data.is_empty() {
            b.extend_from_slice(data);
            if self.ddgst {
                b.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
            }
        }
        b
    }

    pub fn send_cmd(&mut self, cmd: Command, data: &[u8]) {
        let b = self.capsule_bytes(cmd, data);
        self.send(&b);
    }

    /// Waits for the response of `cid`, collecting C2H data; answers R2Ts from `wdata`.
    pub fn wait(&mut self, cid: u16, wdata: &[u8]) -> (Completion, Vec<u8>) {
        let mut rdata = Vec::new();
        loop {
            let p = self.recv().expect("response before EOF");
            match p.hdr.body {
                PduBody::CapsuleResp(r) => {
                    assert_eq!(r.cqe.cid(), cid);
                    return (r.cqe, rdata);
                }
                PduBody::C2HData(d) => {
                    assert_eq!(d.cccid.get(), cid);
                    assert_eq!(d.datao.get() as usize, rdata.len());
                    rdata.extend_from_slice(&p.data);
                    if p.hdr.success() {
                        return (Completion::success(cid, 0), rdata);
                    }
                }
                PduBody::R2T(r) => {
                    assert_eq!(r.cccid.get(), cid);
                    let (mut off, end) = (r.r2to.get(), r.r2to.get() + r.r2tl.get());
                    while off < end {
                        let n = (end - off).min(self.maxh2c);
                        let h = H2CData::new(
                            cid,
                            r.ttag.get(),
                            off,
                            n,
                            off + n == end,
                            self.hdgst,
                            self.ddgst,
                            0,
                        )
                        .unwrap();
                        let mut b = h.as_bytes().to_vec();
                        if self.hdgst {
                            let d = header_digest(&b);
                            b.extend_from_slice(&d.to_le_bytes());
                        }
                        let chunk = &wdata[off as usize..(off + n) as usize];
                        b.extend_from_slice(chunk);
                        if self.ddgst {
                            b.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
                        }
                        self.send(&b);
                        off += n;
                    }
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    /// Runs `cmd` with `wdata` in-capsule (if `in_capsule`) or by R2T; returns the CQE and
    /// any read data.
    pub fn run(
        &mut self,
        mut cmd: Command,
        wdata: &[u8],
        rlen: u32,
        in_capsule: bool,
    ) -> (Completion, Vec<u8>) {
        let cid = self.cid();
        cmd.set_cid(cid);
        if !wdata.is_empty() && in_capsule {
            cmd.set_sgl1(SglDescriptor::in_capsule(0, wdata.len() as u32));
            self.send_cmd(cmd, wdata);
        } else {
            let len = if wdata.is_empty() {
                rlen
            } else {
                wdata.len() as u32
            };
            cmd.set_sgl1(SglDescriptor::tcp_transport(len));
            self.send_cmd(cmd, &[]);
        }
        self.wait(cid, wdata)
    }

    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        host: &str,
    ) -> Completion {
        let kato = if qid == 0 { 10000 } else { 0 };
        self.fabrics_connect_kato(qid, cntlid, subnqn, host, kato)
    }

    pub fn fabrics_connect_kato(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        host: &str,
        kato: u32,
    ) -> Completion {
        let cmd = Connect {
            recfmt: 0,
            qid,
            sqsize: if qid == 0 { 32 } else { 128 },
            cattr: 0,
            kato,
        }
        .to_command(0);
        let data = ConnectData::new([9; 16], cntlid, subnqn, host).unwrap();
        self.run(cmd, data.as_bytes(), 0, true).0
    }

    /// ICReq, admin Connect, CC.EN = 1. Returns the cntlid.
    pub fn admin_up(&mut self, hdgst: bool, ddgst: bool) -> u16 {
        self.admin_up_to(NQN, hdgst, ddgst)
    }

    /// [`Client::admin_up`] to subsystem `subnqn`.
    pub fn admin_up_to(&mut self, subnqn: &str, hdgst: bool, ddgst: bool) -> u16 {
        self.ic(hdgst, ddgst);
        let c = self.fabrics_connect(0, 0xFFFF, subnqn, HOST);
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        let cntlid = c.result.get() as u16;
        let cc = PropertySet {
            size: PropertySize::Four,
            offset: reg::CC,
            value: u64::from(Cc::enable_default().0),
        };
        let cid = self.cid();
        self.send_cmd(cc.to_command(cid), &[]);
        assert!(self.wait(cid, &[]).0.status().is_success());
        let cid = self.cid();
        let g = PropertyGet {
            size: PropertySize::Four,
            offset: reg::CSTS,
        };
        self.send_cmd(g.to_command(cid), &[]);
        let (cqe, _) = self.wait(cid, &[]);
        assert_eq!(cqe.result.get() & 1, 1, "CSTS.RDY");
        cntlid
    }

    pub fn io_up(&mut self, cntlid: u16, qid: u16, hdgst: bool, ddgst: bool) {
        self.io_up_to(NQN, cntlid, qid, hdgst, ddgst)
    }

    /// [`Client::io_up`] to subsystem `subnqn`.
    pub fn io_up_to(&mut self, subnqn: &str, cntlid: u16, qid: u16, hdgst: bool, ddgst: bool) {
        self.ic(hdgst, ddgst);
        let c = self.fabrics_connect(qid, cntlid, subnqn, HOST);
        assert!(c.status().is_success(), "I/O connect: {}", c.status());
    }

    /// Expects plexd to end the connection within READ_DEADLINE: `Some(fes)` for a
    /// C2HTermReq then close, `None` for a plain close. Panics if it stays open (hung).
    pub fn expect_term(&mut self) -> Option<u16> {
        match self.ending(READ_DEADLINE) {
            Ending::Closed => None,
            Ending::TermReq(fes) => Some(fes),
            Ending::Silent => {
                panic!("plexd neither closed nor terminated within {READ_DEADLINE:?}")
            }
        }
    }

    /// Reads (skipping other PDUs) until plexd closes the connection or `within` passes.
    pub fn ending(&mut self, within: Duration) -> Ending {
        let ending = self.read_to_ending(within);
        self.s.set_read_timeout(Some(READ_DEADLINE)).unwrap();
        ending
    }

    fn read_to_ending(&mut self, within: Duration) -> Ending {
        let deadline = Instant::now() + within;
        let mut fes = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ending::Silent;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.recv_lenient() {
                Ok((0x03, raw)) => {
                    assert!(fes.is_none(), "a second C2HTermReq");
                    assert!(raw.len() >= 10, "C2HTermReq of {} bytes", raw.len());
                    fes = Some(u16::from_le_bytes([raw[8], raw[9]]));
                }
                Ok(_) => {}
                Err(e) if is_close(&e) => {
                    return fes.map_or(Ending::Closed, Ending::TermReq);
                }
                Err(e) if is_timeout(&e) => return Ending::Silent,
                Err(e) => panic!("reading from plexd: {e}"),
            }
        }
    }

    /// Reads a PDU without validating it against negotiated options: (type, raw bytes).
    fn recv_lenient(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch)?;
        let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
        let mut raw = ch.to_vec();
        raw.resize(plen.max(8), 0);
        self.s.read_exact(&mut raw[8..])?;
        Ok((ch[0], raw))
    }
}

/// Polls `cond` until it holds; panics naming `what` after a deadline far beyond any
/// scheduling delay.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn status_of(c: &Completion) -> (u8, u8) {
    let s = c.status();
    (s.sct, s.sc)
}

pub fn is(c: &Completion, s: Status) -> bool {
    c.status().same_code(s)
}
