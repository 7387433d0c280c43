//! The parts of a scripted NVMe/TCP controller that the fake targets of these tests share:
//! the ICReq/ICResp exchange, reading the host's PDUs, the Fabrics commands (Connect, Property
//! Get and Set, with a controller that becomes ready as soon as CC.EN is set) and Identify's
//! data for one namespace of `NBLOCKS` 512-byte blocks. Each test file keeps what its fake does
//! differently: how it answers reads and writes, and how it misbehaves.

// Each test file is its own crate and uses only some of this.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

use nvme_spec::fabrics::{Connect, PropertyGet, PropertySet};
use nvme_spec::identify::IdentifyController;
use nvme_spec::tcp::{CapsuleResp, IcResp, ParseOptions, PduBody, PduHeader, Role};
use nvme_spec::{Command, Completion, FromZeros, IntoBytes, Status};

pub const BS: usize = 512;
pub const NBLOCKS: u64 = 4096;
/// The most data one H2CData PDU may carry (the ICResp's MAXH2CDATA).
pub const MAXH2C: u32 = 8192;
/// In-capsule writes up to 4 KiB; larger ones need R2T.
pub const IOCCSZ: u32 = (64 + 4096) / 16;

/// One connection, controller side, after the ICReq/ICResp exchange.
pub struct Conn {
    pub s: TcpStream,
    /// Header and data digests in force on this connection.
    pub hd: bool,
    pub dd: bool,
    /// The controller's CC register, as the host set it.
    pub cc: u32,
    /// The queue the host connected this connection to.
    pub qid: u16,
}

/// Reads the host's ICReq from `s` and answers it. A digest is in force only when the host
/// asked for it and `grant_hdgst` / `grant_ddgst` allow it. Returns the connection (for
/// writing), a second handle for reading, and the options to parse the host's PDUs with.
pub fn accept_icreq(
    s: TcpStream,
    grant_hdgst: bool,
    grant_ddgst: bool,
) -> std::io::Result<(Conn, TcpStream, ParseOptions)> {
    s.set_nodelay(true)?;
    let mut rd = s.try_clone()?;
    let mut icreq = [0u8; 128];
    rd.read_exact(&mut icreq)?;
    let h = PduHeader::parse(&icreq, &ParseOptions::new(Role::Controller)).expect("valid ICReq");
    let PduBody::IcReq(req) = h.body else {
        panic!("expected ICReq")
    };
    let mut c = Conn {
        s,
        hd: req.hdgst() && grant_hdgst,
        dd: req.ddgst() && grant_ddgst,
        cc: 0,
        qid: 0,
    };
    let ic = IcResp::new(0, c.hd, c.dd, MAXH2C);
    c.s.write_all(ic.as_bytes())?;
    let opts = ParseOptions {
        hdgst: c.hd,
        ddgst: c.dd,
        ..ParseOptions::new(Role::Controller)
    };
    Ok((c, rd, opts))
}

/// The host's next PDU, whole (common header, PDU header, digests, data), not yet parsed.
pub fn read_pdu(rd: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut ch = [0u8; 8];
    rd.read_exact(&mut ch)?;
    let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
    assert!((8..=1 << 20).contains(&plen), "host sent PLEN {plen}");
    let mut pdu = vec![0u8; plen];
    pdu[..8].copy_from_slice(&ch);
    rd.read_exact(&mut pdu[8..])?;
    Ok(pdu)
}

impl Conn {
    /// Sends a PDU header (+ data) with the digests in force; `bad_hdgst` / `bad_ddgst` send a
    /// wrong one instead.
    pub fn send_with(
        &mut self,
        hdr: &[u8],
        data: Option<&[u8]>,
        bad_hdgst: bool,
        bad_ddgst: bool,
    ) -> std::io::Result<()> {
        let mut b = hdr.to_vec();
        if self.hd {
            let d = crc32c::crc32c(hdr) ^ u32::from(bad_hdgst);
            b.extend_from_slice(&d.to_le_bytes());
        }
        if let Some(data) = data {
            b.extend_from_slice(data);
            if self.dd {
                let d = crc32c::crc32c(data) ^ u32::from(bad_ddgst);
                b.extend_from_slice(&d.to_le_bytes());
            }
        }
        self.s.write_all(&b)
    }

    /// Sends a PDU header (+ data) with the digests in force.
    pub fn send(&mut self, hdr: &[u8], data: Option<&[u8]>) -> std::io::Result<()> {
        self.send_with(hdr, data, false, false)
    }

    /// A CapsuleResp for `cid` on this connection's queue.
    pub fn resp(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) -> std::io::Result<()> {
        let mut cqe = Completion::new(cid, status);
        cqe.result.set(dw0);
        cqe.dw1.set(dw1);
        cqe.sqid.set(self.qid);
        let r = CapsuleResp::new(cqe, self.hd);
        self.send(r.as_bytes(), None)
    }

    /// Answers a Fabrics command: Connect (its data must be in-capsule; `on_connect` sees it
    /// before the answer, to count or check it), Property Get and Set; any other is refused.
    pub fn fabrics(
        &mut self,
        cmd: &Command,
        data: &[u8],
        on_connect: impl FnOnce(&Connect),
    ) -> std::io::Result<()> {
        let cid = cmd.cid();
        if let Some(con) = Connect::from_command(cmd) {
            assert_eq!(data.len(), 1024, "Connect data in-capsule");
            on_connect(&con);
            self.qid = con.qid;
            self.resp(cid, Status::SUCCESS, 1, 0)
        } else if let Some(pg) = PropertyGet::from_command(cmd) {
            let v: u64 = match pg.offset {
                // CAP: MQES 127, CQR, TO 1 (500 ms)
                0x00 => 127 | (1 << 16) | (1 << 24),
                // VS 1.4
                0x08 => 0x0001_0400,
                0x14 => u64::from(self.cc),
                // CSTS: ready as soon as enabled, shutdown complete as soon as asked for.
                0x1c => {
                    let rdy = self.cc & 1;
                    let shst = if (self.cc >> 14) & 3 != 0 { 2 << 2 } else { 0 };
                    u64::from(rdy | shst)
                }
                _ => 0,
            };
            self.resp(cid, Status::SUCCESS, v as u32, (v >> 32) as u32)
        } else if let Some(ps) = PropertySet::from_command(cmd) {
            if ps.offset == 0x14 {
                self.cc = ps.value as u32;
            }
            self.resp(cid, Status::SUCCESS, 0, 0)
        } else {
            self.resp(cid, Status::INVALID_OPCODE, 0, 0)
        }
    }
}

/// Identify's 4 KiB of data for CNS `cns` (0: the namespace, 1: the controller, 2: the active
/// namespace list), or None for a CNS the fake does not know.
pub fn identify_data(cns: u8, model: &str, serial: &str) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 4096];
    match cns {
        1 => {
            let mut id = IdentifyController::new_zeroed();
            id.set_model(model);
            id.set_serial(serial);
            id.mdts = 5; // 128 KiB
            id.kas.set(1);
            id.sgls.set(1);
            id.ioccsz.set(IOCCSZ);
            id.iorcsz.set(1);
            id.nn.set(1);
            b.copy_from_slice(id.as_bytes());
        }
        2 => b[..4].copy_from_slice(&1u32.to_le_bytes()),
        0 => {
            b[..8].copy_from_slice(&NBLOCKS.to_le_bytes());
            b[8..16].copy_from_slice(&NBLOCKS.to_le_bytes());
            b[128 + 2] = 9; // LBAF0: 512-byte blocks
        }
        _ => return None,
    }
    Some(b)
}
