//! NVMe over Fabrics commands and data (Base 2.0 chapter "Fabrics Command
//! Set": Connect, Property Get/Set, Disconnect) and NVMe Qualified Names
//! (Base 2.0 "NVMe Qualified Names").
//!
//! Fabrics commands are 64-byte SQEs with opcode 7Fh and FCTYPE at byte 4;
//! the views here decode and encode them over [`Command`].

use crate::cmd::{Command, Completion, SglDescriptor};
use crate::opcode::{admin, fctype};
use crate::util::{fill_nul_padded, until_nul};
use thiserror::Error;
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The well-known NQN of discovery controllers.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Prefix of UUID-based NQNs (`nqn.2014-08.org.nvmexpress:uuid:<uuid>`).
pub const UUID_NQN_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";
/// Longest NQN in bytes, excluding the terminating NUL.
pub const NQN_MAX_LEN: usize = 223;
/// Controller ID a host puts in Connect data to ask for any controller (dynamic model).
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// Controller ID meaning "any static controller" (static model).
pub const CNTLID_STATIC_ANY: u16 = 0xFFFE;

/// Connect command (FCTYPE 01h). Fields live in CDW10..CDW12 of the SQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Connect {
    /// Record format of the Connect data; 0 is the only one defined.
    pub recfmt: u16,
    /// Queue to create: 0 = admin queue.
    pub qid: u16,
    /// Submission queue size, 1-based (wire SQSIZE is 0-based).
    pub sqsize: u32,
    /// Connect attributes (bit 2: disable SQ flow control, as Linux's
    /// NVME_CONNECT_DISABLE_SQFLOW; bits 1:0: priority class).
    pub cattr: u8,
    /// Keep alive timeout in milliseconds (admin queue only; 0 = disabled).
    pub kato: u32,
}

impl Connect {
    /// Decodes a Connect command; `None` if `c` is not one.
    pub fn from_command(c: &Command) -> Option<Self> {
        if !c.is_fabrics() || c.fctype() != fctype::CONNECT {
            return None;
        }
        let cdw10 = c.cdw10.get();
        let cdw11 = c.cdw11.get();
        Some(Connect {
            recfmt: cdw10 as u16,
            qid: (cdw10 >> 16) as u16,
            sqsize: (cdw11 & 0xFFFF) + 1,
            cattr: (cdw11 >> 16) as u8,
            kato: c.cdw12.get(),
        })
    }

    /// Builds the Connect SQE: Connect data (1024 bytes) travels as in-capsule
    /// data described by SGL1. `sqsize` is clamped to 1..=65536.
    pub fn to_command(&self, cid: u16) -> Command {
        let mut c = Command::new(admin::FABRICS).with_cid(cid);
        c.nsid.set(u32::from(fctype::CONNECT));
        c.set_sgl1(SglDescriptor::in_capsule(0, ConnectData::SIZE as u32));
        c.cdw10
            .set(u32::from(self.recfmt) | (u32::from(self.qid) << 16));
        let sqsize0 = self.sqsize.clamp(1, 0x1_0000) - 1;
        c.cdw11.set(sqsize0 | (u32::from(self.cattr) << 16));
        c.cdw12.set(self.kato);
        c
    }
}

/// Byte offsets within the Connect SQE, for the IPO of an invalid-parameter reply.
pub mod connect_sqe_offset {
    /// RECFMT.
    pub const RECFMT: u16 = 40;
    /// QID.
    pub const QID: u16 = 42;
    /// SQSIZE.
    pub const SQSIZE: u16 = 44;
    /// CATTR.
    pub const CATTR: u16 = 46;
    /// KATO.
    pub const KATO: u16 = 48;
}

/// Byte offsets within [`ConnectData`], for the IPO of an invalid-parameter reply.
pub mod connect_data_offset {
    /// HOSTID.
    pub const HOSTID: u16 = 0;
    /// CNTLID.
    pub const CNTLID: u16 = 16;
    /// SUBNQN.
    pub const SUBNQN: u16 = 256;
    /// HOSTNQN.
    pub const HOSTNQN: u16 = 512;
}

/// Connect data: the 1024-byte in-capsule data of a Connect command.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ConnectData {
    /// Host identifier (a UUID); must be the same on every queue of a host.
    pub hostid: [u8; 16],
    /// Requested controller: [`CNTLID_DYNAMIC`] on the admin queue of a
    /// dynamic-model subsystem; the admin queue's CNTLID on I/O queues.
    pub cntlid: U16,
    /// Reserved.
    pub rsvd1: [u8; 238],
    /// Subsystem NQN, NUL-terminated.
    pub subnqn: [u8; 256],
    /// Host NQN, NUL-terminated.
    pub hostnqn: [u8; 256],
    /// Reserved.
    pub rsvd2: [u8; 256],
}
const _: () = assert!(core::mem::size_of::<ConnectData>() == 1024);

impl Default for ConnectData {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// Problems with an NQN (or with Connect data carrying one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum NqnError {
    /// Empty.
    #[error("NQN is empty")]
    Empty,
    /// Longer than 223 bytes or missing its terminating NUL.
    #[error("NQN is longer than 223 bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("NQN is not valid UTF-8")]
    NotUtf8,
    /// Does not start with `nqn.`.
    #[error("NQN does not start with \"nqn.\"")]
    BadPrefix,
    /// The `yyyy-mm` date is malformed.
    #[error("NQN date is not of the form yyyy-mm")]
    BadDate,
    /// The reverse domain part is missing or malformed.
    #[error("NQN reverse domain name is malformed")]
    BadDomain,
    /// The UUID form carries a malformed UUID.
    #[error("NQN UUID is malformed")]
    BadUuid,
}

impl ConnectData {
    /// Size in bytes.
    pub const SIZE: usize = 1024;

    /// Connect data for `hostnqn` reaching `subnqn`; `None` if either NQN does not fit.
    pub fn new(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> Option<Self> {
        let mut d = Self::new_zeroed();
        d.hostid = hostid;
        d.cntlid.set(cntlid);
        if !(fill_nul_padded(&mut d.subnqn, subnqn) && fill_nul_padded(&mut d.hostnqn, hostnqn)) {
            return None;
        }
        Some(d)
    }

    /// Reads Connect data from the first 1024 bytes of `bytes`.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(d, _)| d)
    }

    /// Controller ID requested.
    pub fn cntlid(&self) -> u16 {
        self.cntlid.get()
    }

    /// The subsystem NQN: bytes up to the first NUL, checked for length and
    /// UTF-8 (not for NQN syntax: see [`validate_nqn`]).
    pub fn subnqn(&self) -> Result<&str, NqnError> {
        nqn_field(&self.subnqn)
    }

    /// The host NQN, checked as [`ConnectData::subnqn`].
    pub fn hostnqn(&self) -> Result<&str, NqnError> {
        nqn_field(&self.hostnqn)
    }
}

fn nqn_field(f: &[u8; 256]) -> Result<&str, NqnError> {
    let b = until_nul(f);
    if b.len() == f.len() || b.len() > NQN_MAX_LEN {
        return Err(NqnError::TooLong);
    }
    if b.is_empty() {
        return Err(NqnError::Empty);
    }
    core::str::from_utf8(b).map_err(|_| NqnError::NotUtf8)
}

/// Checks NQN syntax (Base 2.0 "NVMe Qualified Names"): at most 223 bytes,
/// and either `nqn.yyyy-mm.reverse.domain[:anything]` or the UUID form
/// `nqn.2014-08.org.nvmexpress:uuid:xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
/// The discovery NQN passes as an ordinary domain-form name.
pub fn validate_nqn(nqn: &str) -> Result<(), NqnError> {
    if nqn.is_empty() {
        return Err(NqnError::Empty);
    }
    if nqn.len() > NQN_MAX_LEN {
        return Err(NqnError::TooLong);
    }
    if let Some(uuid) = nqn.strip_prefix(UUID_NQN_PREFIX) {
        return if is_uuid(uuid) {
            Ok(())
        } else {
            Err(NqnError::BadUuid)
        };
    }
    let rest = nqn.strip_prefix("nqn.").ok_or(NqnError::BadPrefix)?;
    let b = rest.as_bytes();
    // yyyy-mm followed by '.'
    let date_ok = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && matches!((b[5], b[6]), (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2'))
        && b[7] == b'.';
    if !date_ok {
        return Err(NqnError::BadDate);
    }
    let after_date = &rest[8..];
    let domain = after_date.split(':').next().unwrap_or("");
    let labels_ok = !domain.is_empty()
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !labels_ok {
        return Err(NqnError::BadDomain);
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// AUTHREQ bits of a successful Connect response DW0 (DW0 31:16 is AUTHREQ;
/// its bit 1 ATR and bit 2 ASCR land on DW0 bits 17 and 18).
pub mod authreq {
    /// ATR: in-band authentication required.
    pub const ATR: u32 = 1 << 17;
    /// ASCR: secure channel concatenation required.
    pub const ASCR: u32 = 1 << 18;
}

/// Result of a successful Connect (DW0): CNTLID in bits 15:0, AUTHREQ above.
pub fn connect_success(cid: u16, cntlid: u16, authreq: u32) -> Completion {
    Completion::success(
        cid,
        u32::from(cntlid) | (authreq & (authreq::ATR | authreq::ASCR)),
    )
}

/// Controller ID from a successful Connect's DW0.
pub fn connect_result_cntlid(cqe: &Completion) -> u16 {
    cqe.result.get() as u16
}

/// AUTHREQ bits from a successful Connect's DW0.
pub fn connect_result_authreq(cqe: &Completion) -> u32 {
    cqe.result.get() & (authreq::ATR | authreq::ASCR)
}

/// Where the invalid parameter of a failed Connect lies (IATTR bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidParamIn {
    /// In the Connect SQE (offsets in [`connect_sqe_offset`]).
    Command,
    /// In the Connect data (offsets in [`connect_data_offset`]).
    Data,
}

/// DW0 of a "Connect Invalid Parameters" completion: IPO (byte offset of the
/// bad field) in bits 15:0, IATTR in bits 23:16 (bit 16 set = the offset is
/// within the Connect data rather than the SQE).
pub fn invalid_param_dw0(place: InvalidParamIn, offset: u16) -> u32 {
    let iattr = match place {
        InvalidParamIn::Command => 0,
        InvalidParamIn::Data => 1,
    };
    u32::from(offset) | (iattr << 16)
}

/// Decodes [`invalid_param_dw0`].
pub fn decode_invalid_param_dw0(dw0: u32) -> (InvalidParamIn, u16) {
    let place = if (dw0 >> 16) & 1 != 0 {
        InvalidParamIn::Data
    } else {
        InvalidParamIn::Command
    };
    (place, dw0 as u16)
}

/// Property size of a Property Get/Set (ATTRIB bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertySize {
    /// 4-byte property.
    Four,
    /// 8-byte property (CAP, ASQ, ACQ).
    Eight,
}

impl PropertySize {
    fn from_attrib(a: u8) -> Option<Self> {
        match a & 0x7 {
            0 => Some(Self::Four),
            1 => Some(Self::Eight),
            _ => None,
        }
    }

    fn attrib(self) -> u8 {
        match self {
            Self::Four => 0,
            Self::Eight => 1,
        }
    }
}

/// Property Get (FCTYPE 04h): ATTRIB at byte 40, OFST at byte 44; the value
/// comes back in CQE DW0 (and DW1 for 8-byte properties).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyGet {
    /// Property size.
    pub size: PropertySize,
    /// Property offset (see `regs`).
    pub offset: u32,
}

impl PropertyGet {
    /// Decodes; `None` if `c` is not a Property Get or ATTRIB holds a reserved size.
    pub fn from_command(c: &Command) -> Option<Self> {
        if !c.is_fabrics() || c.fctype() != fctype::PROPERTY_GET {
            return None;
        }
        Some(PropertyGet {
            size: PropertySize::from_attrib(c.cdw10.get() as u8)?,
            offset: c.cdw11.get(),
        })
    }

    /// Encodes as an SQE.
    pub fn to_command(&self, cid: u16) -> Command {
        let mut c = Command::new(admin::FABRICS).with_cid(cid);
        c.nsid.set(u32::from(fctype::PROPERTY_GET));
        c.cdw10.set(u32::from(self.size.attrib()));
        c.cdw11.set(self.offset);
        c
    }
}

/// Property Set (FCTYPE 00h): ATTRIB at byte 40, OFST at byte 44, VALUE at bytes 48..56.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertySet {
    /// Property size.
    pub size: PropertySize,
    /// Property offset.
    pub offset: u32,
    /// Value (only the low 4 bytes for a 4-byte property).
    pub value: u64,
}

impl PropertySet {
    /// Decodes; `None` if `c` is not a Property Set or ATTRIB holds a reserved size.
    pub fn from_command(c: &Command) -> Option<Self> {
        if !c.is_fabrics() || c.fctype() != fctype::PROPERTY_SET {
            return None;
        }
        let size = PropertySize::from_attrib(c.cdw10.get() as u8)?;
        let mut value = u64::from(c.cdw12.get()) | (u64::from(c.cdw13.get()) << 32);
        if size == PropertySize::Four {
            value &= 0xFFFF_FFFF;
        }
        Some(PropertySet {
            size,
            offset: c.cdw11.get(),
            value,
        })
    }

    /// Encodes as an SQE.
    pub fn to_command(&self, cid: u16) -> Command {
        let mut c = Command::new(admin::FABRICS).with_cid(cid);
        c.nsid.set(u32::from(fctype::PROPERTY_SET));
        c.cdw10.set(u32::from(self.size.attrib()));
        c.cdw11.set(self.offset);
        c.cdw12.set(self.value as u32);
        c.cdw13.set((self.value >> 32) as u32);
        c
    }
}

/// Disconnect (FCTYPE 08h): deletes the I/O queue it is sent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Record format; 0.
    pub recfmt: u16,
}

impl Disconnect {
    /// Decodes; `None` if `c` is not a Disconnect.
    pub fn from_command(c: &Command) -> Option<Self> {
        if !c.is_fabrics() || c.fctype() != fctype::DISCONNECT {
            return None;
        }
        Some(Disconnect {
            recfmt: c.cdw10.get() as u16,
        })
    }

    /// Encodes as an SQE.
    pub fn to_command(&self, cid: u16) -> Command {
        let mut c = Command::new(admin::FABRICS).with_cid(cid);
        c.nsid.set(u32::from(fctype::DISCONNECT));
        c.cdw10.set(u32::from(self.recfmt));
        c
    }
}

#[cfg(test)]
mod tests;
