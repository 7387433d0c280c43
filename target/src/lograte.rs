//! Log lines that cannot flood: a call site lets `BURST` lines through per `WINDOW`, counts
//! the rest, and says how many it dropped in the next line it lets through. A host that
//! fails a million commands gets a few lines and a count, not a million lines.
//!
//! ```text
//! log_limited!(WARN, "nvmf/tcp {}: no buffer for {len} bytes: {e}", peer);
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site may write per window.
pub const BURST: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget.
pub struct RateLimit {
    window_start_ms: AtomicU64,
    written: AtomicU32,
    dropped: AtomicU64,
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that the first window (start 0) is never mistaken for one that has not begun.
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit {
            window_start_ms: AtomicU64::new(0),
            written: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(dropped)` if this line may be written (`dropped` lines were not, since the last
    /// one that was); None if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW.as_millis() as u64
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.written.store(0, Ordering::Relaxed);
        }
        if self.written.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

/// `tracing` at LEVEL (`WARN`, `INFO`, `ERROR`), limited per call site (see the module).
#[macro_export]
macro_rules! log_limited {
    ($lvl:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::lograte::RateLimit = $crate::lograte::RateLimit::new();
        if let Some(dropped) = LIMIT.check() {
            if dropped == 0 {
                tracing::event!(tracing::Level::$lvl, $($arg)+);
            } else {
                tracing::event!(
                    tracing::Level::$lvl,
                    "{} ({dropped} more like it not logged)",
                    format_args!($($arg)+)
                );
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count() {
        let l = RateLimit::new();
        let t0 = 1_000;
        for _ in 0..BURST {
            assert_eq!(l.check_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.check_at(t0 + 5), None);
        }
        let next = t0 + WINDOW.as_millis() as u64;
        assert_eq!(
            l.check_at(next),
            Some(1000),
            "the first line of a window says what was dropped"
        );
        assert_eq!(l.check_at(next), Some(0));
    }
}
