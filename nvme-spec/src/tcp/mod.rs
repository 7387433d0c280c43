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
//!
//! Here: the common header, PDU types and flags, and where a PDU's pieces go; `pdu.rs` holds
//! each PDU's own header, `digest.rs` the CRC32C digests, `parse.rs` the validating decoder.

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

mod digest;
mod parse;
mod pdu;

pub use digest::*;
pub use parse::*;
pub use pdu::*;

#[cfg(test)]
mod tests;
