//! Rate limits per bdev (`bdev_set_qos_limit`), with SPDK's units and rules.
//!
//! SPDK's four limits: read+write I/O per second, read+write, read-only and write-only MiB per
//! second; 0 is unlimited. IOPS limits are rounded up to a multiple of 1000 and byte limits are
//! whole MiB/s (so a multiple of SPDK's 1 MiB/s minimum), as SPDK does. Only reads and writes
//! are limited (SPDK limits no flush, unmap, write-zeroes or reset either).
//!
//! Budget is handed out in SPDK's 1 ms time slices: each limit has a quota per slice
//! (limit / 1000, at least one I/O or 512 bytes) and a signed remainder. An I/O passes while
//! the remainder of every limit it counts against is positive, so one I/O larger than a slice's
//! quota still passes now and then; the overrun is a debt that later slices pay back first.
//! Unused budget is not saved past a slice. Budget is refilled lazily, by the first I/O (or
//! poll of queued I/O) that sees a new slice, rather than by a 1 ms poller; when slices went
//! by unseen because the reactor was busy elsewhere, asleep or descheduled, their quota is
//! granted then, as SPDK's poller grants every slice that passed since it last ran; at most
//! [`MAX_CATCHUP_SLICES`], so an idle bdev cannot bank more than 10 ms of budget.
//!
//! **Several reactors, one bdev.** SPDK funnels a limited bdev's I/O to one QoS thread. plexd
//! does not move I/O between reactors (a channel has one owner, and its buffers and
//! completions stay there), so instead every channel of the bdev draws from the same atomic
//! remainders: the limit holds for the bdev as a whole however its I/O is spread, with no lock
//! and no timer thread. Whichever channel first sees a new slice on its reactor's clock refills
//! the remainders (a compare-and-swap on the slice number picks one); the others just draw.
//! As in SPDK's own atomic quota, a draw racing a refill can make one slice's count off by the
//! few I/O in flight at that instant; nothing accumulates from it.
//!
//! An I/O over the limit is not failed: its channel queues it and releases it on a later poll
//! once budget is back, asking its reactor to wake no later than the next slice.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use super::IoType;

/// SPDK's QoS time slice.
pub const TIMESLICE_NS: u64 = 1_000_000;
const SLICES_PER_SEC: u64 = 1_000_000_000 / TIMESLICE_NS;
/// SPDK's smallest IOPS limit, and the step IOPS limits are rounded up to.
pub const MIN_IOS_PER_SEC: u64 = 1000;
const MIN_IO_PER_SLICE: i64 = 1;
const MIN_BYTES_PER_SLICE: i64 = 512;
const MIB: u64 = 1024 * 1024;
/// Slices of quota a late refill may grant at once: the longest a reactor sleeps (10 ms).
pub const MAX_CATCHUP_SLICES: i64 = 10;

/// The limits as SPDK's RPC names them; 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == QosLimits::default()
    }

    /// The limits SPDK would apply: IOPS rounded up to a multiple of 1000. Refuses values whose
    /// byte rate does not fit in 64 bits, rather than wrapping.
    pub fn normalized(mut self) -> Result<QosLimits, String> {
        let rem = self.rw_ios_per_sec % MIN_IOS_PER_SEC;
        if rem != 0 {
            self.rw_ios_per_sec = self
                .rw_ios_per_sec
                .checked_add(MIN_IOS_PER_SEC - rem)
                .ok_or("rw_ios_per_sec is too large")?;
        }
        for (name, v) in [
            ("rw_mbytes_per_sec", self.rw_mbytes_per_sec),
            ("r_mbytes_per_sec", self.r_mbytes_per_sec),
            ("w_mbytes_per_sec", self.w_mbytes_per_sec),
        ] {
            if v.checked_mul(MIB).is_none_or(|b| b > i64::MAX as u64) {
                return Err(format!("{name} {v} is too large"));
            }
        }
        Ok(self)
    }

    /// Quota per slice of each limit, in SPDK's order (I/O, rw bytes, read bytes, write
    /// bytes); 0 where unlimited.
    fn per_slice(&self) -> [i64; 4] {
        let q = |per_sec: u64, min: i64| -> i64 {
            if per_sec == 0 {
                0
            } else {
                ((per_sec / SLICES_PER_SEC) as i64).max(min)
            }
        };
        [
            q(self.rw_ios_per_sec, MIN_IO_PER_SLICE),
            q(self.rw_mbytes_per_sec * MIB, MIN_BYTES_PER_SLICE),
            q(self.r_mbytes_per_sec * MIB, MIN_BYTES_PER_SLICE),
            q(self.w_mbytes_per_sec * MIB, MIN_BYTES_PER_SLICE),
        ]
    }
}

/// One limit's budget.
#[derive(Default)]
struct Bucket {
    /// Quota per slice; 0 = this limit is off.
    per_slice: AtomicI64,
    /// What is left of this slice; negative after an overrun.
    remaining: AtomicI64,
}

/// The rate limits of one bdev and their budget, shared by all its channels.
#[derive(Default)]
pub struct Qos {
    /// Any limit set: the one load the unlimited I/O path pays.
    active: AtomicBool,
    limits: Mutex<QosLimits>,
    buckets: [Bucket; 4],
    /// The slice the remainders belong to (time / TIMESLICE_NS).
    slice: AtomicU64,
    /// I/O that had to wait for budget, and slice refills: for tests and the benchmark.
    queued: AtomicU64,
    refills: AtomicU64,
}

impl Qos {
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> QosLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies new limits (already normalized), starting a fresh slice at `now_ns`.
    pub fn set_limits(&self, limits: QosLimits, now_ns: u64) {
        let mut cur = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        *cur = limits;
        self.slice.store(now_ns / TIMESLICE_NS, Ordering::Release);
        for (b, q) in self.buckets.iter().zip(limits.per_slice()) {
            b.per_slice.store(q, Ordering::Release);
            b.remaining.store(q, Ordering::Release);
        }
        self.active.store(!limits.is_unlimited(), Ordering::Release);
    }

    /// How much an I/O counts against each limit.
    fn costs(io_type: IoType, bytes: u64) -> [i64; 4] {
        let b = bytes.min(i64::MAX as u64) as i64;
        match io_type {
            IoType::Read => [1, b, b, 0],
            IoType::Write => [1, b, 0, b],
            _ => [0; 4],
        }
    }

    /// Starts a new slice if `now_ns` is past the current one: leftovers are dropped, and the
    /// quota of each slice that went by (up to [`MAX_CATCHUP_SLICES`]) pays any debt first.
    pub fn refill(&self, now_ns: u64) {
        let slice = now_ns / TIMESLICE_NS;
        let cur = self.slice.load(Ordering::Acquire);
        if slice <= cur
            || self
                .slice
                .compare_exchange(cur, slice, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let passed = (slice - cur).min(MAX_CATCHUP_SLICES as u64) as i64;
        for b in &self.buckets {
            let q = b.per_slice.load(Ordering::Acquire);
            if q == 0 {
                continue;
            }
            let left = b.remaining.swap(0, Ordering::AcqRel);
            let fresh = left.min(0).saturating_add(q.saturating_mul(passed));
            b.remaining.fetch_add(fresh, Ordering::AcqRel);
        }
        self.refills.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the budget for one I/O of `bytes` if every limit it counts against has some left
    /// in this slice. `false`: the I/O must wait (nothing was taken).
    pub fn try_admit(&self, now_ns: u64, io_type: IoType, bytes: u64) -> bool {
        self.refill(now_ns);
        let costs = Self::costs(io_type, bytes);
        for (i, b) in self.buckets.iter().enumerate() {
            let c = costs[i];
            if c == 0 || b.per_slice.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if b.remaining.fetch_sub(c, Ordering::AcqRel) <= 0 {
                b.remaining.fetch_add(c, Ordering::AcqRel);
                self.give_back_first(i, &costs);
                return false;
            }
        }
        true
    }

    fn give_back_first(&self, n: usize, costs: &[i64; 4]) {
        for (b, &c) in self.buckets.iter().zip(costs).take(n) {
            if c != 0 && b.per_slice.load(Ordering::Relaxed) != 0 {
                b.remaining.fetch_add(c, Ordering::AcqRel);
            }
        }
    }

    /// Returns the budget of an admitted I/O that did not start (device queue full).
    pub fn give_back(&self, io_type: IoType, bytes: u64) {
        self.give_back_first(4, &Self::costs(io_type, bytes));
    }

    /// Whether `io_type` is subject to the limits.
    #[inline]
    pub fn limits_type(io_type: IoType) -> bool {
        io_type.has_data()
    }

    pub(crate) fn note_queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// I/O that waited for budget since the bdev was created.
    pub fn queued_total(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Slices refilled since the bdev was created.
    pub fn refills_total(&self) -> u64 {
        self.refills.load(Ordering::Relaxed)
    }

    /// When the slice after the one holding `now_ns` starts.
    pub fn next_slice_ns(now_ns: u64) -> u64 {
        (now_ns / TIMESLICE_NS + 1) * TIMESLICE_NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = TIMESLICE_NS;

    fn qos(l: QosLimits) -> Qos {
        let q = Qos::default();
        q.set_limits(l.normalized().unwrap(), 0);
        q
    }

    /// How many `bytes`-sized reads pass in the slice starting at `t`, trying `tries` times.
    fn admitted(q: &Qos, t: u64, io: IoType, bytes: u64, tries: usize) -> usize {
        (0..tries).filter(|_| q.try_admit(t, io, bytes)).count()
    }

    #[test]
    fn iops_are_rounded_up_to_spdk_multiples() {
        let l = QosLimits {
            rw_ios_per_sec: 1,
            ..Default::default()
        };
        assert_eq!(l.normalized().unwrap().rw_ios_per_sec, 1000);
        let l = QosLimits {
            rw_ios_per_sec: 20_001,
            ..Default::default()
        };
        assert_eq!(l.normalized().unwrap().rw_ios_per_sec, 21_000);
        let l = QosLimits {
            rw_ios_per_sec: 20_000,
            ..Default::default()
        };
        assert_eq!(l.normalized().unwrap().rw_ios_per_sec, 20_000);
        assert!(QosLimits::default().normalized().unwrap().is_unlimited());
        let huge = QosLimits {
            w_mbytes_per_sec: u64::MAX / 2,
            ..Default::default()
        };
        assert!(huge.normalized().is_err());
        let huge = QosLimits {
            rw_ios_per_sec: u64::MAX,
            ..Default::default()
        };
        assert!(huge.normalized().is_err());
    }

    #[test]
    fn iops_quota_per_slice() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 10_000,
            ..Default::default()
        });
        // 10 per 1 ms slice, reads and writes alike.
        assert_eq!(admitted(&q, 0, IoType::Read, 4096, 100), 10);
        assert_eq!(admitted(&q, MS - 1, IoType::Write, 4096, 100), 0);
        assert_eq!(admitted(&q, MS, IoType::Write, 4096, 100), 10);
        // Other types are not limited.
        assert_eq!(admitted(&q, MS, IoType::Flush, 0, 5), 5);
        // Leftovers are not saved, and an idle second banks only the catch-up bound.
        assert_eq!(admitted(&q, 1000 * MS, IoType::Read, 512, 1000), 100);
    }

    #[test]
    fn a_late_refill_grants_the_slices_that_went_by() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 10_000,
            ..Default::default()
        });
        assert_eq!(admitted(&q, 0, IoType::Read, 512, 100), 10);
        // Nobody looked during slices 1 and 2: at slice 3, three slices' quota.
        assert_eq!(admitted(&q, 3 * MS, IoType::Read, 512, 100), 30);
        assert_eq!(admitted(&q, 4 * MS, IoType::Read, 512, 100), 10);
    }

    #[test]
    fn minimum_one_io_per_slice() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 1000,
            ..Default::default()
        });
        for s in 0..5 {
            assert_eq!(admitted(&q, s * MS, IoType::Read, 512, 10), 1);
        }
    }

    #[test]
    fn bandwidth_overrun_is_paid_back() {
        // 1 MiB/s = 1048 bytes per slice; a 64 KiB write passes, then the debt waits.
        let q = qos(QosLimits {
            w_mbytes_per_sec: 1,
            ..Default::default()
        });
        assert!(q.try_admit(0, IoType::Write, 65536));
        // Reads are not counted against the write limit.
        assert_eq!(admitted(&q, 0, IoType::Read, 65536, 10), 10);
        let mut t = MS;
        let mut waited = 0;
        while !q.try_admit(t, IoType::Write, 65536) {
            waited += 1;
            t += MS;
        }
        // 65536 - 1048 = 64488 owed, paid at 1048 per slice: the remainder turns positive in
        // the 62nd slice, so 61 slices refuse.
        assert_eq!(waited, 61);
    }

    #[test]
    fn a_debt_is_paid_by_idle_slices_too() {
        let q = qos(QosLimits {
            w_mbytes_per_sec: 1,
            ..Default::default()
        });
        assert!(q.try_admit(0, IoType::Write, 65536));
        // The debt is paid at 1048 bytes per slice, up to ten slices per refill.
        let mut t = 0;
        for _ in 0..6 {
            t += 10 * MS;
            assert!(!q.try_admit(t, IoType::Write, 4096));
        }
        t += 10 * MS; // 70 slices: 73360 - 64488 = 8872 bytes left, two 4 KiB writes and a bit
        assert_eq!(admitted(&q, t, IoType::Write, 4096, 10), 3);
    }

    #[test]
    fn all_limits_must_allow_and_a_refusal_takes_nothing() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 100_000, // 100 per slice
            r_mbytes_per_sec: 4,     // 4194 bytes per slice: one 4 KiB read, then a debt
            ..Default::default()
        });
        assert_eq!(admitted(&q, 0, IoType::Read, 4096, 10), 2);
        // The refused reads gave their I/O count back: 98 writes still pass.
        assert_eq!(admitted(&q, 0, IoType::Write, 4096, 200), 98);
    }

    #[test]
    fn give_back_returns_budget() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 1000,
            ..Default::default()
        });
        assert!(q.try_admit(0, IoType::Read, 512));
        assert!(!q.try_admit(0, IoType::Read, 512));
        q.give_back(IoType::Read, 512);
        assert!(q.try_admit(0, IoType::Read, 512));
    }

    #[test]
    fn unlimited_again_after_zero() {
        let q = qos(QosLimits {
            rw_ios_per_sec: 1000,
            ..Default::default()
        });
        assert!(q.is_active());
        q.set_limits(QosLimits::default(), 5 * MS);
        assert!(!q.is_active());
        assert_eq!(admitted(&q, 5 * MS, IoType::Read, 512, 50), 50);
    }

    #[test]
    fn shared_by_threads_the_total_holds() {
        // Four threads draw from one bdev's budget in the same slice: 10 pass in all.
        let q = std::sync::Arc::new(qos(QosLimits {
            rw_ios_per_sec: 10_000,
            ..Default::default()
        }));
        let total: usize = (0..4)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || admitted(&q, 0, IoType::Read, 512, 100))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(total, 10);
    }
}
