//! Log-linear latency histogram: fixed memory, no allocation per sample, about 3 % resolution.
//!
//! Values (nanoseconds) below 2^SUB_BITS land in exact buckets; above that each power of two is
//! split into 2^SUB_BITS linear sub-buckets, the way HdrHistogram and SPDK's histogram do.

use serde::Serialize;

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Covers values up to 2^48 ns (about 3 days); larger ones go to the last bucket.
const MAX_BITS: u32 = 48;
const BUCKETS: usize = (MAX_BITS - SUB_BITS + 1) as usize * SUB;

/// A latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

/// Summary of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub avg_us: f64,
    /// Smallest sample.
    pub min_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p99_9_us: f64,
    /// 99.99th percentile.
    pub p99_99_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    if msb >= MAX_BITS {
        return BUCKETS - 1;
    }
    let shift = msb - SUB_BITS + 1;
    // The top SUB_BITS bits below the leading one choose the sub-bucket.
    let sub = ((v >> (shift - 1)) as usize) & (SUB - 1);
    shift as usize * SUB + sub
}

/// Highest value that lands in bucket `i` (what percentiles report: a conservative bound).
fn upper(i: usize) -> u64 {
    let shift = (i / SUB) as u32;
    let sub = (i % SUB) as u64;
    if shift == 0 {
        return sub;
    }
    let base = (SUB as u64 + sub) << (shift - 1);
    base + (1u64 << (shift - 1)) - 1
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one sample.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.sum += ns as u128;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.total += o.total;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// Forgets every sample (after warm-up).
    pub fn clear(&mut self) {
        *self = Histogram::new();
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), never above the recorded maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Mean, min, max and the usual percentiles, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: self.total,
            avg_us: if self.total == 0 {
                0.0
            } else {
                self.sum as f64 / self.total as f64 / 1000.0
            },
            min_us: if self.total == 0 { 0.0 } else { us(self.min) },
            max_us: us(self.max),
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            p99_9_us: us(self.quantile(0.999)),
            p99_99_us: us(self.quantile(0.9999)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0;
        for v in (0..200_000u64).chain([1 << 30, (1 << 40) + 12345, u64::MAX / 3]) {
            let i = index(v);
            assert!(i >= last || v >= 1 << MAX_BITS);
            last = i;
            if v < 1 << MAX_BITS {
                assert!(upper(i) >= v, "v={v} i={i} upper={}", upper(i));
                // resolution: the bucket is at most ~1/16 of its value wide
                assert!(upper(i) - v <= v / 16 + 1, "v={v} upper={}", upper(i));
            }
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert!((s.avg_us - 5000.5).abs() < 0.01);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.max_us, 10_000.0);
        for (got, want) in [
            (s.p50_us, 5000.0),
            (s.p99_us, 9900.0),
            (s.p99_99_us, 9999.0),
        ] {
            assert!(got >= want && got <= want * 1.04, "got {got} want {want}");
        }
        let mut h2 = Histogram::new();
        h2.record(50);
        h2.merge(&h);
        assert_eq!(h2.count(), 10_001);
        assert_eq!(h2.summary().min_us, 0.05);
        assert_eq!(Histogram::new().summary().p99_us, 0.0);
    }
}
