//! SGL descriptors (Base 2.0 "Scatter Gather List (SGL)").

use super::*;

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
