//! An I/O as the layer carries it: its type, buffers and tag, and how it ended.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

impl IoType {
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
        IoType::Reset,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Whether the I/O moves data through its buffers.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }

    /// Whether the I/O changes what blocks read (a write of any kind).
    pub fn changes_data(self) -> bool {
        matches!(self, IoType::Write | IoType::WriteZeroes | IoType::Unmap)
    }
}

/// A set of I/O types a bdev supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTypes(u8);

impl IoTypes {
    pub fn of(types: &[IoType]) -> IoTypes {
        IoTypes(types.iter().fold(0, |m, t| m | t.bit()))
    }
    pub fn all() -> IoTypes {
        IoTypes::of(&IoType::ALL)
    }
    pub fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

/// The buffers of one I/O; most I/O has one. A module may share a view with several devices
/// below it (a mirror's legs) or split it, but hands the caller back what it was given.
pub type IoBufs = SmallVec<[BufView; 2]>;

/// One I/O request. The buffers travel with it and come back in its [`IoCompletion`].
#[derive(Debug)]
pub struct BdevIo {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub bufs: IoBufs,
    /// The submitter's own identifier, returned untouched.
    pub tag: u64,
    pub(super) submitted_ns: u64,
}

impl BdevIo {
    pub fn new(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        bufs: IoBufs,
        tag: u64,
    ) -> Self {
        BdevIo {
            io_type,
            offset_blocks,
            num_blocks,
            bufs,
            tag,
            submitted_ns: 0,
        }
    }

    pub fn read(offset_blocks: u64, num_blocks: u64, bufs: IoBufs, tag: u64) -> Self {
        Self::new(IoType::Read, offset_blocks, num_blocks, bufs, tag)
    }

    pub fn write(offset_blocks: u64, num_blocks: u64, bufs: IoBufs, tag: u64) -> Self {
        Self::new(IoType::Write, offset_blocks, num_blocks, bufs, tag)
    }

    /// An I/O without data (flush, unmap, write zeroes, reset).
    pub fn no_data(io_type: IoType, offset_blocks: u64, num_blocks: u64, tag: u64) -> Self {
        Self::new(io_type, offset_blocks, num_blocks, IoBufs::new(), tag)
    }

    /// Total bytes in the buffers.
    pub fn buf_len(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }

    /// Finishes the I/O with `status`; modules call this.
    pub fn complete(self, status: IoStatus) -> IoCompletion {
        IoCompletion {
            tag: self.tag,
            io_type: self.io_type,
            status,
            bufs: self.bufs,
            offset_blocks: self.offset_blocks,
            num_blocks: self.num_blocks,
            submitted_ns: self.submitted_ns,
        }
    }
}

/// How an I/O ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Success,
    /// The range passes the end of the device.
    OutOfRange,
    /// The buffers do not match the length or alignment the device needs.
    InvalidBuffer,
    /// The device does not do this type of I/O.
    Unsupported,
    /// The device failed the I/O (errno where known).
    IoError(i32),
    /// Aborted: the device was removed or reset.
    Aborted,
    /// A remote NVMe device's own status, passed through.
    Nvme {
        sct: u8,
        sc: u8,
    },
}

impl IoStatus {
    /// What a remote NVMe namespace answers a host whose reservation another host took.
    pub const RESERVATION_CONFLICT: IoStatus = IoStatus::Nvme { sct: 0, sc: 0x83 };

    pub fn is_ok(self) -> bool {
        self == IoStatus::Success
    }

    pub fn is_reservation_conflict(self) -> bool {
        self == IoStatus::RESERVATION_CONFLICT
    }
}

/// A finished I/O, with its buffers back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub io_type: IoType,
    pub status: IoStatus,
    pub bufs: IoBufs,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub(super) submitted_ns: u64,
}
