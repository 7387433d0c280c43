//! PCI devices in userspace through VFIO, over the kernel's type1 IOMMU.
//!
//! - [`Container`]: the IOMMU address space of this process. Every device opened here shares
//!   it, so memory mapped once for DMA ([`Container::map_dma`]) is reachable by all of them, at
//!   the IOVA the caller chose.
//! - [`Device`]: one PCI function bound to vfio-pci, with its config space and its BARs.
//! - [`Bar`]: a BAR mapped into the process, read and written with volatile accesses that are
//!   bounds- and alignment-checked, so safe code cannot reach past it.
//!
//! The ioctls and mappings are in `sys.rs`, the only unsafe code besides [`Bar`]'s accessors
//! and the DMA mapping call (unsafe to call: the device may write the memory at any time).
//! Where the machine has no IOMMU the device has no IOMMU group and opening it fails with
//! [`Error::NoIommu`]; VFIO's no-IOMMU mode is never used (Debian kernels lack it, and it gives
//! the device the run of all memory).

mod pci;
mod sys;

pub use pci::PciAddress;

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{0}` is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)")]
    BadAddress(String),
    #[error("no PCI device {0} on this machine")]
    NoSuchDevice(PciAddress),
    #[error(
        "PCI device {device} is {}, not bound to vfio-pci: run scripts/setup.sh (PCI_ALLOWED={device}) to hand it over",
        .driver.as_deref().map(|d| format!("bound to {d}")).unwrap_or_else(|| "bound to no driver".into())
    )]
    NotBoundToVfio {
        device: PciAddress,
        driver: Option<String>,
    },
    #[error(
        "PCI device {0} has no IOMMU group: this machine has no IOMMU enabled (boot with \
         intel_iommu=on or amd_iommu=on); plexd does not use VFIO's no-IOMMU mode"
    )]
    NoIommu(PciAddress),
    #[error("cannot open {path}: {source} (is the vfio-pci module loaded?)")]
    NoVfio {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("VFIO group {group} of {device} is in use by another process")]
    GroupInUse { group: u32, device: PciAddress },
    #[error(
        "VFIO group {group} of {device} is not usable: every device in it must be bound to \
         vfio-pci or to no driver, and these are not: {}",
        .peers.join(", ")
    )]
    GroupNotViable {
        group: u32,
        device: PciAddress,
        peers: Vec<String>,
    },
    #[error("the kernel's VFIO lacks {0}")]
    Unsupported(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The errno an RPC answers this with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::BadAddress(_) | Error::Invalid(_) => libc::EINVAL,
            Error::NoSuchDevice(_) => libc::ENODEV,
            Error::NotBoundToVfio { .. }
            | Error::GroupInUse { .. }
            | Error::GroupNotViable { .. } => libc::EBUSY,
            Error::NoIommu(_) | Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::NoVfio { source, .. } | Error::Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The process's IOMMU address space.
pub struct Container {
    fd: OwnedFd,
    state: Mutex<ContainerState>,
}

#[derive(Default)]
struct ContainerState {
    /// The groups in the container; the IOMMU type is chosen as the first one comes in.
    groups: Vec<(u32, Arc<File>)>,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks that the kernel speaks the type1 v2 IOMMU.
    pub fn open() -> Result<Arc<Container>> {
        let path = "/dev/vfio/vfio";
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::NoVfio {
                path: path.into(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let v = sys::ioctl_val(fd.as_fd(), sys::GET_API_VERSION, 0)
            .map_err(io_err("VFIO_GET_API_VERSION"))?;
        if v != sys::API_VERSION {
            return Err(Error::Invalid(format!("VFIO API version {v}, expected 0")));
        }
        let has = sys::ioctl_val(fd.as_fd(), sys::CHECK_EXTENSION, sys::TYPE1V2_IOMMU as _)
            .map_err(io_err("VFIO_CHECK_EXTENSION"))?;
        if has != 1 {
            return Err(Error::Unsupported(
                "the type1 v2 IOMMU (modprobe vfio_iommu_type1)",
            ));
        }
        Ok(Arc::new(Container {
            fd,
            state: Mutex::new(ContainerState::default()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContainerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens device `addr` (bound to vfio-pci), adding its group to this container.
    pub fn open_device(self: &Arc<Self>, addr: PciAddress) -> Result<Device> {
        let group_id = addr.vfio_group()?;
        let group = self.attach_group(group_id, addr)?;
        let name = std::ffi::CString::new(addr.to_string()).expect("no NUL in an address");
        let raw = sys::get_device_fd(group.as_fd(), &name)
            .map_err(io_err(format!("VFIO_GROUP_GET_DEVICE_FD {addr}")))?;
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut info = sys::DeviceInfo {
            argsz: std::mem::size_of::<sys::DeviceInfo>() as u32,
            ..Default::default()
        };
        sys::ioctl_arg(fd.as_fd(), sys::DEVICE_GET_INFO, &mut info)
            .map_err(io_err(format!("VFIO_DEVICE_GET_INFO {addr}")))?;
        if info.flags & sys::DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Invalid(format!(
                "{addr} is not a PCI device to VFIO"
            )));
        }
        Ok(Device {
            file: File::from(fd),
            addr,
            _group: group,
            _container: self.clone(),
        })
    }

    fn attach_group(&self, id: u32, addr: PciAddress) -> Result<Arc<File>> {
        let mut st = self.lock();
        if let Some((_, g)) = st.groups.iter().find(|(g, _)| *g == id) {
            return Ok(g.clone());
        }
        let path = format!("/dev/vfio/{id}");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EBUSY) => Error::GroupInUse {
                    group: id,
                    device: addr,
                },
                _ => Error::NoVfio {
                    path: path.clone(),
                    source,
                },
            })?;
        let mut status = sys::GroupStatus {
            argsz: std::mem::size_of::<sys::GroupStatus>() as u32,
            flags: 0,
        };
        sys::ioctl_arg(file.as_fd(), sys::GROUP_GET_STATUS, &mut status)
            .map_err(io_err(format!("VFIO_GROUP_GET_STATUS {path}")))?;
        if status.flags & sys::GROUP_FLAGS_VIABLE == 0 {
            let peers = pci::group_peers(id, &addr)
                .into_iter()
                .filter(|(_, d)| d.as_deref().is_some_and(|d| d != "vfio-pci"))
                .map(|(n, d)| format!("{n} (bound to {})", d.unwrap_or_default()))
                .collect();
            return Err(Error::GroupNotViable {
                group: id,
                device: addr,
                peers,
            });
        }
        // GROUP_SET_CONTAINER takes a pointer to the container's descriptor.
        let mut arg = FdArg(std::os::fd::AsRawFd::as_raw_fd(&self.fd));
        sys::ioctl_arg(file.as_fd(), sys::GROUP_SET_CONTAINER, &mut arg)
            .map_err(io_err(format!("VFIO_GROUP_SET_CONTAINER {path}")))?;
        if st.groups.is_empty() {
            sys::ioctl_val(self.fd.as_fd(), sys::SET_IOMMU, sys::TYPE1V2_IOMMU as _)
                .map_err(io_err("VFIO_SET_IOMMU type1v2"))?;
        }
        let file = Arc::new(file);
        st.groups.push((id, file.clone()));
        Ok(file)
    }

    /// The IOVA ranges the IOMMU can translate (none known before a device is open).
    pub fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        if self.lock().groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; 4096];
        sys::ioctl_bytes(self.fd.as_fd(), sys::IOMMU_GET_INFO, &mut buf)
            .map_err(io_err("VFIO_IOMMU_GET_INFO"))?;
        Ok(parse_iova_ranges(&buf))
    }

    /// Lets the devices of this container read and write `len` bytes at `vaddr` through
    /// addresses `iova..iova + len`.
    ///
    /// # Safety
    /// The memory must stay mapped and owned by the caller, and must not be handed to other
    /// users, for the life of the container (in practice, of the process): a device may
    /// write it at any time, and nothing takes the mapping away.
    pub unsafe fn map_dma(&self, vaddr: *const u8, len: usize, iova: u64) -> Result<()> {
        let mut m = sys::DmaMap {
            argsz: std::mem::size_of::<sys::DmaMap>() as u32,
            flags: sys::DMA_MAP_FLAG_READ | sys::DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        sys::ioctl_arg(self.fd.as_fd(), sys::IOMMU_MAP_DMA, &mut m)
            .map(drop)
            .map_err(io_err(format!(
                "VFIO_IOMMU_MAP_DMA of {len} bytes at IOVA {iova:#x}"
            )))
    }
}

/// A descriptor number, as GROUP_SET_CONTAINER reads it.
#[repr(C)]
struct FdArg(libc::c_int);
// SAFETY: repr(C) wrapper of the int GROUP_SET_CONTAINER reads.
unsafe impl sys::IoctlArg for FdArg {}

/// The IOVA ranges in a VFIO_IOMMU_GET_INFO answer's capability chain; an answer without the
/// capability (older kernels) gives the whole 48-bit space.
fn parse_iova_ranges(buf: &[u8]) -> Vec<RangeInclusive<u64>> {
    let u32_at = |o: usize| {
        buf.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let u16_at = |o: usize| {
        buf.get(o..o + 2)
            .map(|b| u16::from_ne_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        buf.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    let whole = vec![0..=(1u64 << 48) - 1];
    let flags = u32_at(4).unwrap_or(0);
    if flags & sys::IOMMU_INFO_CAPS == 0 {
        return whole;
    }
    let mut off = u32_at(16).unwrap_or(0) as usize;
    let mut hops = 0;
    while off != 0 && hops < 64 {
        hops += 1;
        let (Some(id), Some(next)) = (u16_at(off), u32_at(off + 4)) else {
            break;
        };
        if id == sys::IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(off + 8).unwrap_or(0) as usize;
            return (0..n.min(256))
                .filter_map(|i| {
                    let at = off + 16 + i * 16;
                    Some(u64_at(at)?..=u64_at(at + 8)?)
                })
                .collect();
        }
        off = next as usize;
    }
    whole
}

/// A PCI function bound to vfio-pci, opened in a [`Container`].
pub struct Device {
    file: File,
    addr: PciAddress,
    _group: Arc<File>,
    _container: Arc<Container>,
}

/// PCI config space: the command register and its bus-master bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

impl Device {
    fn region(&self, index: u32) -> Result<sys::RegionInfo> {
        let mut r = sys::RegionInfo {
            argsz: std::mem::size_of::<sys::RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        sys::ioctl_arg(self.file.as_fd(), sys::DEVICE_GET_REGION_INFO, &mut r).map_err(io_err(
            format!("VFIO_DEVICE_GET_REGION_INFO {} region {index}", self.addr),
        ))?;
        Ok(r)
    }

    /// Reads config space at `offset`.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.region(sys::PCI_CONFIG_REGION_INDEX)?;
        self.file
            .read_exact_at(buf, r.offset + offset)
            .map_err(io_err(format!("{} config read at {offset:#x}", self.addr)))
    }

    /// Writes config space at `offset`.
    pub fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.region(sys::PCI_CONFIG_REGION_INDEX)?;
        self.file
            .write_all_at(buf, r.offset + offset)
            .map_err(io_err(format!("{} config write at {offset:#x}", self.addr)))
    }

    /// Lets the device decode its BARs and master DMA (the PCI command register's bits).
    pub fn enable_bus_master(&self) -> Result<()> {
        let mut b = [0u8; 2];
        self.config_read(PCI_COMMAND, &mut b)?;
        let cmd = u16::from_le_bytes(b) | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY;
        self.config_write(PCI_COMMAND, &cmd.to_le_bytes())
    }

    /// Maps BAR `index` (a memory BAR the kernel lets us map).
    pub fn map_bar(&self, index: u32) -> Result<Bar> {
        if index > 5 {
            return Err(Error::Invalid(format!(
                "BAR {index} does not exist (0 to 5)"
            )));
        }
        let r = self.region(sys::PCI_BAR0_REGION_INDEX + index)?;
        let need =
            sys::REGION_INFO_FLAG_READ | sys::REGION_INFO_FLAG_WRITE | sys::REGION_INFO_FLAG_MMAP;
        if r.size == 0 || r.flags & need != need {
            return Err(Error::Invalid(format!(
                "BAR {index} of {} cannot be mapped (size {}, flags {:#x})",
                self.addr, r.size, r.flags
            )));
        }
        let len = usize::try_from(r.size).map_err(|_| Error::Invalid("BAR too large".into()))?;
        let ptr = sys::mmap_shared(self.file.as_fd(), len, r.offset)
            .map_err(io_err(format!("mmap of BAR {index} of {}", self.addr)))?;
        Ok(Bar {
            ptr: NonNull::new(ptr).expect("mmap never returns null on success"),
            len,
        })
    }
}

/// A mapped BAR. Accesses are volatile, naturally aligned, and checked against its length.
pub struct Bar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory reached only through volatile accesses; which thread
// makes them does not matter to the device or to memory safety.
unsafe impl Send for Bar {}
// SAFETY: as above; concurrent volatile accesses are the device's business (registers).
unsafe impl Sync for Bar {}

impl Bar {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of a `size`-byte register at `offset`, if it is inside and aligned.
    #[inline]
    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(
            offset.is_multiple_of(size) && offset.checked_add(size).is_some_and(|e| e <= self.len),
            "register access of {size} bytes at {offset:#x} outside a BAR of {:#x} bytes",
            self.len
        );
        // SAFETY: offset + size <= len, checked above, so the result is inside the mapping.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    #[inline]
    pub fn read32(&self, offset: usize) -> u32 {
        let p = self.at(offset, 4).cast::<u32>();
        // SAFETY: `at` checked bounds and alignment; the mapping lives as long as self.
        u32::from_le(unsafe { p.read_volatile() })
    }

    #[inline]
    pub fn write32(&self, offset: usize, v: u32) {
        let p = self.at(offset, 4).cast::<u32>();
        // SAFETY: as in read32.
        unsafe { p.write_volatile(v.to_le()) }
    }

    /// A 64-bit register, read as two 32-bit halves, low first (as NVMe allows for CAP).
    pub fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }

    /// A 64-bit register, written as two 32-bit halves, low first (ASQ, ACQ).
    pub fn write64(&self, offset: usize, v: u64) {
        self.write32(offset, v as u32);
        self.write32(offset + 4, (v >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping came from mmap_shared with this length and dies with self.
        unsafe { sys::munmap(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernels() {
        // _IO(';', 100 + n): values from include/uapi/linux/vfio.h.
        assert_eq!(sys::GET_API_VERSION, 0x3b64);
        assert_eq!(sys::GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(sys::IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(std::mem::size_of::<sys::RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<sys::DmaMap>(), 32);
    }

    #[test]
    fn iova_ranges_come_from_the_capability_chain() {
        let mut b = vec![0u8; 96];
        b[4..8].copy_from_slice(&(sys::IOMMU_INFO_CAPS | 1).to_ne_bytes());
        b[16..20].copy_from_slice(&24u32.to_ne_bytes()); // cap_offset
                                                         // A cap of another kind first, pointing on to the IOVA ranges at 40.
        b[24..26].copy_from_slice(&9u16.to_ne_bytes());
        b[28..32].copy_from_slice(&40u32.to_ne_bytes());
        b[40..42].copy_from_slice(&1u16.to_ne_bytes());
        b[48..52].copy_from_slice(&2u32.to_ne_bytes());
        for (i, (s, e)) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, (1 << 39) - 1)]
            .iter()
            .enumerate()
        {
            b[56 + i * 16..64 + i * 16].copy_from_slice(&s.to_ne_bytes());
            b[64 + i * 16..72 + i * 16].copy_from_slice(&e.to_ne_bytes());
        }
        assert_eq!(
            parse_iova_ranges(&b),
            vec![0..=0xfedf_ffff, 0xfef0_0000..=(1 << 39) - 1]
        );
        // No capabilities: the whole space; a chain that loops ends.
        assert_eq!(parse_iova_ranges(&[0u8; 24]), vec![0..=(1u64 << 48) - 1]);
        let mut looped = vec![0u8; 40];
        looped[4..8].copy_from_slice(&sys::IOMMU_INFO_CAPS.to_ne_bytes());
        looped[16..20].copy_from_slice(&24u32.to_ne_bytes());
        looped[24..26].copy_from_slice(&9u16.to_ne_bytes());
        looped[28..32].copy_from_slice(&24u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&looped), vec![0..=(1u64 << 48) - 1]);
    }

    #[test]
    #[should_panic(expected = "outside a BAR")]
    fn a_register_past_the_bar_is_refused() {
        let mut mem = vec![0u32; 4];
        let bar = Bar {
            ptr: NonNull::new(mem.as_mut_ptr().cast()).unwrap(),
            len: 16,
        };
        bar.write32(12, 7);
        assert_eq!(bar.read32(12), 7);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bar.read32(16)));
        std::mem::forget(bar); // not an mmap: must not be unmapped
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }
}
