//! The kernel's VFIO interface (`include/uapi/linux/vfio.h`): request numbers, argument
//! layouts, and the one place this crate calls `ioctl`, `mmap` and `munmap`.
//!
//! Every VFIO request is `_IO(';', 100 + n)`: no size or direction is encoded, the argument
//! structs carry their own `argsz` instead.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}

pub const GET_API_VERSION: u64 = vfio_io(0);
pub const CHECK_EXTENSION: u64 = vfio_io(1);
pub const SET_IOMMU: u64 = vfio_io(2);
pub const GROUP_GET_STATUS: u64 = vfio_io(3);
pub const GROUP_SET_CONTAINER: u64 = vfio_io(4);
pub const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
pub const DEVICE_GET_INFO: u64 = vfio_io(7);
pub const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
pub const IOMMU_GET_INFO: u64 = vfio_io(12);
pub const IOMMU_MAP_DMA: u64 = vfio_io(13);

pub const API_VERSION: i32 = 0;
/// The type1 IOMMU with v2 semantics (unmap of partial ranges refused, no implicit splits).
pub const TYPE1V2_IOMMU: u64 = 3;

pub const GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const IOMMU_INFO_CAPS: u32 = 1 << 1;
pub const IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// vfio-pci's region indexes: BARs 0–5, then the expansion ROM, then config space.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;

#[repr(C)]
#[derive(Default)]
pub struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Default)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// An argument struct the kernel reads and may fill in, whose size is its `argsz`.
///
/// # Safety
/// The type must be `#[repr(C)]` with the layout of the kernel's struct for the request it is
/// passed with, and valid for any bit pattern the kernel writes.
pub unsafe trait IoctlArg {}
// SAFETY: each is repr(C) with the uapi layout and made only of integers.
unsafe impl IoctlArg for GroupStatus {}
// SAFETY: as above.
unsafe impl IoctlArg for DeviceInfo {}
// SAFETY: as above.
unsafe impl IoctlArg for RegionInfo {}
// SAFETY: as above.
unsafe impl IoctlArg for DmaMap {}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A request whose argument is a plain integer (or none).
pub fn ioctl_val(fd: BorrowedFd<'_>, req: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the requests used with this take their argument by value; the kernel reads no
    // memory of ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) })
}

/// A request whose argument is `arg`, read and possibly filled in by the kernel.
pub fn ioctl_arg<T: IoctlArg>(
    fd: BorrowedFd<'_>,
    req: u64,
    arg: &mut T,
) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the layout the request expects
    // (IoctlArg's contract) whose argsz tells the kernel how much of it to touch.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) })
}

/// A request whose argument is a byte buffer starting with an `argsz` header (info structs
/// followed by their capability chains).
pub fn ioctl_bytes(fd: BorrowedFd<'_>, req: u64, buf: &mut [u8]) -> io::Result<libc::c_int> {
    assert!(buf.len() >= 4 && buf.len() <= u32::MAX as usize);
    let argsz = (buf.len() as u32).to_ne_bytes();
    buf[..4].copy_from_slice(&argsz);
    // SAFETY: the kernel writes at most argsz (= buf.len()) bytes into `buf`, which we own.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, buf.as_mut_ptr()) })
}

/// GROUP_GET_DEVICE_FD's argument is the device's name as a C string.
pub fn get_device_fd(group: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<libc::c_int> {
    // SAFETY: the kernel reads the NUL-terminated string and nothing else.
    check(unsafe { libc::ioctl(group.as_raw_fd(), GROUP_GET_DEVICE_FD as _, name.as_ptr()) })
}

/// Maps `len` bytes of `fd` at `offset`, shared, for reads and writes.
pub fn mmap_shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel (no fixed address), so no existing memory
    // is replaced; the caller owns the result and unmaps it with `munmap`.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// Unmaps a mapping made by [`mmap_shared`].
///
/// # Safety
/// `(p, len)` is a mapping from `mmap_shared` that nothing will touch again.
pub unsafe fn munmap(p: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { libc::munmap(p.cast(), len) };
}
