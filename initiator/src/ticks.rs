//! A cheap clock for per-command timestamps: the CPU's time-stamp counter.
//!
//! Each command is stamped when it starts (timeouts) and, in plexperf, when it completes
//! (latency). `Instant::now()` costs 20-70 ns here (a vDSO call that reads the counter and
//! scales it); reading the counter alone costs a few. SPDK times I/O the same way
//! (`spdk_get_ticks`).
//!
//! The counter is used only where the kernel itself keeps time with it (its clocksource is
//! `tsc`), which it allows only for a counter that runs at a constant rate on every CPU and
//! through sleep states. Elsewhere a tick is a nanosecond read from `Instant`. The rate is
//! measured once, over 1 ms, at the first use (or at [`calibrate`]).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the rate is measured over: the two clock reads at each end are tens of
/// nanoseconds apart, so its error is below 1e-4.
const CALIBRATION: Duration = Duration::from_millis(1);

struct Rate {
    use_tsc: bool,
    /// Nanoseconds per tick (1.0 without the counter).
    ns_per_tick: f64,
    /// The fallback's zero.
    epoch: Instant,
}

fn rate() -> &'static Rate {
    static RATE: OnceLock<Rate> = OnceLock::new();
    RATE.get_or_init(|| {
        let epoch = Instant::now();
        if !kernel_keeps_time_with_tsc() {
            return Rate {
                use_tsc: false,
                ns_per_tick: 1.0,
                epoch,
            };
        }
        let (i0, t0) = (Instant::now(), read_tsc());
        let mut i1 = Instant::now();
        while i1.duration_since(i0) < CALIBRATION {
            std::hint::spin_loop();
            i1 = Instant::now();
        }
        let t1 = read_tsc();
        Rate {
            use_tsc: t1 > t0,
            ns_per_tick: i1.duration_since(i0).as_nanos() as f64 / (t1 - t0).max(1) as f64,
            epoch,
        }
    })
}

fn kernel_keeps_time_with_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|s| s.trim() == "tsc")
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn read_tsc() -> u64 {
    // SAFETY: RDTSC exists on every x86-64 CPU and only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn read_tsc() -> u64 {
    0
}

/// Measures the rate now rather than at the first [`now`] (which would then take 1 ms).
pub fn calibrate() {
    rate();
}

/// The current time in ticks: only differences mean anything, through [`to_ns`].
#[inline]
pub fn now() -> u64 {
    let r = rate();
    if r.use_tsc {
        read_tsc()
    } else {
        r.epoch.elapsed().as_nanos() as u64
    }
}

/// A span of `ticks` in nanoseconds.
#[inline]
pub fn to_ns(ticks: u64) -> u64 {
    (ticks as f64 * rate().ns_per_tick) as u64
}

/// A span of `ticks` as a `Duration`.
pub fn to_duration(ticks: u64) -> Duration {
    Duration::from_nanos(to_ns(ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_clock() {
        calibrate();
        // Each tick read sits between two clock reads, so the span it measured lies between
        // the inner and the outer clock spans, whatever the scheduler did meanwhile.
        let (a0, t0, b0) = (Instant::now(), now(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (a1, t1, b1) = (Instant::now(), now(), Instant::now());
        let by_ticks = to_ns(t1 - t0) as f64;
        let inner = (a1 - b0).as_nanos() as f64;
        let outer = (b1 - a0).as_nanos() as f64;
        assert!(
            by_ticks >= inner * 0.999 && by_ticks <= outer * 1.001,
            "{by_ticks} ns by ticks, {inner}..{outer} ns by the clock"
        );
    }

    #[test]
    fn ticks_never_go_back_on_one_thread() {
        let mut last = now();
        for _ in 0..10_000 {
            let t = now();
            assert!(t >= last);
            last = t;
        }
    }
}
