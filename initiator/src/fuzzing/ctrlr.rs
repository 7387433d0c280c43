//! Drives a whole [`Controller`] over NVMe/TCP against a target whose answers a fuzz input
//! scripts, for the fuzz target `fuzz/fuzz_targets/nvme_tcp_ctrlr.rs`. The queue harness
//! (`super`) puts raw bytes on the wire; this one speaks the protocol correctly and lies in
//! what it says: register values, Identify data, namespace lists, features granted, error
//! statuses, short data, answers given twice or never, asynchronous events, dropped
//! connections. What plexd's controller layer does with those answers (bring-up, the
//! namespace scan, I/O queue creation, keep-alive, async events, reset and reconnect,
//! shutdown) must end in an error or a working controller, never in a panic, and never lose
//! or double-complete an I/O.
//!
//! The target runs on its own thread, since bring-up waits for its answers. It answers each
//! command, in the order they arrive, by the next record of the script: one byte of kind,
//! then the kind's bytes. Once the script is spent every answer is the default one, so any
//! prefix of a good conversation still reaches a working controller.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvme_spec::fabrics::{PropertyGet, PropertySet};
use nvme_spec::identify::{cns, IdentifyController, IdentifyNamespace, LbaFormat, NamespaceList};
use nvme_spec::log::{DiscoveryLogEntry, DiscoveryLogHeader};
use nvme_spec::opcode::{admin, fctype};
use nvme_spec::regs::{offset as reg, shutdown, Cc};
use nvme_spec::tcp::{C2HData, CapsuleResp, IcReq, IcResp, PduType, R2T};
use nvme_spec::{Command, Completion, FromBytes, FromZeros, IntoBytes, Status};

use super::with_digests;
use crate::ctrlr::{Controller, CtrlrEvent, CtrlrState};
use crate::error::IoError;
use crate::opts::CtrlrOpts;
use crate::qpair::IoCompletion;
use crate::trid::TransportId;

/// The namespace every default answer describes: 2,048 blocks of 512 bytes.
const NS_BLOCKS: u64 = 2048;
/// MAXH2CDATA granted: a 64 KiB write goes out in four H2CData PDUs.
const MAXH2CDATA: u32 = 16 * 1024;
/// What one answer may move: a script cannot make the target send more than this.
const DATA_MAX: usize = 1 << 20;

/// The fuzz input after its mode byte, read as the target answers.
struct Script {
    bytes: Vec<u8>,
    at: usize,
}

impl Script {
    /// The next byte; 0 once spent (so records read past the end are default ones).
    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
}

/// How the target answers one command (the first byte of a record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// As a good controller would.
    Default,
    /// With the status of the next two bytes (the CQE's status word).
    Status,
    /// The default data with bytes patched: a count (0..=7), then (offset u16, value) each.
    Patched,
    /// The default data, with DW0 and DW1 from the next eight bytes (register values).
    Dwords,
    /// None: the target drops the connection.
    Drop,
    /// The default answer, twice.
    Twice,
    /// The default answer with only the first (next u16) bytes of its data.
    Short,
    /// None, the connection kept: the host must time out, or give the command up.
    Hold,
    /// An Asynchronous Event Request completes first, with DW0 from the next four bytes
    /// (the next to come, if none is held); then the default answer.
    Event,
}

impl Answer {
    /// The low four bits choose; the values no kind has are default answers.
    fn of(b: u8) -> Answer {
        use Answer::*;
        [
            Default, Status, Patched, Dwords, Drop, Twice, Short, Event, Hold,
        ]
        .get(usize::from(b & 15))
        .copied()
        .unwrap_or(Default)
    }
}

/// One connection the target accepted.
struct Conn {
    sock: TcpStream,
    rx: Vec<u8>,
    hdgst: bool,
    ddgst: bool,
    /// CIDs of the Asynchronous Event Requests the target holds.
    aers: Vec<u16>,
    /// A write waiting for its data after an R2T: (CID, bytes still to come).
    r2t: Option<(u16, u32)>,
    dead: bool,
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) {
        if self.dead {
            return;
        }
        // A blocking write (the host reads while it waits for answers); reads stay
        // non-blocking, so one quiet connection never holds up the others.
        let sent = self.sock.set_nonblocking(false).is_ok()
            && self.sock.write_all(bytes).is_ok()
            && self.sock.set_nonblocking(true).is_ok();
        self.dead |= !sent;
    }

    fn respond(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) {
        let mut cqe = Completion::new(cid, status);
        cqe.result.set(dw0);
        cqe.dw1.set(dw1);
        let pdu = with_digests(
            CapsuleResp::new(cqe, self.hdgst).as_bytes(),
            &[],
            self.hdgst,
            false,
        );
        self.send(&pdu);
    }

    /// Sends the data (on success) and the response; twice for [`Answer::Twice`].
    fn answer(
        &mut self,
        cid: u16,
        kind: Answer,
        status: Status,
        dw0: u32,
        dw1: u32,
        data: Option<&[u8]>,
    ) {
        for _ in 0..if kind == Answer::Twice { 2 } else { 1 } {
            if let Some(d) = data.filter(|_| status.is_success()) {
                self.c2h(cid, d);
            }
            self.respond(cid, status, dw0, dw1);
        }
    }

    fn c2h(&mut self, cid: u16, data: &[u8]) {
        // One PDU per 64 KiB, the last one flagged.
        let mut off = 0;
        while off < data.len() {
            let end = (off + 65536).min(data.len());
            let Some(h) = C2HData::new(
                cid,
                off as u32,
                (end - off) as u32,
                end == data.len(),
                false,
                self.hdgst,
                self.ddgst,
                0,
            ) else {
                return;
            };
            let pdu = with_digests(h.as_bytes(), &data[off..end], self.hdgst, self.ddgst);
            self.send(&pdu);
            off = end;
        }
    }
}

/// The target's state: its connections, the controller registers it keeps, and the script.
struct Target {
    listener: TcpListener,
    conns: Vec<Conn>,
    script: Script,
    cc: u32,
    /// Commands answered (or dropped) by a script record.
    answered: usize,
    /// An event for the next Asynchronous Event Request (DW0), none being held when it came.
    event: Option<u32>,
}

impl Target {
    /// Serves until `stop`; returns how many commands it answered.
    fn serve(mut self, stop: Arc<AtomicBool>) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        let mut idle = 0u32;
        while !stop.load(Ordering::Acquire) {
            let mut moved = false;
            if let Ok((sock, _)) = self.listener.accept() {
                if sock.set_nonblocking(true).is_err() || sock.set_nodelay(true).is_err() {
                    continue;
                }
                self.conns.push(Conn {
                    sock,
                    rx: Vec::new(),
                    hdgst: false,
                    ddgst: false,
                    aers: Vec::new(),
                    r2t: None,
                    dead: false,
                });
                moved = true;
            }
            for i in 0..self.conns.len() {
                if self.conns[i].dead {
                    continue;
                }
                match self.conns[i].sock.read(&mut buf) {
                    Ok(0) => self.conns[i].dead = true,
                    Ok(n) => {
                        moved = true;
                        self.conns[i].rx.extend_from_slice(&buf[..n]);
                        self.take_pdus(i);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => self.conns[i].dead = true,
                }
            }
            // Dropped connections close their sockets here, so the host sees them end.
            self.conns.retain(|c| !c.dead);
            // The host answers within microseconds while it runs; a short sleep once it has
            // been quiet a while keeps this thread from taking a core from it.
            idle = if moved { 0 } else { idle + 1 };
            if idle > 64 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::thread::yield_now();
            }
        }
        self.answered
    }

    /// Handles every whole PDU received on connection `i`.
    fn take_pdus(&mut self, i: usize) {
        loop {
            let c = &mut self.conns[i];
            if c.dead || c.rx.len() < 8 {
                return;
            }
            let plen = u32::from_le_bytes([c.rx[4], c.rx[5], c.rx[6], c.rx[7]]) as usize;
            if !(8..=DATA_MAX + 4096).contains(&plen) {
                c.dead = true;
                return;
            }
            if c.rx.len() < plen {
                return;
            }
            let pdu: Vec<u8> = c.rx.drain(..plen).collect();
            self.on_pdu(i, &pdu);
        }
    }

    fn on_pdu(&mut self, i: usize, pdu: &[u8]) {
        let c = &mut self.conns[i];
        // Every PDU a host sends has at least a 24-byte header (ICReq 128, capsules 72).
        if pdu.len() < 24 {
            c.dead = true;
            return;
        }
        let (pdo, hd) = (usize::from(pdu[3]), c.hdgst);
        match pdu[0] {
            t if t == PduType::IcReq as u8 => {
                let Ok((req, _)) = IcReq::read_from_prefix(pdu) else {
                    c.dead = true;
                    return;
                };
                c.hdgst = req.hdgst();
                c.ddgst = req.ddgst();
                let resp = IcResp::new(0, c.hdgst, c.ddgst, MAXH2CDATA);
                c.send(resp.as_bytes());
            }
            t if t == PduType::CapsuleCmd as u8 => {
                let Ok((cmd, _)) = Command::read_from_prefix(&pdu[8..]) else {
                    c.dead = true;
                    return;
                };
                let end = pdu.len() - if c.ddgst && pdo > 0 { 4 } else { 0 };
                let in_capsule = if pdo > 0 && pdo <= end { end - pdo } else { 0 };
                let wants = cmd.sgl1().length.get();
                if cmd.opcode & 3 == 1 && in_capsule == 0 && wants > 0 && !cmd.is_fabrics() {
                    // A write whose data waits for an R2T: asked for all at once.
                    c.r2t = Some((cmd.cid(), wants));
                    let r2t = R2T::new(cmd.cid(), 1, 0, wants, hd);
                    c.send(&with_digests(r2t.as_bytes(), &[], hd, false));
                    return;
                }
                self.answer(i, &cmd);
            }
            t if t == PduType::H2CData as u8 => {
                let cid = u16::from_le_bytes([pdu[8], pdu[9]]);
                let datal = u32::from_le_bytes([pdu[16], pdu[17], pdu[18], pdu[19]]);
                match c.r2t {
                    Some((want, left)) if want == cid && datal <= left => {
                        if datal == left {
                            c.r2t = None;
                            let mut cmd = Command::new(nvme_spec::opcode::io::WRITE);
                            cmd.set_cid(cid);
                            self.answer(i, &cmd);
                        } else {
                            c.r2t = Some((want, left - datal));
                        }
                    }
                    _ => c.dead = true,
                }
            }
            _ => c.dead = true,
        }
    }

    /// The default answer to `cmd`: status, DW0, DW1, and the data it returns.
    fn default_answer(&mut self, cmd: &Command) -> (Status, u32, u32, Option<Vec<u8>>) {
        let ok = Status::SUCCESS;
        if cmd.is_fabrics() {
            return match cmd.fctype() {
                fctype::CONNECT => (ok, 1, 0, None),
                fctype::PROPERTY_GET => {
                    let v = PropertyGet::from_command(cmd).map_or(0, |p| self.register(p.offset));
                    (ok, v as u32, (v >> 32) as u32, None)
                }
                fctype::PROPERTY_SET => {
                    if let Some(p) = PropertySet::from_command(cmd).filter(|p| p.offset == reg::CC)
                    {
                        self.cc = p.value as u32;
                    }
                    (ok, 0, 0, None)
                }
                _ => (Status::INVALID_OPCODE, 0, 0, None),
            };
        }
        let data_len = (cmd.sgl1().length.get() as usize).min(DATA_MAX);
        let opcode = cmd.opcode;
        let page = nvme_spec::cmd::GetLogPage::from_command(cmd);
        if opcode == admin::GET_LOG_PAGE && page.lid == LID_DISCOVERY {
            let log = discovery_log();
            let from = usize::try_from(page.offset)
                .unwrap_or(usize::MAX)
                .min(log.len());
            let mut d = log[from..].to_vec();
            d.resize(data_len, 0);
            return (ok, 0, 0, Some(d));
        }
        if cmd.opcode & 3 == 2 && opcode != admin::IDENTIFY {
            // Reads and log pages: a pattern the length the host asked for.
            return (ok, 0, 0, Some((0..data_len).map(|i| i as u8).collect()));
        }
        match opcode {
            admin::IDENTIFY => {
                let id = nvme_spec::cmd::Identify::from_command(cmd);
                let data = match id.cns {
                    cns::CONTROLLER => identify_controller(),
                    cns::ACTIVE_NS_LIST => {
                        NamespaceList::from_ids(id.nsid, [1]).0.as_bytes().to_vec()
                    }
                    cns::NAMESPACE if id.nsid == 1 => identify_namespace(),
                    _ => vec![0; 4096],
                };
                (ok, 0, 0, Some(data))
            }
            // Four I/O queues each way.
            admin::SET_FEATURES if cmd.cdw10.get() & 0xff == 0x07 => (ok, 0x0003_0003, 0, None),
            _ => (ok, 0, 0, None),
        }
    }

    /// A controller register as Property Get reads it: a 128-entry queue, CAP.TO of 500 ms,
    /// the NVM command set; version 1.4; CSTS.RDY following CC.EN and shutdowns complete.
    fn register(&self, offset: u32) -> u64 {
        let cc = Cc(self.cc);
        match offset {
            reg::CAP => 127 | 1 << 16 | 1 << 24 | 1 << 37,
            reg::VS => 0x0001_0400,
            reg::CC => u64::from(self.cc),
            reg::CSTS => {
                let shst = if cc.shn() != shutdown::SHN_NONE { 2 } else { 0 };
                u64::from(cc.en()) | shst << 2
            }
            _ => 0,
        }
    }

    /// Answers `cmd` on connection `i` by the script's next record.
    fn answer(&mut self, i: usize, cmd: &Command) {
        if cmd.opcode == admin::ASYNC_EVENT_REQUEST && !cmd.is_fabrics() {
            // Held until an `Event` record completes it.
            match self.event.take() {
                Some(ev) => self.conns[i].respond(cmd.cid(), Status::SUCCESS, ev, 0),
                None => self.conns[i].aers.push(cmd.cid()),
            }
            return;
        }
        let (mut status, mut dw0, mut dw1, mut data) = self.default_answer(cmd);
        self.answered += 1;
        let kind = Answer::of(self.script.byte());
        match kind {
            Answer::Default | Answer::Twice | Answer::Drop | Answer::Hold => {}
            Answer::Status => status = Status::from_word(self.script.u16()),
            Answer::Patched => {
                for _ in 0..self.script.byte() & 7 {
                    let (at, v) = (self.script.u16(), self.script.byte());
                    if let Some(d) = data.as_mut().filter(|d| !d.is_empty()) {
                        let len = d.len();
                        d[usize::from(at) % len] = v;
                    }
                }
            }
            Answer::Dwords => (dw0, dw1) = (self.script.u32(), self.script.u32()),
            Answer::Short => {
                let keep = usize::from(self.script.u16());
                if let Some(d) = data.as_mut() {
                    d.truncate(keep);
                }
            }
            Answer::Event => {
                // Held on the admin queue's connection, whichever queue this command is on.
                // If none is held yet (the host's request may be on its way), the next one
                // completes at once.
                let ev = self.script.u32();
                match self.conns.iter_mut().find(|c| !c.aers.is_empty()) {
                    Some(c) => {
                        let aer = c.aers.remove(0);
                        c.respond(aer, Status::SUCCESS, ev, 0);
                    }
                    None => self.event = Some(ev),
                }
            }
        }
        let c = &mut self.conns[i];
        match kind {
            Answer::Drop => c.dead = true,
            Answer::Hold => {}
            _ => c.answer(cmd.cid(), kind, status, dw0, dw1, data.as_deref()),
        }
    }
}

const LID_DISCOVERY: u8 = 0x70;

/// The discovery log the target serves: one NVMe/TCP subsystem, generation 1.
fn discovery_log() -> Vec<u8> {
    let mut hdr = DiscoveryLogHeader::new_zeroed();
    hdr.genctr.set(1);
    hdr.numrec.set(1);
    let entry =
        DiscoveryLogEntry::tcp(2, SUBNQN, "127.0.0.1", "4420", false, 1).expect("the strings fit");
    let mut log = hdr.as_bytes().to_vec();
    log.extend_from_slice(entry.as_bytes());
    log
}

fn identify_controller() -> Vec<u8> {
    let mut id = IdentifyController::default();
    id.set_serial("FUZZ0001");
    id.set_model("plexstor fuzz target");
    id.set_firmware_rev("1.0");
    id.set_subnqn(SUBNQN);
    // 32 pages of 4 KiB per command; 8 KiB in a capsule; keep-alive in 100 ms units.
    id.mdts = 5;
    id.cntrltype = 1;
    id.kas.set(1);
    id.aerl = 3;
    id.nn.set(1);
    id.sgls.set(1 | 1 << 20);
    id.ioccsz.set((8192 + 64) / 16);
    id.iorcsz.set(1);
    id.maxcmd.set(128);
    id.as_bytes().to_vec()
}

fn identify_namespace() -> Vec<u8> {
    let mut ns = IdentifyNamespace::default();
    ns.nsze.set(NS_BLOCKS);
    ns.ncap.set(NS_BLOCKS);
    ns.nuse.set(NS_BLOCKS);
    ns.lbaf[0] = LbaFormat::new(512);
    ns.as_bytes().to_vec()
}

const SUBNQN: &str = "nqn.2024-01.io.plexstor:fuzz-ctrlr";

/// The target on its own thread, stopped and joined when dropped.
struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Running {
    fn start(script: &[u8]) -> Option<Running> {
        let listener = TcpListener::bind("127.0.0.1:0").ok()?;
        listener.set_nonblocking(true).ok()?;
        let addr = listener.local_addr().ok()?;
        let target = Target {
            listener,
            conns: Vec::new(),
            script: Script {
                bytes: script.to_vec(),
                at: 0,
            },
            cc: 0,
            answered: 0,
            event: None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || target.serve(s));
        Some(Running {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Running {
    /// Stops the target; returns how many commands it answered.
    fn stop(&mut self) -> usize {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(n)) => n,
            // A panic in the target is the harness's own bug: it must not hide.
            Some(Err(_)) if !std::thread::panicking() => panic!("the fake target panicked"),
            _ => 0,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the host did in one run, for the tests to check.
#[derive(Debug, Default)]
struct Outcome {
    connected: bool,
    namespaces: usize,
    /// The I/O that came back, by tag, with whether it succeeded.
    io: Vec<(u64, bool)>,
    /// The controller was back up after the reset.
    reconnected: bool,
    /// What the controller reported to its owner, in order.
    events: Vec<CtrlrEvent>,
    /// Commands the target answered, shutdown included.
    answered: usize,
    /// Entries of the discovery log read (discovery mode), if it was read.
    discovered: Option<usize>,
}

/// The I/O the run submits: (tag, write?, blocks).
fn io_plan(size: u8) -> [(u64, bool, u32); 2] {
    let blocks = [1, 8, 128, 256][usize::from(size & 3)];
    [(1, false, blocks), (2, true, blocks)]
}

/// Polls `ctrlr` and `qpair` for `at_least`, then until both I/O are back or `limit` passes.
fn drive(
    ctrlr: &mut Controller,
    qpair: &mut crate::qpair::IoQpair<Vec<u8>>,
    back: &mut Vec<IoCompletion<Vec<u8>>>,
    at_least: Duration,
    limit: Duration,
) {
    let start = Instant::now();
    while (back.len() < 2 || start.elapsed() < at_least) && start.elapsed() < limit {
        ctrlr.poll();
        if qpair.poll(|c| back.push(c)) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    // What the admin queue received meanwhile (an event the target sent before the I/O's
    // answers, say) is handled before the run goes on.
    for _ in 0..16 {
        if !ctrlr.poll() {
            break;
        }
    }
}

/// Fuzz entry. The first byte: bits 0 and 1 ask for header and data digests; bit 2 turns on
/// keep-alive (KATO 10 ms, so a few go out while the I/O runs); bit 3 opens an I/O queue
/// and submits a read and a write on the first namespace (bits 4 and 5: 1, 8, 128 or 256 blocks); bit 6 resets the
/// controller afterwards, so bring-up runs again on a new connection; bit 7 connects to the
/// discovery NQN instead and reads the discovery log (the rest then has no effect). The rest
/// is the target's script (see [`Answer`]).
pub fn run(input: &[u8]) {
    let _ = run_inner(input, FUZZ_PATIENCE);
}

/// How long the host waits for an answer the target holds back (connect, admin command, I/O)
/// when fuzzing: far longer than loopback needs, short enough to keep the fuzzer fast.
const FUZZ_PATIENCE: Duration = Duration::from_millis(50);

/// One run; `patience` bounds each wait for the target (see [`FUZZ_PATIENCE`]).
fn run_inner(input: &[u8], patience: Duration) -> Outcome {
    let mut out = Outcome::default();
    let Some((&mode, script)) = input.split_first() else {
        return out;
    };
    let Some(mut target) = Running::start(script) else {
        return out;
    };
    let keep_alive = if mode & 4 != 0 {
        Duration::from_millis(10)
    } else {
        Duration::ZERO
    };
    let opts = CtrlrOpts {
        hdgst: mode & 1 != 0,
        ddgst: mode & 2 != 0,
        keep_alive_timeout: keep_alive,
        admin_queue_size: 8,
        io_queue_size: 8,
        connect_timeout: patience,
        // Reached only when the target holds an answer back and keeps the connection.
        admin_timeout: patience,
        io_timeout: None,
        reconnect_delay: Duration::ZERO,
        ctrlr_loss_timeout: Some(Duration::ZERO),
        ..CtrlrOpts::default()
    };
    let subnqn = if mode & 128 != 0 {
        nvme_spec::fabrics::DISCOVERY_NQN
    } else {
        SUBNQN
    };
    let trid = TransportId::tcp(target.addr, subnqn);
    let Ok(mut ctrlr) = Controller::connect(&trid, &opts) else {
        return out;
    };
    if trid.is_discovery() {
        out.connected = true;
        out.discovered = crate::discovery::get_log(&mut ctrlr)
            .map(|l| l.entries.len())
            .ok();
        drop(ctrlr);
        out.answered = target.stop();
        return out;
    }
    out.connected = true;
    out.namespaces = ctrlr.namespaces().len();
    check_namespaces(&ctrlr);
    let first = ctrlr.namespaces().first().cloned();
    if let (true, Some(ns)) = (mode & 8 != 0, first) {
        if let Ok(mut qpair) = ctrlr.alloc_io_qpair::<Vec<u8>>(None) {
            let mut back = Vec::new();
            for (tag, write, blocks) in io_plan(mode >> 4) {
                let blocks = blocks.min(u32::try_from(ns.blocks).unwrap_or(u32::MAX));
                let buf = vec![tag as u8; blocks as usize * ns.block_size as usize];
                let r = if write {
                    qpair.write(ns.nsid, 0, blocks, buf, tag)
                } else {
                    qpair.read(ns.nsid, 0, blocks, buf, tag)
                };
                if r.is_err() {
                    // Refused at submit (larger than MDTS, say): back at once, failed.
                    back.push(IoCompletion {
                        tag,
                        result: Err(IoError::Nvme(Status::INVALID_FIELD)),
                        dw0: 0,
                        buf: None,
                    });
                }
            }
            // Long enough for keep-alives to go out (every KATO / 2).
            let at_least = keep_alive * 2;
            drive(&mut ctrlr, &mut qpair, &mut back, at_least, patience * 2);
            qpair.abort_all(|c| back.push(c));
            let mut tags: Vec<u64> = back.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            assert_eq!(tags, [1, 2], "every I/O comes back exactly once");
            out.io = back.iter().map(|c| (c.tag, c.result.is_ok())).collect();
            out.io.sort_unstable();
        }
    }
    if mode & 64 != 0 && ctrlr.state() == CtrlrState::Connected {
        ctrlr.reset();
        let until = Instant::now() + patience * 2;
        while ctrlr.state() != CtrlrState::Connected
            && ctrlr.state() != CtrlrState::Failed
            && Instant::now() < until
        {
            ctrlr.poll();
        }
        out.reconnected = ctrlr.state() == CtrlrState::Connected;
        check_namespaces(&ctrlr);
    }
    while let Some(e) = ctrlr.next_event() {
        out.events.push(e);
    }
    // Shuts down through CC.SHN, answered by the script too.
    drop(ctrlr);
    out.answered = target.stop();
    out
}

/// What the owner relies on of a namespace list, whatever the target said.
fn check_namespaces(c: &Controller) {
    let ns = c.namespaces();
    assert!(
        ns.windows(2).all(|w| w[0].nsid < w[1].nsid),
        "namespaces in ascending order, each once"
    );
    for n in ns {
        assert!(n.nsid != 0 && n.blocks > 0, "{n:?}");
        assert!((512..=1 << 16).contains(&n.block_size), "{n:?}");
    }
    let info = c.info();
    assert!(
        info.max_queue_entries >= 2 && info.io_queues >= 1,
        "{info:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answers of a bring-up, in order: Connect, Property Get CAP, VS and CC, Property
    /// Set CC.EN, Property Get CSTS, Identify Controller, Set Features (async event
    /// configuration), the active namespace list, Identify Namespace 1, Set Features (number
    /// of queues). The Asynchronous Event Request is held, and answered by no record.
    const BRING_UP: usize = 11;
    const IO_CONNECT: usize = BRING_UP;
    const READ: usize = BRING_UP + 1;
    const WRITE: usize = BRING_UP + 2;

    /// Mode bits: an I/O queue, with 8- or 128-block I/O; a reset after.
    const IO_8: u8 = 8 | 1 << 4;
    const IO_128: u8 = 8 | 2 << 4;
    const RESET: u8 = 64;
    const DISCOVERY: u8 = 128;

    /// A script answering `at` commands by default, then with `record`.
    fn at(n: usize, record: &[u8]) -> Vec<u8> {
        let mut s = vec![0; n];
        s.extend_from_slice(record);
        s
    }

    fn run_with(mode: u8, script: &[u8]) -> Outcome {
        let mut input = vec![mode];
        input.extend_from_slice(script);
        run_inner(&input, PATIENCE)
    }

    /// Nothing a test waits for is held back, except in `held` below: a loaded machine must
    /// not turn a slow answer into a different outcome.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// As `run_with`, where the target holds an answer back: the host waits `patience`.
    fn held(mode: u8, script: &[u8], patience: Duration) -> Outcome {
        let mut input = vec![mode];
        input.extend_from_slice(script);
        run_inner(&input, patience)
    }

    #[test]
    fn default_answers_bring_the_controller_up_and_run_io_with_every_option() {
        for mode in [IO_8, IO_128 | RESET, IO_8 | 3, IO_128 | 3 | RESET, IO_8 | 4] {
            let o = run_with(mode, &[]);
            assert!(o.connected, "mode {mode:#x}: {o:?}");
            assert_eq!(o.namespaces, 1, "mode {mode:#x}");
            assert_eq!(o.io, [(1, true), (2, true)], "mode {mode:#x}");
            assert_eq!(o.reconnected, mode & RESET != 0, "mode {mode:#x}");
        }
    }

    #[test]
    fn a_refused_connect_or_a_failed_identify_fails_bring_up() {
        let refused = [1, 0x02, 0x00];
        assert!(!run_with(IO_8, &refused).connected);
        assert!(!run_with(IO_8, &at(6, &refused)).connected);
    }

    #[test]
    fn a_dropped_admin_connection_fails_bring_up_and_the_reset_reconnects() {
        assert!(!run_with(0, &at(3, &[4])).connected);
        // The reset's Connect finds the target gone from the old connection, not the new.
        let o = run_with(IO_8 | RESET, &at(WRITE + 1, &[]));
        assert!(o.reconnected, "{o:?}");
    }

    #[test]
    fn io_failed_by_the_target_comes_back_failed() {
        let o = run_with(IO_8, &at(READ, &[1, 0x04, 0x00]));
        assert_eq!(o.io, [(1, false), (2, true)], "{o:?}");
    }

    #[test]
    fn an_answer_given_twice_or_never_loses_no_io() {
        for record in [&[5u8][..], &[4]] {
            for i in [READ, WRITE] {
                let o = run_with(IO_8, &at(i, record));
                assert_eq!(o.io.len(), 2, "{record:?} at {i}: {o:?}");
            }
            // The I/O queue's Connect: the queue is refused, or works.
            let o = run_with(IO_8, &at(IO_CONNECT, record));
            assert!(o.io.is_empty() || o.io.len() == 2, "{o:?}");
        }
        // Held while the connection stays: the queue gives it up when its owner tears down.
        let o = held(IO_8, &at(READ, &[8]), Duration::from_millis(200));
        assert_eq!(o.io, [(1, false), (2, true)], "{o:?}");
        // A write carried by R2T and H2CData, answered twice.
        let o = run_with(IO_128, &at(WRITE, &[5]));
        assert_eq!(o.io.len(), 2, "{o:?}");
    }

    #[test]
    fn a_namespace_change_event_is_read_and_rescanned() {
        // The event: type 2 (notice), info 0 (namespace attribute changed), log page 4.
        let event = [7, 0x02, 0x00, 0x04, 0x00];
        let quiet = run_with(IO_8, &[]);
        let o = run_with(IO_8, &at(READ, &event));
        assert_eq!(o.io, [(1, true), (2, true)], "{o:?}");
        // The Changed Namespace List log page, the namespace list and Identify Namespace 1:
        // the same namespace, so no change is reported.
        assert_eq!(o.answered, quiet.answered + 3, "{o:?}");
        assert!(o.events.is_empty(), "{o:?}");
        // Another event is passed on to the owner as it came, after its log page is read.
        let smart = [7, 0x01, 0x00, 0x02, 0x00];
        let o = run_with(IO_8, &at(READ, &smart));
        assert_eq!(o.answered, quiet.answered + 1, "{o:?}");
        let aen = CtrlrEvent::Aen {
            ty: 1,
            info: 0,
            log_page: 2,
        };
        assert_eq!(o.events, [aen], "{o:?}");
    }

    #[test]
    fn the_discovery_log_is_read_whole_or_refused() {
        let quiet = run_with(DISCOVERY, &[]);
        assert_eq!(quiet.discovered, Some(1));
        // Discovery bring-up: Connect, CAP, VS, CC, CC.EN, CSTS, Identify; then the log's
        // header, its entry, the header again. A header claiming 5,000 records is refused.
        let numrec = [2, 2, 8, 0, 0x88, 9, 0, 0x13];
        assert_eq!(run_with(DISCOVERY, &at(7, &numrec)).discovered, None);
        // An unknown record format is refused.
        assert_eq!(
            run_with(DISCOVERY, &at(7, &[2, 1, 16, 0, 1])).discovered,
            None
        );
        // A generation that moves between the reads: read again, then the same log.
        let o = run_with(DISCOVERY, &at(9, &[2, 1, 0, 0, 2]));
        assert_eq!(o.discovered, Some(1), "{o:?}");
        assert_eq!(o.answered, quiet.answered + 3, "the log read twice: {o:?}");
    }

    #[test]
    fn odd_register_values_and_identify_data_end_in_errors_not_panics() {
        // CAP.MQES 0; CAP all ones; CSTS.CFS.
        for (i, dw) in [(1, [0u8; 8]), (1, [0xff; 8]), (5, [2, 0, 0, 0, 0, 0, 0, 0])] {
            let mut rec = vec![3];
            rec.extend_from_slice(&dw);
            run_with(IO_8, &at(i, &rec));
        }
        // MDTS 1 (a 4 KiB transfer at most): the 64 KiB I/O is refused at submit.
        let o = run_with(IO_128, &at(6, &[2, 1, 77, 0, 1]));
        assert!(o.connected);
        assert_eq!(o.io, [(1, false), (2, false)], "{o:?}");
        // A namespace of block size 2^0 (LBADS 0) is skipped.
        let o = run_with(IO_8, &at(9, &[2, 1, 130, 0, 0]));
        assert!(o.connected);
        assert_eq!(o.namespaces, 0, "{o:?}");
    }
}
