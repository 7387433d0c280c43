//! Log pages (Base 2.0 "Log Page Identifiers" and the structures after it)
//! and asynchronous event encodings.

use crate::status::Status;
use crate::util::{fill_ascii_padded, fill_nul_padded, until_nul};
use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Log Page Identifiers.
pub mod lid {
    /// Supported Log Pages.
    pub const SUPPORTED_LOG_PAGES: u8 = 0x00;
    /// Error Information.
    pub const ERROR_INFO: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS_LIST: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const CMD_EFFECTS: u8 = 0x05;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    /// Telemetry Host-Initiated.
    pub const TELEMETRY_HOST: u8 = 0x07;
    /// Telemetry Controller-Initiated.
    pub const TELEMETRY_CTRL: u8 = 0x08;
    /// Endurance Group Information.
    pub const ENDURANCE_GROUP: u8 = 0x09;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0C;
    /// Persistent Event Log.
    pub const PERSISTENT_EVENT: u8 = 0x0D;
    /// Discovery (discovery controllers only).
    pub const DISCOVERY: u8 = 0x70;
    /// Reservation Notification.
    pub const RESERVATION_NOTIFICATION: u8 = 0x80;
    /// Sanitize Status.
    pub const SANITIZE_STATUS: u8 = 0x81;
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

/// Error Information log entry (64 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ErrorInfoEntry {
    /// Unique, increasing error count; 0 = empty entry.
    pub error_count: U64,
    /// Submission queue of the failed command.
    pub sqid: U16,
    /// Command identifier.
    pub cmdid: U16,
    /// Status field of the completion (bit 0 is the phase tag).
    pub status_field: U16,
    /// Byte (7:0) and bit (10:8) of the command parameter in error.
    pub param_error_location: U16,
    /// First LBA that saw the error.
    pub lba: U64,
    /// Namespace.
    pub nsid: U32,
    /// Vendor specific information available (log page id).
    pub vs: u8,
    /// Transport type.
    pub trtype: u8,
    /// Reserved.
    pub rsvd30: [u8; 2],
    /// Command specific information.
    pub cs: U64,
    /// Transport type specific information.
    pub trtype_specific: U16,
    /// Reserved.
    pub rsvd42: [u8; 22],
}
wire_struct!(ErrorInfoEntry, 64);

impl ErrorInfoEntry {
    /// The status recorded in the entry.
    pub fn status(&self) -> Status {
        Status::from_word(self.status_field.get())
    }
}

/// SMART / Health Information log page (512 bytes). 128-bit counters are
/// little-endian [`U128`]; data units are thousands of 512-byte units.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature (Kelvin).
    pub temperature: U16,
    /// Available spare (%).
    pub avail_spare: u8,
    /// Available spare threshold (%).
    pub spare_thresh: u8,
    /// Percentage used.
    pub percent_used: u8,
    /// Endurance group critical warning summary.
    pub endu_grp_crit_warn: u8,
    /// Reserved.
    pub rsvd7: [u8; 25],
    /// Data units read.
    pub data_units_read: U128,
    /// Data units written.
    pub data_units_written: U128,
    /// Host read commands.
    pub host_reads: U128,
    /// Host write commands.
    pub host_writes: U128,
    /// Controller busy time (minutes).
    pub ctrl_busy_time: U128,
    /// Power cycles.
    pub power_cycles: U128,
    /// Power on hours.
    pub power_on_hours: U128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: U128,
    /// Media and data integrity errors.
    pub media_errors: U128,
    /// Number of error information log entries.
    pub num_err_log_entries: U128,
    /// Warning composite temperature time (minutes).
    pub warning_temp_time: U32,
    /// Critical composite temperature time (minutes).
    pub critical_comp_time: U32,
    /// Temperature sensors 1..8 (Kelvin).
    pub temp_sensor: [U16; 8],
    /// Thermal management temperature 1 transition count.
    pub thm_temp1_trans_count: U32,
    /// Thermal management temperature 2 transition count.
    pub thm_temp2_trans_count: U32,
    /// Total time for thermal management temperature 1.
    pub thm_temp1_total_time: U32,
    /// Total time for thermal management temperature 2.
    pub thm_temp2_total_time: U32,
    /// Reserved.
    pub rsvd232: [u8; 280],
}
wire_struct!(SmartLog, 512);

/// Converts a byte count to SMART data units (1000 * 512 bytes, rounded up).
pub const fn bytes_to_data_units(bytes: u128) -> u128 {
    bytes.div_ceil(512_000)
}

/// Firmware Slot Information log page (512 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FwSlotLog {
    /// Active firmware info: bits 2:0 active slot, bits 6:4 next-reset slot.
    pub afi: u8,
    /// Reserved.
    pub rsvd1: [u8; 7],
    /// Firmware revision per slot 1..7 (ASCII, space padded).
    pub frs: [[u8; 8]; 7],
    /// Reserved.
    pub rsvd64: [u8; 448],
}
wire_struct!(FwSlotLog, 512);

impl FwSlotLog {
    /// A controller with one firmware slot: slot 1 active and holding `rev` (space padded,
    /// cut at 8 bytes).
    pub fn single_slot(rev: &str) -> Self {
        let mut l = Self::new_zeroed();
        l.afi = 1;
        fill_ascii_padded(&mut l.frs[0], rev);
        l
    }
}

/// Changed Namespace List log page: same layout as the Active NS list.
pub type ChangedNamespaceList = crate::identify::NamespaceList;

/// The Changed Namespace List for `nsids` (any order, duplicates allowed): ascending, or,
/// when more than 1024 namespaces changed, FFFFFFFFh in the first entry and zeros after, as
/// the spec asks so the host rescans everything.
pub fn changed_namespace_list(nsids: &[u32]) -> ChangedNamespaceList {
    let (list, n) = ChangedNamespaceList::from_ids(0, nsids.iter().copied());
    let overflow = n == list.ids.len() && nsids.iter().any(|&id| id > list.ids[n - 1].get());
    if !overflow {
        return list;
    }
    let mut l = ChangedNamespaceList::new_zeroed();
    l.ids[0].set(u32::MAX);
    l
}

/// Commands Supported and Effects log page (4096 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdEffectsLog {
    /// Admin commands, indexed by opcode.
    pub acs: [U32; 256],
    /// I/O commands, indexed by opcode.
    pub iocs: [U32; 256],
    /// Reserved.
    pub rsvd: [u8; 2048],
}
wire_struct!(CmdEffectsLog, 4096);

/// Bits of a Commands Supported and Effects entry.
pub mod effects {
    /// Command supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical block content change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace capability change.
    pub const NCC: u32 = 1 << 2;
    /// Namespace inventory change.
    pub const NIC: u32 = 1 << 3;
    /// Controller capability change.
    pub const CCC: u32 = 1 << 4;
}

/// Transport types (TRTYPE).
pub mod trtype {
    /// RDMA.
    pub const RDMA: u8 = 1;
    /// Fibre Channel.
    pub const FC: u8 = 2;
    /// TCP.
    pub const TCP: u8 = 3;
    /// Intra-host (loopback).
    pub const LOOP: u8 = 254;
}

/// Address families (ADRFAM).
pub mod adrfam {
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
    /// InfiniBand.
    pub const IB: u8 = 3;
    /// Fibre Channel.
    pub const FC: u8 = 4;
    /// Intra-host.
    pub const LOOP: u8 = 254;
}

/// Discovery entry subsystem types (SUBTYPE).
pub mod subtype {
    /// A referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    /// An NVM subsystem.
    pub const NVME: u8 = 2;
    /// The discovery subsystem reporting the log page.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport requirements (TREQ).
pub mod treq {
    /// Secure channel: not specified.
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0;
    /// Secure channel: required.
    pub const SECURE_CHANNEL_REQUIRED: u8 = 1;
    /// Secure channel: not required.
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 2;
    /// SQ flow control disable supported (SQHD may be FFFFh).
    pub const DISABLE_SQFLOW: u8 = 1 << 2;
}

/// NVMe/TCP TSAS security type (byte 0 of TSAS).
pub mod tcp_sectype {
    /// No security.
    pub const NONE: u8 = 0;
    /// TLS 1.2.
    pub const TLS12: u8 = 1;
    /// TLS 1.3.
    pub const TLS13: u8 = 2;
}

/// The first bytes of an RDMA entry's TSAS: queue pair type, provider type, connection
/// management service (then reserved bytes and a partition key of 0).
pub mod rdma_tsas {
    /// Reliable connected queue pairs.
    pub const QPTYPE_CONNECTED: u8 = 1;
    /// No provider type specified.
    pub const PRTYPE_NOT_SPECIFIED: u8 = 1;
    /// The RDMA/IP connection manager (RDMA_CM).
    pub const CMS_RDMA_CM: u8 = 1;
}

/// Discovery log page header (1024 bytes); `numrec` entries follow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    /// Generation counter; changes whenever the log changes.
    pub genctr: U64,
    /// Number of records.
    pub numrec: U64,
    /// Record format; 0.
    pub recfmt: U16,
    /// Reserved.
    pub rsvd: [u8; 1006],
}
wire_struct!(DiscoveryLogHeader, 1024);

/// One Discovery log page entry (1024 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DiscoveryLogEntry {
    /// Transport type ([`trtype`]).
    pub trtype: u8,
    /// Address family ([`adrfam`]).
    pub adrfam: u8,
    /// Subsystem type ([`subtype`]).
    pub subtype: u8,
    /// Transport requirements ([`treq`]).
    pub treq: u8,
    /// Port identifier.
    pub portid: U16,
    /// Controller ID (FFFFh for the dynamic model).
    pub cntlid: U16,
    /// Admin max SQ size.
    pub asqsz: U16,
    /// Entry flags.
    pub eflags: U16,
    /// Reserved.
    pub rsvd12: [u8; 20],
    /// Transport service identifier (TCP port, ASCII).
    pub trsvcid: [u8; 32],
    /// Reserved.
    pub rsvd64: [u8; 192],
    /// Subsystem NQN.
    pub subnqn: [u8; 256],
    /// Transport address (IP address, ASCII).
    pub traddr: [u8; 256],
    /// Transport specific address subtype (TCP: byte 0 is SECTYPE).
    pub tsas: [u8; 256],
}
wire_struct!(DiscoveryLogEntry, 1024);

/// Discovery entry flags (EFLAGS).
pub mod eflags {
    /// Explicit persistent connection support for discovery.
    pub const EPCSD: u16 = 1 << 0;
    /// Duplicate returned information.
    pub const DUPRETINFO: u16 = 1 << 1;
    /// No CDC connectivity.
    pub const NCC: u16 = 1 << 2;
}

impl DiscoveryLogEntry {
    /// An NVMe/TCP entry. Strings are NUL padded; `None` if one does not fit.
    pub fn tcp(
        subtype: u8,
        subnqn: &str,
        traddr: &str,
        trsvcid: &str,
        ipv6: bool,
        portid: u16,
    ) -> Option<Self> {
        let mut e = Self::ip_entry(trtype::TCP, subtype, subnqn, traddr, trsvcid, ipv6, portid)?;
        e.tsas[0] = tcp_sectype::NONE;
        Some(e)
    }

    /// An NVMe/RDMA entry: reliable connected queue pairs, no provider named, the RDMA/IP
    /// connection manager. `None` if a string does not fit.
    pub fn rdma(
        subtype: u8,
        subnqn: &str,
        traddr: &str,
        trsvcid: &str,
        ipv6: bool,
        portid: u16,
    ) -> Option<Self> {
        let mut e = Self::ip_entry(trtype::RDMA, subtype, subnqn, traddr, trsvcid, ipv6, portid)?;
        e.tsas[..3].copy_from_slice(&[
            rdma_tsas::QPTYPE_CONNECTED,
            rdma_tsas::PRTYPE_NOT_SPECIFIED,
            rdma_tsas::CMS_RDMA_CM,
        ]);
        Some(e)
    }

    fn ip_entry(
        trtype: u8,
        subtype: u8,
        subnqn: &str,
        traddr: &str,
        trsvcid: &str,
        ipv6: bool,
        portid: u16,
    ) -> Option<Self> {
        let mut e = Self::new_zeroed();
        e.trtype = trtype;
        e.adrfam = if ipv6 { adrfam::IPV6 } else { adrfam::IPV4 };
        e.subtype = subtype;
        e.treq = treq::SECURE_CHANNEL_NOT_REQUIRED;
        e.portid.set(portid);
        e.cntlid.set(crate::fabrics::CNTLID_DYNAMIC);
        e.asqsz.set(32);
        let ok = fill_nul_padded(&mut e.subnqn, subnqn)
            && fill_nul_padded(&mut e.traddr, traddr)
            && fill_nul_padded(&mut e.trsvcid, trsvcid);
        ok.then_some(e)
    }

    /// The entry with TRADDR and TRSVCID space padded instead of NUL padded, as SPDK's target
    /// writes them (hosts trim either).
    pub fn with_space_padded_addresses(mut self) -> Self {
        for field in [&mut self.traddr[..], &mut self.trsvcid[..]] {
            let len = until_nul(field).len();
            field[len..].fill(b' ');
        }
        self
    }

    /// Subsystem NQN (up to the first NUL); `None` if not UTF-8.
    pub fn subnqn_str(&self) -> Option<&str> {
        core::str::from_utf8(until_nul(&self.subnqn)).ok()
    }

    /// Transport address, trailing spaces and NULs removed.
    pub fn traddr_str(&self) -> Option<&str> {
        crate::util::read_ascii_padded(until_nul(&self.traddr))
    }

    /// Transport service id, trailing spaces and NULs removed.
    pub fn trsvcid_str(&self) -> Option<&str> {
        crate::util::read_ascii_padded(until_nul(&self.trsvcid))
    }
}

/// ANA log page header (16 bytes); descriptors follow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AnaLogHeader {
    /// Change count.
    pub chgcnt: U64,
    /// Number of ANA group descriptors.
    pub ngrps: U16,
    /// Reserved.
    pub rsvd: [u8; 6],
}
wire_struct!(AnaLogHeader, 16);

/// ANA group descriptor (32 bytes), followed by `nnsids` 4-byte NSIDs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AnaGroupDescriptor {
    /// ANA group id.
    pub grpid: U32,
    /// Number of NSIDs that follow (0 when the RGO bit of LSP was set).
    pub nnsids: U32,
    /// Change count.
    pub chgcnt: U64,
    /// ANA state ([`ana_state`]) in bits 3:0.
    pub state: u8,
    /// Reserved.
    pub rsvd: [u8; 15],
}
wire_struct!(AnaGroupDescriptor, 32);

/// ANA states.
pub mod ana_state {
    /// Optimized.
    pub const OPTIMIZED: u8 = 0x1;
    /// Non-optimized.
    pub const NON_OPTIMIZED: u8 = 0x2;
    /// Inaccessible.
    pub const INACCESSIBLE: u8 = 0x3;
    /// Persistent loss.
    pub const PERSISTENT_LOSS: u8 = 0x4;
    /// Change.
    pub const CHANGE: u8 = 0xF;
}

/// ANA Get Log Page LSP bit 0: return groups only (RGO), no NSID lists.
pub const ANA_LSP_RGO: u8 = 1;

/// Asynchronous event types (AER completion DW0 bits 2:0).
pub mod aer_type {
    /// Error status.
    pub const ERROR: u8 = 0;
    /// SMART / health status.
    pub const SMART: u8 = 1;
    /// Notice.
    pub const NOTICE: u8 = 2;
    /// Immediate.
    pub const IMMEDIATE: u8 = 3;
    /// One-shot.
    pub const ONE_SHOT: u8 = 4;
    /// I/O command set specific.
    pub const IO_COMMAND_SET: u8 = 6;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Asynchronous event information for notices (AER DW0 bits 15:8).
pub mod aer_notice {
    /// Namespace attribute changed; read log page 04h.
    pub const NS_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Firmware activation starting.
    pub const FW_ACTIVATION_STARTING: u8 = 0x01;
    /// Telemetry log changed.
    pub const TELEMETRY_LOG_CHANGED: u8 = 0x02;
    /// ANA change; read log page 0Ch.
    pub const ANA_CHANGE: u8 = 0x03;
    /// Discovery log page change; read log page 70h.
    pub const DISCOVERY_LOG_CHANGE: u8 = 0xF0;
}

/// An asynchronous event as carried in DW0 of an AER completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Event type ([`aer_type`]).
    pub event_type: u8,
    /// Event information ([`aer_notice`] for notices).
    pub info: u8,
    /// Log page the host should read to clear the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// The "namespace attribute changed" notice (type 2, info 0, log 04h).
    pub const NS_CHANGED: AsyncEvent = AsyncEvent {
        event_type: aer_type::NOTICE,
        info: aer_notice::NS_ATTRIBUTE_CHANGED,
        log_page: lid::CHANGED_NS_LIST,
    };
    /// The ANA change notice (type 2, info 3, log 0Ch).
    pub const ANA_CHANGED: AsyncEvent = AsyncEvent {
        event_type: aer_type::NOTICE,
        info: aer_notice::ANA_CHANGE,
        log_page: lid::ANA,
    };
    /// The discovery log change notice (type 2, info F0h, log 70h).
    pub const DISCOVERY_CHANGED: AsyncEvent = AsyncEvent {
        event_type: aer_type::NOTICE,
        info: aer_notice::DISCOVERY_LOG_CHANGE,
        log_page: lid::DISCOVERY,
    };

    /// DW0 encoding.
    pub const fn to_dw0(&self) -> u32 {
        (self.event_type as u32 & 0x7) | ((self.info as u32) << 8) | ((self.log_page as u32) << 16)
    }

    /// Decodes DW0.
    pub const fn from_dw0(v: u32) -> Self {
        AsyncEvent {
            event_type: (v & 0x7) as u8,
            info: (v >> 8) as u8,
            log_page: (v >> 16) as u8,
        }
    }
}

/// Copies the part of a log page a Get Log Page asked for: `offset` bytes
/// in, at most `out.len()` bytes. Returns how many bytes were copied (the
/// rest of `out` is zeroed, as the spec asks for reads past the end), or
/// `None` if `offset` is beyond the page (answer Invalid Field in Command).
pub fn copy_log_window(page: &[u8], offset: u64, out: &mut [u8]) -> Option<usize> {
    let off = usize::try_from(offset).ok()?;
    if off > page.len() {
        return None;
    }
    let src = page.get(off..)?;
    let n = src.len().min(out.len());
    out[..n].copy_from_slice(&src[..n]);
    out[n..].fill(0);
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn offsets() {
        assert_eq!(offset_of!(ErrorInfoEntry, status_field), 12);
        assert_eq!(offset_of!(ErrorInfoEntry, lba), 16);
        assert_eq!(offset_of!(ErrorInfoEntry, nsid), 24);
        assert_eq!(offset_of!(ErrorInfoEntry, cs), 32);
        assert_eq!(offset_of!(SmartLog, temperature), 1);
        assert_eq!(offset_of!(SmartLog, avail_spare), 3);
        assert_eq!(offset_of!(SmartLog, data_units_read), 32);
        assert_eq!(offset_of!(SmartLog, host_writes), 80);
        assert_eq!(offset_of!(SmartLog, power_on_hours), 128);
        assert_eq!(offset_of!(SmartLog, media_errors), 160);
        assert_eq!(offset_of!(SmartLog, num_err_log_entries), 176);
        assert_eq!(offset_of!(SmartLog, warning_temp_time), 192);
        assert_eq!(offset_of!(SmartLog, temp_sensor), 200);
        assert_eq!(offset_of!(SmartLog, thm_temp1_trans_count), 216);
        assert_eq!(offset_of!(FwSlotLog, frs), 8);
        assert_eq!(offset_of!(CmdEffectsLog, iocs), 1024);
        assert_eq!(offset_of!(DiscoveryLogHeader, recfmt), 16);
        assert_eq!(offset_of!(DiscoveryLogEntry, portid), 4);
        assert_eq!(offset_of!(DiscoveryLogEntry, cntlid), 6);
        assert_eq!(offset_of!(DiscoveryLogEntry, asqsz), 8);
        assert_eq!(offset_of!(DiscoveryLogEntry, eflags), 10);
        assert_eq!(offset_of!(DiscoveryLogEntry, trsvcid), 32);
        assert_eq!(offset_of!(DiscoveryLogEntry, subnqn), 256);
        assert_eq!(offset_of!(DiscoveryLogEntry, traddr), 512);
        assert_eq!(offset_of!(DiscoveryLogEntry, tsas), 768);
        assert_eq!(offset_of!(AnaGroupDescriptor, chgcnt), 8);
        assert_eq!(offset_of!(AnaGroupDescriptor, state), 16);
    }

    #[test]
    fn smart_counters_are_128_bit_le() {
        let mut s = SmartLog::default();
        s.data_units_written
            .set(bytes_to_data_units(1_024_000) + (1u128 << 64));
        assert_eq!(
            &s.as_bytes()[48..64],
            &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        s.temperature.set(300);
        assert_eq!(&s.as_bytes()[1..3], &300u16.to_le_bytes());
        assert_eq!(bytes_to_data_units(1), 1);
        assert_eq!(bytes_to_data_units(0), 0);
    }

    #[test]
    fn discovery_entry() {
        let e = DiscoveryLogEntry::tcp(
            subtype::NVME,
            "nqn.2024-01.io.plexstor:v1",
            "10.0.0.1",
            "4420",
            false,
            1,
        )
        .unwrap();
        let b = e.as_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(b[1], 1);
        assert_eq!(b[2], 2);
        assert_eq!(&b[6..8], &[0xFF, 0xFF]);
        assert_eq!(&b[32..37], b"4420\0");
        assert_eq!(&b[512..521], b"10.0.0.1\0");
        assert_eq!(e.subnqn_str(), Some("nqn.2024-01.io.plexstor:v1"));
        assert_eq!(e.traddr_str(), Some("10.0.0.1"));
        let mut sp = e;
        sp.trsvcid = [b' '; 32];
        sp.trsvcid[..4].copy_from_slice(b"8009");
        assert_eq!(sp.trsvcid_str(), Some("8009"));
        assert!(DiscoveryLogEntry::tcp(2, &"n".repeat(300), "a", "1", false, 0).is_none());
    }

    #[test]
    fn discovery_entry_space_padded() {
        let e = DiscoveryLogEntry::tcp(subtype::NVME, "nqn.x", "127.0.0.1", "4420", false, 7)
            .unwrap()
            .with_space_padded_addresses();
        let b = e.as_bytes();
        assert_eq!(&b[0..10], &[3, 1, 2, 2, 7, 0, 0xFF, 0xFF, 32, 0]);
        let mut trsvcid = [b' '; 32];
        trsvcid[..4].copy_from_slice(b"4420");
        assert_eq!(&b[32..64], &trsvcid);
        assert_eq!(&b[256..262], b"nqn.x\0");
        assert!(b[262..512].iter().all(|&x| x == 0));
        let mut traddr = [b' '; 256];
        traddr[..9].copy_from_slice(b"127.0.0.1");
        assert_eq!(&b[512..768], &traddr);
        assert!(b[768..].iter().all(|&x| x == 0));
        assert_eq!(e.traddr_str(), Some("127.0.0.1"));
        assert_eq!(e.trsvcid_str(), Some("4420"));
    }

    #[test]
    fn firmware_single_slot() {
        let l = FwSlotLog::single_slot("0.1.0");
        let b = l.as_bytes();
        assert_eq!(b[0], 1);
        assert!(b[1..8].iter().all(|&x| x == 0));
        assert_eq!(&b[8..16], b"0.1.0   ");
        assert!(b[16..].iter().all(|&x| x == 0));
        assert_eq!(&FwSlotLog::single_slot("123456789").frs[0], b"12345678");
    }

    #[test]
    fn changed_namespace_list_layout() {
        let l = changed_namespace_list(&[9, 2, 9, 5]);
        let b = l.as_bytes();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..16], &[2, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        assert!(b[12..].iter().all(|&x| x == 0));
        assert!(changed_namespace_list(&[])
            .as_bytes()
            .iter()
            .all(|&x| x == 0));
        let full: Vec<u32> = (1..=1024).collect();
        assert_eq!(changed_namespace_list(&full).ids[1023].get(), 1024);
        let over: Vec<u32> = (1..=1025).rev().collect();
        let b = changed_namespace_list(&over);
        assert_eq!(&b.as_bytes()[0..4], &[0xFF; 4]);
        assert!(b.as_bytes()[4..].iter().all(|&x| x == 0));
    }

    #[test]
    fn async_events() {
        assert_eq!(AsyncEvent::NS_CHANGED.to_dw0(), 0x0004_0002);
        assert_eq!(AsyncEvent::DISCOVERY_CHANGED.to_dw0(), 0x0070_F002);
        assert_eq!(AsyncEvent::from_dw0(0x000C_0302), AsyncEvent::ANA_CHANGED);
    }

    #[test]
    fn log_window() {
        let page = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut out = [0xEEu8; 6];
        assert_eq!(copy_log_window(&page, 4, &mut out), Some(4));
        assert_eq!(out, [5, 6, 7, 8, 0, 0]);
        assert_eq!(copy_log_window(&page, 8, &mut out), Some(0));
        assert_eq!(copy_log_window(&page, 9, &mut out), None);
        assert_eq!(copy_log_window(&page, u64::MAX, &mut out), None);
    }
}
