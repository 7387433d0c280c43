//! Mappings of pinned memory, hugepage-backed where possible.

use crate::{pool, DmaError, HUGEPAGE_SIZE};
use memmap2::{MmapMut, MmapOptions};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a mapping's memory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// 2 MiB hugepages from the kernel's reserved pool.
    Hugepages,
    /// Ordinary pages, locked in RAM. Works, but costs TLB misses and cannot back VFIO DMA
    /// on every IOMMU.
    Locked,
}

/// A large mapping of pinned memory owned by one user, released when dropped.
pub struct DmaRegion {
    mem: Pinned,
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

impl DmaRegion {
    /// Maps `len` bytes (rounded up to whole hugepages), zero-filled.
    pub fn new(len: usize) -> Result<DmaRegion, DmaError> {
        let len = len.max(1).div_ceil(HUGEPAGE_SIZE) * HUGEPAGE_SIZE;
        pool::charge(len)?;
        match map_pinned(len) {
            Ok(mem) => Ok(DmaRegion { mem }),
            Err(e) => {
                pool::uncharge(len);
                Err(e)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.mem.len
    }

    pub fn is_empty(&self) -> bool {
        self.mem.len == 0
    }

    pub fn kind(&self) -> MemoryKind {
        self.mem.kind
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.mem.map[self.mem.offset..self.mem.offset + self.mem.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem.map[self.mem.offset..self.mem.offset + self.mem.len]
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        pool::uncharge(self.mem.len);
    }
}

/// Pinned memory: `len` bytes at `offset` in `map`, starting on a 2 MiB boundary (so a device
/// mapping can use 2 MiB IOMMU pages, and no 2 MiB granule is shared with other memory).
pub(crate) struct Pinned {
    pub map: MmapMut,
    pub offset: usize,
    pub len: usize,
    pub kind: MemoryKind,
}

impl Pinned {
    pub fn base(&mut self) -> *mut u8 {
        self.map[self.offset..].as_mut_ptr()
    }
}

/// Maps anonymous memory, from hugepages if the kernel has them, else locked ordinary pages.
pub(crate) fn map_pinned(len: usize) -> Result<Pinned, DmaError> {
    if let Ok(map) = MmapOptions::new()
        .len(len)
        .huge(Some(21))
        .populate()
        .map_anon()
    {
        // Hugetlb mappings are aligned to their page size.
        return Ok(Pinned {
            map,
            offset: 0,
            len,
            kind: MemoryKind::Hugepages,
        });
    }
    warn_fallback_once(len);
    // Populating more than the machine has would not fail the mmap: the OOM killer would end
    // the whole process. Refuse up front instead.
    if let Some(avail) = mem_available() {
        if len as u64 > avail / 10 * 9 {
            return Err(DmaError::Map {
                len,
                source: std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    format!("only {} MiB of memory is available", avail >> 20),
                ),
            });
        }
    }
    // One page more than asked, to start on a 2 MiB boundary inside it.
    let map = MmapOptions::new()
        .len(len + HUGEPAGE_SIZE)
        .populate()
        .map_anon()
        .map_err(|source| DmaError::Map { len, source })?;
    if let Err(e) = map.lock() {
        tracing::warn!("mlock of {len} bytes failed ({e}); DMA memory may be paged out");
    }
    let addr = map.as_ptr() as usize;
    let offset = addr.next_multiple_of(HUGEPAGE_SIZE) - addr;
    Ok(Pinned {
        map,
        offset,
        len,
        kind: MemoryKind::Locked,
    })
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn warn_fallback_once(len: usize) {
    if FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into());
    tracing::warn!(
        "NOT ENOUGH HUGEPAGES: could not map {len} bytes from hugepages (HugePages_Free={free}); \
         using ordinary locked memory instead, which is slower and not fit for VFIO devices. \
         Fix: run `sudo HUGEMEM=2048 scripts/setup.sh` before starting plexd."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_the_machine_has_is_an_error_not_an_oom_kill() {
        let too_much = mem_available().expect("Linux has /proc/meminfo") as usize * 2;
        assert!(matches!(
            DmaRegion::new(too_much),
            Err(DmaError::Map { .. })
        ));
    }
}
