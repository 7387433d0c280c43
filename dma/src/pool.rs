//! The buffer pool: power-of-two size classes carved from pinned chunks, with a per-thread
//! cache in front of lock-free shared free lists.

use crate::region::{map_pinned, MemoryKind, Pinned};
use crate::{DmaError, HUGEPAGE_SIZE};
use crossbeam_queue::SegQueue;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub const MIN_BUF_SIZE: usize = 512;
pub const MAX_BUF_SIZE: usize = 4 << 20;
const MIN_SHIFT: u32 = MIN_BUF_SIZE.trailing_zeros();
const NUM_CLASSES: usize = (MAX_BUF_SIZE.trailing_zeros() - MIN_SHIFT + 1) as usize;

/// How many bytes of each class a thread keeps before it hands buffers back to the pool.
const THREAD_CACHE_BYTES: usize = 8 << 20;

struct Pool {
    free: [SegQueue<usize>; NUM_CLASSES],
    /// Every chunk ever mapped; kept so that buffer addresses stay valid forever.
    chunks: Mutex<Vec<Pinned>>,
    mapped: AtomicUsize,
    limit: AtomicUsize,
    huge_bytes: AtomicUsize,
    locked_bytes: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        free: std::array::from_fn(|_| SegQueue::new()),
        chunks: Mutex::new(Vec::new()),
        mapped: AtomicUsize::new(0),
        limit: AtomicUsize::new(0),
        huge_bytes: AtomicUsize::new(0),
        locked_bytes: AtomicUsize::new(0),
    })
}

pub(crate) fn set_limit(bytes: usize) {
    pool().limit.store(bytes, Ordering::Relaxed);
}

/// Accounts for `len` more mapped bytes, failing if that passes the limit.
pub(crate) fn charge(len: usize) -> Result<(), DmaError> {
    let p = pool();
    let limit = p.limit.load(Ordering::Relaxed);
    let used = p.mapped.fetch_add(len, Ordering::Relaxed);
    if limit != 0 && used + len > limit {
        p.mapped.fetch_sub(len, Ordering::Relaxed);
        return Err(DmaError::LimitReached { limit, used });
    }
    Ok(())
}

pub(crate) fn uncharge(len: usize) {
    pool().mapped.fetch_sub(len, Ordering::Relaxed);
}

fn class_of(len: usize) -> Result<usize, DmaError> {
    if len > MAX_BUF_SIZE {
        return Err(DmaError::TooLarge(len));
    }
    let size = len.max(MIN_BUF_SIZE).next_power_of_two();
    Ok((size.trailing_zeros() - MIN_SHIFT) as usize)
}

const fn class_size(class: usize) -> usize {
    MIN_BUF_SIZE << class
}

/// Maps a new chunk and splits it into buffers of `class`; returns one and frees the rest.
fn grow(class: usize) -> Result<usize, DmaError> {
    let size = class_size(class);
    let chunk_len = size.max(HUGEPAGE_SIZE);
    charge(chunk_len)?;
    let mut mem = map_pinned(chunk_len).inspect_err(|_| uncharge(chunk_len))?;
    let base = mem.base() as usize;
    let kind = mem.kind;
    let p = pool();
    // A device driver's mapper sees the chunk before any buffer of it is handed out.
    crate::iova::admit_chunk(base, chunk_len, || {
        p.chunks.lock().unwrap_or_else(|e| e.into_inner()).push(mem);
    })
    .inspect_err(|_| uncharge(chunk_len))?;
    match kind {
        MemoryKind::Hugepages => p.huge_bytes.fetch_add(chunk_len, Ordering::Relaxed),
        MemoryKind::Locked => p.locked_bytes.fetch_add(chunk_len, Ordering::Relaxed),
    };
    for i in 1..chunk_len / size {
        p.free[class].push(base + i * size);
    }
    Ok(base)
}

/// Every chunk's first byte and length, for a mapper registered after they were mapped.
pub(crate) fn chunk_spans() -> Vec<(usize, usize)> {
    pool()
        .chunks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter_mut()
        .map(|c| (c.base() as usize, c.len))
        .collect()
}

/// The pool chunk holding the byte at `addr`: its first byte and length. Chunks are never
/// unmapped, so a transport may register each once with its device and look buffers up in
/// its own table afterwards.
pub fn chunk_of(addr: usize) -> Option<(usize, usize)> {
    chunk_spans()
        .into_iter()
        .find(|&(base, len)| addr >= base && addr - base < len)
}

struct ThreadCache {
    lists: [Vec<usize>; NUM_CLASSES],
}

impl ThreadCache {
    fn limit(class: usize) -> usize {
        (THREAD_CACHE_BYTES / class_size(class)).max(2)
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        let p = pool();
        for (class, list) in self.lists.iter_mut().enumerate() {
            for addr in list.drain(..) {
                p.free[class].push(addr);
            }
        }
    }
}

thread_local! {
    static CACHE: RefCell<ThreadCache> = RefCell::new(ThreadCache {
        lists: std::array::from_fn(|_| Vec::new()),
    });
}

fn take(class: usize) -> Result<usize, DmaError> {
    let cached = CACHE
        .try_with(|c| c.borrow_mut().lists[class].pop())
        .ok()
        .flatten();
    if let Some(addr) = cached {
        return Ok(addr);
    }
    if let Some(addr) = pool().free[class].pop() {
        return Ok(addr);
    }
    grow(class)
}

fn give_back(class: usize, addr: usize) {
    let spilled = CACHE.try_with(|c| {
        let mut c = c.borrow_mut();
        let list = &mut c.lists[class];
        list.push(addr);
        let limit = ThreadCache::limit(class);
        if list.len() > limit {
            // Hand half back so that a thread that only frees (a completion thread) does not
            // hoard what a thread that only allocates needs.
            let p = pool();
            for a in list.drain(limit / 2..) {
                p.free[class].push(a);
            }
        }
    });
    if spilled.is_err() {
        // The thread is exiting and its cache is gone.
        pool().free[class].push(addr);
    }
}

/// An I/O buffer from the pool: pinned, at least 512-byte aligned (a buffer of size S ≥ 4 KiB
/// is S-aligned up to the 2 MiB page), valid until dropped, when it goes back to the pool.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    class: u8,
}

// SAFETY: a DmaBuf is the unique owner of its memory, which lives for the whole process; it may
// move to and be freed on any thread.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only read through `&[u8]`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A buffer of `len` bytes (contents unspecified: old data from earlier users).
    pub fn new(len: usize) -> Result<DmaBuf, DmaError> {
        let class = class_of(len)?;
        let addr = take(class)?;
        Ok(DmaBuf {
            // SAFETY: pool addresses come from successful mmaps and are never zero.
            ptr: unsafe { NonNull::new_unchecked(addr as *mut u8) },
            len,
            class: class as u8,
        })
    }

    /// A buffer of `len` bytes filled with zeroes.
    pub fn zeroed(len: usize) -> Result<DmaBuf, DmaError> {
        let mut b = DmaBuf::new(len)?;
        b.fill(0);
        Ok(b)
    }

    /// The usable size; `len()` may be set anywhere up to it.
    pub fn capacity(&self) -> usize {
        class_size(self.class as usize)
    }

    /// Changes the length within the capacity (contents beyond the old length unspecified).
    pub fn set_len(&mut self, len: usize) -> Result<(), DmaError> {
        if len > self.capacity() {
            return Err(DmaError::TooLarge(len));
        }
        self.len = len;
        Ok(())
    }

    /// The buffer's virtual address (for alignment checks and logs).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The address a device uses to reach this buffer, once a device mapper is registered
    /// ([`crate::iova`]); `None` before. The buffer's IOVAs are contiguous.
    #[inline]
    pub fn iova(&self) -> Option<u64> {
        crate::iova::iova(self.addr())
    }

    /// The first byte, without making a reference to the whole buffer (views of disjoint
    /// ranges write through it while others read).
    pub(crate) fn raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is inside this buffer's class-sized slot, which we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        give_back(self.class as usize, self.ptr.as_ptr() as usize);
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DmaBuf({:#x}, len {}, cap {})",
            self.addr(),
            self.len,
            self.capacity()
        )
    }
}

/// What the pool holds, for status RPCs and tests.
#[derive(Clone, Debug, Default)]
pub struct PoolStats {
    pub mapped_bytes: usize,
    pub hugepage_bytes: usize,
    pub locked_bytes: usize,
    /// Buffers in the shared free lists (not counting per-thread caches), per size class.
    pub shared_free: Vec<(usize, usize)>,
}

pub fn stats() -> PoolStats {
    let p = pool();
    PoolStats {
        mapped_bytes: p.mapped.load(Ordering::Relaxed),
        hugepage_bytes: p.huge_bytes.load(Ordering::Relaxed),
        locked_bytes: p.locked_bytes.load(Ordering::Relaxed),
        shared_free: (0..NUM_CLASSES)
            .map(|c| (class_size(c), p.free[c].len()))
            .filter(|&(_, n)| n > 0)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(1).unwrap(), 0);
        assert_eq!(class_of(512).unwrap(), 0);
        assert_eq!(class_of(513).unwrap(), 1);
        assert_eq!(class_of(4096).unwrap(), 3);
        assert_eq!(class_size(class_of(MAX_BUF_SIZE).unwrap()), MAX_BUF_SIZE);
        assert!(matches!(
            class_of(MAX_BUF_SIZE + 1),
            Err(DmaError::TooLarge(_))
        ));
    }

    #[test]
    fn buffers_are_aligned_distinct_and_reused() {
        let a = DmaBuf::new(4096).unwrap();
        let b = DmaBuf::new(4096).unwrap();
        assert_eq!(a.addr() % 4096, 0);
        assert_ne!(a.addr(), b.addr());
        let addr = b.addr();
        drop(b);
        let c = DmaBuf::new(3000).unwrap();
        assert_eq!(
            c.addr(),
            addr,
            "the thread cache hands back the last freed buffer"
        );
        assert_eq!(c.len(), 3000);
        assert_eq!(c.capacity(), 4096);
        drop(a);
    }

    #[test]
    fn contents_survive_and_zeroed_is_zero() {
        let mut a = DmaBuf::new(64 << 10).unwrap();
        a.fill(0xa5);
        assert!(a.iter().all(|&x| x == 0xa5));
        drop(a);
        let z = DmaBuf::zeroed(64 << 10).unwrap();
        assert!(z.iter().all(|&x| x == 0));
    }

    #[test]
    fn largest_class_and_too_large() {
        let big = DmaBuf::new(MAX_BUF_SIZE).unwrap();
        assert_eq!(big.len(), MAX_BUF_SIZE);
        assert!(DmaBuf::new(MAX_BUF_SIZE + 1).is_err());
    }

    #[test]
    fn set_len_is_bounded_by_capacity() {
        let mut a = DmaBuf::new(1000).unwrap();
        a.set_len(1024).unwrap();
        assert!(a.set_len(1025).is_err());
    }

    /// Buffers freed on a thread that then exits go back to the pool and are handed out again.
    /// The pool's mapped total is shared with the crate's other tests, which run alongside and
    /// map chunks of their own; so this test uses a class none of them uses (32 KiB: one
    /// chunk holds exactly 64) and checks the buffers' addresses instead.
    #[test]
    fn buffers_move_between_threads() {
        const SIZE: usize = 32 << 10;
        let per_chunk = SIZE.max(HUGEPAGE_SIZE) / SIZE;
        let bufs: Vec<DmaBuf> = (0..per_chunk).map(|_| DmaBuf::new(SIZE).unwrap()).collect();
        let mut first: Vec<usize> = bufs.iter().map(|b| b.addr()).collect();
        std::thread::spawn(move || drop(bufs)).join().unwrap();
        let again: Vec<DmaBuf> = (0..per_chunk).map(|_| DmaBuf::new(SIZE).unwrap()).collect();
        let mut second: Vec<usize> = again.iter().map(|b| b.addr()).collect();
        first.sort_unstable();
        second.sort_unstable();
        assert_eq!(first, second, "freed buffers are reused, not remapped");
    }
}
