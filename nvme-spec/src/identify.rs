//! Identify data structures (Base 2.0 "Identify Controller Data Structure",
//! NVM Command Set 1.0 "Identify Namespace Data Structure", Base 2.0
//! "Namespace Identification Descriptor") and CNS values.
//!
//! All are 4096 bytes. Fields are public little-endian values so a target
//! fills them directly; the few bit fields people get wrong have helpers.

use crate::util::{fill_ascii_padded, read_ascii_padded};
use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of every Identify data structure.
pub const IDENTIFY_DATA_SIZE: usize = 4096;

/// Controller or Namespace Structure (CNS) values (Identify CDW10 7:0).
pub mod cns {
    /// Identify Namespace (NVM command set).
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list.
    pub const NS_DESC_LIST: u8 = 0x03;
    /// NVM Set list.
    pub const NVM_SET_LIST: u8 = 0x04;
    /// I/O command set specific Identify Namespace.
    pub const CSI_NAMESPACE: u8 = 0x05;
    /// I/O command set specific Identify Controller.
    pub const CSI_CONTROLLER: u8 = 0x06;
    /// Active Namespace ID list of an I/O command set.
    pub const CSI_ACTIVE_NS_LIST: u8 = 0x07;
    /// I/O command set independent Identify Namespace.
    pub const CS_INDEPENDENT_NAMESPACE: u8 = 0x08;
    /// Allocated Namespace ID list.
    pub const ALLOCATED_NS_LIST: u8 = 0x10;
    /// Identify Namespace for an allocated NSID.
    pub const ALLOCATED_NAMESPACE: u8 = 0x11;
    /// Controllers attached to a namespace.
    pub const NS_CONTROLLER_LIST: u8 = 0x12;
    /// Controllers in the subsystem.
    pub const CONTROLLER_LIST: u8 = 0x13;
    /// Primary Controller Capabilities.
    pub const PRIMARY_CTRL_CAPS: u8 = 0x14;
    /// Secondary Controller list.
    pub const SECONDARY_CTRL_LIST: u8 = 0x15;
    /// Namespace Granularity list.
    pub const NS_GRANULARITY: u8 = 0x16;
    /// UUID list.
    pub const UUID_LIST: u8 = 0x17;
    /// Identify I/O Command Set data structure.
    pub const COMMAND_SET: u8 = 0x1C;
}

/// Command Set Identifiers (CSI).
pub mod csi {
    /// NVM command set.
    pub const NVM: u8 = 0x00;
    /// Key Value command set.
    pub const KV: u8 = 0x01;
    /// Zoned Namespace command set.
    pub const ZNS: u8 = 0x02;
}

/// Power State Descriptor (32 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct PowerState {
    /// Maximum power (centiwatts, or 0.0001 W units if MXPS).
    pub mp: U16,
    /// Reserved.
    pub rsvd2: u8,
    /// Bit 0 MXPS (max power scale), bit 1 NOPS (non-operational state).
    pub flags: u8,
    /// Entry latency (µs).
    pub enlat: U32,
    /// Exit latency (µs).
    pub exlat: U32,
    /// Relative read throughput.
    pub rrt: u8,
    /// Relative read latency.
    pub rrl: u8,
    /// Relative write throughput.
    pub rwt: u8,
    /// Relative write latency.
    pub rwl: u8,
    /// Idle power.
    pub idlp: U16,
    /// Idle power scale (bits 7:6).
    pub ips: u8,
    /// Reserved.
    pub rsvd19: u8,
    /// Active power.
    pub actp: U16,
    /// Active power workload (bits 2:0) and scale (bits 7:6).
    pub apws: u8,
    /// Reserved.
    pub rsvd23: [u8; 9],
}
const _: () = assert!(core::mem::size_of::<PowerState>() == 32);

/// Identify Controller data structure (CNS 01h).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: U16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: U16,
    /// Serial number, ASCII, space padded.
    pub sn: [u8; 20],
    /// Model number, ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware revision, ASCII, space padded.
    pub fr: [u8; 8],
    /// Recommended arbitration burst.
    pub rab: u8,
    /// IEEE OUI (little-endian 3 bytes).
    pub ieee: [u8; 3],
    /// Multi-path I/O and namespace sharing (bit 0 multi-port, 1 multi-controller, 3 ANA).
    pub cmic: u8,
    /// Maximum data transfer size as a power of two of CAP.MPSMIN pages; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: U16,
    /// Version, same encoding as the VS property.
    pub ver: U32,
    /// RTD3 resume latency (µs).
    pub rtd3r: U32,
    /// RTD3 entry latency (µs).
    pub rtd3e: U32,
    /// Optional asynchronous events supported (see [`oaes`]).
    pub oaes: U32,
    /// Controller attributes (bit 0 128-bit host ID, ...).
    pub ctratt: U32,
    /// Read recovery levels supported.
    pub rrls: U16,
    /// Reserved.
    pub rsvd102: [u8; 9],
    /// Controller type: 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    /// FRU globally unique identifier.
    pub fguid: [u8; 16],
    /// Command retry delay time 1 (100 ms units).
    pub crdt1: U16,
    /// Command retry delay time 2.
    pub crdt2: U16,
    /// Command retry delay time 3.
    pub crdt3: U16,
    /// Reserved.
    pub rsvd134: [u8; 119],
    /// NVM subsystem report (NVMe-MI).
    pub nvmsr: u8,
    /// VPD write cycle information (NVMe-MI).
    pub vwci: u8,
    /// Management endpoint capabilities (NVMe-MI).
    pub mec: u8,
    /// Optional admin command support (see [`oacs`]).
    pub oacs: U16,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Asynchronous event request limit, 0's based.
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes (see [`lpa`]).
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    /// Number of power states supported, 0's based.
    pub npss: u8,
    /// Admin vendor specific command configuration.
    pub avscc: u8,
    /// Autonomous power state transition attributes.
    pub apsta: u8,
    /// Warning composite temperature threshold (Kelvin).
    pub wctemp: U16,
    /// Critical composite temperature threshold (Kelvin).
    pub cctemp: U16,
    /// Maximum time for firmware activation (100 ms units).
    pub mtfa: U16,
    /// Host memory buffer preferred size (4 KiB units).
    pub hmpre: U32,
    /// Host memory buffer minimum size (4 KiB units).
    pub hmmin: U32,
    /// Total NVM capacity (bytes).
    pub tnvmcap: U128,
    /// Unallocated NVM capacity (bytes).
    pub unvmcap: U128,
    /// Replay protected memory block support.
    pub rpmbs: U32,
    /// Extended device self-test time (minutes).
    pub edstt: U16,
    /// Device self-test options.
    pub dsto: u8,
    /// Firmware update granularity (4 KiB units).
    pub fwug: u8,
    /// Keep alive support: granularity in 100 ms units; 0 = keep alive unsupported.
    pub kas: U16,
    /// Host controlled thermal management attributes.
    pub hctma: U16,
    /// Minimum thermal management temperature.
    pub mntmt: U16,
    /// Maximum thermal management temperature.
    pub mxtmt: U16,
    /// Sanitize capabilities.
    pub sanicap: U32,
    /// Host memory buffer minimum descriptor entry size.
    pub hmminds: U32,
    /// Host memory maximum descriptors entries.
    pub hmmaxd: U16,
    /// NVM set identifier maximum.
    pub nsetidmax: U16,
    /// Endurance group identifier maximum.
    pub endgidmax: U16,
    /// ANA transition time (seconds).
    pub anatt: u8,
    /// ANA capabilities.
    pub anacap: u8,
    /// ANA group identifier maximum.
    pub anagrpmax: U32,
    /// Number of ANA group identifiers.
    pub nanagrpid: U32,
    /// Persistent event log size (64 KiB units).
    pub pels: U32,
    /// Domain identifier.
    pub domainid: U16,
    /// Reserved.
    pub rsvd358: [u8; 10],
    /// Max endurance group capacity.
    pub megcap: U128,
    /// Reserved.
    pub rsvd384: [u8; 128],
    /// SQ entry size: bits 3:0 required (log2), bits 7:4 maximum. 0x66 for 64 bytes.
    pub sqes: u8,
    /// CQ entry size: bits 3:0 required (log2), bits 7:4 maximum. 0x44 for 16 bytes.
    pub cqes: u8,
    /// Maximum outstanding commands (Fabrics).
    pub maxcmd: U16,
    /// Number of namespaces (largest valid NSID).
    pub nn: U32,
    /// Optional NVM command support (see [`oncs`]).
    pub oncs: U16,
    /// Fused operation support.
    pub fuses: U16,
    /// Format NVM attributes.
    pub fna: u8,
    /// Volatile write cache: bit 0 present, bits 2:1 flush-all (NSID FFFFFFFFh) behaviour.
    pub vwc: u8,
    /// Atomic write unit normal, 0's based blocks.
    pub awun: U16,
    /// Atomic write unit power fail, 0's based blocks.
    pub awupf: U16,
    /// I/O command set vendor specific command configuration (NVSCC).
    pub nvscc: u8,
    /// Namespace write protection capabilities.
    pub nwpc: u8,
    /// Atomic compare and write unit, 0's based blocks.
    pub acwu: U16,
    /// Copy descriptor formats supported.
    pub ocfs: U16,
    /// SGL support (see [`sgls`]).
    pub sgls: U32,
    /// Maximum number of allowed namespaces.
    pub mnan: U32,
    /// Maximum domain namespace attachments.
    pub maxdna: U128,
    /// Maximum I/O controller namespace attachments.
    pub maxcna: U32,
    /// Reserved.
    pub rsvd564: [u8; 204],
    /// NVM subsystem NQN, NUL-terminated.
    pub subnqn: [u8; 256],
    /// Reserved.
    pub rsvd1024: [u8; 768],
    /// Fabrics: I/O queue command capsule supported size (16-byte units; 4 = SQE only).
    pub ioccsz: U32,
    /// Fabrics: I/O queue response capsule supported size (16-byte units).
    pub iorcsz: U32,
    /// Fabrics: in-capsule data offset (16-byte units).
    pub icdoff: U16,
    /// Fabrics controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// Maximum SGL data block descriptors; 0 = no limit.
    pub msdbd: u8,
    /// Optional fabric commands support (bit 0: Disconnect).
    pub ofcs: U16,
    /// Reserved.
    pub rsvd1806: [u8; 242],
    /// Power state descriptors 0..31.
    pub psd: [PowerState; 32],
    /// Vendor specific.
    pub vs: [u8; 1024],
}
const _: () = assert!(core::mem::size_of::<IdentifyController>() == IDENTIFY_DATA_SIZE);

/// OACS bits.
pub mod oacs {
    /// Security Send/Receive.
    pub const SECURITY: u16 = 1 << 0;
    /// Format NVM.
    pub const FORMAT: u16 = 1 << 1;
    /// Firmware download/commit.
    pub const FIRMWARE: u16 = 1 << 2;
    /// Namespace management.
    pub const NS_MANAGEMENT: u16 = 1 << 3;
    /// Device self-test.
    pub const SELF_TEST: u16 = 1 << 4;
    /// Directives.
    pub const DIRECTIVES: u16 = 1 << 5;
    /// NVMe-MI send/receive.
    pub const NVME_MI: u16 = 1 << 6;
    /// Virtualization management.
    pub const VIRTUALIZATION: u16 = 1 << 7;
    /// Doorbell buffer config.
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
    /// Get LBA status.
    pub const GET_LBA_STATUS: u16 = 1 << 9;
}

/// ONCS bits.
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set/Get Features.
    pub const SAVE_FEATURES: u16 = 1 << 4;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
    /// Verify.
    pub const VERIFY: u16 = 1 << 7;
    /// Copy.
    pub const COPY: u16 = 1 << 8;
}

/// CTRATT bits.
pub mod ctratt {
    /// 128-bit Host Identifier supported (what NVMe over Fabrics uses).
    pub const HOST_ID_128: u32 = 1 << 0;
}

/// OAES bits (which optional asynchronous events the controller sends).
pub mod oaes {
    /// Namespace Attribute Notices (changed namespace list).
    pub const NS_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices.
    pub const FW_ACTIVATION: u32 = 1 << 9;
    /// Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Discovery Log Page Change Notification (discovery controllers).
    pub const DISCOVERY_CHANGE: u32 = 1 << 31;
}

/// LPA bits.
pub mod lpa {
    /// SMART / Health log per namespace.
    pub const SMART_PER_NS: u8 = 1 << 0;
    /// Commands Supported and Effects log.
    pub const CMD_EFFECTS: u8 = 1 << 1;
    /// Extended data for Get Log Page (NUMDU, LPOL/LPOU).
    pub const EXTENDED_DATA: u8 = 1 << 2;
    /// Telemetry.
    pub const TELEMETRY: u8 = 1 << 3;
    /// Persistent event log.
    pub const PERSISTENT_EVENT: u8 = 1 << 4;
}

/// SGLS bits.
pub mod sgls {
    /// SGLs supported, no alignment requirement (bits 1:0 = 01b).
    pub const SUPPORTED: u32 = 0x1;
    /// SGLs supported with dword alignment (bits 1:0 = 10b).
    pub const SUPPORTED_DWORD_ALIGNED: u32 = 0x2;
    /// Bits 1:0: whether (and how) SGLs are supported for the NVM command set.
    pub const SUPPORT_MASK: u32 = 0x3;
    /// Keyed SGL data block descriptor supported.
    pub const KEYED: u32 = 1 << 2;
    /// SGL bit bucket descriptor supported.
    pub const BIT_BUCKET: u32 = 1 << 16;
    /// Transport SGL data block descriptor supported (NVMe/TCP).
    pub const TRANSPORT: u32 = 1 << 19;
    /// Offset addressing in SGL data blocks (in-capsule data).
    pub const OFFSET: u32 = 1 << 20;
}

/// CNTRLTYPE values.
pub mod cntrltype {
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMIN: u8 = 3;
}

impl Default for IdentifyController {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl IdentifyController {
    /// Sets SN, space padded (longer input is cut at 20 bytes).
    pub fn set_serial(&mut self, s: &str) {
        fill_ascii_padded(&mut self.sn, s);
    }

    /// Sets MN, space padded (cut at 40 bytes).
    pub fn set_model(&mut self, s: &str) {
        fill_ascii_padded(&mut self.mn, s);
    }

    /// Sets FR, space padded (cut at 8 bytes).
    pub fn set_firmware_rev(&mut self, s: &str) {
        fill_ascii_padded(&mut self.fr, s);
    }

    /// Sets SUBNQN; returns false (leaving it unchanged) if it does not fit.
    pub fn set_subnqn(&mut self, nqn: &str) -> bool {
        crate::util::fill_nul_padded(&mut self.subnqn, nqn)
    }

    /// Serial number without trailing padding.
    pub fn serial(&self) -> Option<&str> {
        read_ascii_padded(&self.sn)
    }

    /// Model number without trailing padding.
    pub fn model(&self) -> Option<&str> {
        read_ascii_padded(&self.mn)
    }

    /// Firmware revision without trailing padding.
    pub fn firmware_rev(&self) -> Option<&str> {
        read_ascii_padded(&self.fr)
    }

    /// Subsystem NQN up to the first NUL; `None` if not UTF-8.
    pub fn subnqn_str(&self) -> Option<&str> {
        core::str::from_utf8(crate::util::until_nul(&self.subnqn)).ok()
    }

    /// Maximum data transfer in bytes for a memory page size of `mpsmin_bytes`; `None` = no limit.
    pub fn max_transfer_bytes(&self, mpsmin_bytes: u64) -> Option<u64> {
        match self.mdts {
            0 => None,
            m => mpsmin_bytes.checked_shl(u32::from(m)),
        }
    }
}

/// LBA Format (4 bytes): metadata size, log2 of the data size, relative performance.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata bytes per LBA.
    pub ms: U16,
    /// LBA data size as a power of two (9 = 512 bytes, 12 = 4 KiB).
    pub lbads: u8,
    /// Relative performance (bits 1:0; 0 = best).
    pub rp: u8,
}
const _: () = assert!(core::mem::size_of::<LbaFormat>() == 4);

impl LbaFormat {
    /// A format with `block_size` bytes (must be a power of two) and no metadata.
    pub fn new(block_size: u32) -> Self {
        LbaFormat {
            ms: U16::ZERO,
            lbads: block_size.trailing_zeros() as u8,
            rp: 0,
        }
    }

    /// Block size in bytes; `None` for LBADS values that do not fit in 32 bits.
    pub fn block_size(&self) -> Option<u32> {
        1u32.checked_shl(u32::from(self.lbads))
    }
}

/// Identify Namespace data structure for the NVM command set (CNS 00h).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: U64,
    /// Namespace capacity in logical blocks.
    pub ncap: U64,
    /// Namespace utilization in logical blocks.
    pub nuse: U64,
    /// Namespace features (bit 0 thin provisioning, bit 2 DAE/DULBE, bit 4 NPWG.. fields valid).
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: bits 3:0 format index (low), bit 4 metadata at end of LBA, bits 6:5 index (high).
    pub flbas: u8,
    /// Metadata capabilities.
    pub mc: u8,
    /// End-to-end data protection capabilities.
    pub dpc: u8,
    /// End-to-end data protection type settings.
    pub dps: u8,
    /// Namespace multi-path I/O and sharing (bit 0: may be attached to several controllers).
    pub nmic: u8,
    /// Reservation capabilities.
    pub rescap: u8,
    /// Format progress indicator.
    pub fpi: u8,
    /// Deallocate logical block features (bits 2:0: what reads of deallocated blocks return; bit 3 WZ deallocate).
    pub dlfeat: u8,
    /// Namespace atomic write unit normal, 0's based.
    pub nawun: U16,
    /// Namespace atomic write unit power fail, 0's based.
    pub nawupf: U16,
    /// Namespace atomic compare and write unit, 0's based.
    pub nacwu: U16,
    /// Namespace atomic boundary size normal.
    pub nabsn: U16,
    /// Namespace atomic boundary offset.
    pub nabo: U16,
    /// Namespace atomic boundary size power fail.
    pub nabspf: U16,
    /// Namespace optimal I/O boundary (blocks).
    pub noiob: U16,
    /// NVM capacity (bytes).
    pub nvmcap: U128,
    /// Namespace preferred write granularity, 0's based.
    pub npwg: U16,
    /// Namespace preferred write alignment, 0's based.
    pub npwa: U16,
    /// Namespace preferred deallocate granularity, 0's based.
    pub npdg: U16,
    /// Namespace preferred deallocate alignment, 0's based.
    pub npda: U16,
    /// Namespace optimal write size, 0's based.
    pub nows: U16,
    /// Maximum single source range length (Copy).
    pub mssrl: U16,
    /// Maximum copy length.
    pub mcl: U32,
    /// Maximum source range count, 0's based.
    pub msrc: u8,
    /// Reserved.
    pub rsvd81: u8,
    /// Number of unique capability LBA formats.
    pub nulbaf: u8,
    /// Reserved.
    pub rsvd83: [u8; 9],
    /// ANA group identifier.
    pub anagrpid: U32,
    /// Reserved.
    pub rsvd96: [u8; 3],
    /// Namespace attributes (bit 0: write protected).
    pub nsattr: u8,
    /// NVM set identifier.
    pub nvmsetid: U16,
    /// Endurance group identifier.
    pub endgid: U16,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// IEEE extended unique identifier.
    pub eui64: [u8; 8],
    /// LBA formats 0..63.
    pub lbaf: [LbaFormat; 64],
    /// Reserved.
    pub rsvd384: [u8; 3328],
    /// Vendor specific.
    pub vs: [u8; 384],
}
const _: () = assert!(core::mem::size_of::<IdentifyNamespace>() == IDENTIFY_DATA_SIZE);

impl Default for IdentifyNamespace {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl IdentifyNamespace {
    /// Index of the LBA format in use (FLBAS bits 3:0 and 6:5).
    pub fn lba_format_index(&self) -> usize {
        usize::from(self.flbas & 0xF) | (usize::from((self.flbas >> 5) & 0x3) << 4)
    }

    /// Selects LBA format `index` (0..=63) in FLBAS, keeping bit 4.
    pub fn set_lba_format_index(&mut self, index: u8) {
        let i = index & 0x3F;
        self.flbas = (self.flbas & 0x10) | (i & 0xF) | ((i >> 4) << 5);
    }

    /// The LBA format in use.
    pub fn lba_format(&self) -> LbaFormat {
        self.lbaf
            .get(self.lba_format_index())
            .copied()
            .unwrap_or_default()
    }

    /// Block size of the format in use; `None` if the format is nonsense.
    pub fn block_size(&self) -> Option<u32> {
        self.lba_format().block_size()
    }
}

/// Active Namespace ID list (CNS 02h): up to 1024 NSIDs in increasing order, 0-terminated.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct NamespaceList {
    /// NSIDs; unused entries are 0.
    pub ids: [U32; 1024],
}
const _: () = assert!(core::mem::size_of::<NamespaceList>() == IDENTIFY_DATA_SIZE);

impl Default for NamespaceList {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl NamespaceList {
    /// Builds the list of NSIDs greater than `after` (the command's NSID),
    /// from `nsids` which need not be sorted. Returns the list and how many
    /// entries it holds (at most 1024; further NSIDs are for the next page).
    pub fn from_ids<I: IntoIterator<Item = u32>>(after: u32, nsids: I) -> (Self, usize) {
        let mut l = Self::new_zeroed();
        let mut n = 0usize;
        for id in nsids {
            if id == 0 || id <= after {
                continue;
            }
            // Insertion sort into the bounded array; keep the 1024 smallest.
            let mut pos = n;
            while pos > 0 && l.ids[pos - 1].get() > id {
                pos -= 1;
            }
            if pos > 0 && l.ids[pos - 1].get() == id {
                continue;
            }
            if pos >= l.ids.len() {
                continue;
            }
            let end = n.min(l.ids.len() - 1);
            l.ids.copy_within(pos..end, pos + 1);
            l.ids[pos].set(id);
            n = (n + 1).min(l.ids.len());
        }
        (l, n)
    }

    /// The non-zero NSIDs up to the first 0.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().map(|v| v.get()).take_while(|&v| v != 0)
    }
}

/// Namespace Identifier Types of the descriptor list (CNS 03h).
pub mod nidt {
    /// IEEE EUI-64, 8 bytes.
    pub const EUI64: u8 = 1;
    /// NGUID, 16 bytes.
    pub const NGUID: u8 = 2;
    /// UUID, 16 bytes.
    pub const UUID: u8 = 3;
    /// Command Set Identifier, 1 byte.
    pub const CSI: u8 = 4;

    /// Length the spec requires for a type; `None` for unknown types.
    pub const fn len(t: u8) -> Option<u8> {
        match t {
            EUI64 => Some(8),
            NGUID | UUID => Some(16),
            CSI => Some(1),
            _ => None,
        }
    }
}

/// One Namespace Identification Descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsIdDescriptor<'a> {
    /// EUI-64.
    Eui64([u8; 8]),
    /// NGUID.
    Nguid([u8; 16]),
    /// UUID.
    Uuid([u8; 16]),
    /// Command set.
    Csi(u8),
    /// A type this crate does not know, with its raw value.
    Other(u8, &'a [u8]),
}

impl NsIdDescriptor<'_> {
    fn parts(&self) -> (u8, &[u8]) {
        match self {
            NsIdDescriptor::Eui64(v) => (nidt::EUI64, v),
            NsIdDescriptor::Nguid(v) => (nidt::NGUID, v),
            NsIdDescriptor::Uuid(v) => (nidt::UUID, v),
            NsIdDescriptor::Csi(v) => (nidt::CSI, core::slice::from_ref(v)),
            NsIdDescriptor::Other(t, v) => (*t, v),
        }
    }
}

/// Writes a descriptor list into `out` (normally the 4096-byte Identify
/// buffer, zeroed first so the list is terminated): each descriptor is NIDT,
/// NIDL, 2 reserved bytes, then NIDL bytes. Returns the bytes used, or `None`
/// if the descriptors do not fit.
pub fn encode_ns_id_descriptors(out: &mut [u8], descs: &[NsIdDescriptor<'_>]) -> Option<usize> {
    let mut pos = 0usize;
    for d in descs {
        let (t, v) = d.parts();
        let len = u8::try_from(v.len()).ok()?;
        let end = pos.checked_add(4)?.checked_add(v.len())?;
        let slot = out.get_mut(pos..end)?;
        slot[0] = t;
        slot[1] = len;
        slot[2] = 0;
        slot[3] = 0;
        slot[4..].copy_from_slice(v);
        pos = end;
    }
    if let Some(rest) = out.get_mut(pos..) {
        // A zero NIDT ends the list; clear it so stale bytes cannot look like a descriptor.
        for b in rest.iter_mut().take(4) {
            *b = 0;
        }
    }
    Some(pos)
}

/// Iterates the descriptors of a CNS 03h buffer until a zero NIDT or the
/// end; stops (yielding nothing more) on a descriptor that overruns the buffer
/// or whose length contradicts its type.
pub fn parse_ns_id_descriptors(buf: &[u8]) -> impl Iterator<Item = NsIdDescriptor<'_>> {
    let mut pos = 0usize;
    core::iter::from_fn(move || {
        let hdr = buf.get(pos..pos + 4)?;
        let (t, l) = (hdr[0], usize::from(hdr[1]));
        if t == 0 {
            return None;
        }
        let v = buf.get(pos + 4..pos + 4 + l)?;
        if let Some(expect) = nidt::len(t) {
            if usize::from(expect) != l {
                pos = buf.len();
                return None;
            }
        }
        pos += 4 + l;
        Some(match t {
            nidt::EUI64 => NsIdDescriptor::Eui64(v.try_into().ok()?),
            nidt::NGUID => NsIdDescriptor::Nguid(v.try_into().ok()?),
            nidt::UUID => NsIdDescriptor::Uuid(v.try_into().ok()?),
            nidt::CSI => NsIdDescriptor::Csi(*v.first()?),
            _ => NsIdDescriptor::Other(t, v),
        })
    })
}

#[cfg(test)]
mod tests;
