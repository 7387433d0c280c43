//! The validating decoder: a received PDU header checked against the negotiated options.

use super::*;

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
