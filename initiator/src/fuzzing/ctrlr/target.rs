//! The scripted target of the controller harness: a controller over NVMe/TCP, on its own
//! thread, that frames every answer correctly and says in it what the script tells it.
//!
//! It answers each command, in the order they arrive, by the next record of the script: one
//! byte of kind (see [`Answer`]), then the kind's bytes. Once the script is spent every
//! answer is the default one, a good controller's, so any prefix of a good conversation still
//! reaches a working controller.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvme_spec::fabrics::{PropertyGet, PropertySet};
use nvme_spec::features::fid;
use nvme_spec::identify::{cns, IdentifyController, IdentifyNamespace, LbaFormat, NamespaceList};
use nvme_spec::log::{lid, DiscoveryLogEntry, DiscoveryLogHeader};
use nvme_spec::opcode::{admin, fctype, DataDirection};
use nvme_spec::regs::{offset as reg, shutdown, Cap, Cc, Csts};
use nvme_spec::tcp::{C2HData, CapsuleResp, CommonHeader, H2CData, IcReq, IcResp, PduType, R2T};
use nvme_spec::{Command, Completion, FromBytes, FromZeros, IntoBytes, Status};

use crate::fuzzing::with_digests;

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
            if c.dead {
                return;
            }
            let Ok((ch, _)) = CommonHeader::read_from_prefix(&c.rx) else {
                return;
            };
            let plen = ch.plen() as usize;
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
                let writes =
                    DataDirection::from_opcode(cmd.opcode) == DataDirection::HostToController;
                if writes && in_capsule == 0 && wants > 0 && !cmd.is_fabrics() {
                    // A write whose data waits for an R2T: asked for all at once.
                    c.r2t = Some((cmd.cid(), wants));
                    let r2t = R2T::new(cmd.cid(), 1, 0, wants, hd);
                    c.send(&with_digests(r2t.as_bytes(), &[], hd, false));
                    return;
                }
                self.answer(i, &cmd);
            }
            t if t == PduType::H2CData as u8 => {
                let Ok((h2c, _)) = H2CData::read_from_prefix(pdu) else {
                    c.dead = true;
                    return;
                };
                let (cid, datal) = (h2c.cccid.get(), h2c.datal.get());
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
        if opcode == admin::GET_LOG_PAGE && page.lid == lid::DISCOVERY {
            let log = discovery_log();
            let from = usize::try_from(page.offset)
                .unwrap_or(usize::MAX)
                .min(log.len());
            let mut d = log[from..].to_vec();
            d.resize(data_len, 0);
            return (ok, 0, 0, Some(d));
        }
        let reads = DataDirection::from_opcode(opcode) == DataDirection::ControllerToHost;
        if reads && opcode != admin::IDENTIFY {
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
            admin::SET_FEATURES if cmd.cdw10.get() as u8 == fid::NUMBER_OF_QUEUES => {
                (ok, 0x0003_0003, 0, None)
            }
            _ => (ok, 0, 0, None),
        }
    }

    /// A controller register as Property Get reads it: a 128-entry queue, CAP.TO of 500 ms,
    /// the NVM command set; version 1.4; CSTS.RDY following CC.EN and shutdowns complete.
    fn register(&self, offset: u32) -> u64 {
        let cc = Cc(self.cc);
        match offset {
            reg::CAP => {
                Cap(0)
                    .with_mqes(127)
                    .with_cqr(true)
                    .with_to(1)
                    .with_css(1)
                    .0
            }
            reg::VS => 0x0001_0400,
            reg::CC => u64::from(self.cc),
            reg::CSTS => {
                let done = cc.shn() != shutdown::SHN_NONE;
                let shst = if done {
                    shutdown::SHST_COMPLETE
                } else {
                    shutdown::SHST_NORMAL
                };
                u64::from(Csts(0).with_rdy(cc.en()).with_shst(shst).0)
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

pub(super) const SUBNQN: &str = "nqn.2024-01.io.plexstor:fuzz-ctrlr";

/// The target on its own thread, stopped and joined when dropped.
pub(super) struct Running {
    pub(super) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Running {
    /// Listens on a loopback port and answers by `script`; `None` if the port cannot be had.
    pub(super) fn start(script: &[u8]) -> Option<Running> {
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

    /// Stops the target; returns how many commands it answered.
    pub(super) fn stop(&mut self) -> usize {
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
