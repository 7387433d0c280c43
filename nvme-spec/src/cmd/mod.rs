//! Submission and completion queue entries, SGL descriptors and decoded views
//! of the commands a target and a host need (Base 2.0 "Submission Queue
//! Entry", "Completion Queue Entry", "Scatter Gather List (SGL)"; NVM Command
//! Set 1.0 for the I/O commands).
//!
//! [`Command`] is the raw 64-byte entry with little-endian fields. The
//! per-command structs ([`ReadWrite`], [`GetLogPage`], ...) are small decoded
//! copies with host-endian fields and spec-level meaning (1-based counts, byte
//! offsets), built with `from_command` and written back with `apply`.
//!
//! Here: the submission queue entry and its builders; `sgl.rs` the SGL descriptor,
//! `completion.rs` the completion entry, `io_views.rs` and `admin_views.rs` the decoded views.

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

mod admin_views;
mod completion;
mod io_views;
mod sgl;

pub use admin_views::*;
pub use completion::*;
pub use io_views::*;
pub use sgl::*;

#[cfg(test)]
mod tests;
