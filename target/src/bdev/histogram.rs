//! Latency histograms per bdev (`bdev_enable_histogram`, `bdev_get_histogram`), in the layout
//! of SPDK's `histogram_data.h`, so SPDK's scripts decode what plexd sends.
//!
//! The layout: values (latencies in ticks; plexd's tick is a nanosecond, so `tsc_rate` is
//! 10^9) fall in power-of-two ranges, each split into `1 << granularity` buckets; range 0 and
//! range 1 hold one value per bucket, each later range twice as many as the one before. Only
//! ranges `min_range..=max_range` are kept (from `min_nsec` / `max_nsec`); smaller values
//! count in the first bucket, larger in the last. `bdev_get_histogram` sends the bucket
//! counts as little-endian u64s in base64, with `granularity`, `min_range`, `max_range` and
//! `tsc_rate`.
//!
//! Cost: each channel gets its own buckets when it first polls after an enable (one
//! allocation per channel per enable, none per I/O); its owner counts with a plain load and
//! store. Disabled, a completion pays one `Option` test, and a poll one relaxed load.

use super::{IoCompletion, IoType};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// SPDK's default granularity: 128 buckets per power of two.
pub const GRANULARITY_DEFAULT: u32 = 7;
/// Bound on buckets per channel (1 MiB of counters), so a request cannot exhaust memory.
const MAX_BUCKETS: usize = 1 << 17;

/// Which buckets a histogram has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistShape {
    pub granularity: u32,
    pub min_range: u32,
    pub max_range: u32,
}

impl HistShape {
    /// The shape that counts values in `[min_val, max_val)`, as SPDK sizes it.
    pub fn new(granularity: u32, min_val: u64, max_val: u64) -> Result<HistShape, String> {
        if granularity > 63 {
            return Err(format!("granularity {granularity} must be below 64"));
        }
        if min_val >= max_val {
            return Err(format!(
                "min_nsec {min_val} must be smaller than max_nsec {max_val}"
            ));
        }
        let mut s = HistShape {
            granularity,
            min_range: 0,
            max_range: 0,
        };
        s.min_range = s.range(min_val);
        s.max_range = s.range(max_val - 1);
        if s.num_buckets() > MAX_BUCKETS {
            return Err(format!(
                "granularity {granularity} over this nanosecond range needs {} buckets; \
                 plexd allows {MAX_BUCKETS}: lower granularity or narrow min_nsec..max_nsec",
                s.num_buckets()
            ));
        }
        Ok(s)
    }

    fn lsb(&self) -> u32 {
        64 - self.granularity
    }

    fn per_range(&self) -> usize {
        1usize << self.granularity
    }

    pub fn num_buckets(&self) -> usize {
        (self.max_range - self.min_range + 1) as usize * self.per_range()
    }

    fn range(&self, v: u64) -> u32 {
        let clz = v.leading_zeros();
        if clz <= self.lsb() {
            self.lsb() - clz
        } else {
            0
        }
    }

    /// The bucket index of `v` in the kept ranges.
    pub fn bucket(&self, v: u64) -> usize {
        let range = self.range(v);
        let (range, index) = if range < self.min_range {
            (self.min_range, 0)
        } else if range > self.max_range {
            (self.max_range, self.per_range() - 1)
        } else {
            let shift = range.saturating_sub(1);
            (range, ((v >> shift) as usize) & (self.per_range() - 1))
        };
        ((range - self.min_range) as usize) * self.per_range() + index
    }
}

/// One channel's counters.
pub struct Histogram {
    generation: u64,
    shape: HistShape,
    io_type: Option<IoType>,
    buckets: Box<[AtomicU64]>,
}

impl Histogram {
    fn new(generation: u64, shape: &HistShape, io_type: Option<IoType>) -> Histogram {
        Histogram {
            generation,
            shape: *shape,
            io_type,
            buckets: (0..shape.num_buckets())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Counts one finished I/O; called only by the channel's owner.
    #[inline]
    pub fn record(&self, c: &IoCompletion) {
        if self.io_type.is_some_and(|t| t != c.io_type) {
            return;
        }
        self.tally(crate::reactor::now_ns().saturating_sub(c.submitted_ns));
    }

    /// Counts one value; a plain load and store, as only the owner writes.
    #[inline]
    pub fn tally(&self, v: u64) {
        let b = &self.buckets[self.shape.bucket(v)];
        b.store(b.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// The setting of one bdev and the counters of its channels.
#[derive(Default)]
pub struct HistogramCtl {
    /// Moves on every enable or disable; channels compare it once per poll.
    generation: AtomicU64,
    inner: Mutex<CtlInner>,
}

#[derive(Default)]
struct CtlInner {
    setting: Option<(HistShape, Option<IoType>)>,
    channels: Vec<Arc<Histogram>>,
    /// Counts of channels closed since the last enable.
    closed: Vec<u64>,
}

impl HistogramCtl {
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CtlInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts counting afresh with `shape`, only I/O of `io_type` if given.
    pub fn enable(&self, shape: HistShape, io_type: Option<IoType>) {
        let mut g = self.lock();
        g.setting = Some((shape, io_type));
        g.channels.clear();
        g.closed = vec![0; shape.num_buckets()];
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn disable(&self) {
        let mut g = self.lock();
        g.setting = None;
        g.channels.clear();
        g.closed = Vec::new();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn is_enabled(&self) -> bool {
        self.lock().setting.is_some()
    }

    /// Counters for a channel under the current setting; `None` while disabled.
    pub fn channel_histogram(&self) -> Option<Arc<Histogram>> {
        let mut g = self.lock();
        let (shape, io_type) = g.setting?;
        let h = Arc::new(Histogram::new(self.generation(), &shape, io_type));
        g.channels.push(h.clone());
        Some(h)
    }

    /// A channel is done with `h` (closed, or moving to a new setting): keep its counts if
    /// they belong to the current setting.
    pub fn channel_closed(&self, h: Arc<Histogram>) {
        let mut g = self.lock();
        if h.generation == self.generation() && g.closed.len() == h.buckets.len() {
            for (a, b) in g.closed.iter_mut().zip(h.buckets.iter()) {
                *a += b.load(Ordering::Relaxed);
            }
        }
        g.channels.retain(|c| !Arc::ptr_eq(c, &h));
    }

    /// The shape and the summed counts of every channel; `None` while disabled.
    pub fn snapshot(&self) -> Option<(HistShape, Vec<u64>)> {
        let g = self.lock();
        let (shape, _) = g.setting?;
        let mut sum = g.closed.clone();
        sum.resize(shape.num_buckets(), 0);
        for h in &g.channels {
            for (a, b) in sum.iter_mut().zip(h.buckets.iter()) {
                *a += b.load(Ordering::Relaxed);
            }
        }
        Some((shape, sum))
    }
}

/// Standard base64 with padding (RFC 4648), as SPDK's `spdk_base64_encode` writes it.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The counts as SPDK's RPC sends them: little-endian u64s, base64.
pub fn encode_counts(counts: &[u64]) -> String {
    let bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
    base64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> HistShape {
        HistShape::new(GRANULARITY_DEFAULT, 0, u64::MAX).unwrap()
    }

    #[test]
    fn buckets_follow_spdk_layout() {
        let s = full();
        assert_eq!((s.min_range, s.max_range), (0, 57));
        assert_eq!(s.num_buckets(), 58 * 128);
        // Ranges 0 and 1: one value per bucket.
        assert_eq!(s.bucket(0), 0);
        assert_eq!(s.bucket(127), 127);
        assert_eq!(s.bucket(128), 128);
        assert_eq!(s.bucket(255), 255);
        // Range 2: two values per bucket.
        assert_eq!(s.bucket(256), 2 * 128);
        assert_eq!(s.bucket(257), 2 * 128);
        assert_eq!(s.bucket(258), 2 * 128 + 1);
        // Range 3: four.
        assert_eq!(s.bucket(512 + 7), 3 * 128 + 1);
        assert_eq!(s.bucket(u64::MAX), 58 * 128 - 1);
    }

    #[test]
    fn narrowed_ranges_clamp_at_both_ends() {
        // 1 us .. 1 s in ns.
        let s = HistShape::new(7, 1000, 1_000_000_000).unwrap();
        assert_eq!(s.min_range, 3); // 1000 < 1024: range 3 covers 512..1023
        assert_eq!(s.max_range, 23); // 2^29 <= 999_999_999 < 2^30
        assert_eq!(s.bucket(0), 0);
        assert_eq!(s.bucket(u64::MAX), s.num_buckets() - 1);
        assert_eq!(s.bucket(512), 0);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(HistShape::new(7, 10, 10).is_err());
        assert!(HistShape::new(64, 0, 10).is_err());
        assert!(HistShape::new(30, 0, u64::MAX).is_err());
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_counts(&[1]), "AQAAAAAAAAA=");
    }

    #[test]
    fn counts_survive_channel_close_and_reset_on_enable() {
        let ctl = HistogramCtl::default();
        assert!(ctl.channel_histogram().is_none());
        ctl.enable(full(), None);
        let h = ctl.channel_histogram().unwrap();
        h.tally(300);
        h.tally(300);
        ctl.channel_closed(h);
        let h2 = ctl.channel_histogram().unwrap();
        h2.tally(5);
        let (_, c) = ctl.snapshot().unwrap();
        assert_eq!(c[2 * 128 + 22], 2);
        assert_eq!(c[5], 1);
        ctl.enable(full(), None);
        assert_eq!(ctl.snapshot().unwrap().1.iter().sum::<u64>(), 0);
        // A channel still holding the old counters gives them back without effect.
        ctl.channel_closed(h2);
        assert_eq!(ctl.snapshot().unwrap().1.iter().sum::<u64>(), 0);
        ctl.disable();
        assert!(ctl.snapshot().is_none());
    }
}
