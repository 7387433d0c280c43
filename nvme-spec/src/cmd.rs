//! Submission and completion queue entries, SGL descriptors and decoded views
//! of the commands a target and a host need (Base 2.0 "Submission Queue
//! Entry", "Completion Queue Entry", "Scatter Gather List (SGL)"; NVM Command
//! Set 1.0 for the I/O commands).
//!
//! [`Command`] is the raw 64-byte entry with little-endian fields. The
//! per-command structs ([`ReadWrite`], [`GetLogPage`], ...) are small decoded
//! copies with host-endian fields and spec-level meaning (1-based counts, byte
//! offsets), built with `from_command` and written back with `apply`.

use crate::opcode::{admin, io};
use crate::status::{Status, PHASE_BIT};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Reserved NSID meaning "all namespaces" (broadcast).
pub const NSID_ALL: u32 = 0xFFFF_FFFF;

/// Flags byte (CDW0 bits 15:8): FUSE in bits 1:0, PSDT in bits 7:6.
pub mod flags {
    /// Mask of the FUSE field.
    pub const FUSE_MASK: u8 = 0x03;
    /// First command of a fused operation.
    pub const FUSE_FIRST: u8 = 0x01;
    /// Second command of a fused operation.
    pub const FUSE_SECOND: u8 = 0x02;
    /// Mask of the PSDT field.
    pub const PSDT_MASK: u8 = 0xC0;
    /// PSDT 00b: PRPs are used for the data transfer.
    pub const PSDT_PRP: u8 = 0x00;
    /// PSDT 01b: SGLs, MPTR holds the address of a contiguous metadata buffer.
    /// NVMe over Fabrics requires this value (Base 2.0 "Fabrics: Capsules").
    pub const PSDT_SGL_MPTR_CONTIG: u8 = 0x40;
    /// PSDT 10b: SGLs, MPTR holds the address of an SGL segment.
    pub const PSDT_SGL_MPTR_SGL: u8 = 0x80;
}

/// A 64-byte submission queue entry.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Command {
    /// CDW0 bits 7:0: opcode.
    pub opcode: u8,
    /// CDW0 bits 15:8: FUSE and PSDT (see [`flags`]).
    pub flags: u8,
    /// CDW0 bits 31:16: command identifier, unique per submission queue.
    pub cid: U16,
    /// Namespace identifier. For Fabrics commands (opcode 7Fh) byte 4 is FCTYPE.
    pub nsid: U32,
    /// Command dword 2 (command specific).
    pub cdw2: U32,
    /// Command dword 3 (command specific).
    pub cdw3: U32,
    /// Metadata pointer.
    pub mptr: U64,
    /// Data pointer: PRP1+PRP2 or SGL Descriptor 1 (see [`Command::sgl1`]).
    pub dptr: [u8; 16],
    /// Command dword 10.
    pub cdw10: U32,
    /// Command dword 11.
    pub cdw11: U32,
    /// Command dword 12.
    pub cdw12: U32,
    /// Command dword 13.
    pub cdw13: U32,
    /// Command dword 14.
    pub cdw14: U32,
    /// Command dword 15.
    pub cdw15: U32,
}
const _: () = assert!(core::mem::size_of::<Command>() == 64);

impl Default for Command {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl Command {
    /// Size of a submission queue entry in bytes.
    pub const SIZE: usize = 64;

    /// A zeroed command with the given opcode.
    pub fn new(opcode: u8) -> Self {
        let mut c = Self::new_zeroed();
        c.opcode = opcode;
        c
    }

    /// Reads a command from the first 64 bytes of `bytes` (copying it).
    /// Returns `None` if fewer than 64 bytes are given.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(c, _)| c)
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.cid.set(cid);
    }

    /// Builder form of [`Command::set_cid`].
    #[must_use]
    pub fn with_cid(mut self, cid: u16) -> Self {
        self.set_cid(cid);
        self
    }

    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.nsid.get()
    }

    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, nsid: u32) {
        self.nsid.set(nsid);
    }

    /// FUSE field (0 = normal, 1 = first, 2 = second of a fused pair).
    pub fn fuse(&self) -> u8 {
        self.flags & flags::FUSE_MASK
    }

    /// PSDT field value 0..=3 (0 = PRP, 1 = SGL + contiguous MPTR, 2 = SGL + MPTR SGL).
    pub fn psdt(&self) -> u8 {
        (self.flags & flags::PSDT_MASK) >> 6
    }

    /// True when the data pointer holds an SGL descriptor.
    pub fn uses_sgl(&self) -> bool {
        self.psdt() != 0
    }

    /// Sets PSDT (0..=3), leaving FUSE alone.
    pub fn set_psdt(&mut self, psdt: u8) {
        self.flags = (self.flags & !flags::PSDT_MASK) | ((psdt & 0x3) << 6);
    }

    /// FCTYPE of a Fabrics command (byte 4). Meaningless for other opcodes.
    pub fn fctype(&self) -> u8 {
        self.nsid.get() as u8
    }

    /// True for a Fabrics command (opcode 7Fh).
    pub fn is_fabrics(&self) -> bool {
        self.opcode == admin::FABRICS
    }

    /// The data pointer read as SGL Descriptor 1.
    pub fn sgl1(&self) -> SglDescriptor {
        SglDescriptor::read_from_bytes(&self.dptr).unwrap_or_else(|_| SglDescriptor::new_zeroed())
    }

    /// Writes SGL Descriptor 1 and sets PSDT to 01b, as every NVMe-oF host does.
    pub fn set_sgl1(&mut self, sgl: SglDescriptor) {
        self.dptr.copy_from_slice(sgl.as_bytes());
        self.set_psdt(1);
    }

    /// PRP entry 1 (PCIe).
    pub fn prp1(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.dptr[..8]);
        u64::from_le_bytes(b)
    }

    /// PRP entry 2 (PCIe).
    pub fn prp2(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.dptr[8..]);
        u64::from_le_bytes(b)
    }

    /// Sets both PRP entries and PSDT 00b.
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) {
        self.dptr[..8].copy_from_slice(&prp1.to_le_bytes());
        self.dptr[8..].copy_from_slice(&prp2.to_le_bytes());
        self.set_psdt(0);
    }

    /// Human name of the opcode for logs (`admin` says which command set to consult).
    pub fn opcode_name(&self, admin_queue: bool) -> &'static str {
        if self.is_fabrics() {
            return crate::opcode::fctype::name(self.fctype()).unwrap_or("Unknown Fabrics");
        }
        let name = if admin_queue {
            admin::name(self.opcode)
        } else {
            io::name(self.opcode)
        };
        name.unwrap_or("Unknown")
    }

    // ---- constructors for the commands a host sends ----

    /// NVM Read of `nblocks` (1..=65536) logical blocks starting at `slba`.
    pub fn read_blocks(nsid: u32, slba: u64, nblocks: u32) -> Self {
        let mut c = Self::new(io::READ);
        ReadWrite {
            nsid,
            slba,
            nblocks,
            ..ReadWrite::default()
        }
        .apply(&mut c);
        c
    }

    /// NVM Write of `nblocks` (1..=65536) logical blocks starting at `slba`.
    pub fn write_blocks(nsid: u32, slba: u64, nblocks: u32, fua: bool) -> Self {
        let mut c = Self::new(io::WRITE);
        ReadWrite {
            nsid,
            slba,
            nblocks,
            fua,
            ..ReadWrite::default()
        }
        .apply(&mut c);
        c
    }

    /// NVM Compare of `nblocks` logical blocks starting at `slba`.
    pub fn compare_blocks(nsid: u32, slba: u64, nblocks: u32) -> Self {
        let mut c = Self::new(io::COMPARE);
        ReadWrite {
            nsid,
            slba,
            nblocks,
            ..ReadWrite::default()
        }
        .apply(&mut c);
        c
    }

    /// NVM Flush.
    pub fn flush(nsid: u32) -> Self {
        let mut c = Self::new(io::FLUSH);
        c.set_nsid(nsid);
        c
    }

    /// NVM Write Zeroes; `deallocate` lets the controller unmap the range.
    pub fn write_zeroes(nsid: u32, slba: u64, nblocks: u32, deallocate: bool) -> Self {
        let mut c = Self::new(io::WRITE_ZEROES);
        WriteZeroes {
            nsid,
            slba,
            nblocks,
            deac: deallocate,
            fua: false,
        }
        .apply(&mut c);
        c
    }

    /// Dataset Management with `nranges` (1..=256) [`DsmRange`]s in the data
    /// buffer; `deallocate` sets the AD attribute (what "unmap"/TRIM means).
    pub fn dataset_management(nsid: u32, nranges: u16, deallocate: bool) -> Self {
        let mut c = Self::new(io::DATASET_MANAGEMENT);
        DatasetManagement {
            nsid,
            nranges,
            deallocate,
            integral_read: false,
            integral_write: false,
        }
        .apply(&mut c);
        c
    }

    /// Identify with the given CNS (see `identify::cns`).
    pub fn identify(cns: u8, nsid: u32, cntid: u16, csi: u8) -> Self {
        let mut c = Self::new(admin::IDENTIFY);
        Identify {
            cns,
            nsid,
            cntid,
            csi,
            cns_specific_id: 0,
            uuid_index: 0,
        }
        .apply(&mut c);
        c
    }

    /// Get Log Page of `len_bytes` (a multiple of 4, at least 4) from byte `offset`.
    pub fn get_log_page(
        nsid: u32,
        lid: u8,
        lsp: u8,
        rae: bool,
        len_bytes: u32,
        offset: u64,
    ) -> Self {
        let mut c = Self::new(admin::GET_LOG_PAGE);
        GetLogPage {
            nsid,
            lid,
            lsp,
            rae,
            numd: (len_bytes / 4).max(1),
            offset,
            lsi: 0,
            uuid_index: 0,
            ot: false,
            csi: 0,
        }
        .apply(&mut c);
        c
    }

    /// Get Features of `fid` with select `sel` (0 = current).
    pub fn get_features(fid: u8, sel: u8, cdw11: u32) -> Self {
        let mut c = Self::new(admin::GET_FEATURES);
        GetFeatures {
            nsid: 0,
            fid,
            sel,
            cdw11,
            uuid_index: 0,
        }
        .apply(&mut c);
        c
    }

    /// Set Features of `fid` with value `cdw11` (and `sv` = save across resets).
    pub fn set_features(fid: u8, cdw11: u32, sv: bool) -> Self {
        let mut c = Self::new(admin::SET_FEATURES);
        SetFeatures {
            nsid: 0,
            fid,
            sv,
            cdw11,
            cdw12: 0,
            uuid_index: 0,
        }
        .apply(&mut c);
        c
    }

    /// Abort the command `cid` on submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        let mut c = Self::new(admin::ABORT);
        Abort { sqid, cid }.apply(&mut c);
        c
    }

    /// Keep Alive.
    pub fn keep_alive() -> Self {
        Self::new(admin::KEEP_ALIVE)
    }

    /// Asynchronous Event Request.
    pub fn async_event_request() -> Self {
        Self::new(admin::ASYNC_EVENT_REQUEST)
    }
}

/// SGL descriptor types (bits 7:4 of the SGL Identifier byte).
pub mod sgl_type {
    /// SGL Data Block.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment.
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Keyed SGL Data Block (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport SGL Data Block (NVMe/TCP: data moved by H2CData/C2HData PDUs).
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
    /// Vendor specific.
    pub const VENDOR: u8 = 0xF;
}

/// SGL descriptor subtypes (bits 3:0 of the SGL Identifier byte).
pub mod sgl_subtype {
    /// The address field is a memory address.
    pub const ADDRESS: u8 = 0x0;
    /// The address field is an offset (into in-capsule data, for Fabrics).
    pub const OFFSET: u8 = 0x1;
    /// Transport specific subtype A: NVMe/TCP's "host buffer" transport data block.
    pub const TRANSPORT_A: u8 = 0xA;
    /// Keyed data block: invalidate the key after use (RDMA).
    pub const INVALIDATE_KEY: u8 = 0xF;
}

/// A 16-byte SGL descriptor. The generic layout is address (8), length (4),
/// reserved (3), SGL identifier (1). Keyed data blocks reuse bytes 8..15 as a
/// 3-byte length and a 4-byte key; see the `keyed_*` accessors.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SglDescriptor {
    /// Address or offset.
    pub addr: U64,
    /// Length in bytes (generic layout).
    pub length: U32,
    /// Reserved in the generic layout; part of the key for keyed blocks.
    pub rsvd: [u8; 3],
    /// SGL identifier: type in bits 7:4, subtype in bits 3:0.
    pub id: u8,
}
const _: () = assert!(core::mem::size_of::<SglDescriptor>() == 16);

impl Default for SglDescriptor {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl SglDescriptor {
    /// A descriptor of the given type/subtype, address and length.
    pub fn new(desc_type: u8, subtype: u8, addr: u64, length: u32) -> Self {
        SglDescriptor {
            addr: U64::new(addr),
            length: U32::new(length),
            rsvd: [0; 3],
            id: (desc_type << 4) | (subtype & 0xF),
        }
    }

    /// NVMe/TCP and RDMA in-capsule data: a data block descriptor whose
    /// address is the offset into the capsule's data (normally ICDOFF = 0).
    pub fn in_capsule(offset: u64, length: u32) -> Self {
        Self::new(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET, offset, length)
    }

    /// NVMe/TCP host buffer: a transport data block, subtype A, address 0;
    /// the data moves by R2T/H2CData (writes) or C2HData (reads).
    pub fn tcp_transport(length: u32) -> Self {
        Self::new(
            sgl_type::TRANSPORT_DATA_BLOCK,
            sgl_subtype::TRANSPORT_A,
            0,
            length,
        )
    }

    /// A plain data block at a memory address.
    pub fn data_block(addr: u64, length: u32) -> Self {
        Self::new(sgl_type::DATA_BLOCK, sgl_subtype::ADDRESS, addr, length)
    }

    /// A keyed data block (RDMA): 24-bit length and 32-bit remote key.
    pub fn keyed_data_block(addr: u64, length: u32, key: u32, invalidate: bool) -> Self {
        let l = length.to_le_bytes();
        let k = key.to_le_bytes();
        let sub = if invalidate {
            sgl_subtype::INVALIDATE_KEY
        } else {
            sgl_subtype::ADDRESS
        };
        SglDescriptor {
            addr: U64::new(addr),
            length: U32::from_bytes([l[0], l[1], l[2], k[0]]),
            rsvd: [k[1], k[2], k[3]],
            id: (sgl_type::KEYED_DATA_BLOCK << 4) | sub,
        }
    }

    /// Descriptor type (bits 7:4 of the identifier).
    pub fn desc_type(&self) -> u8 {
        self.id >> 4
    }

    /// Descriptor subtype (bits 3:0 of the identifier).
    pub fn subtype(&self) -> u8 {
        self.id & 0xF
    }

    /// Address (or offset) field.
    pub fn addr(&self) -> u64 {
        self.addr.get()
    }

    /// Length field of the generic layout.
    pub fn len(&self) -> u32 {
        self.length.get()
    }

    /// True when the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for the in-capsule form used by NVMe/TCP (data block, offset subtype).
    pub fn is_in_capsule(&self) -> bool {
        self.desc_type() == sgl_type::DATA_BLOCK && self.subtype() == sgl_subtype::OFFSET
    }

    /// True for the NVMe/TCP host-buffer form (transport data block, subtype A).
    pub fn is_tcp_transport(&self) -> bool {
        self.desc_type() == sgl_type::TRANSPORT_DATA_BLOCK
            && self.subtype() == sgl_subtype::TRANSPORT_A
    }

    /// 24-bit length of a keyed data block.
    pub fn keyed_len(&self) -> u32 {
        self.length.get() & 0x00FF_FFFF
    }

    /// 32-bit key of a keyed data block.
    pub fn keyed_key(&self) -> u32 {
        let b = self.length.to_bytes();
        u32::from_le_bytes([b[3], self.rsvd[0], self.rsvd[1], self.rsvd[2]])
    }
}

/// A 16-byte completion queue entry.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Completion {
    /// DW0: command specific result.
    pub result: U32,
    /// DW1: command specific (upper half of 64-bit results such as Property Get).
    pub dw1: U32,
    /// SQ head pointer.
    pub sqhd: U16,
    /// SQ identifier.
    pub sqid: U16,
    /// Identifier of the completed command.
    pub cid: U16,
    /// Status word: phase tag and [`Status`].
    pub status: U16,
}
const _: () = assert!(core::mem::size_of::<Completion>() == 16);

impl Default for Completion {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl Completion {
    /// Size of a completion queue entry in bytes.
    pub const SIZE: usize = 16;

    /// A completion for `cid` with `status`, phase 0 and zero result.
    pub fn new(cid: u16, status: Status) -> Self {
        let mut c = Self::new_zeroed();
        c.cid.set(cid);
        c.status.set(status.to_word(false));
        c
    }

    /// A successful completion for `cid` with result DW0.
    pub fn success(cid: u16, result: u32) -> Self {
        let mut c = Self::new(cid, Status::SUCCESS);
        c.result.set(result);
        c
    }

    /// Reads a completion from the first 16 bytes of `bytes` (copying it).
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(c, _)| c)
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Decoded status (without phase).
    pub fn status(&self) -> Status {
        Status::from_word(self.status.get())
    }

    /// Phase tag.
    pub fn phase(&self) -> bool {
        self.status.get() & PHASE_BIT != 0
    }

    /// Sets the status, keeping the current phase tag.
    pub fn set_status(&mut self, status: Status) {
        let p = self.phase();
        self.status.set(status.to_word(p));
    }

    /// Sets the phase tag, keeping the status.
    pub fn set_phase(&mut self, phase: bool) {
        let s = self.status();
        self.status.set(s.to_word(phase));
    }

    /// DW0 | DW1 << 32, for 64-bit results (Property Get of an 8-byte property).
    pub fn result64(&self) -> u64 {
        u64::from(self.result.get()) | (u64::from(self.dw1.get()) << 32)
    }

    /// Sets DW0 and DW1 from a 64-bit result.
    pub fn set_result64(&mut self, v: u64) {
        self.result.set(v as u32);
        self.dw1.set((v >> 32) as u32);
    }
}

// ---- decoded command views ----

/// Read / Write / Compare (NVM Command Set "Read command", "Write command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReadWrite {
    /// Namespace.
    pub nsid: u32,
    /// Starting LBA (CDW10 | CDW11 << 32).
    pub slba: u64,
    /// Number of logical blocks, 1-based (the wire NLB in CDW12 15:0 is 0-based).
    pub nblocks: u32,
    /// Force Unit Access (CDW12 bit 30).
    pub fua: bool,
    /// Limited Retry (CDW12 bit 31).
    pub lr: bool,
    /// Protection Information field (CDW12 bits 29:26).
    pub prinfo: u8,
    /// Directive Type, writes only (CDW12 bits 23:20).
    pub dtype: u8,
    /// Dataset Management hints (CDW13 bits 7:0).
    pub dsm: u8,
    /// Directive Specific, writes only (CDW13 bits 31:16).
    pub dspec: u16,
}

impl ReadWrite {
    /// Decodes the fields of a Read, Write or Compare command.
    pub fn from_command(c: &Command) -> Self {
        let cdw12 = c.cdw12.get();
        let cdw13 = c.cdw13.get();
        ReadWrite {
            nsid: c.nsid(),
            slba: u64::from(c.cdw10.get()) | (u64::from(c.cdw11.get()) << 32),
            nblocks: (cdw12 & 0xFFFF) + 1,
            fua: cdw12 & (1 << 30) != 0,
            lr: cdw12 & (1 << 31) != 0,
            prinfo: ((cdw12 >> 26) & 0xF) as u8,
            dtype: ((cdw12 >> 20) & 0xF) as u8,
            dsm: cdw13 as u8,
            dspec: (cdw13 >> 16) as u16,
        }
    }

    /// Writes the fields into `c` (opcode untouched). `nblocks` is clamped to 1..=65536.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10.set(self.slba as u32);
        c.cdw11.set((self.slba >> 32) as u32);
        let nlb = self.nblocks.clamp(1, 0x1_0000) - 1;
        c.cdw12.set(
            nlb | (u32::from(self.lr) << 31)
                | (u32::from(self.fua) << 30)
                | (u32::from(self.prinfo & 0xF) << 26)
                | (u32::from(self.dtype & 0xF) << 20),
        );
        c.cdw13
            .set(u32::from(self.dsm) | (u32::from(self.dspec) << 16));
    }

    /// Exclusive end LBA, or `None` on 64-bit overflow (which a target must
    /// report as LBA Out of Range rather than wrap).
    pub fn end_lba(&self) -> Option<u64> {
        self.slba.checked_add(u64::from(self.nblocks))
    }
}

/// Write Zeroes (NVM Command Set "Write Zeroes command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WriteZeroes {
    /// Namespace.
    pub nsid: u32,
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks, 1-based.
    pub nblocks: u32,
    /// Deallocate (CDW12 bit 25): the range may be unmapped.
    pub deac: bool,
    /// Force Unit Access (CDW12 bit 30).
    pub fua: bool,
}

impl WriteZeroes {
    /// Decodes a Write Zeroes command.
    pub fn from_command(c: &Command) -> Self {
        let cdw12 = c.cdw12.get();
        WriteZeroes {
            nsid: c.nsid(),
            slba: u64::from(c.cdw10.get()) | (u64::from(c.cdw11.get()) << 32),
            nblocks: (cdw12 & 0xFFFF) + 1,
            deac: cdw12 & (1 << 25) != 0,
            fua: cdw12 & (1 << 30) != 0,
        }
    }

    /// Writes the fields into `c`. `nblocks` is clamped to 1..=65536.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10.set(self.slba as u32);
        c.cdw11.set((self.slba >> 32) as u32);
        let nlb = self.nblocks.clamp(1, 0x1_0000) - 1;
        c.cdw12
            .set(nlb | (u32::from(self.deac) << 25) | (u32::from(self.fua) << 30));
    }
}

/// Dataset Management (NVM Command Set "Dataset Management command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatasetManagement {
    /// Namespace.
    pub nsid: u32,
    /// Number of ranges, 1-based (wire NR in CDW10 7:0 is 0-based, so 1..=256).
    pub nranges: u16,
    /// Attribute - Deallocate (CDW11 bit 2).
    pub deallocate: bool,
    /// Attribute - Integral Dataset for Write (CDW11 bit 1).
    pub integral_write: bool,
    /// Attribute - Integral Dataset for Read (CDW11 bit 0).
    pub integral_read: bool,
}

impl DatasetManagement {
    /// Decodes a Dataset Management command.
    pub fn from_command(c: &Command) -> Self {
        let cdw11 = c.cdw11.get();
        DatasetManagement {
            nsid: c.nsid(),
            nranges: (c.cdw10.get() & 0xFF) as u16 + 1,
            deallocate: cdw11 & 0x4 != 0,
            integral_write: cdw11 & 0x2 != 0,
            integral_read: cdw11 & 0x1 != 0,
        }
    }

    /// Writes the fields into `c`; `nranges` is clamped to 1..=256.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10.set(u32::from(self.nranges.clamp(1, 256) - 1));
        c.cdw11.set(
            (u32::from(self.deallocate) << 2)
                | (u32::from(self.integral_write) << 1)
                | u32::from(self.integral_read),
        );
    }

    /// Length of the range list in the data buffer.
    pub fn data_len(&self) -> usize {
        usize::from(self.nranges) * DsmRange::SIZE
    }
}

/// One 16-byte range of a Dataset Management command.
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
pub struct DsmRange {
    /// Context attributes.
    pub cattr: U32,
    /// Length in logical blocks (1-based; 0 is a valid no-op).
    pub nlb: U32,
    /// Starting LBA.
    pub slba: U64,
}
const _: () = assert!(core::mem::size_of::<DsmRange>() == 16);

impl DsmRange {
    /// Size of one range in bytes.
    pub const SIZE: usize = 16;

    /// A range of `nlb` blocks at `slba`.
    pub fn new(slba: u64, nlb: u32) -> Self {
        DsmRange {
            cattr: U32::ZERO,
            nlb: U32::new(nlb),
            slba: U64::new(slba),
        }
    }

    /// Views the ranges of a DSM data buffer; `None` unless `bytes` is a whole
    /// number of ranges.
    pub fn slice_from(bytes: &[u8]) -> Option<&[DsmRange]> {
        <[DsmRange]>::ref_from_bytes(bytes).ok()
    }
}

/// Identify (Base 2.0 "Identify command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Identify {
    /// Namespace.
    pub nsid: u32,
    /// Controller or Namespace Structure (CDW10 7:0).
    pub cns: u8,
    /// Controller identifier (CDW10 31:16).
    pub cntid: u16,
    /// CNS specific identifier (CDW11 15:0).
    pub cns_specific_id: u16,
    /// Command Set Identifier (CDW11 31:24).
    pub csi: u8,
    /// UUID index (CDW14 6:0).
    pub uuid_index: u8,
}

impl Identify {
    /// Decodes an Identify command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        let cdw11 = c.cdw11.get();
        Identify {
            nsid: c.nsid(),
            cns: cdw10 as u8,
            cntid: (cdw10 >> 16) as u16,
            cns_specific_id: cdw11 as u16,
            csi: (cdw11 >> 24) as u8,
            uuid_index: (c.cdw14.get() & 0x7F) as u8,
        }
    }

    /// Writes the fields into `c`.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10
            .set(u32::from(self.cns) | (u32::from(self.cntid) << 16));
        c.cdw11
            .set(u32::from(self.cns_specific_id) | (u32::from(self.csi) << 24));
        c.cdw14.set(u32::from(self.uuid_index & 0x7F));
    }
}

/// Get Features (Base 2.0 "Get Features command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GetFeatures {
    /// Namespace (for namespace-specific features).
    pub nsid: u32,
    /// Feature Identifier (CDW10 7:0).
    pub fid: u8,
    /// Select (CDW10 10:8): 0 current, 1 default, 2 saved, 3 supported capabilities.
    pub sel: u8,
    /// Feature specific CDW11.
    pub cdw11: u32,
    /// UUID index (CDW14 6:0).
    pub uuid_index: u8,
}

impl GetFeatures {
    /// Decodes a Get Features command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        GetFeatures {
            nsid: c.nsid(),
            fid: cdw10 as u8,
            sel: ((cdw10 >> 8) & 0x7) as u8,
            cdw11: c.cdw11.get(),
            uuid_index: (c.cdw14.get() & 0x7F) as u8,
        }
    }

    /// Writes the fields into `c`.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10
            .set(u32::from(self.fid) | (u32::from(self.sel & 0x7) << 8));
        c.cdw11.set(self.cdw11);
        c.cdw14.set(u32::from(self.uuid_index & 0x7F));
    }
}

/// Set Features (Base 2.0 "Set Features command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetFeatures {
    /// Namespace (for namespace-specific features).
    pub nsid: u32,
    /// Feature Identifier (CDW10 7:0).
    pub fid: u8,
    /// Save (CDW10 bit 31): persist across power cycles and resets.
    pub sv: bool,
    /// Feature specific CDW11 (the value for most features).
    pub cdw11: u32,
    /// Feature specific CDW12.
    pub cdw12: u32,
    /// UUID index (CDW14 6:0).
    pub uuid_index: u8,
}

impl SetFeatures {
    /// Decodes a Set Features command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        SetFeatures {
            nsid: c.nsid(),
            fid: cdw10 as u8,
            sv: cdw10 & (1 << 31) != 0,
            cdw11: c.cdw11.get(),
            cdw12: c.cdw12.get(),
            uuid_index: (c.cdw14.get() & 0x7F) as u8,
        }
    }

    /// Writes the fields into `c`.
    pub fn apply(&self, c: &mut Command) {
        c.set_nsid(self.nsid);
        c.cdw10
            .set(u32::from(self.fid) | (u32::from(self.sv) << 31));
        c.cdw11.set(self.cdw11);
        c.cdw12.set(self.cdw12);
        c.cdw14.set(u32::from(self.uuid_index & 0x7F));
    }
}

/// Get Log Page (Base 2.0 "Get Log Page command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GetLogPage {
    /// Namespace.
    pub nsid: u32,
    /// Log Page Identifier (CDW10 7:0).
    pub lid: u8,
    /// Log Specific Parameter (CDW10 14:8).
    pub lsp: u8,
    /// Retain Asynchronous Event (CDW10 bit 15): do not clear the pending event.
    pub rae: bool,
    /// Number of dwords to return, 1-based (wire NUMDU:NUMDL is 0-based).
    pub numd: u32,
    /// Log Specific Identifier (CDW11 31:16).
    pub lsi: u16,
    /// Log page offset in bytes (LPOU:LPOL), or an index when `ot` is set.
    pub offset: u64,
    /// UUID index (CDW14 6:0).
    pub uuid_index: u8,
    /// Offset Type (CDW14 bit 23): `offset` is an entry index, not bytes.
    pub ot: bool,
    /// Command Set Identifier (CDW14 31:24).
    pub csi: u8,
}

impl GetLogPage {
    /// Decodes a Get Log Page command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        let cdw11 = c.cdw11.get();
        let cdw14 = c.cdw14.get();
        let numd0 = (cdw10 >> 16) | ((cdw11 & 0xFFFF) << 16);
        GetLogPage {
            nsid: c.nsid(),
            lid: cdw10 as u8,
            lsp: ((cdw10 >> 8) & 0x7F) as u8,
            rae: cdw10 & (1 << 15) != 0,
            // 0xFFFF_FFFF + 1 does not fit; saturate (no log page is 16 GiB).
            numd: numd0.saturating_add(1),
            lsi: (cdw11 >> 16) as u16,
            offset: u64::from(c.cdw12.get()) | (u64::from(c.cdw13.get()) << 32),
            uuid_index: (cdw14 & 0x7F) as u8,
            ot: cdw14 & (1 << 23) != 0,
            csi: (cdw14 >> 24) as u8,
        }
    }

    /// Writes the fields into `c`. `numd` is clamped to at least 1.
    pub fn apply(&self, c: &mut Command) {
        let numd0 = self.numd.max(1) - 1;
        c.set_nsid(self.nsid);
        c.cdw10.set(
            u32::from(self.lid)
                | (u32::from(self.lsp & 0x7F) << 8)
                | (u32::from(self.rae) << 15)
                | (numd0 << 16),
        );
        c.cdw11.set((numd0 >> 16) | (u32::from(self.lsi) << 16));
        c.cdw12.set(self.offset as u32);
        c.cdw13.set((self.offset >> 32) as u32);
        c.cdw14.set(
            u32::from(self.uuid_index & 0x7F)
                | (u32::from(self.ot) << 23)
                | (u32::from(self.csi) << 24),
        );
    }

    /// Number of bytes requested (numd * 4).
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.numd) * 4
    }
}

/// Abort (Base 2.0 "Abort command").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Abort {
    /// Submission queue of the command to abort (CDW10 15:0).
    pub sqid: u16,
    /// Identifier of the command to abort (CDW10 31:16).
    pub cid: u16,
}

impl Abort {
    /// Decodes an Abort command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        Abort {
            sqid: cdw10 as u16,
            cid: (cdw10 >> 16) as u16,
        }
    }

    /// Writes the fields into `c`.
    pub fn apply(&self, c: &mut Command) {
        c.cdw10
            .set(u32::from(self.sqid) | (u32::from(self.cid) << 16));
    }
}

/// Create I/O Completion Queue / Create I/O Submission Queue (PCIe only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CreateIoQueue {
    /// Queue identifier (CDW10 15:0).
    pub qid: u16,
    /// Queue size in entries, 1-based (wire QSIZE CDW10 31:16 is 0-based).
    pub qsize: u32,
    /// Physically contiguous (CDW11 bit 0).
    pub pc: bool,
    /// CQ: interrupts enabled (CDW11 bit 1). SQ: unused.
    pub ien: bool,
    /// CQ: interrupt vector. SQ: the completion queue to post to (both CDW11 31:16).
    pub iv_or_cqid: u16,
    /// SQ: queue priority (CDW11 2:1).
    pub qprio: u8,
}

impl CreateIoQueue {
    /// Decodes a Create I/O CQ or SQ command.
    pub fn from_command(c: &Command) -> Self {
        let cdw10 = c.cdw10.get();
        let cdw11 = c.cdw11.get();
        CreateIoQueue {
            qid: cdw10 as u16,
            qsize: (cdw10 >> 16) + 1,
            pc: cdw11 & 1 != 0,
            ien: cdw11 & 2 != 0,
            iv_or_cqid: (cdw11 >> 16) as u16,
            qprio: ((cdw11 >> 1) & 0x3) as u8,
        }
    }

    /// Writes the fields into `c` as a Create I/O CQ (`is_sq == false`) or SQ.
    pub fn apply(&self, c: &mut Command, is_sq: bool) {
        let qsize0 = self.qsize.clamp(1, 0x1_0000) - 1;
        c.cdw10.set(u32::from(self.qid) | (qsize0 << 16));
        let mid = if is_sq {
            u32::from(self.qprio & 0x3) << 1
        } else {
            u32::from(self.ien) << 1
        };
        c.cdw11
            .set(u32::from(self.pc) | mid | (u32::from(self.iv_or_cqid) << 16));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn command_offsets() {
        assert_eq!(offset_of!(Command, opcode), 0);
        assert_eq!(offset_of!(Command, flags), 1);
        assert_eq!(offset_of!(Command, cid), 2);
        assert_eq!(offset_of!(Command, nsid), 4);
        assert_eq!(offset_of!(Command, mptr), 16);
        assert_eq!(offset_of!(Command, dptr), 24);
        assert_eq!(offset_of!(Command, cdw10), 40);
        assert_eq!(offset_of!(Command, cdw15), 60);
        assert_eq!(offset_of!(Completion, sqhd), 8);
        assert_eq!(offset_of!(Completion, cid), 12);
        assert_eq!(offset_of!(Completion, status), 14);
    }

    #[test]
    fn read_command_bytes() {
        // A Linux-host style NVMe/TCP read: opcode 02h, PSDT 01b, cid 0x1234,
        // nsid 1, SGL transport data block of 8 KiB, slba 0x1_0000_0010, nlb 15 (16 blocks), FUA.
        let mut b = [0u8; 64];
        b[0] = 0x02;
        b[1] = 0x40;
        b[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[32..36].copy_from_slice(&8192u32.to_le_bytes());
        b[39] = 0x5A;
        b[40..44].copy_from_slice(&0x10u32.to_le_bytes());
        b[44..48].copy_from_slice(&1u32.to_le_bytes());
        b[48..52].copy_from_slice(&(15u32 | 1 << 30).to_le_bytes());
        let c = Command::read(&b).unwrap();
        assert_eq!(c.cid(), 0x1234);
        assert_eq!(c.psdt(), 1);
        assert!(c.sgl1().is_tcp_transport());
        assert_eq!(c.sgl1().len(), 8192);
        let rw = ReadWrite::from_command(&c);
        assert_eq!(rw.slba, 0x1_0000_0010);
        assert_eq!(rw.nblocks, 16);
        assert!(rw.fua);
        // And build the same bytes back.
        let mut d = Command::write_blocks(1, 0x1_0000_0010, 16, true).with_cid(0x1234);
        d.opcode = io::READ;
        d.set_sgl1(SglDescriptor::tcp_transport(8192));
        assert_eq!(d.as_bytes(), &b[..]);
        assert!(Command::read(&b[..63]).is_none());
    }

    #[test]
    fn sgl_forms() {
        let s = SglDescriptor::in_capsule(0, 4096);
        assert_eq!(s.as_bytes()[15], 0x01);
        assert_eq!(&s.as_bytes()[8..12], &4096u32.to_le_bytes());
        assert!(s.is_in_capsule());
        let t = SglDescriptor::tcp_transport(512);
        assert_eq!(t.as_bytes()[15], 0x5A);
        let k = SglDescriptor::keyed_data_block(0xdead_beef, 0x12_3456, 0xAABB_CCDD, true);
        assert_eq!(&k.as_bytes()[8..11], &[0x56, 0x34, 0x12]);
        assert_eq!(&k.as_bytes()[11..15], &0xAABB_CCDDu32.to_le_bytes());
        assert_eq!(k.as_bytes()[15], 0x4F);
        assert_eq!(k.keyed_len(), 0x12_3456);
        assert_eq!(k.keyed_key(), 0xAABB_CCDD);
    }

    #[test]
    fn completion_status_and_phase() {
        let mut c = Completion::new(7, Status::INVALID_FIELD.with_dnr());
        assert!(!c.phase());
        c.set_phase(true);
        assert_eq!(c.as_bytes()[14..16], 0x8005u16.to_le_bytes());
        assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
        c.set_result64(0x1122_3344_5566_7788);
        assert_eq!(&c.as_bytes()[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(c.result64(), 0x1122_3344_5566_7788);
        assert_eq!(Completion::read(c.as_bytes()), Some(c));
    }

    #[test]
    fn dsm_and_ranges() {
        let c = Command::dataset_management(3, 256, true);
        assert_eq!(c.cdw10.get(), 255);
        assert_eq!(c.cdw11.get(), 4);
        let d = DatasetManagement::from_command(&c);
        assert_eq!(d.nranges, 256);
        assert!(d.deallocate);
        assert_eq!(d.data_len(), 4096);
        let mut buf = [0u8; 32];
        buf[4..8].copy_from_slice(&8u32.to_le_bytes());
        buf[8..16].copy_from_slice(&100u64.to_le_bytes());
        let r = DsmRange::slice_from(&buf).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].nlb.get(), 8);
        assert_eq!(r[0].slba.get(), 100);
        assert!(DsmRange::slice_from(&buf[..20]).is_none());
    }

    #[test]
    fn write_zeroes_bits() {
        let c = Command::write_zeroes(1, 5, 65536, true);
        assert_eq!(c.cdw12.get(), 0xFFFF | 1 << 25);
        let w = WriteZeroes::from_command(&c);
        assert_eq!((w.slba, w.nblocks, w.deac, w.fua), (5, 65536, true, false));
    }

    #[test]
    fn get_log_page_numd() {
        // 4096 bytes = 1024 dwords -> NUMD 0-based 1023: NUMDL 0x3FF, NUMDU 0.
        let c = Command::get_log_page(NSID_ALL, 0x02, 0, true, 4096, 512);
        assert_eq!(c.cdw10.get(), 0x02 | 1 << 15 | 0x3FF << 16);
        assert_eq!(c.cdw11.get(), 0);
        assert_eq!(c.cdw12.get(), 512);
        let g = GetLogPage::from_command(&c);
        assert_eq!(g.len_bytes(), 4096);
        assert!(g.rae);
        // Large request spills into NUMDU.
        let c = Command::get_log_page(0, 0x70, 0, false, 1 << 20, 1 << 33);
        assert_eq!(c.cdw10.get() >> 16, 0xFFFF);
        assert_eq!(c.cdw11.get() & 0xFFFF, 0x3);
        assert_eq!(c.cdw13.get(), 2);
        let g = GetLogPage::from_command(&c);
        assert_eq!((g.numd, g.offset), (1 << 18, 1 << 33));
        let mut m = Command::new(admin::GET_LOG_PAGE);
        m.cdw10.set(0xFFFF_0000);
        m.cdw11.set(0xFFFF);
        assert_eq!(GetLogPage::from_command(&m).numd, u32::MAX);
    }

    #[test]
    fn identify_features_abort() {
        let c = Command::identify(0x01, 0, 0x22, 0);
        assert_eq!(c.cdw10.get(), 0x0022_0001);
        let i = Identify::from_command(&c);
        assert_eq!((i.cns, i.cntid), (1, 0x22));
        let c = Command::set_features(0x07, 0x0003_0003, true);
        assert_eq!(c.cdw10.get(), 0x8000_0007);
        let s = SetFeatures::from_command(&c);
        assert!(s.sv);
        let g = GetFeatures::from_command(&Command::get_features(0x0F, 3, 0));
        assert_eq!((g.fid, g.sel), (0x0F, 3));
        let a = Abort::from_command(&Command::abort(2, 0xBEEF));
        assert_eq!((a.sqid, a.cid), (2, 0xBEEF));
        assert_eq!(Command::abort(2, 0xBEEF).cdw10.get(), 0xBEEF_0002);
    }

    #[test]
    fn create_queue() {
        let mut c = Command::new(admin::CREATE_IO_SQ);
        CreateIoQueue {
            qid: 1,
            qsize: 1024,
            pc: true,
            iv_or_cqid: 1,
            qprio: 2,
            ..Default::default()
        }
        .apply(&mut c, true);
        assert_eq!(c.cdw10.get(), 1 | 1023 << 16);
        assert_eq!(c.cdw11.get(), 1 | 2 << 1 | 1 << 16);
        let q = CreateIoQueue::from_command(&c);
        assert_eq!((q.qid, q.qsize, q.qprio, q.iv_or_cqid), (1, 1024, 2, 1));
    }

    #[test]
    fn prps_and_flags() {
        let mut c = Command::new(io::READ);
        c.flags = flags::FUSE_FIRST | flags::PSDT_SGL_MPTR_CONTIG;
        assert_eq!(c.fuse(), 1);
        c.set_prps(0x1000, 0x2000);
        assert_eq!(
            (c.prp1(), c.prp2(), c.psdt(), c.fuse()),
            (0x1000, 0x2000, 0, 1)
        );
        assert_eq!(c.opcode_name(false), "Read");
        assert_eq!(
            Command::new(admin::FABRICS).opcode_name(true),
            "Property Set"
        );
    }
}
