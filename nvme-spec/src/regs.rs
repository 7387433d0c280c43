//! Controller properties (Base 2.0 "Controller Properties"; on PCIe these are
//! the BAR0 registers, on Fabrics they are read with Property Get/Set).
//!
//! Each property is a transparent newtype over its integer with accessors
//! for the fields, so the value can travel in a Property Get completion or a
//! register read unchanged.

use crate::fabrics::PropertySize;

/// Property offsets.
pub mod offset {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4).
    pub const VS: u32 = 0x08;
    /// Interrupt Mask Set (PCIe only).
    pub const INTMS: u32 = 0x0C;
    /// Interrupt Mask Clear (PCIe only).
    pub const INTMC: u32 = 0x10;
    /// Controller Configuration (4).
    pub const CC: u32 = 0x14;
    /// Controller Status (4).
    pub const CSTS: u32 = 0x1C;
    /// NVM Subsystem Reset (4).
    pub const NSSR: u32 = 0x20;
    /// Admin Queue Attributes (PCIe only).
    pub const AQA: u32 = 0x24;
    /// Admin Submission Queue base address (8, PCIe only).
    pub const ASQ: u32 = 0x28;
    /// Admin Completion Queue base address (8, PCIe only).
    pub const ACQ: u32 = 0x30;
    /// Controller Memory Buffer Location (PCIe only).
    pub const CMBLOC: u32 = 0x38;
    /// Controller Memory Buffer Size (PCIe only).
    pub const CMBSZ: u32 = 0x3C;
    /// Controller Ready Timeouts.
    pub const CRTO: u32 = 0x68;
    /// First doorbell (PCIe): SQ0 tail doorbell.
    pub const DOORBELL_BASE: u32 = 0x1000;
}

/// Size of the property at `off` as Fabrics defines it; `None` for offsets
/// that are not properties on a Fabrics controller (a target answers those
/// with Invalid Field in Command).
pub fn fabrics_property_size(off: u32) -> Option<PropertySize> {
    match off {
        offset::CAP => Some(PropertySize::Eight),
        offset::VS | offset::CC | offset::CSTS | offset::NSSR | offset::CRTO => {
            Some(PropertySize::Four)
        }
        _ => None,
    }
}

/// Value a host writes to NSSR to reset the NVM subsystem ("NVMe").
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

macro_rules! field {
    ($base:ty; $(#[$m:meta])* $get:ident, $set:ident, $ty:ty, $shift:expr, $bits:expr) => {
        $(#[$m])*
        pub const fn $get(&self) -> $ty {
            ((self.0 >> $shift) & ((1 << $bits) - 1)) as $ty
        }
        #[doc = concat!("Builder setting `", stringify!($get), "` (excess bits are dropped).")]
        #[must_use]
        pub const fn $set(mut self, v: $ty) -> Self {
            let mask = ((1 << $bits) - 1) << $shift;
            self.0 = (self.0 & !mask) | (((v as u64) << $shift) as $base & mask);
            self
        }
    };
}

macro_rules! flag {
    ($(#[$m:meta])* $get:ident, $set:ident, $bit:expr) => {
        $(#[$m])*
        pub const fn $get(&self) -> bool {
            self.0 & (1 << $bit) != 0
        }
        #[doc = concat!("Builder setting `", stringify!($get), "`.")]
        #[must_use]
        pub const fn $set(mut self, v: bool) -> Self {
            if v {
                self.0 |= 1 << $bit;
            } else {
                self.0 &= !(1 << $bit);
            }
            self
        }
    };
}

/// Controller Capabilities (CAP, offset 0, 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Cap(pub u64);

impl Cap {
    field!(
        u64;
        /// Maximum queue entries supported, 0-based (1 means 2 entries).
        mqes, with_mqes, u16, 0, 16
    );
    flag!(
        /// Contiguous queues required.
        cqr, with_cqr, 16
    );
    field!(
        u64;
        /// Arbitration mechanisms supported beyond round robin.
        ams, with_ams, u8, 17, 2
    );
    field!(
        u64;
        /// Worst-case time for CSTS.RDY to follow CC.EN, in 500 ms units.
        to, with_to, u8, 24, 8
    );
    field!(
        u64;
        /// Doorbell stride: 4 << DSTRD bytes between doorbells.
        dstrd, with_dstrd, u8, 32, 4
    );
    flag!(
        /// NVM subsystem reset supported.
        nssrs, with_nssrs, 36
    );
    field!(
        u64;
        /// Command sets supported (CSS): bit 0 NVM (CAP bit 37), bit 6 I/O command sets (bit 43), bit 7 admin only (bit 44).
        css, with_css, u8, 37, 8
    );
    flag!(
        /// Boot partition support.
        bps, with_bps, 45
    );
    field!(
        u64;
        /// Minimum memory page size: 2 ^ (12 + MPSMIN).
        mpsmin, with_mpsmin, u8, 48, 4
    );
    field!(
        u64;
        /// Maximum memory page size: 2 ^ (12 + MPSMAX).
        mpsmax, with_mpsmax, u8, 52, 4
    );
    flag!(
        /// Persistent memory region supported.
        pmrs, with_pmrs, 56
    );
    flag!(
        /// Controller memory buffer supported.
        cmbs, with_cmbs, 57
    );
    field!(
        u64;
        /// Controller ready modes supported (bit 0 with media, bit 1 independent of media).
        crms, with_crms, u8, 59, 2
    );

    /// CAP.CSS bit: NVM command set.
    pub const CSS_NVM: u8 = 1 << 0;
    /// CAP.CSS bit: one or more I/O command sets (CC.CSS 110b allowed).
    pub const CSS_IOCS: u8 = 1 << 6;
    /// CAP.CSS bit: no I/O command set, admin only.
    pub const CSS_NO_IO: u8 = 1 << 7;

    /// Queue entries supported, 1-based.
    pub const fn max_queue_entries(&self) -> u32 {
        self.mqes() as u32 + 1
    }

    /// Ready timeout in milliseconds.
    pub const fn timeout_ms(&self) -> u32 {
        self.to() as u32 * 500
    }

    /// Minimum memory page size in bytes.
    pub const fn min_page_size(&self) -> u64 {
        1u64 << (12 + self.mpsmin() as u32)
    }

    /// Maximum memory page size in bytes.
    pub const fn max_page_size(&self) -> u64 {
        1u64 << (12 + self.mpsmax() as u32)
    }
}

/// Version (VS, offset 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct Vs(pub u32);

impl Vs {
    /// NVMe 1.3.
    pub const V1_3: Vs = Vs::new(1, 3, 0);
    /// NVMe 1.4.
    pub const V1_4: Vs = Vs::new(1, 4, 0);
    /// NVMe 2.0.
    pub const V2_0: Vs = Vs::new(2, 0, 0);

    /// A version value.
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Vs(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }

    /// Major version.
    pub const fn major(&self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Minor version.
    pub const fn minor(&self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Tertiary version.
    pub const fn tertiary(&self) -> u8 {
        self.0 as u8
    }
}

impl core::fmt::Display for Vs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// CC.SHN / CSTS.SHST encodings.
pub mod shutdown {
    /// CC.SHN: no notification.
    pub const SHN_NONE: u8 = 0;
    /// CC.SHN: normal shutdown.
    pub const SHN_NORMAL: u8 = 1;
    /// CC.SHN: abrupt shutdown.
    pub const SHN_ABRUPT: u8 = 2;
    /// CSTS.SHST: normal operation.
    pub const SHST_NORMAL: u8 = 0;
    /// CSTS.SHST: shutdown processing occurring.
    pub const SHST_OCCURRING: u8 = 1;
    /// CSTS.SHST: shutdown processing complete.
    pub const SHST_COMPLETE: u8 = 2;
}

/// Controller Configuration (CC, offset 14h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Cc(pub u32);

impl Cc {
    flag!(
        /// Enable.
        en, with_en, 0
    );
    field!(
        u32;
        /// I/O command set selected (see the `CSS_*` constants).
        css, with_css, u8, 4, 3
    );
    field!(
        u32;
        /// Memory page size: 2 ^ (12 + MPS).
        mps, with_mps, u8, 7, 4
    );
    field!(
        u32;
        /// Arbitration mechanism selected.
        ams, with_ams, u8, 11, 3
    );
    field!(
        u32;
        /// Shutdown notification ([`shutdown`]).
        shn, with_shn, u8, 14, 2
    );
    field!(
        u32;
        /// I/O SQ entry size, log2 (6 = 64 bytes).
        iosqes, with_iosqes, u8, 16, 4
    );
    field!(
        u32;
        /// I/O CQ entry size, log2 (4 = 16 bytes).
        iocqes, with_iocqes, u8, 20, 4
    );
    flag!(
        /// Controller ready independent of media enable.
        crime, with_crime, 24
    );

    /// CC.CSS: NVM command set.
    pub const CSS_NVM: u8 = 0b000;
    /// CC.CSS: all supported I/O command sets.
    pub const CSS_ALL_IOCS: u8 = 0b110;
    /// CC.CSS: admin command set only.
    pub const CSS_ADMIN_ONLY: u8 = 0b111;

    /// The value a host writes to enable a controller with 64-byte SQEs,
    /// 16-byte CQEs, 4 KiB pages and the NVM command set.
    pub const fn enable_default() -> Self {
        Cc(0).with_en(true).with_iosqes(6).with_iocqes(4)
    }
}

/// Controller Status (CSTS, offset 1Ch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Csts(pub u32);

impl Csts {
    flag!(
        /// Ready.
        rdy, with_rdy, 0
    );
    flag!(
        /// Controller fatal status.
        cfs, with_cfs, 1
    );
    field!(
        u32;
        /// Shutdown status ([`shutdown`]).
        shst, with_shst, u8, 2, 2
    );
    flag!(
        /// NVM subsystem reset occurred.
        nssro, with_nssro, 4
    );
    flag!(
        /// Processing paused.
        pp, with_pp, 5
    );
    flag!(
        /// Shutdown type (1 = subsystem-wide).
        st, with_st, 6
    );
}

/// Admin Queue Attributes (AQA, offset 24h, PCIe only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Aqa(pub u32);

impl Aqa {
    field!(
        u32;
        /// Admin SQ size, 0-based.
        asqs, with_asqs, u16, 0, 12
    );
    field!(
        u32;
        /// Admin CQ size, 0-based.
        acqs, with_acqs, u16, 16, 12
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields() {
        // MQES 1023, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = Cap(0)
            .with_mqes(1023)
            .with_cqr(true)
            .with_to(15)
            .with_css(Cap::CSS_NVM)
            .with_mpsmax(4);
        assert_eq!(cap.0, 0x0040_0020_0F01_03FF);
        assert_eq!(cap.max_queue_entries(), 1024);
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 65536);
        assert!(cap.cqr());
        // CSS I/O command sets is bit 43.
        assert_eq!(Cap(0).with_css(Cap::CSS_IOCS).0, 1 << 43);
        assert_eq!(Cap(1 << 37).css(), Cap::CSS_NVM);
        assert_eq!(Cap(u64::MAX).with_mqes(0).mqes(), 0);
        assert_eq!(Cap(u64::MAX).with_mqes(0).0, !0xFFFFu64);
    }

    #[test]
    fn cc_csts_vs() {
        let cc = Cc::enable_default();
        assert_eq!(cc.0, 0x0046_0001);
        let cc = cc.with_shn(shutdown::SHN_NORMAL);
        assert_eq!(cc.0, 0x0046_4001);
        assert_eq!(cc.shn(), shutdown::SHN_NORMAL);
        assert_eq!(Cc(0).with_css(Cc::CSS_ALL_IOCS).0, 0x60);
        let csts = Csts(0).with_rdy(true).with_shst(shutdown::SHST_COMPLETE);
        assert_eq!(csts.0, 0x9);
        assert_eq!(Vs::V1_3.0, 0x0001_0300);
        assert_eq!(Vs::V2_0.to_string(), "2.0.0");
        assert_eq!(Vs(0x0001_0402).tertiary(), 2);
        assert_eq!(Aqa(0).with_asqs(31).with_acqs(31).0, 0x001F_001F);
        assert_eq!(
            fabrics_property_size(offset::CAP),
            Some(PropertySize::Eight)
        );
        assert_eq!(fabrics_property_size(offset::CC), Some(PropertySize::Four));
        assert_eq!(fabrics_property_size(offset::AQA), None);
    }
}
