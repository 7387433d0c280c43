//! Reservations (Base 2.0 "Reservations"; NVM Command Set 1.0 "Reservation Register",
//! "Reservation Report", "Reservation Acquire", "Reservation Release").
//!
//! The four commands are I/O commands. Their dword 10 carries an action, the Ignore Existing
//! Key bit and (Acquire, Release) the reservation type; keys travel in the data buffer. The
//! decoded views here follow the crate's pattern: `from_command` reads, `to_command` builds.

use crate::cmd::Command;
use crate::opcode::io;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Reservation types (RTYPE). 0 means "no reservation" in a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResvType {
    /// Only the holder writes; anyone reads.
    WriteExclusive = 1,
    /// Only the holder reads or writes.
    ExclusiveAccess = 2,
    /// Registrants read and write; others only read.
    WriteExclusiveRegistrantsOnly = 3,
    /// Registrants read and write; others nothing.
    ExclusiveAccessRegistrantsOnly = 4,
    /// As type 3, every registrant being a holder.
    WriteExclusiveAllRegistrants = 5,
    /// As type 4, every registrant being a holder.
    ExclusiveAccessAllRegistrants = 6,
}

impl ResvType {
    /// Every type, in RTYPE order.
    pub const ALL: [ResvType; 6] = [
        ResvType::WriteExclusive,
        ResvType::ExclusiveAccess,
        ResvType::WriteExclusiveRegistrantsOnly,
        ResvType::ExclusiveAccessRegistrantsOnly,
        ResvType::WriteExclusiveAllRegistrants,
        ResvType::ExclusiveAccessAllRegistrants,
    ];

    /// The type for an RTYPE value, if it names one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }

    /// Whether non-holders are kept from reading too (the Exclusive Access family).
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            ResvType::ExclusiveAccess
                | ResvType::ExclusiveAccessRegistrantsOnly
                | ResvType::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether every registrant is a holder.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            ResvType::WriteExclusiveAllRegistrants | ResvType::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether registrants that are not the holder get the holder's access (types 3 to 6).
    pub fn registrants_have_access(self) -> bool {
        !matches!(self, ResvType::WriteExclusive | ResvType::ExclusiveAccess)
    }

    /// (may read, may write) for a host that does not hold the reservation, by whether it is
    /// registered: the Base spec's "Command Behavior in the Presence of a Reservation" table.
    pub fn non_holder_access(self, registered: bool) -> (bool, bool) {
        if registered && self.registrants_have_access() {
            return (true, true);
        }
        (!self.exclusive_access(), false)
    }
}

/// Reservation Register Action (RREGA).
pub mod rrega {
    /// Register a key.
    pub const REGISTER: u8 = 0;
    /// Unregister.
    pub const UNREGISTER: u8 = 1;
    /// Replace the key.
    pub const REPLACE: u8 = 2;
}

/// Reservation Acquire Action (RACQA).
pub mod racqa {
    /// Acquire.
    pub const ACQUIRE: u8 = 0;
    /// Preempt.
    pub const PREEMPT: u8 = 1;
    /// Preempt and abort.
    pub const PREEMPT_AND_ABORT: u8 = 2;
}

/// Reservation Release Action (RRELA).
pub mod rrela {
    /// Release.
    pub const RELEASE: u8 = 0;
    /// Clear: release and unregister everyone.
    pub const CLEAR: u8 = 1;
}

/// Change Persist Through Power Loss State (CPTPL) of Reservation Register.
pub mod cptpl {
    /// Leave it.
    pub const NO_CHANGE: u8 = 0;
    /// Reservations are released and registrations cleared on power on.
    pub const CLEAR: u8 = 2;
    /// Reservations and registrations persist across a power loss.
    pub const PERSIST: u8 = 3;
}

/// RESCAP bits of Identify Namespace.
pub mod rescap {
    /// Persist Through Power Loss supported.
    pub const PTPL: u8 = 1 << 0;
    /// Write Exclusive.
    pub const WE: u8 = 1 << 1;
    /// Exclusive Access.
    pub const EA: u8 = 1 << 2;
    /// Write Exclusive - Registrants Only.
    pub const WERO: u8 = 1 << 3;
    /// Exclusive Access - Registrants Only.
    pub const EARO: u8 = 1 << 4;
    /// Write Exclusive - All Registrants.
    pub const WEAR: u8 = 1 << 5;
    /// Exclusive Access - All Registrants.
    pub const EAAR: u8 = 1 << 6;
    /// Ignore Existing Key behaves as NVMe 1.3 and later define it.
    pub const IEK13: u8 = 1 << 7;
    /// Every type, with 1.3 IEKEY semantics.
    pub const ALL_TYPES: u8 = WE | EA | WERO | EARO | WEAR | EAAR | IEK13;
}

/// Reservation Register (CDW10: RREGA 2:0, IEKEY 3, CPTPL 31:30; data [`RegisterData`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResvRegister {
    /// Namespace.
    pub nsid: u32,
    /// Action (see [`rrega`]).
    pub rrega: u8,
    /// Ignore Existing Key.
    pub iekey: bool,
    /// Change PTPL state (see [`cptpl`]).
    pub cptpl: u8,
}

impl ResvRegister {
    /// Decodes the command's fields.
    pub fn from_command(c: &Command) -> Self {
        let d = c.cdw10.get();
        ResvRegister {
            nsid: c.nsid(),
            rrega: (d & 7) as u8,
            iekey: d & (1 << 3) != 0,
            cptpl: (d >> 30) as u8,
        }
    }

    /// The command; its data is a 16-byte [`RegisterData`].
    pub fn to_command(&self) -> Command {
        let mut c = Command::new(io::RESERVATION_REGISTER);
        c.set_nsid(self.nsid);
        c.cdw10.set(
            u32::from(self.rrega & 7)
                | (u32::from(self.iekey) << 3)
                | (u32::from(self.cptpl & 3) << 30),
        );
        c
    }
}

/// CDW10 of Acquire and Release: the action (bits 2:0), IEKEY (3) and RTYPE (15:8).
fn action_cdw10(action: u8, iekey: bool, rtype: u8) -> u32 {
    u32::from(action & 7) | (u32::from(iekey) << 3) | (u32::from(rtype) << 8)
}

fn split_action_cdw10(d: u32) -> (u8, bool, u8) {
    ((d & 7) as u8, d & (1 << 3) != 0, (d >> 8) as u8)
}

/// Reservation Acquire (CDW10: RACQA 2:0, IEKEY 3, RTYPE 15:8; data [`AcquireData`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResvAcquire {
    /// Namespace.
    pub nsid: u32,
    /// Action (see [`racqa`]).
    pub racqa: u8,
    /// Ignore Existing Key (reserved since NVMe 1.3 for Acquire).
    pub iekey: bool,
    /// Reservation type (see [`ResvType`]).
    pub rtype: u8,
}

impl ResvAcquire {
    /// Decodes the command's fields.
    pub fn from_command(c: &Command) -> Self {
        let (action, iekey, rtype) = split_action_cdw10(c.cdw10.get());
        ResvAcquire {
            nsid: c.nsid(),
            racqa: action,
            iekey,
            rtype,
        }
    }

    /// The command; its data is a 16-byte [`AcquireData`].
    pub fn to_command(&self) -> Command {
        let mut c = Command::new(io::RESERVATION_ACQUIRE);
        c.set_nsid(self.nsid);
        c.cdw10
            .set(action_cdw10(self.racqa, self.iekey, self.rtype));
        c
    }
}

/// Reservation Release (CDW10: RRELA 2:0, IEKEY 3, RTYPE 15:8; data: CRKEY, 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResvRelease {
    /// Namespace.
    pub nsid: u32,
    /// Action (see [`rrela`]).
    pub rrela: u8,
    /// Ignore Existing Key (reserved since NVMe 1.3 for Release).
    pub iekey: bool,
    /// Type of the reservation being released.
    pub rtype: u8,
}

impl ResvRelease {
    /// Length of the data: the current reservation key.
    pub const DATA_LEN: usize = 8;

    /// Decodes the command's fields.
    pub fn from_command(c: &Command) -> Self {
        let (action, iekey, rtype) = split_action_cdw10(c.cdw10.get());
        ResvRelease {
            nsid: c.nsid(),
            rrela: action,
            iekey,
            rtype,
        }
    }

    /// The command; its data is the 8-byte little-endian CRKEY.
    pub fn to_command(&self) -> Command {
        let mut c = Command::new(io::RESERVATION_RELEASE);
        c.set_nsid(self.nsid);
        c.cdw10
            .set(action_cdw10(self.rrela, self.iekey, self.rtype));
        c
    }
}

/// Reservation Report (CDW10: NUMD, 0's based dwords; CDW11 bit 0: EDS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResvReport {
    /// Namespace.
    pub nsid: u32,
    /// Bytes the host asked for ((NUMD + 1) * 4).
    pub len: u64,
    /// Extended data structure (128-bit host identifiers).
    pub eds: bool,
}

impl ResvReport {
    /// Decodes the command's fields.
    pub fn from_command(c: &Command) -> Self {
        ResvReport {
            nsid: c.nsid(),
            len: (u64::from(c.cdw10.get()) + 1) * 4,
            eds: c.cdw11.get() & 1 != 0,
        }
    }

    /// The command for a buffer of `len` bytes (a multiple of 4, at least 4).
    pub fn to_command(&self) -> Command {
        let mut c = Command::new(io::RESERVATION_REPORT);
        c.set_nsid(self.nsid);
        c.cdw10.set(((self.len / 4).max(1) - 1) as u32);
        c.cdw11.set(u32::from(self.eds));
        c
    }
}

/// Data of Reservation Register: current and new reservation keys.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RegisterData {
    /// Current reservation key.
    pub crkey: U64,
    /// New reservation key.
    pub nrkey: U64,
}
const _: () = assert!(core::mem::size_of::<RegisterData>() == 16);

/// Data of Reservation Acquire: current key and the key to preempt.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct AcquireData {
    /// Current reservation key.
    pub crkey: U64,
    /// Preempt reservation key.
    pub prkey: U64,
}
const _: () = assert!(core::mem::size_of::<AcquireData>() == 16);

/// Header of the extended Reservation Status data structure (64 bytes; the first 24 are the
/// non-extended header).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ResvStatusHeader {
    /// Generation: moves on register, unregister, preempt and clear.
    pub gen: U32,
    /// Type held (0: none).
    pub rtype: u8,
    /// Number of registered controller entries that follow.
    pub regctl: U16,
    /// Reserved.
    pub rsvd7: [u8; 2],
    /// Persist Through Power Loss state.
    pub ptpls: u8,
    /// Reserved.
    pub rsvd10: [u8; 14],
    /// Reserved (extended structure only).
    pub rsvd24: [u8; 40],
}
const _: () = assert!(core::mem::size_of::<ResvStatusHeader>() == 64);

impl Default for ResvStatusHeader {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

/// One Registered Controller extended data structure (64 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RegisteredCtrlrExt {
    /// Controller ID (FFFFh: the dynamic controller model, any controller of the host).
    pub cntlid: U16,
    /// Bit 0: this host holds the reservation.
    pub rcsts: u8,
    /// Reserved.
    pub rsvd3: [u8; 5],
    /// The host's reservation key.
    pub rkey: U64,
    /// 128-bit Host Identifier.
    pub hostid: [u8; 16],
    /// Reserved.
    pub rsvd32: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<RegisteredCtrlrExt>() == 64);

impl Default for RegisteredCtrlrExt {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

/// A decoded extended Reservation Status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResvStatus {
    /// Generation counter.
    pub gen: u32,
    /// Type held, if any.
    pub rtype: Option<ResvType>,
    /// PTPL state.
    pub ptpl: bool,
    /// Registered hosts: (host ID, key, holds the reservation).
    pub registrants: Vec<([u8; 16], u64, bool)>,
}

impl ResvStatus {
    /// Parses an extended Reservation Status. Entries cut off by a short buffer are left out;
    /// `None` if even the header is missing or RTYPE is unknown.
    pub fn parse_extended(b: &[u8]) -> Option<ResvStatus> {
        let (h, rest) = ResvStatusHeader::read_from_prefix(b).ok()?;
        let rtype = match h.rtype {
            0 => None,
            t => Some(ResvType::from_u8(t)?),
        };
        let registrants = rest
            .chunks_exact(64)
            .take(usize::from(h.regctl.get()))
            .filter_map(|c| RegisteredCtrlrExt::read_from_bytes(c).ok())
            .map(|r| (r.hostid, r.rkey.get(), r.rcsts & 1 != 0))
            .collect();
        Some(ResvStatus {
            gen: h.gen.get(),
            rtype,
            ptpl: h.ptpls & 1 != 0,
            registrants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dword10_round_trips() {
        let r = ResvRegister {
            nsid: 3,
            rrega: rrega::REPLACE,
            iekey: true,
            cptpl: cptpl::PERSIST,
        };
        let c = r.to_command();
        assert_eq!(c.opcode, io::RESERVATION_REGISTER);
        assert_eq!(c.cdw10.get(), 0xC000_000A);
        assert_eq!(ResvRegister::from_command(&c), r);
        let a = ResvAcquire {
            nsid: 1,
            racqa: racqa::PREEMPT_AND_ABORT,
            iekey: false,
            rtype: ResvType::ExclusiveAccessAllRegistrants as u8,
        };
        let c = a.to_command();
        assert_eq!(c.cdw10.get(), 0x0602);
        assert_eq!(ResvAcquire::from_command(&c), a);
        let l = ResvRelease {
            nsid: 1,
            rrela: rrela::CLEAR,
            iekey: false,
            rtype: 1,
        };
        assert_eq!(ResvRelease::from_command(&l.to_command()), l);
        let p = ResvReport {
            nsid: 1,
            len: 4096,
            eds: true,
        };
        let c = p.to_command();
        assert_eq!((c.cdw10.get(), c.cdw11.get()), (1023, 1));
        assert_eq!(ResvReport::from_command(&c), p);
    }

    #[test]
    fn access_table() {
        use ResvType::*;
        // (type, registered non-holder, non-registrant) as (read, write).
        let want = [
            (WriteExclusive, (true, false), (true, false)),
            (ExclusiveAccess, (false, false), (false, false)),
            (WriteExclusiveRegistrantsOnly, (true, true), (true, false)),
            (ExclusiveAccessRegistrantsOnly, (true, true), (false, false)),
            (WriteExclusiveAllRegistrants, (true, true), (true, false)),
            (ExclusiveAccessAllRegistrants, (true, true), (false, false)),
        ];
        for (t, reg, non) in want {
            assert_eq!(t.non_holder_access(true), reg, "{t:?} registrant");
            assert_eq!(t.non_holder_access(false), non, "{t:?} non-registrant");
        }
        assert_eq!(ResvType::from_u8(0), None);
        assert_eq!(ResvType::from_u8(7), None);
        assert_eq!(ResvType::from_u8(4), Some(ExclusiveAccessRegistrantsOnly));
    }

    #[test]
    fn status_parses_and_tolerates_short_buffers() {
        let mut b = vec![0u8; 64 + 2 * 64];
        let mut h = ResvStatusHeader::default();
        h.gen.set(7);
        h.rtype = 1;
        h.regctl.set(2);
        h.ptpls = 1;
        b[..64].copy_from_slice(h.as_bytes());
        let mut r = RegisteredCtrlrExt::default();
        r.cntlid.set(0xFFFF);
        r.rcsts = 1;
        r.rkey.set(0xAB);
        r.hostid = [9; 16];
        b[64..128].copy_from_slice(r.as_bytes());
        let s = ResvStatus::parse_extended(&b).unwrap();
        assert_eq!(s.gen, 7);
        assert_eq!(s.rtype, Some(ResvType::WriteExclusive));
        assert!(s.ptpl);
        assert_eq!(s.registrants.len(), 2);
        assert_eq!(s.registrants[0], ([9; 16], 0xAB, true));
        // One entry cut off: only what arrived.
        assert_eq!(
            ResvStatus::parse_extended(&b[..100])
                .unwrap()
                .registrants
                .len(),
            0
        );
        assert!(ResvStatus::parse_extended(&b[..10]).is_none());
        b[4] = 9;
        assert!(ResvStatus::parse_extended(&b).is_none());
    }
}
