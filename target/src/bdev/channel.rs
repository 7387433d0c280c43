//! A consumer's channel to a bdev: the checks before a module sees an I/O, and the
//! statistics and completions after.

use super::*;

/// A consumer's handle for I/O to one bdev, owned by one reactor.
pub struct IoChannel {
    entry: Arc<BdevEntry>,
    inner: Box<dyn BdevChannel>,
    stats: Arc<IoStats>,
    /// I/O refused by the layer's checks, completed on the next poll.
    rejected: VecDeque<IoCompletion>,
    /// Accepted I/O waiting for QoS budget, in submission order.
    throttled: VecDeque<BdevIo>,
    in_flight: usize,
    block_size: u64,
    /// This channel's latency histogram while one is enabled, and the setting it follows.
    hist: Option<Arc<histogram::Histogram>>,
    hist_gen: u64,
}

impl IoChannel {
    /// A channel to `entry` through the module's `inner`, counting into `stats` (which the
    /// entry keeps too).
    pub(super) fn new(
        entry: Arc<BdevEntry>,
        inner: Box<dyn BdevChannel>,
        stats: Arc<IoStats>,
    ) -> IoChannel {
        let block_size = u64::from(entry.info().block_size);
        IoChannel {
            entry,
            inner,
            stats,
            rejected: VecDeque::new(),
            throttled: VecDeque::new(),
            in_flight: 0,
            block_size,
            hist: None,
            hist_gen: 0,
        }
    }

    pub fn entry(&self) -> &Arc<BdevEntry> {
        &self.entry
    }

    /// I/O submitted and not yet handed back by `poll`, including I/O waiting for QoS budget.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// I/O held back by the bdev's rate limits. These need no device completion, only time:
    /// `poll` releases them, and has asked the reactor to wake by the next budget slice
    /// ([`crate::reactor::wake_by`]), so a consumer need not keep its reactor spinning for them.
    pub fn throttled(&self) -> usize {
        self.throttled.len()
    }

    /// Starts `io`. Invalid I/O is not refused here but completed with an error status by the
    /// next `poll`; `Err` hands the I/O back only when the device queue is full (retry later).
    pub fn submit(&mut self, mut io: BdevIo) -> Result<(), BdevIo> {
        io.submitted_ns = crate::reactor::now_ns();
        if let Err(status) = self.check(&io) {
            self.rejected.push_back(io.complete(status));
            self.in_flight += 1;
            return Ok(());
        }
        // One relaxed load when the bdev has no limit (and nothing is still queued).
        let qos = &self.entry.qos;
        if (qos.is_active() || !self.throttled.is_empty()) && qos::Qos::limits_type(io.io_type) {
            let bytes = io.num_blocks * self.block_size;
            if !self.throttled.is_empty() || !qos.try_admit(io.submitted_ns, io.io_type, bytes) {
                qos.note_queued();
                self.throttled.push_back(io);
                self.in_flight += 1;
                return Ok(());
            }
            if let Err(io) = self.inner.submit(io) {
                qos.give_back(io.io_type, bytes);
                return Err(io);
            }
        } else {
            self.inner.submit(io)?;
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Starts queued I/O as far as the budget allows, in order; if some must still wait, asks
    /// the reactor to wake when the next slice begins.
    fn release_throttled(&mut self) {
        if self.entry.is_removed() {
            // Deleted while they waited: they end as any I/O to a deleted bdev does.
            while let Some(io) = self.throttled.pop_front() {
                self.rejected.push_back(io.complete(IoStatus::Aborted));
            }
            return;
        }
        let now = crate::reactor::now_ns();
        let qos = &self.entry.qos;
        while let Some(io) = self.throttled.front() {
            let bytes = io.num_blocks * self.block_size;
            let (io_type, active) = (io.io_type, qos.is_active());
            if active && !qos.try_admit(now, io_type, bytes) {
                crate::reactor::wake_by(qos::Qos::next_slice_ns(now));
                return;
            }
            let io = self.throttled.pop_front().expect("front exists");
            if let Err(io) = self.inner.submit(io) {
                // The device is full: try again on the next poll.
                if active {
                    qos.give_back(io_type, bytes);
                }
                self.throttled.push_front(io);
                return;
            }
        }
    }

    fn check(&self, io: &BdevIo) -> Result<(), IoStatus> {
        let info = self.entry.info();
        if self.entry.is_removed() {
            return Err(IoStatus::Aborted);
        }
        if !info.io_types.contains(io.io_type) {
            return Err(IoStatus::Unsupported);
        }
        let end = io.offset_blocks.checked_add(io.num_blocks);
        if io.io_type != IoType::Reset
            && io.io_type != IoType::Flush
            && end.is_none_or(|e| e > info.num_blocks())
        {
            return Err(IoStatus::OutOfRange);
        }
        if io.io_type.has_data() {
            let want = io.num_blocks.checked_mul(self.block_size);
            let align = info.required_alignment.max(1) as u64;
            let shaped = io.bufs.iter().all(|b| {
                (b.addr() as u64).is_multiple_of(align)
                    && (b.len() as u64).is_multiple_of(self.block_size)
                    && !b.is_empty()
            });
            // A read fills its buffers: never one another device or leg shares.
            let fillable = io.io_type != IoType::Read || io.bufs.iter().all(|b| b.is_writable());
            if io.num_blocks == 0 || want != Some(io.buf_len() as u64) || !shaped || !fillable {
                return Err(IoStatus::InvalidBuffer);
            }
        }
        Ok(())
    }

    /// Hands finished I/O to `done`; returns how many.
    pub fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        if !self.throttled.is_empty() {
            self.release_throttled();
        }
        let gen = self.entry.histogram.generation();
        if gen != self.hist_gen {
            // Enabled, disabled or reset since the last poll (rare): follow the new setting.
            if let Some(old) = self.hist.take() {
                self.entry.histogram.channel_closed(old);
            }
            self.hist = self.entry.histogram.channel_histogram();
            self.hist_gen = gen;
        }
        let stats = &self.stats;
        let hist = self.hist.as_deref();
        let bs = self.block_size;
        let mut n = 0;
        let mut finish = |c: IoCompletion| {
            stats.record(&c, bs);
            if let Some(h) = hist {
                h.record(&c);
            }
            done(c);
        };
        while let Some(c) = self.rejected.pop_front() {
            finish(c);
            n += 1;
        }
        n += self.inner.poll(&mut finish);
        self.in_flight -= n.min(self.in_flight);
        n
    }
}

impl Drop for IoChannel {
    fn drop(&mut self) {
        if let Some(h) = self.hist.take() {
            self.entry.histogram.channel_closed(h);
        }
        self.entry.closed_stats.add(&self.stats);
        self.entry
            .channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &self.stats));
    }
}

/// Completions finished at submit time, waiting for the next poll (RAM-speed modules).
#[derive(Default)]
pub struct ReadyQueue {
    done: VecDeque<IoCompletion>,
}

impl ReadyQueue {
    pub fn push(&mut self, c: IoCompletion) {
        self.done.push_back(c);
    }

    pub fn drain(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let n = self.done.len();
        for c in self.done.drain(..) {
            done(c);
        }
        n
    }
}
