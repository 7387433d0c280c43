//! Device addresses (IOVAs) of pool memory.
//!
//! Devices behind an IOMMU reach memory through addresses we choose. Once a driver registers
//! a [`Mapper`] (the VFIO container), every pool chunk, those already mapped and each new one
//! before its buffers are handed out, is mapped at the next free IOVA, and the translation is
//! recorded in a two-level table of 2 MiB granules: looking an address up is two atomic loads,
//! no lock, so the I/O path can afford it for every buffer. Memory that was never registered
//! (before any mapper, or a chunk whose mapping failed, which then fails the allocation) has no
//! IOVA: [`iova`] answers `None` and the driver refuses the buffer rather than hand the device
//! an address it cannot reach.
//!
//! IOVAs are chosen 2 MiB-aligned and chunks are 2 MiB-aligned, so a granule never holds two
//! chunks and the table's one entry per granule is exact.

use crate::{DmaError, HUGEPAGE_SIZE};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

/// Maps `len` bytes at `vaddr` for the device at IOVA `iova`; an error names what failed.
pub type Mapper = Box<dyn Fn(*const u8, usize, u64) -> Result<(), String> + Send + Sync>;

const GRANULE_SHIFT: u32 = HUGEPAGE_SIZE.trailing_zeros();
const LEAF_SHIFT: u32 = 30;
const LEAF_ENTRIES: usize = 1 << (LEAF_SHIFT - GRANULE_SHIFT);
/// User addresses on x86-64 (4-level tables) are below 2^47; memory above that reach is
/// refused a mapping rather than recorded.
const ROOT_ENTRIES: usize = 1 << (47 - LEAF_SHIFT);
/// A leaf entry: the granule's IOVA with this bit set (IOVAs are 2 MiB-aligned, so the low bits
/// are free).
const VALID: u64 = 1;

type Leaf = [AtomicU64; LEAF_ENTRIES];

static ROOT: [AtomicPtr<Leaf>; ROOT_ENTRIES] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; ROOT_ENTRIES];

struct Registry {
    map: Mapper,
    next: u64,
    end: u64,
}

/// Held while a chunk is mapped and recorded, so registration and growth never interleave.
static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> std::sync::MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a mapper is registered: pool memory is then only handed out once mapped.
pub fn is_registered() -> bool {
    registry().is_some()
}

/// Registers `map`, to place pool chunks at IOVAs in `range` (rounded in to 2 MiB), and maps
/// every chunk the pool already has. One mapper per process: a second is refused.
pub fn register(range: std::ops::Range<u64>, map: Mapper) -> Result<(), DmaError> {
    let mut reg = registry();
    if reg.is_some() {
        return Err(DmaError::Iova("a DMA mapper is already registered".into()));
    }
    let g = HUGEPAGE_SIZE as u64;
    let mut r = Registry {
        map,
        next: range.start.div_ceil(g) * g,
        end: range.end / g * g,
    };
    let res = crate::pool::chunk_spans()
        .into_iter()
        .try_for_each(|(base, len)| r.add(base, len));
    // Kept even after a failure: the chunks mapped so far stay mapped and recorded, so a
    // second registration must not place others at their IOVAs. A chunk left out has no
    // IOVA, which the device driver refuses.
    *reg = Some(r);
    res
}

/// Admits a new pool chunk: maps it if a mapper is registered, then runs `keep` (which
/// records the chunk in the pool) under the same lock, so [`register`] sees every chunk
/// exactly once. On error the chunk must not be used.
pub(crate) fn admit_chunk(base: usize, len: usize, keep: impl FnOnce()) -> Result<(), DmaError> {
    let mut reg = registry();
    if let Some(r) = reg.as_mut() {
        r.add(base, len)?;
    }
    keep();
    Ok(())
}

impl Registry {
    fn add(&mut self, base: usize, len: usize) -> Result<(), DmaError> {
        let g = HUGEPAGE_SIZE;
        if !base.is_multiple_of(g) || !len.is_multiple_of(g) {
            return Err(DmaError::Iova(format!(
                "memory at {base:#x} ({len} bytes) is not in whole 2 MiB pages"
            )));
        }
        if base.saturating_add(len.saturating_sub(1)) >> LEAF_SHIFT >= ROOT_ENTRIES {
            return Err(DmaError::Iova(format!(
                "memory at {base:#x} is beyond the IOVA table's reach"
            )));
        }
        let iova = self.next;
        if iova + len as u64 > self.end {
            return Err(DmaError::Iova(format!(
                "no IOVA space left for {len} more bytes (up to {:#x} in use)",
                self.next
            )));
        }
        (self.map)(base as *const u8, len, iova).map_err(DmaError::Iova)?;
        self.next += len as u64;
        for k in 0..len / g {
            record(base + k * g, iova + (k * g) as u64);
        }
        Ok(())
    }
}

fn record(granule: usize, iova: u64) {
    let slot = &ROOT[granule >> LEAF_SHIFT];
    let mut leaf = slot.load(Ordering::Acquire);
    if leaf.is_null() {
        // Leaves live for the process: a lookup may hold one at any time.
        let fresh: &'static Leaf = Box::leak(Box::new([const { AtomicU64::new(0) }; LEAF_ENTRIES]));
        // Only REGISTRY's holder stores, so a plain store cannot lose another's leaf.
        leaf = fresh as *const Leaf as *mut Leaf;
        slot.store(leaf, Ordering::Release);
    }
    // SAFETY: non-null leaf pointers come from Box::leak above and are never freed.
    let leaf = unsafe { &*leaf };
    leaf[(granule >> GRANULE_SHIFT) & (LEAF_ENTRIES - 1)].store(iova | VALID, Ordering::Release);
}

/// The IOVA of the byte at `addr`, if its memory is registered with the device mapper.
#[inline]
pub fn iova(addr: usize) -> Option<u64> {
    let leaf = ROOT.get(addr >> LEAF_SHIFT)?.load(Ordering::Acquire);
    if leaf.is_null() {
        return None;
    }
    // SAFETY: as in `record`: leaves are leaked, never freed.
    let leaf = unsafe { &*leaf };
    let e = leaf[(addr >> GRANULE_SHIFT) & (LEAF_ENTRIES - 1)].load(Ordering::Acquire);
    (e & VALID != 0).then(|| (e & !VALID) + (addr & (HUGEPAGE_SIZE - 1)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DmaBuf;
    use std::sync::{Arc, Mutex as StdMutex};

    // One test: the mapper is process-wide, and cargo runs a file's tests in one process.
    #[test]
    fn chunks_are_mapped_before_use_and_translated_exactly() {
        let early = DmaBuf::new(4096).unwrap();
        assert_eq!(iova(early.addr()), None, "nothing is registered yet");
        let calls = Arc::new(StdMutex::new(Vec::new()));
        let seen = calls.clone();
        register(
            (1 << 32)..(1 << 39),
            Box::new(move |v, len, iova| {
                seen.lock().unwrap().push((v as usize, len, iova));
                Ok(())
            }),
        )
        .unwrap();
        assert!(
            register(0..1, Box::new(|_, _, _| Ok(()))).is_err(),
            "one mapper only"
        );
        let mapped = calls.lock().unwrap().clone();
        assert!(
            !mapped.is_empty(),
            "the pool's existing chunks are mapped at registration"
        );
        assert!(mapped
            .iter()
            .all(|&(_, _, i)| i >= 1 << 32 && i % (2 << 20) == 0));
        // The early buffer now has the IOVA of its chunk plus its offset in it.
        let (v, _, i) = mapped
            .iter()
            .copied()
            .find(|&(v, len, _)| (v..v + len).contains(&early.addr()))
            .unwrap();
        assert_eq!(iova(early.addr()), Some(i + (early.addr() - v) as u64));
        // A buffer from a chunk mapped later (the largest class needs a new one) is mapped too,
        // at a distinct IOVA range, and contiguous across its 2 MiB pages.
        let big = DmaBuf::new(4 << 20).unwrap();
        let b = iova(big.addr()).unwrap();
        assert_eq!(iova(big.addr() + (3 << 20) + 5), Some(b + (3 << 20) + 5));
        let ranges = calls.lock().unwrap().clone();
        for (n, &(_, l1, i1)) in ranges.iter().enumerate() {
            for &(_, l2, i2) in &ranges[n + 1..] {
                assert!(
                    i1 + l1 as u64 <= i2 || i2 + l2 as u64 <= i1,
                    "IOVA ranges overlap"
                );
            }
        }
        // Memory that is not the pool's has none.
        let heap = vec![0u8; 4096];
        assert_eq!(iova(heap.as_ptr() as usize), None);
    }
}
