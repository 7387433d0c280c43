//! The write-intent log in memory: which regions may differ between plexes, which of those the
//! plexes' bitmaps already record, which are being copied, and how many writes each has in
//! flight. Channels on every reactor share it through atomics; only the mirror's service
//! (one poller) writes bitmaps to disk and clears bits.
//!
//! The rules that make it safe:
//! - A write to a region first counts itself in `inflight`, then looks at the region. It goes
//!   to the plexes only once the region's bit is on disk on every serving plex (`on_disk`), so
//!   after a crash every region a write may have reached is marked.
//! - The service clears a bit only after taking it out of `on_disk` and then seeing no write in
//!   flight; a write counts itself before looking. Both sides use SeqCst, so either the write
//!   sees the bit gone (and waits for it to be written again) or the service sees the write
//!   (and keeps the bit).
//! - Resync locks a region the same way before copying it: writes arriving meanwhile wait, so a
//!   copy never overwrites newer data on the plex being copied to.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

/// A set of regions as atomic bits.
pub struct Bits(Vec<AtomicU64>);

impl Bits {
    pub fn new(n: u64) -> Bits {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn test(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(SeqCst) & (1 << (i % 64)) != 0
    }

    pub fn set(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), SeqCst);
    }

    pub fn clear(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_and(!(1 << (i % 64)), SeqCst);
    }

    /// The words of `words` (a chunk's part of the bitmap).
    pub fn snapshot(&self, words: Range<usize>) -> Vec<u64> {
        self.0[words.start.min(self.0.len())..words.end.min(self.0.len())]
            .iter()
            .map(|w| w.load(SeqCst))
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| w.load(SeqCst).count_ones() as u64)
            .sum()
    }

    /// The set bits in order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, w)| {
            let mut v = w.load(SeqCst);
            std::iter::from_fn(move || {
                if v == 0 {
                    return None;
                }
                let b = v.trailing_zeros() as u64;
                v &= v - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

/// What a write finds when it enters a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Recorded on disk: go ahead.
    Ready,
    /// Marked in memory, not yet on disk: wait (still counted in flight).
    Persisting,
    /// Being copied by resync: wait (not counted; enter again later).
    Locked,
}

pub struct IntentLog {
    /// Regions of the mirror as it is now; the sets below have room for every region the
    /// bitmap can cover, so the mirror can grow without moving them.
    regions: AtomicU64,
    /// May differ between plexes (a write in flight, or a plex missed it).
    pub dirty: Bits,
    /// Recorded as dirty in the bitmap of every serving plex.
    pub on_disk: Bits,
    /// Being copied by resync.
    pub locked: Bits,
    inflight: Vec<AtomicU32>,
}

impl IntentLog {
    /// A log of `regions`, able to grow to `capacity`.
    pub fn new(regions: u64, capacity: u64) -> IntentLog {
        let capacity = capacity.max(regions);
        IntentLog {
            regions: AtomicU64::new(regions),
            dirty: Bits::new(capacity),
            on_disk: Bits::new(capacity),
            locked: Bits::new(capacity),
            inflight: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions.load(SeqCst)
    }

    /// The mirror grew to `regions` (at most the capacity it was made with).
    pub fn grow(&self, regions: u64) {
        let cap = self.inflight.len() as u64;
        self.regions.fetch_max(regions.min(cap), SeqCst);
    }

    /// A write enters region `r` (see the module rules).
    pub fn enter(&self, r: u64) -> Entry {
        self.inflight[r as usize].fetch_add(1, SeqCst);
        if self.locked.test(r) {
            self.inflight[r as usize].fetch_sub(1, SeqCst);
            return Entry::Locked;
        }
        if self.on_disk.test(r) {
            return Entry::Ready;
        }
        self.dirty.set(r);
        Entry::Persisting
    }

    /// A write that entered `r` is done with it.
    pub fn leave(&self, r: u64) {
        self.inflight[r as usize].fetch_sub(1, SeqCst);
    }

    pub fn writes_in_flight(&self, r: u64) -> u32 {
        self.inflight[r as usize].load(SeqCst)
    }

    /// Resync takes region `r`: true once no write is in it (writes arriving later wait).
    /// Call again until true; `unlock` when the copy is done.
    pub fn try_lock(&self, r: u64) -> bool {
        self.locked.set(r);
        self.writes_in_flight(r) == 0
    }

    pub fn unlock(&self, r: u64) {
        self.locked.clear(r);
    }

    /// The service clears region `r` if no write is in it; false if one is (bit kept).
    pub fn try_clear(&self, r: u64) -> bool {
        self.on_disk.clear(r);
        if self.writes_in_flight(r) != 0 {
            self.on_disk.set(r);
            return false;
        }
        self.dirty.clear(r);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_waits_for_its_bit_on_disk_and_blocks_clearing_until_it_leaves() {
        let log = IntentLog::new(130, 130);
        assert_eq!(log.enter(129), Entry::Persisting);
        assert!(log.dirty.test(129) && !log.on_disk.test(129));
        log.on_disk.set(129);
        assert_eq!(log.enter(129), Entry::Ready);
        assert!(!log.try_clear(129), "two writes are in it");
        assert!(
            log.on_disk.test(129),
            "a refused clear leaves the bit on disk"
        );
        log.leave(129);
        log.leave(129);
        assert!(log.try_clear(129));
        assert!(!log.dirty.test(129) && !log.on_disk.test(129));
        assert_eq!(
            log.enter(129),
            Entry::Persisting,
            "cleared means written again first"
        );
    }

    #[test]
    fn resync_locks_out_writes_and_waits_for_those_inside() {
        let log = IntentLog::new(4, 4);
        log.on_disk.set(2);
        assert_eq!(log.enter(2), Entry::Ready);
        assert!(!log.try_lock(2), "a write is inside");
        assert_eq!(log.enter(2), Entry::Locked, "new writes wait");
        log.leave(2);
        assert!(log.try_lock(2));
        log.unlock(2);
        assert_eq!(log.enter(2), Entry::Ready);
    }

    #[test]
    fn bits_iterate_and_count() {
        let b = Bits::new(200);
        for i in [0, 63, 64, 199] {
            b.set(i);
        }
        assert_eq!(b.iter_set().collect::<Vec<_>>(), [0, 63, 64, 199]);
        assert_eq!(b.count(), 4);
        b.clear(63);
        assert_eq!(b.snapshot(0..1), [1]);
    }
}
