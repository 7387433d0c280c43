//! One benchmark thread: owns its queue pairs, keeps each at queue depth, records latencies.
//! Nothing is allocated per I/O: buffers and I/O contexts are preallocated per queue slot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dma::DmaBuf;
use initiator::histogram::Histogram;
use initiator::{ticks, IoError, IoQpair, SubmitErrorKind};

use crate::verify::{self, Check};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Seq,
    Rand,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Index of the namespace entry this job reports into.
    pub ns_index: usize,
    pub nsid: u32,
    pub block_size: u32,
    /// Blocks per I/O.
    pub io_blocks: u32,
    /// This job's unit range [lo, hi) in units of io_blocks.
    pub units_lo: u64,
    pub units_hi: u64,
    pub depth: usize,
    /// Completions taken per poll (0: all there are).
    pub max_completions: usize,
    pub read_pct: u32,
    pub pattern: Pattern,
    pub verify: bool,
    pub run_id: u32,
    pub seed: u64,
}

#[derive(Default)]
pub struct JobResult {
    pub ns_index: usize,
    /// The job's unit range [lo, hi).
    pub range: (u64, u64),
    pub ios: u64,
    pub bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub hist: Histogram,
    pub verified_blocks: u64,
    pub unwritten_blocks: u64,
    pub mismatches: u64,
    pub mismatch_samples: Vec<String>,
    pub first_error: Option<String>,
    /// With --verify: what each unit of this job's range last held, for --verify-state.
    pub units: Option<UnitsState>,
}

/// What --verify knows of each unit (one I/O's worth of blocks) in a job's range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitsState {
    /// The generation of the last write acknowledged (0: none known).
    pub acked: Vec<u64>,
    /// The generation of a later write that failed or never completed (0: none): the unit may
    /// hold it or `acked`, and the next read settles which.
    pub maybe: Vec<u64>,
}

struct IoCtx {
    /// When it was submitted, in `initiator::ticks`.
    start: u64,
    unit: u64,
    read: bool,
    gen: u64,
}

pub struct Job {
    spec: JobSpec,
    qp: IoQpair<DmaBuf>,
    bufs: Vec<Option<DmaBuf>>,
    ctx: Vec<IoCtx>,
    free: Vec<u32>,
    inflight: usize,
    cursor: u64,
    rng: u64,
    units: UnitsState,
    busy: Vec<bool>,
    res: JobResult,
    measuring: bool,
}

impl Job {
    /// Buffers come from the DMA pool (hugepages where reserved), as plexd's own I/O does.
    /// `prior`: what an earlier run left in this range (--verify-state).
    pub fn new(
        spec: JobSpec,
        qp: IoQpair<DmaBuf>,
        prior: Option<UnitsState>,
    ) -> Result<Job, dma::DmaError> {
        let io_bytes = (spec.io_blocks * spec.block_size) as usize;
        let n = spec.depth;
        let count = (spec.units_hi - spec.units_lo) as usize;
        let (units, busy) = if spec.verify {
            let u = prior.unwrap_or_else(|| UnitsState {
                acked: vec![0; count],
                maybe: vec![0; count],
            });
            (u, vec![false; count])
        } else {
            (UnitsState::default(), Vec::new())
        };
        Ok(Job {
            bufs: (0..n)
                .map(|_| DmaBuf::zeroed(io_bytes).map(Some))
                .collect::<Result<_, _>>()?,
            ctx: (0..n)
                .map(|_| IoCtx {
                    start: 0,
                    unit: 0,
                    read: false,
                    gen: 0,
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            inflight: 0,
            cursor: spec.units_lo,
            rng: spec.seed | 1,
            units,
            busy,
            res: JobResult {
                ns_index: spec.ns_index,
                range: (spec.units_lo, spec.units_hi),
                ..Default::default()
            },
            measuring: false,
            spec,
            qp,
        })
    }

    #[inline]
    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn pick_unit(&mut self) -> Option<u64> {
        let span = self.spec.units_hi - self.spec.units_lo;
        for _ in 0..8 {
            let u = match self.spec.pattern {
                Pattern::Rand => self.spec.units_lo + self.rand() % span,
                Pattern::Seq => {
                    let u = self.cursor;
                    self.cursor += 1;
                    if self.cursor >= self.spec.units_hi {
                        self.cursor = self.spec.units_lo;
                    }
                    u
                }
            };
            // In verify mode never overlap two I/Os on one unit: the result would be undefined.
            if !self.spec.verify || !self.busy[(u - self.spec.units_lo) as usize] {
                return Some(u);
            }
        }
        None
    }

    fn submit_one(&mut self) -> bool {
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let Some(unit) = self.pick_unit() else {
            self.free.push(slot);
            return false;
        };
        let read = match self.spec.read_pct {
            100 => true,
            0 => false,
            p => (self.rand() % 100) < p as u64,
        };
        let s = &self.spec;
        let lba = unit * s.io_blocks as u64;
        let mut buf = self.bufs[slot as usize]
            .take()
            .expect("free slot has its buffer");
        let mut gen = 0;
        if s.verify {
            let i = (unit - s.units_lo) as usize;
            self.busy[i] = true;
            if !read {
                // Above anything this run wrote here, failed writes included, so that every
                // write leaves a generation of its own.
                let last = self.units.acked[i].max(self.units.maybe[i]);
                gen = if last >> 32 == u64::from(s.run_id) {
                    last + 1
                } else {
                    (u64::from(s.run_id) << 32) | 1
                };
                let bs = s.block_size as usize;
                for (k, b) in buf.chunks_mut(bs).enumerate() {
                    verify::fill(b, lba + k as u64, gen);
                }
            }
        }
        let c = &mut self.ctx[slot as usize];
        c.start = ticks::now();
        c.unit = unit;
        c.read = read;
        c.gen = gen;
        let r = if read {
            self.qp.read(s.nsid, lba, s.io_blocks, buf, slot as u64)
        } else {
            self.qp.write(s.nsid, lba, s.io_blocks, buf, slot as u64)
        };
        match r {
            Ok(()) => {
                self.inflight += 1;
                true
            }
            Err(e) => {
                self.bufs[slot as usize] = e.buf;
                self.free.push(slot);
                if s.verify {
                    self.busy[(unit - s.units_lo) as usize] = false;
                }
                if e.kind == SubmitErrorKind::PathFailed {
                    self.res.errors += 1;
                    self.res
                        .first_error
                        .get_or_insert_with(|| format!("submit: {}", e.kind));
                }
                false
            }
        }
    }

    fn complete(&mut self, tag: u64, result: Result<(), IoError>, buf: Option<DmaBuf>, now: u64) {
        let slot = tag as usize;
        self.inflight -= 1;
        let (start, unit, read, gen) = {
            let c = &self.ctx[slot];
            (c.start, c.unit, c.read, c.gen)
        };
        let s = &self.spec;
        if s.verify {
            let i = (unit - s.units_lo) as usize;
            self.busy[i] = false;
            if result.is_ok() {
                if read {
                    let (acked, maybe) = (self.units.acked[i], self.units.maybe[i]);
                    let bs = s.block_size as usize;
                    let lba0 = unit * s.io_blocks as u64;
                    if let Some(b) = &buf {
                        // A write of unknown outcome may have landed: if the unit holds it,
                        // that is what it holds from now on.
                        let landed = maybe != 0
                            && b.chunks(bs).enumerate().all(|(k, blk)| {
                                verify::check(blk, lba0 + k as u64, Some(maybe)) == Check::Ok
                            });
                        if landed {
                            self.units.acked[i] = maybe;
                        }
                        if maybe != 0 {
                            self.units.maybe[i] = 0;
                        }
                        let want = (self.units.acked[i] != 0).then_some(self.units.acked[i]);
                        for (k, blk) in b.chunks(bs).enumerate() {
                            let lba = lba0 + k as u64;
                            let check = if maybe != 0 && acked == 0 && !landed {
                                // Never acknowledged here: unwritten is as good as written.
                                verify::check(blk, lba, None)
                            } else {
                                verify::check(blk, lba, want)
                            };
                            match check {
                                Check::Ok => self.res.verified_blocks += 1,
                                Check::Unwritten => self.res.unwritten_blocks += 1,
                                Check::Bad(why) => {
                                    self.res.mismatches += 1;
                                    if self.res.mismatch_samples.len() < 16 {
                                        self.res
                                            .mismatch_samples
                                            .push(format!("nsid {} LBA {lba}: {why}", s.nsid));
                                    }
                                }
                            }
                        }
                    }
                } else {
                    self.units.acked[i] = gen;
                    self.units.maybe[i] = 0;
                }
            } else if !read {
                self.units.maybe[i] = gen;
            }
        }
        self.bufs[slot] = buf;
        self.free.push(slot as u32);
        if let Err(e) = result {
            self.res.errors += 1;
            self.res
                .first_error
                .get_or_insert_with(|| format!("I/O error: {e}"));
            return;
        }
        if self.measuring {
            self.res
                .hist
                .record(ticks::to_ns(now.saturating_sub(start)));
            self.res.ios += 1;
            self.res.bytes += u64::from(s.io_blocks * s.block_size);
            if read {
                self.res.reads += 1;
            } else {
                self.res.writes += 1;
            }
        }
    }

    fn poll(&mut self) -> usize {
        // (tag, result, buffer) of each command the poll finished.
        type Finished = (u64, Result<(), IoError>, Option<DmaBuf>);
        let mut done: smallvec::SmallVec<[Finished; 64]> = smallvec::SmallVec::new();
        let n = self.qp.poll_max(self.spec.max_completions, |c| {
            done.push((c.tag, c.result, c.buf))
        });
        if n > 0 {
            let now = ticks::now();
            for (tag, r, b) in done.drain(..) {
                self.complete(tag, r, b, now);
            }
        }
        n
    }
}

/// Pins the calling thread to `core`.
pub fn pin(core: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                core,
                "sched_setaffinity failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Runs `jobs` on this thread: warm-up, measurement for `duration`, then a drain of
/// everything in flight (bounded by `drain_max`).
pub fn run(
    core: usize,
    mut jobs: Vec<Job>,
    warmup: Duration,
    duration: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<JobResult> {
    pin(core);
    let start = Instant::now();
    let measure_at = start + warmup;
    let end = measure_at + duration;
    let drain_max = Duration::from_secs(30);
    let mut measuring = warmup.is_zero();
    for j in jobs.iter_mut() {
        j.measuring = measuring;
    }
    let mut stopping = false;
    let mut iter = 0u32;
    loop {
        for j in jobs.iter_mut() {
            if !stopping {
                while j.inflight < j.spec.depth && j.submit_one() {}
            }
            j.poll();
        }
        iter = iter.wrapping_add(1);
        if !iter.is_multiple_of(64) && !stopping {
            continue;
        }
        let now = Instant::now();
        if !measuring && now >= measure_at {
            measuring = true;
            for j in jobs.iter_mut() {
                j.measuring = true;
            }
        }
        if !stopping && (now >= end || stop.load(Ordering::Relaxed)) {
            // Clean stop: no new I/O, completions after -t are drained but not counted.
            stopping = true;
            for j in jobs.iter_mut() {
                j.measuring = false;
            }
        }
        if stopping {
            if jobs.iter().all(|j| j.inflight == 0) {
                break;
            }
            if now >= end + drain_max {
                tracing::warn!(core, "in-flight I/O did not drain within {drain_max:?}");
                break;
            }
            // Nothing new to submit: do not spin a whole core while the last I/Os drain
            // through a reconnect.
            if jobs.iter().all(|j| !j.qp.is_connected()) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    jobs.into_iter()
        .map(|mut j| {
            j.qp.abort_all(|_| {});
            if j.spec.verify {
                // Writes still in flight (their buffers out) may or may not have landed.
                for (slot, b) in j.bufs.iter().enumerate() {
                    let c = &j.ctx[slot];
                    if b.is_none() && !c.read {
                        j.units.maybe[(c.unit - j.spec.units_lo) as usize] = c.gen;
                    }
                }
                j.res.units = Some(std::mem::take(&mut j.units));
            }
            j.res
        })
        .collect()
}
