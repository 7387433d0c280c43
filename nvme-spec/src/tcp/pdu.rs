//! The PDUs themselves: their headers as they are on the wire, and how each is built.

use super::*;

/// ICReq: the first PDU a host sends on a connection.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IcReq {
    /// Common header (type 0, hlen 128, plen 128).
    pub ch: CommonHeader,
    /// PDU format version; 0.
    pub pfv: U16,
    /// Host PDU data alignment for C2H data PDUs (0's based dwords, 0..=31).
    pub hpda: u8,
    /// Requested digests ([`digest_flags`]).
    pub dgst: u8,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: U32,
    /// Reserved.
    pub rsvd: [u8; 112],
}
wire_struct!(IcReq, 128);

impl IcReq {
    /// An ICReq asking for the given digests.
    pub fn new(hpda: u8, hdgst: bool, ddgst: bool, maxr2t: u32) -> Self {
        let mut r = Self::new_zeroed();
        r.ch = CommonHeader::new(PduType::IcReq, 0, 0, 128);
        r.hpda = hpda;
        r.dgst = dgst_byte(hdgst, ddgst);
        r.maxr2t.set(maxr2t);
        r
    }

    /// True if the host asks for header digests.
    pub fn hdgst(&self) -> bool {
        self.dgst & digest_flags::HDGST_ENABLE != 0
    }

    /// True if the host asks for data digests.
    pub fn ddgst(&self) -> bool {
        self.dgst & digest_flags::DDGST_ENABLE != 0
    }
}

/// ICResp: the controller's answer to ICReq.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IcResp {
    /// Common header (type 1, hlen 128, plen 128).
    pub ch: CommonHeader,
    /// PDU format version; 0.
    pub pfv: U16,
    /// Controller PDU data alignment for H2C data PDUs (0's based dwords, 0..=31).
    pub cpda: u8,
    /// Enabled digests ([`digest_flags`]).
    pub dgst: u8,
    /// Maximum data bytes per H2CData PDU (a multiple of 4, at least 4096).
    pub maxh2cdata: U32,
    /// Reserved.
    pub rsvd: [u8; 112],
}
wire_struct!(IcResp, 128);

impl IcResp {
    /// An ICResp enabling the given digests.
    pub fn new(cpda: u8, hdgst: bool, ddgst: bool, maxh2cdata: u32) -> Self {
        let mut r = Self::new_zeroed();
        r.ch = CommonHeader::new(PduType::IcResp, 0, 0, 128);
        r.cpda = cpda;
        r.dgst = dgst_byte(hdgst, ddgst);
        r.maxh2cdata.set(maxh2cdata);
        r
    }

    /// True if header digests are enabled.
    pub fn hdgst(&self) -> bool {
        self.dgst & digest_flags::HDGST_ENABLE != 0
    }

    /// True if data digests are enabled.
    pub fn ddgst(&self) -> bool {
        self.dgst & digest_flags::DDGST_ENABLE != 0
    }
}

fn dgst_byte(hdgst: bool, ddgst: bool) -> u8 {
    (if hdgst { digest_flags::HDGST_ENABLE } else { 0 })
        | (if ddgst { digest_flags::DDGST_ENABLE } else { 0 })
}

/// H2CTermReq / C2HTermReq header. The PDU data that follows (at most 128
/// bytes) is a copy of the header of the PDU that caused the error.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct TermReq {
    /// Common header (type 2 or 3, hlen 24).
    pub ch: CommonHeader,
    /// Fatal Error Status ([`fes`]).
    pub fes: U16,
    /// Fatal Error Information: for invalid header field and unsupported
    /// parameter, the byte offset of the offending field; else reserved.
    pub fei: U32,
    /// Reserved.
    pub rsvd: [u8; 10],
}
wire_struct!(TermReq, 24);

impl TermReq {
    /// A termination request header. `t` must be H2CTermReq or C2HTermReq;
    /// `data_len` is how many bytes of the offending header follow (clamped to 128).
    pub fn new(t: PduType, fes: u16, fei: u32, data_len: usize) -> Self {
        let mut r = Self::new_zeroed();
        let dl = data_len.min(TERM_REQ_MAX_DATA) as u32;
        r.ch = CommonHeader::new(t, 0, 0, 24 + dl);
        r.fes.set(fes);
        r.fei.set(fei);
        r
    }

    /// Writes a whole termination request PDU into `out`: the header for
    /// `err`, followed by up to 128 bytes of `offending` (the received header
    /// bytes). `sender` is the side sending the termination request. Returns
    /// the PDU length, or `None` if `err` has no FES (a truncated read is not
    /// a protocol error) or `out` is shorter than 24 bytes.
    pub fn encode(out: &mut [u8], sender: Role, err: &PduError, offending: &[u8]) -> Option<usize> {
        let fes = err.fes()?;
        let t = match sender {
            Role::Controller => PduType::C2HTermReq,
            Role::Host => PduType::H2CTermReq,
        };
        let room = out.len().checked_sub(24)?;
        let dl = offending.len().min(TERM_REQ_MAX_DATA).min(room);
        let hdr = TermReq::new(t, fes, err.fei(), dl);
        out.get_mut(..24)?.copy_from_slice(hdr.as_bytes());
        out.get_mut(24..24 + dl)?
            .copy_from_slice(offending.get(..dl)?);
        Some(24 + dl)
    }
}

/// CapsuleCmd header: common header and the 64-byte SQE. In-capsule data, if
/// any, starts at PDO.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CapsuleCmd {
    /// Common header (type 4, hlen 72).
    pub ch: CommonHeader,
    /// The submission queue entry.
    pub cmd: Command,
}
wire_struct!(CapsuleCmd, 72);

impl CapsuleCmd {
    /// A capsule header for `cmd` with `data_len` bytes of in-capsule data.
    /// `cpda` is the controller's PDA from ICResp. `None` on PLEN overflow.
    pub fn new(cmd: Command, data_len: u32, hdgst: bool, ddgst: bool, cpda: u8) -> Option<Self> {
        let t = PduType::CapsuleCmd;
        let l = PduLayout::compute(t, data_len, hdgst, ddgst, cpda)?;
        Some(CapsuleCmd {
            ch: CommonHeader::new(
                t,
                PduLayout::digest_flags(t, data_len > 0, hdgst, ddgst),
                l.pdo,
                l.plen,
            ),
            cmd,
        })
    }
}

/// CapsuleResp: common header and the 16-byte CQE. Never carries data.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CapsuleResp {
    /// Common header (type 5, hlen 24).
    pub ch: CommonHeader,
    /// The completion queue entry.
    pub cqe: Completion,
}
wire_struct!(CapsuleResp, 24);

impl CapsuleResp {
    /// A response capsule for `cqe`.
    pub fn new(cqe: Completion, hdgst: bool) -> Self {
        let t = PduType::CapsuleResp;
        let plen = 24 + if hdgst { 4 } else { 0 };
        CapsuleResp {
            ch: CommonHeader::new(t, PduLayout::digest_flags(t, false, hdgst, false), 0, plen),
            cqe,
        }
    }
}

/// H2CData header: write data sent by the host in answer to an R2T.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct H2CData {
    /// Common header (type 6, hlen 24).
    pub ch: CommonHeader,
    /// Command capsule CID this data belongs to.
    pub cccid: U16,
    /// Transfer tag copied from the R2T.
    pub ttag: U16,
    /// Offset of this data within the command's data buffer.
    pub datao: U32,
    /// Number of data bytes in this PDU.
    pub datal: U32,
    /// Reserved.
    pub rsvd: [u8; 4],
}
wire_struct!(H2CData, 24);

impl H2CData {
    /// An H2CData header; `cpda` is the controller's PDA. `None` on PLEN overflow.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cccid: u16,
        ttag: u16,
        datao: u32,
        datal: u32,
        last: bool,
        hdgst: bool,
        ddgst: bool,
        cpda: u8,
    ) -> Option<Self> {
        let t = PduType::H2CData;
        let l = PduLayout::compute(t, datal, hdgst, ddgst, cpda)?;
        let flags = PduLayout::digest_flags(t, datal > 0, hdgst, ddgst)
            | if last { pdu_flags::LAST_PDU } else { 0 };
        Some(H2CData {
            ch: CommonHeader::new(t, flags, l.pdo, l.plen),
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            datao: U32::new(datao),
            datal: U32::new(datal),
            rsvd: [0; 4],
        })
    }
}

/// C2HData header: read data sent by the controller.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct C2HData {
    /// Common header (type 7, hlen 24).
    pub ch: CommonHeader,
    /// Command capsule CID this data belongs to.
    pub cccid: U16,
    /// Reserved.
    pub rsvd1: [u8; 2],
    /// Offset of this data within the command's data buffer.
    pub datao: U32,
    /// Number of data bytes in this PDU.
    pub datal: U32,
    /// Reserved.
    pub rsvd2: [u8; 4],
}
wire_struct!(C2HData, 24);

impl C2HData {
    /// A C2HData header; `hpda` is the host's PDA. `success` (which implies
    /// `last`) tells the host no CapsuleResp follows. `None` on PLEN overflow.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cccid: u16,
        datao: u32,
        datal: u32,
        last: bool,
        success: bool,
        hdgst: bool,
        ddgst: bool,
        hpda: u8,
    ) -> Option<Self> {
        let t = PduType::C2HData;
        let l = PduLayout::compute(t, datal, hdgst, ddgst, hpda)?;
        let mut flags = PduLayout::digest_flags(t, datal > 0, hdgst, ddgst);
        if last || success {
            flags |= pdu_flags::LAST_PDU;
        }
        if success {
            flags |= pdu_flags::SUCCESS;
        }
        Some(C2HData {
            ch: CommonHeader::new(t, flags, l.pdo, l.plen),
            cccid: U16::new(cccid),
            rsvd1: [0; 2],
            datao: U32::new(datao),
            datal: U32::new(datal),
            rsvd2: [0; 4],
        })
    }
}

/// R2T: the controller asks the host for `r2tl` bytes at offset `r2to`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct R2T {
    /// Common header (type 9, hlen 24).
    pub ch: CommonHeader,
    /// Command capsule CID.
    pub cccid: U16,
    /// Transfer tag the host echoes in its H2CData PDUs.
    pub ttag: U16,
    /// Offset within the command's data buffer.
    pub r2to: U32,
    /// Requested length.
    pub r2tl: U32,
    /// Reserved.
    pub rsvd: [u8; 4],
}
wire_struct!(R2T, 24);

impl R2T {
    /// An R2T header.
    pub fn new(cccid: u16, ttag: u16, r2to: u32, r2tl: u32, hdgst: bool) -> Self {
        let t = PduType::R2T;
        let plen = 24 + if hdgst { 4 } else { 0 };
        R2T {
            ch: CommonHeader::new(t, PduLayout::digest_flags(t, false, hdgst, false), 0, plen),
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            r2to: U32::new(r2to),
            r2tl: U32::new(r2tl),
            rsvd: [0; 4],
        }
    }
}
