//! DMA-able memory for the data path.
//!
//! Two kinds of memory come from here:
//! - [`DmaBuf`]: I/O buffers from a process-wide pool of power-of-two size classes (512 B to
//!   4 MiB). Each thread keeps a small cache per class, so the I/O path allocates and frees
//!   without locks or syscalls; the shared free lists behind the caches are lock-free queues.
//! - [`DmaRegion`]: one large mapping owned by its user (the malloc bdev's backing store).
//!
//! Memory is taken from 2 MiB hugepages (`MAP_HUGETLB`) where the machine has them reserved,
//! because a device (through VFIO) needs memory that never moves and hugepages keep IOVA
//! translation tables small. When hugepages run short we fall back to ordinary anonymous memory
//! locked with `mlock`, and say so once, loudly, with the command that fixes it.
//!
//! A device driver registers a mapper ([`iova::register`]); from then on every chunk is mapped
//! for the device before its buffers are handed out, and `iova()` gives each buffer's device
//! address.
//!
//! Pool memory is never returned to the kernel: a buffer's address stays valid for the life of
//! the process, which is what makes handing raw addresses to a device (or a kernel ring) sound.

pub mod iova;
mod pool;
mod region;
mod view;

pub use pool::{chunk_of, stats, DmaBuf, PoolStats, MAX_BUF_SIZE, MIN_BUF_SIZE};
pub use region::{DmaRegion, MemoryKind};
pub use view::BufView;

use thiserror::Error;

/// The size of the pages the pool is carved from.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

#[derive(Debug, Error)]
pub enum DmaError {
    #[error(
        "DMA buffer of {0} bytes is larger than the largest pool buffer ({MAX_BUF_SIZE} bytes)"
    )]
    TooLarge(usize),
    #[error("DMA memory limit of {limit} bytes reached (in use: {used}); raise --mem-size")]
    LimitReached { limit: usize, used: usize },
    #[error("DMA memory cannot be given to the device: {0}")]
    Iova(String),
    #[error("cannot map {len} bytes of memory: {source}")]
    Map {
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Limits the total memory the pool may map (0 = no limit). Regions count too.
pub fn set_memory_limit(bytes: usize) {
    pool::set_limit(bytes);
}
