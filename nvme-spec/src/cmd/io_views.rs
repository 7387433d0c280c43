//! Decoded views of the I/O commands (NVM Command Set 1.0).

use super::*;

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
