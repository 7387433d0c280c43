//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0, chapter "PDU Formats")
//! and a validating header decoder.
//!
//! Every PDU starts with the 8-byte [`CommonHeader`]; `hlen` bytes of PDU
//! specific header follow, then an optional 4-byte header digest (HDGST),
//! optional padding up to PDO, the PDU data, and an optional 4-byte data
//! digest (DDGST). Digests are CRC32C stored little-endian. ICReq, ICResp
//! and the termination PDUs never carry digests.
//!
//! A receiver reads [`PduHeader::bytes_needed`] bytes, calls
//! [`PduHeader::parse`], and on error sends a termination request built by
//! [`TermReq::encode`] with [`PduError::fes`] / [`PduError::fei`] and closes
//! the connection.

use crate::cmd::{Command, Completion};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// IANA port for NVMe/TCP discovery controllers.
pub const DISCOVERY_PORT: u16 = 8009;
/// Conventional port for NVMe/TCP I/O controllers.
pub const DEFAULT_PORT: u16 = 4420;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// The only PDU format version defined (PFV 0 = 1.0).
pub const PFV_1_0: u16 = 0;
/// Smallest MAXH2CDATA a controller may advertise.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Largest PDA value (0's based dwords: 31 = 128-byte alignment).
pub const MAX_PDA: u8 = 31;
/// A termination request carries at most this many bytes of the PDU header in error.
pub const TERM_REQ_MAX_DATA: usize = 128;

/// PDU type (common header byte 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request (host to controller).
    IcReq = 0x00,
    /// Initialize Connection Response (controller to host).
    IcResp = 0x01,
    /// Host to controller termination request.
    H2CTermReq = 0x02,
    /// Controller to host termination request.
    C2HTermReq = 0x03,
    /// Command capsule, optionally with in-capsule data.
    CapsuleCmd = 0x04,
    /// Response capsule.
    CapsuleResp = 0x05,
    /// Host to controller data (answers an R2T).
    H2CData = 0x06,
    /// Controller to host data (reads).
    C2HData = 0x07,
    /// Ready to Transfer: the controller asks for write data.
    R2T = 0x09,
}

impl PduType {
    /// Decodes a PDU type byte.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// The fixed HLEN of this PDU type.
    pub const fn header_len(self) -> u8 {
        match self {
            Self::IcReq | Self::IcResp => 128,
            Self::CapsuleCmd => 72,
            Self::H2CTermReq
            | Self::C2HTermReq
            | Self::CapsuleResp
            | Self::H2CData
            | Self::C2HData
            | Self::R2T => 24,
        }
    }

    /// True if header and data digests can apply to this type (all but
    /// ICReq, ICResp and the termination requests).
    pub const fn digests_apply(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2CTermReq | Self::C2HTermReq
        )
    }

    /// True for the PDUs that travel host to controller.
    pub const fn is_h2c(self) -> bool {
        matches!(
            self,
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData
        )
    }

    /// Short name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::IcReq => "ICReq",
            Self::IcResp => "ICResp",
            Self::H2CTermReq => "H2CTermReq",
            Self::C2HTermReq => "C2HTermReq",
            Self::CapsuleCmd => "CapsuleCmd",
            Self::CapsuleResp => "CapsuleResp",
            Self::H2CData => "H2CData",
            Self::C2HData => "C2HData",
            Self::R2T => "R2T",
        }
    }
}

/// Common header FLAGS bits.
pub mod pdu_flags {
    /// HDGSTF: a header digest follows the PDU header.
    pub const HDGSTF: u8 = 0x01;
    /// DDGSTF: a data digest follows the PDU data.
    pub const DDGSTF: u8 = 0x02;
    /// LAST_PDU: last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 0x04;
    /// SUCCESS: C2HData only; the command completed successfully and no
    /// CapsuleResp will follow. Only valid together with LAST_PDU.
    pub const SUCCESS: u8 = 0x08;
}

/// ICReq/ICResp DGST field bits.
pub mod digest_flags {
    /// Header digests enabled.
    pub const HDGST_ENABLE: u8 = 0x01;
    /// Data digests enabled.
    pub const DDGST_ENABLE: u8 = 0x02;
}

/// Fatal Error Status codes of termination requests.
pub mod fes {
    /// Invalid PDU Header Field; FEI = byte offset of the field.
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU Sequence Error (a PDU that is valid but not expected now).
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    /// Header Digest Error.
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    /// Data Transfer Out of Range (offset/length outside the command's buffer).
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data Transfer Limit Exceeded (named "R2T Limit Exceeded" in TP 8000):
    /// more data in one PDU than MAXH2CDATA, or more outstanding R2Ts than MAXR2T.
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    /// Older name of [`DATA_LIMIT_EXCEEDED`]; same value.
    pub const R2T_LIMIT_EXCEEDED: u16 = 0x05;
    /// Unsupported Parameter; FEI = byte offset of the field.
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;

    /// Human name for logs.
    pub const fn name(fes: u16) -> &'static str {
        match fes {
            INVALID_HEADER_FIELD => "Invalid PDU Header Field",
            PDU_SEQUENCE_ERROR => "PDU Sequence Error",
            HEADER_DIGEST_ERROR => "Header Digest Error",
            DATA_OUT_OF_RANGE => "Data Transfer Out of Range",
            DATA_LIMIT_EXCEEDED => "Data Transfer Limit Exceeded",
            UNSUPPORTED_PARAMETER => "Unsupported Parameter",
            _ => "Unknown",
        }
    }
}

macro_rules! wire_struct {
    ($name:ident, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        impl Default for $name {
            fn default() -> Self {
                Self::new_zeroed()
            }
        }
    };
}

/// The 8-byte common header that starts every PDU.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CommonHeader {
    /// PDU type ([`PduType`] as a byte).
    pub pdu_type: u8,
    /// Flags ([`pdu_flags`]).
    pub flags: u8,
    /// Length of the PDU header, common header included, digest excluded.
    pub hlen: u8,
    /// PDU Data Offset from the start of the PDU, 0 when there is no data.
    pub pdo: u8,
    /// Total PDU length: header, digests, padding and data.
    pub plen: U32,
}
wire_struct!(CommonHeader, 8);

impl CommonHeader {
    /// Size in bytes.
    pub const SIZE: usize = 8;

    /// A common header for `t` with its fixed HLEN.
    pub fn new(t: PduType, flags: u8, pdo: u8, plen: u32) -> Self {
        CommonHeader {
            pdu_type: t as u8,
            flags,
            hlen: t.header_len(),
            pdo,
            plen: U32::new(plen),
        }
    }

    /// Total PDU length.
    pub fn plen(&self) -> u32 {
        self.plen.get()
    }
}

/// Where the pieces of a data-carrying PDU go, computed by a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduLayout {
    /// PDO to put in the common header (0 when there is no data).
    pub pdo: u8,
    /// PLEN to put in the common header.
    pub plen: u32,
}

impl PduLayout {
    /// Layout of a PDU of type `t` with `data_len` bytes of data, given the
    /// negotiated digests and the receiver's PDA (0's based dwords). Returns
    /// `None` if PLEN would overflow 32 bits.
    pub fn compute(t: PduType, data_len: u32, hdgst: bool, ddgst: bool, pda: u8) -> Option<Self> {
        let dg = t.digests_apply();
        let hdr = u32::from(t.header_len()) + if dg && hdgst { 4 } else { 0 };
        if data_len == 0 {
            return Some(PduLayout { pdo: 0, plen: hdr });
        }
        let pdo = data_offset(hdr, pda);
        let plen = pdo
            .checked_add(data_len)?
            .checked_add(if dg && ddgst { 4 } else { 0 })?;
        Some(PduLayout {
            pdo: pdo as u8,
            plen,
        })
    }

    /// Common header flags for this layout (digest flags only).
    pub fn digest_flags(t: PduType, has_data: bool, hdgst: bool, ddgst: bool) -> u8 {
        if !t.digests_apply() {
            return 0;
        }
        (if hdgst { pdu_flags::HDGSTF } else { 0 })
            | (if ddgst && has_data {
                pdu_flags::DDGSTF
            } else {
                0
            })
    }
}

/// Alignment in bytes required by a PDA value (0's based dwords).
pub const fn pda_alignment(pda: u8) -> u32 {
    (pda as u32 % 32 + 1) * 4
}

/// The data offset for a header of `hdr_len` bytes (digest included) under `pda`.
fn data_offset(hdr_len: u32, pda: u8) -> u32 {
    let a = pda_alignment(pda);
    hdr_len.div_ceil(a) * a
}

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

// ---- digests ----

/// CRC32C of a PDU header (the `hlen` bytes before HDGST).
pub fn header_digest(header: &[u8]) -> u32 {
    crc32c::crc32c(header)
}

/// CRC32C of contiguous PDU data.
pub fn data_digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Incremental CRC32C for PDU data spread over several buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDigest(u32);

impl DataDigest {
    /// A fresh digest.
    pub const fn new() -> Self {
        DataDigest(0)
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    /// The digest so far (stored little-endian on the wire).
    pub const fn value(&self) -> u32 {
        self.0
    }
}

/// Checks a received data digest (4 little-endian bytes) against `data`.
pub fn verify_data_digest(data: &[u8], digest: &[u8]) -> bool {
    match <[u8; 4]>::try_from(digest) {
        Ok(d) => u32::from_le_bytes(d) == data_digest(data),
        Err(_) => false,
    }
}

// ---- validating decoder ----

/// Which side is parsing: the controller receives H2C PDUs, the host C2H.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The NVMe-oF target side.
    Controller,
    /// The initiator side.
    Host,
}

/// What the receiver negotiated; governs what [`PduHeader::parse`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseOptions {
    /// The side receiving these PDUs.
    pub receiver: Role,
    /// Header digests negotiated (false until ICReq/ICResp completes).
    pub hdgst: bool,
    /// Data digests negotiated.
    pub ddgst: bool,
    /// The receiver's own PDA (controller: the CPDA it sent; host: the HPDA it sent).
    pub pda: u8,
    /// Controller: the MAXH2CDATA it advertised. Ignored by a host.
    pub max_h2c_data: u32,
    /// Controller: largest in-capsule data it accepts (IOCCSZ * 16 - 64). Ignored by a host.
    pub max_in_capsule_data: u32,
}

impl ParseOptions {
    /// Options before the connection is initialized: no digests, PDA 0, and
    /// no data limits (no data PDU is valid before IC anyway; the caller
    /// enforces sequencing).
    pub const fn new(receiver: Role) -> Self {
        ParseOptions {
            receiver,
            hdgst: false,
            ddgst: false,
            pda: 0,
            max_h2c_data: u32::MAX,
            max_in_capsule_data: u32::MAX,
        }
    }
}

/// A PDU header problem. Every variant except [`PduError::Truncated`] is
/// fatal: the receiver sends a termination request with [`PduError::fes`]
/// and [`PduError::fei`] and closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PduError {
    /// Not enough bytes yet; read at least `needed` and try again.
    #[error("incomplete PDU header: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        have: usize,
    },
    /// PDU type byte not defined by the spec.
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    /// A defined PDU type that never travels in this direction.
    #[error("{} PDU cannot be received by the {receiver:?}", .pdu_type.name())]
    WrongDirection {
        /// The type received.
        pdu_type: PduType,
        /// Who received it.
        receiver: Role,
    },
    /// A header field holds an invalid value.
    #[error("invalid PDU header field at byte {offset}: {what}")]
    InvalidField {
        /// Byte offset of the field from the start of the PDU.
        offset: u32,
        /// What is wrong, for logs.
        what: &'static str,
    },
    /// The header digest does not match the header.
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// Digest carried in the PDU.
        received: u32,
        /// Digest computed over the received header.
        computed: u32,
    },
    /// More data in one PDU than the receiver allows.
    #[error("PDU data length {len} exceeds the limit {max}")]
    DataLimitExceeded {
        /// Data length of the PDU.
        len: u32,
        /// Limit in force.
        max: u32,
    },
    /// A valid value this implementation does not support.
    #[error("unsupported parameter at byte {offset}: {what}")]
    UnsupportedParameter {
        /// Byte offset of the field from the start of the PDU.
        offset: u32,
        /// What is unsupported, for logs.
        what: &'static str,
    },
}

impl PduError {
    /// True for [`PduError::Truncated`]: read more, this is not an error yet.
    pub const fn is_incomplete(&self) -> bool {
        matches!(self, PduError::Truncated { .. })
    }

    /// Fatal Error Status for the termination request; `None` for `Truncated`.
    pub const fn fes(&self) -> Option<u16> {
        Some(match self {
            PduError::Truncated { .. } => return None,
            PduError::UnknownType(_)
            | PduError::WrongDirection { .. }
            | PduError::InvalidField { .. } => fes::INVALID_HEADER_FIELD,
            PduError::HeaderDigest { .. } => fes::HEADER_DIGEST_ERROR,
            PduError::DataLimitExceeded { .. } => fes::DATA_LIMIT_EXCEEDED,
            PduError::UnsupportedParameter { .. } => fes::UNSUPPORTED_PARAMETER,
        })
    }

    /// Fatal Error Information: the offending field's byte offset where the
    /// FES defines one, else 0.
    pub const fn fei(&self) -> u32 {
        match self {
            PduError::UnknownType(_) | PduError::WrongDirection { .. } => 0,
            PduError::InvalidField { offset, .. }
            | PduError::UnsupportedParameter { offset, .. } => *offset,
            _ => 0,
        }
    }
}

/// Byte offsets of common header fields, for FEI.
mod off {
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
    pub const PFV: u32 = 8;
    pub const PDA: u32 = 10;
    pub const MAXDATA: u32 = 12;
    pub const DATAL: u32 = 16;
}

/// The PDU-specific part of a parsed header (copied out of the buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduBody {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq or C2HTermReq.
    TermReq(TermReq),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2CData(H2CData),
    /// C2HData.
    C2HData(C2HData),
    /// R2T.
    R2T(R2T),
}

/// A validated PDU header and where the rest of the PDU lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduHeader {
    /// PDU type.
    pub pdu_type: PduType,
    /// Common header as received.
    pub ch: CommonHeader,
    /// A header digest follows the header (and was verified).
    pub hdgst: bool,
    /// A data digest follows the data.
    pub ddgst: bool,
    /// Offset of the data from the start of the PDU (PDO; HLEN for term requests), 0 if none.
    pub data_offset: u32,
    /// Data length (excluding padding and digest).
    pub data_len: u32,
    /// The type-specific header.
    pub body: PduBody,
}

impl PduHeader {
    /// How many bytes of `buf` (the start of a PDU) must be available before
    /// [`PduHeader::parse`] can succeed: 8 for the common header, then HLEN
    /// plus 4 if a header digest applies. Fails early on an unknown type or
    /// wrong HLEN so a receiver never waits for bytes of a bogus header.
    pub fn bytes_needed(buf: &[u8], opts: &ParseOptions) -> Result<usize, PduError> {
        let Ok((ch, _)) = CommonHeader::read_from_prefix(buf) else {
            return Ok(CommonHeader::SIZE);
        };
        let t = check_type_and_hlen(&ch, opts)?;
        check_digest_flags(t, ch.flags, opts)?;
        Ok(header_and_digest_len(t, opts))
    }

    /// Validates the header at the start of `buf`: type and direction, HLEN,
    /// digest flags against what was negotiated, the header digest itself,
    /// PDO (bounds and alignment to `opts.pda`), PLEN, data length limits and
    /// per-type rules. `buf` need not hold the PDU data.
    pub fn parse(buf: &[u8], opts: &ParseOptions) -> Result<PduHeader, PduError> {
        let (ch, _) = CommonHeader::read_from_prefix(buf).map_err(|_| PduError::Truncated {
            needed: CommonHeader::SIZE,
            have: buf.len(),
        })?;
        let t = check_type_and_hlen(&ch, opts)?;
        let hlen = usize::from(ch.hlen);
        let hd_len = header_and_digest_len(t, opts);
        let flags = ch.flags;
        let (hdgst, ddgst) = check_digest_flags(t, flags, opts)?;

        // The checks above need only the common header, so a bad PDU is
        // refused before the receiver waits for the rest of its header.
        if buf.len() < hd_len {
            return Err(PduError::Truncated {
                needed: hd_len,
                have: buf.len(),
            });
        }

        if hdgst {
            let hdr = buf.get(..hlen).ok_or(PduError::Truncated {
                needed: hd_len,
                have: buf.len(),
            })?;
            let dg = buf.get(hlen..hlen + 4).ok_or(PduError::Truncated {
                needed: hd_len,
                have: buf.len(),
            })?;
            let received = u32::from_le_bytes([dg[0], dg[1], dg[2], dg[3]]);
            let computed = header_digest(hdr);
            if received != computed {
                return Err(PduError::HeaderDigest { received, computed });
            }
        }

        let plen = ch.plen.get();
        let hd = hd_len as u32;
        let pdo = u32::from(ch.pdo);
        let ddgst_len = if ddgst { 4 } else { 0 };

        // Where the data is, and how long.
        let (data_offset, data_len) = match t {
            PduType::IcReq | PduType::IcResp | PduType::CapsuleResp | PduType::R2T => {
                if pdo != 0 {
                    return Err(invalid(off::PDO, "PDO must be 0 on a PDU without data"));
                }
                if plen != hd {
                    return Err(invalid(off::PLEN, "PLEN must equal HLEN (+ header digest)"));
                }
                if ddgst {
                    return Err(invalid(off::FLAGS, "DDGSTF set on a PDU without data"));
                }
                (0, 0)
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                let max = hd + TERM_REQ_MAX_DATA as u32;
                if plen < hd || plen > max {
                    return Err(invalid(off::PLEN, "termination request PLEN out of range"));
                }
                (hd, plen - hd)
            }
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData => {
                if pdo == 0 {
                    // No data.
                    if plen != hd {
                        return Err(invalid(off::PDO, "PDO is 0 but PLEN leaves room for data"));
                    }
                    if ddgst {
                        return Err(invalid(off::FLAGS, "DDGSTF set on a PDU without data"));
                    }
                    (0, 0)
                } else {
                    // Data starts at the end of the header (and digest), padded
                    // up to the PDA alignment. PDO == end of header is also
                    // accepted whatever the PDA: SPDK hosts only pad when the
                    // alignment exceeds the header length, and an unpadded
                    // PDO is harmless to a receiver that copies the data.
                    let align = pda_alignment(opts.pda);
                    if pdo < hd || (pdo != hd && pdo % align != 0) || pdo >= hd + align {
                        return Err(invalid(
                            off::PDO,
                            "PDO not at the aligned end of the header",
                        ));
                    }
                    let data_end = plen
                        .checked_sub(ddgst_len)
                        .filter(|&e| e >= pdo)
                        .ok_or(invalid(off::PLEN, "PLEN smaller than PDO (+ data digest)"))?;
                    let data_len = data_end - pdo;
                    if opts.ddgst && data_len > 0 && !ddgst {
                        return Err(invalid(
                            off::FLAGS,
                            "DDGSTF clear although data digest was negotiated",
                        ));
                    }
                    (pdo, data_len)
                }
            }
        };

        let body = match t {
            PduType::IcReq => {
                let r = read_body::<IcReq>(buf)?;
                if r.pfv.get() != PFV_1_0 {
                    return Err(PduError::UnsupportedParameter {
                        offset: off::PFV,
                        what: "PDU format version",
                    });
                }
                if r.hpda > MAX_PDA {
                    return Err(invalid(off::PDA, "HPDA above 31"));
                }
                PduBody::IcReq(r)
            }
            PduType::IcResp => {
                let r = read_body::<IcResp>(buf)?;
                if r.pfv.get() != PFV_1_0 {
                    return Err(PduError::UnsupportedParameter {
                        offset: off::PFV,
                        what: "PDU format version",
                    });
                }
                if r.cpda > MAX_PDA {
                    return Err(invalid(off::PDA, "CPDA above 31"));
                }
                let m = r.maxh2cdata.get();
                if m < MIN_MAXH2CDATA || m % 4 != 0 {
                    return Err(invalid(
                        off::MAXDATA,
                        "MAXH2CDATA below 4096 or not a multiple of 4",
                    ));
                }
                PduBody::IcResp(r)
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                PduBody::TermReq(read_body::<TermReq>(buf)?)
            }
            PduType::CapsuleCmd => {
                if data_len > opts.max_in_capsule_data {
                    return Err(PduError::DataLimitExceeded {
                        len: data_len,
                        max: opts.max_in_capsule_data,
                    });
                }
                PduBody::CapsuleCmd(read_body::<CapsuleCmd>(buf)?)
            }
            PduType::CapsuleResp => PduBody::CapsuleResp(read_body::<CapsuleResp>(buf)?),
            PduType::H2CData => {
                let d = read_body::<H2CData>(buf)?;
                if d.datal.get() != data_len {
                    return Err(invalid(off::DATAL, "DATAL does not match PLEN"));
                }
                if data_len > opts.max_h2c_data {
                    return Err(PduError::DataLimitExceeded {
                        len: data_len,
                        max: opts.max_h2c_data,
                    });
                }
                PduBody::H2CData(d)
            }
            PduType::C2HData => {
                let d = read_body::<C2HData>(buf)?;
                if d.datal.get() != data_len {
                    return Err(invalid(off::DATAL, "DATAL does not match PLEN"));
                }
                if flags & pdu_flags::SUCCESS != 0 && flags & pdu_flags::LAST_PDU == 0 {
                    return Err(invalid(off::FLAGS, "SUCCESS without LAST_PDU"));
                }
                PduBody::C2HData(d)
            }
            PduType::R2T => PduBody::R2T(read_body::<R2T>(buf)?),
        };

        Ok(PduHeader {
            pdu_type: t,
            ch,
            hdgst,
            ddgst,
            data_offset,
            data_len,
            body,
        })
    }

    /// Total PDU length (PLEN).
    pub fn plen(&self) -> u32 {
        self.ch.plen.get()
    }

    /// Header length including the header digest.
    pub fn header_len(&self) -> usize {
        usize::from(self.ch.hlen) + if self.hdgst { DIGEST_LEN } else { 0 }
    }

    /// Byte range of the data within the PDU.
    pub fn data_range(&self) -> core::ops::Range<usize> {
        let s = self.data_offset as usize;
        s..s + self.data_len as usize
    }

    /// Byte range of the data digest within the PDU, if present.
    pub fn data_digest_range(&self) -> Option<core::ops::Range<usize>> {
        if self.ddgst && self.data_len > 0 {
            let e = self.data_range().end;
            Some(e..e + DIGEST_LEN)
        } else {
            None
        }
    }

    /// LAST_PDU flag.
    pub fn last_pdu(&self) -> bool {
        self.ch.flags & pdu_flags::LAST_PDU != 0
    }

    /// SUCCESS flag (C2HData).
    pub fn success(&self) -> bool {
        self.ch.flags & pdu_flags::SUCCESS != 0
    }
}

fn invalid(offset: u32, what: &'static str) -> PduError {
    PduError::InvalidField { offset, what }
}

fn read_body<T: FromBytes>(buf: &[u8]) -> Result<T, PduError> {
    T::read_from_prefix(buf)
        .map(|(t, _)| t)
        .map_err(|_| PduError::Truncated {
            needed: core::mem::size_of::<T>(),
            have: buf.len(),
        })
}

fn check_type_and_hlen(ch: &CommonHeader, opts: &ParseOptions) -> Result<PduType, PduError> {
    let t = PduType::from_u8(ch.pdu_type).ok_or(PduError::UnknownType(ch.pdu_type))?;
    let expected_h2c = opts.receiver == Role::Controller;
    if t.is_h2c() != expected_h2c {
        return Err(PduError::WrongDirection {
            pdu_type: t,
            receiver: opts.receiver,
        });
    }
    if ch.hlen != t.header_len() {
        return Err(invalid(off::HLEN, "HLEN does not match the PDU type"));
    }
    Ok(t)
}

/// Digest flags must match what was negotiated; returns (HDGSTF, DDGSTF).
fn check_digest_flags(
    t: PduType,
    flags: u8,
    opts: &ParseOptions,
) -> Result<(bool, bool), PduError> {
    let hdgst = flags & pdu_flags::HDGSTF != 0;
    let ddgst = flags & pdu_flags::DDGSTF != 0;
    if t.digests_apply() {
        if hdgst != opts.hdgst {
            return Err(invalid(
                off::FLAGS,
                "HDGSTF does not match the negotiated header digest",
            ));
        }
        if ddgst && !opts.ddgst {
            return Err(invalid(
                off::FLAGS,
                "DDGSTF set but data digest not negotiated",
            ));
        }
    } else if hdgst || ddgst {
        return Err(invalid(
            off::FLAGS,
            "digest flag set on a PDU without digests",
        ));
    }
    Ok((hdgst, ddgst))
}

fn header_and_digest_len(t: PduType, opts: &ParseOptions) -> usize {
    usize::from(t.header_len())
        + if t.digests_apply() && opts.hdgst {
            DIGEST_LEN
        } else {
            0
        }
}

#[cfg(test)]
mod tests;
