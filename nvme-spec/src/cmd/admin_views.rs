//! Decoded views of the admin commands a target and a host need (Base 2.0).

use super::*;

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
