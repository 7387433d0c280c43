//! Per-channel I/O counters, summed by `bdev_get_iostat`.

use super::*;

/// Counters of one channel, written only by its owner, summed by `bdev_get_iostat`.
#[derive(Default, Debug)]
pub struct IoStats {
    pub bytes_read: AtomicU64,
    pub num_read_ops: AtomicU64,
    pub bytes_written: AtomicU64,
    pub num_write_ops: AtomicU64,
    pub bytes_unmapped: AtomicU64,
    pub num_unmap_ops: AtomicU64,
    pub num_write_zeroes_ops: AtomicU64,
    pub num_flush_ops: AtomicU64,
    pub read_latency_ns: AtomicU64,
    pub write_latency_ns: AtomicU64,
    pub unmap_latency_ns: AtomicU64,
    pub num_io_errors: AtomicU64,
}

/// Adds to a counter that only one thread writes: a plain load and store, no locked RMW.
/// (`v` may be `u64::MAX`, a wrapping -1, for gauges.) The nvmf poll groups' counters use it too.
pub(crate) fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

impl IoStats {
    pub(super) fn record(&self, c: &IoCompletion, block_size: u64) {
        let bytes = c.num_blocks * block_size;
        let ns = crate::reactor::now_ns().saturating_sub(c.submitted_ns);
        if !c.status.is_ok() {
            bump(&self.num_io_errors, 1);
            return;
        }
        match c.io_type {
            IoType::Read => {
                bump(&self.bytes_read, bytes);
                bump(&self.num_read_ops, 1);
                bump(&self.read_latency_ns, ns);
            }
            IoType::Write => {
                bump(&self.bytes_written, bytes);
                bump(&self.num_write_ops, 1);
                bump(&self.write_latency_ns, ns);
            }
            IoType::Unmap => {
                bump(&self.bytes_unmapped, bytes);
                bump(&self.num_unmap_ops, 1);
                bump(&self.unmap_latency_ns, ns);
            }
            IoType::WriteZeroes => bump(&self.num_write_zeroes_ops, 1),
            IoType::Flush => bump(&self.num_flush_ops, 1),
            IoType::Reset => {}
        }
    }

    /// Adds `other` into `self` (summing channels).
    pub fn add(&self, other: &IoStats) {
        let pairs = [
            (&self.bytes_read, &other.bytes_read),
            (&self.num_read_ops, &other.num_read_ops),
            (&self.bytes_written, &other.bytes_written),
            (&self.num_write_ops, &other.num_write_ops),
            (&self.bytes_unmapped, &other.bytes_unmapped),
            (&self.num_unmap_ops, &other.num_unmap_ops),
            (&self.num_write_zeroes_ops, &other.num_write_zeroes_ops),
            (&self.num_flush_ops, &other.num_flush_ops),
            (&self.read_latency_ns, &other.read_latency_ns),
            (&self.write_latency_ns, &other.write_latency_ns),
            (&self.unmap_latency_ns, &other.unmap_latency_ns),
            (&self.num_io_errors, &other.num_io_errors),
        ];
        for (a, b) in pairs {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}
