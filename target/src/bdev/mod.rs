//! The block device layer.
//!
//! Every block device implements [`Bdev`]; consumers (an NVMe-oF queue pair, a mirror) open an
//! [`IoChannel`] on the reactor they run on and drive it without locks: `submit` an I/O that
//! carries its own buffers and a caller tag, later `poll` for completions, which hand the
//! buffers back. Completions are never delivered from inside `submit`, so a consumer never sees
//! re-entrant calls. The layer checks ranges and buffer shapes before a module sees an I/O, and
//! keeps per-channel statistics that `bdev_get_iostat` sums.
//!
//! For stacking (a mirror over its legs, a volume over a pool) the layer also gives:
//! - buffers as [`BufView`]s, which a stacked device shares with every leg or splits into
//!   pieces without copying;
//! - the reactor a channel is opened on ([`Bdev::open_channel`]);
//! - events when a bdev is removed or resized ([`BdevEntry::subscribe`]), so a consumer learns
//!   it from the layer rather than from a failed I/O;
//! - an examine step ([`BdevRegistry::add_examiner`]): each module may look at every bdev that
//!   appears, to recognise its own metadata on it.

pub mod histogram;
pub mod lvol;
pub mod malloc;
pub mod mirror;
pub mod null;
pub mod nvme;
pub mod qos;
mod registry;
pub mod rpc;
pub mod uring;

pub use dma::BufView;
pub use registry::{check_geometry, validate_name, BdevRegistry, Examiner};
use serde_json::Value;
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use uuid::Uuid;

use crate::reactor::ReactorHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

impl IoType {
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
        IoType::Reset,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Whether the I/O moves data through its buffers.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }

    /// Whether the I/O changes what blocks read (a write of any kind).
    pub fn changes_data(self) -> bool {
        matches!(self, IoType::Write | IoType::WriteZeroes | IoType::Unmap)
    }
}

/// A set of I/O types a bdev supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTypes(u8);

impl IoTypes {
    pub fn of(types: &[IoType]) -> IoTypes {
        IoTypes(types.iter().fold(0, |m, t| m | t.bit()))
    }
    pub fn all() -> IoTypes {
        IoTypes::of(&IoType::ALL)
    }
    pub fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

/// The buffers of one I/O; most I/O has one. A module may share a view with several devices
/// below it (a mirror's legs) or split it, but hands the caller back what it was given.
pub type IoBufs = SmallVec<[BufView; 2]>;

/// One I/O request. The buffers travel with it and come back in its [`IoCompletion`].
#[derive(Debug)]
pub struct BdevIo {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub bufs: IoBufs,
    /// The submitter's own identifier, returned untouched.
    pub tag: u64,
    submitted_ns: u64,
}

impl BdevIo {
    pub fn new(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        bufs: IoBufs,
        tag: u64,
    ) -> Self {
        BdevIo {
            io_type,
            offset_blocks,
            num_blocks,
            bufs,
            tag,
            submitted_ns: 0,
        }
    }

    pub fn read(offset_blocks: u64, num_blocks: u64, bufs: IoBufs, tag: u64) -> Self {
        Self::new(IoType::Read, offset_blocks, num_blocks, bufs, tag)
    }

    pub fn write(offset_blocks: u64, num_blocks: u64, bufs: IoBufs, tag: u64) -> Self {
        Self::new(IoType::Write, offset_blocks, num_blocks, bufs, tag)
    }

    /// An I/O without data (flush, unmap, write zeroes, reset).
    pub fn no_data(io_type: IoType, offset_blocks: u64, num_blocks: u64, tag: u64) -> Self {
        Self::new(io_type, offset_blocks, num_blocks, IoBufs::new(), tag)
    }

    /// Total bytes in the buffers.
    pub fn buf_len(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }

    /// Finishes the I/O with `status`; modules call this.
    pub fn complete(self, status: IoStatus) -> IoCompletion {
        IoCompletion {
            tag: self.tag,
            io_type: self.io_type,
            status,
            bufs: self.bufs,
            offset_blocks: self.offset_blocks,
            num_blocks: self.num_blocks,
            submitted_ns: self.submitted_ns,
        }
    }
}

/// How an I/O ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Success,
    /// The range passes the end of the device.
    OutOfRange,
    /// The buffers do not match the length or alignment the device needs.
    InvalidBuffer,
    /// The device does not do this type of I/O.
    Unsupported,
    /// The device failed the I/O (errno where known).
    IoError(i32),
    /// Aborted: the device was removed or reset.
    Aborted,
    /// A remote NVMe device's own status, passed through.
    Nvme {
        sct: u8,
        sc: u8,
    },
}

impl IoStatus {
    /// What a remote NVMe namespace answers a host whose reservation another host took.
    pub const RESERVATION_CONFLICT: IoStatus = IoStatus::Nvme { sct: 0, sc: 0x83 };

    pub fn is_ok(self) -> bool {
        self == IoStatus::Success
    }

    pub fn is_reservation_conflict(self) -> bool {
        self == IoStatus::RESERVATION_CONFLICT
    }
}

/// A finished I/O, with its buffers back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub io_type: IoType,
    pub status: IoStatus,
    pub bufs: IoBufs,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    submitted_ns: u64,
}

/// A module's per-consumer channel. It only ever sees I/O the layer has checked.
pub trait BdevChannel {
    /// Starts `io`, or hands it back when the channel's queue is full.
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo>;
    /// Passes finished I/O to `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize;
}

/// What every bdev tells about itself.
#[derive(Debug)]
pub struct BdevInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub product_name: &'static str,
    pub block_size: u32,
    num_blocks: AtomicU64,
    pub uuid: Uuid,
    /// Buffer address alignment the device needs, in bytes (1 = any).
    pub required_alignment: u32,
    pub write_cache: bool,
    pub io_types: IoTypes,
}

impl BdevInfo {
    pub fn new(
        name: String,
        product_name: &'static str,
        block_size: u32,
        num_blocks: u64,
        uuid: Uuid,
        io_types: IoTypes,
    ) -> Self {
        BdevInfo {
            name,
            aliases: Vec::new(),
            product_name,
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            uuid,
            required_alignment: 1,
            write_cache: false,
            io_types,
        }
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    pub fn set_num_blocks(&self, n: u64) {
        self.num_blocks.store(n, Ordering::Release)
    }

    /// The parameters that recreate a plain device of this geometry (malloc, null).
    pub fn geometry_params(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "num_blocks": self.num_blocks(),
            "block_size": self.block_size,
            "uuid": self.uuid,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.num_blocks() * self.block_size as u64
    }
}

/// A block device module's device.
pub trait Bdev: Send + Sync + 'static {
    fn info(&self) -> &BdevInfo;
    /// The module's name, as `bdev_get_bdevs` shows it in `driver_specific`.
    fn module(&self) -> &'static str;
    /// Opens a channel for one consumer, on the thread that will drive it: `reactor` is that
    /// thread's reactor, or `None` off any reactor (tests, tools), where a module that needs
    /// per-reactor resources refuses.
    fn open_channel(
        &self,
        reactor: Option<&ReactorHandle>,
    ) -> Result<Box<dyn BdevChannel>, BdevError>;
    /// The RPC call that recreates this bdev, for `save_config`.
    fn config(&self) -> Option<(&'static str, Value)>;
    /// Module-specific facts for `bdev_get_bdevs`.
    fn driver_specific(&self) -> Value {
        Value::Object(Default::default())
    }
}

#[derive(Debug, Error)]
pub enum BdevError {
    #[error("bdev {0} already exists")]
    Exists(String),
    #[error("no bdev named {0}")]
    NotFound(String),
    #[error("bdev {name} is in use by {owner}; release it first")]
    Claimed { name: String, owner: String },
    #[error("{0}")]
    InvalidParam(String),
    #[error("bdev {name} was deleted")]
    Removed { name: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dma(#[from] dma::DmaError),
}

impl BdevError {
    /// The errno SPDK would report for this, used as the JSON-RPC error code.
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::NotFound(_) | BdevError::Removed { .. } => libc::ENODEV,
            BdevError::Claimed { .. } => libc::EBUSY,
            BdevError::InvalidParam(_) => libc::EINVAL,
            BdevError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BdevError::Dma(_) => libc::ENOMEM,
        }
    }
}

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
    fn record(&self, c: &IoCompletion, block_size: u64) {
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

/// A registered bdev: the device plus what the layer tracks about it.
pub struct BdevEntry {
    bdev: Arc<dyn Bdev>,
    claimed_by: Mutex<Option<String>>,
    removed: AtomicBool,
    /// Stats of open channels, and the sum of closed ones.
    channel_stats: Mutex<Vec<Arc<IoStats>>>,
    closed_stats: IoStats,
    /// Rate limits, shared by every channel (`bdev_set_qos_limit`).
    pub qos: qos::Qos,
    /// Latency histogram control (`bdev_enable_histogram`).
    pub histogram: histogram::HistogramCtl,
    /// Who wants to hear of removal and resizes.
    subscribers: Mutex<Vec<(u64, Arc<EventFn>)>>,
    /// The names it answers to besides its own: the device's at first, then as renamed
    /// ([`BdevRegistry::rename_alias`]).
    aliases: Mutex<Vec<String>>,
}

/// What happened to a bdev, for those who use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev was deleted (or its device went away): I/O to it fails from now on.
    Removed,
    /// Its size changed; I/O is checked against the new size from now on.
    Resized { old_blocks: u64, new_blocks: u64 },
}

/// A subscriber's handler. It runs on the thread that changed the bdev (the control plane or a
/// controller's owner), so it must not block; a consumer on a reactor sends itself a message.
pub type EventFn = dyn Fn(&BdevEntry, BdevEvent) + Send + Sync;

static NEXT_SUBSCRIPTION: AtomicU64 = AtomicU64::new(1);

/// Keeps a subscription alive; dropping it unsubscribes.
#[must_use = "dropping a Subscription unsubscribes at once"]
pub struct Subscription {
    entry: std::sync::Weak<BdevEntry>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(e) = self.entry.upgrade() {
            lock(&e.subscribers).retain(|(id, _)| *id != self.id);
        }
    }
}

/// Locks a control-path mutex; a panic elsewhere ends plexd (see `fatal`), so poisoning only
/// means a test thread failed, and the data is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BdevEntry {
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn info(&self) -> &BdevInfo {
        self.bdev.info()
    }

    pub fn name(&self) -> &str {
        &self.bdev.info().name
    }

    /// The names it answers to besides its own.
    pub fn aliases(&self) -> Vec<String> {
        lock(&self.aliases).clone()
    }

    /// Whether `name` is this bdev's name or one of its aliases (what the registry resolves).
    pub fn answers_to(&self, name: &str) -> bool {
        self.name() == name || lock(&self.aliases).iter().any(|a| a == name)
    }

    pub fn claimed_by(&self) -> Option<String> {
        self.claimed_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Marks the bdev as used by `owner` (a subsystem namespace, a mirror), so that it cannot
    /// be deleted or claimed twice.
    pub fn claim(&self, owner: &str) -> Result<(), BdevError> {
        let mut c = self.claimed_by.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = &*c {
            return Err(BdevError::Claimed {
                name: self.name().to_string(),
                owner: cur.clone(),
            });
        }
        *c = Some(owner.to_string());
        Ok(())
    }

    pub fn release(&self) {
        *self.claimed_by.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Opens a channel on the calling thread.
    pub fn open_channel(self: &Arc<Self>) -> Result<IoChannel, BdevError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed {
                name: self.name().to_string(),
            });
        }
        let reactor = crate::reactor::current();
        let inner = self.bdev.open_channel(reactor.as_ref())?;
        let stats = Arc::new(IoStats::default());
        self.channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats.clone());
        Ok(IoChannel {
            entry: self.clone(),
            inner,
            stats,
            rejected: VecDeque::new(),
            throttled: VecDeque::new(),
            in_flight: 0,
            block_size: self.info().block_size as u64,
            hist: None,
            hist_gen: 0,
        })
    }

    /// The sum of every channel's counters, open and closed.
    pub fn io_stats(&self) -> IoStats {
        let total = IoStats::default();
        total.add(&self.closed_stats);
        for s in self
            .channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            total.add(s);
        }
        total
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Calls `f` when this bdev is removed or resized, until the returned guard is dropped.
    /// A bdev already removed gets `Removed` at once.
    pub fn subscribe(
        self: &Arc<Self>,
        f: impl Fn(&BdevEntry, BdevEvent) + Send + Sync + 'static,
    ) -> Subscription {
        let id = NEXT_SUBSCRIPTION.fetch_add(1, Ordering::Relaxed);
        let f: Arc<EventFn> = Arc::new(f);
        lock(&self.subscribers).push((id, f.clone()));
        if self.is_removed() {
            f(self, BdevEvent::Removed);
        }
        Subscription {
            entry: Arc::downgrade(self),
            id,
        }
    }

    /// Changes the size and tells the subscribers (a module whose device changed size calls it).
    /// Nothing happens once the bdev is removed.
    pub fn resize(&self, new_blocks: u64) {
        let old_blocks = self.info().num_blocks();
        // A removed bdev has no users left to tell.
        if old_blocks != new_blocks && !self.is_removed() {
            self.info().set_num_blocks(new_blocks);
            self.notify(BdevEvent::Resized {
                old_blocks,
                new_blocks,
            });
        }
    }

    /// Marks the bdev gone and tells the subscribers, once.
    fn mark_removed(&self) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            self.notify(BdevEvent::Removed);
        }
    }

    fn notify(&self, ev: BdevEvent) {
        // Handlers run without the lock, so one may subscribe or unsubscribe.
        let subs: Vec<Arc<EventFn>> = lock(&self.subscribers)
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        for f in subs {
            f(self, ev);
        }
    }
}

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Submits one I/O and polls until it completes.
    pub fn run_io(ch: &mut IoChannel, io: BdevIo) -> IoCompletion {
        ch.submit(io).expect("queue has room");
        let mut out = None;
        for _ in 0..1_000_000 {
            ch.poll(&mut |c| out = Some(c));
            if let Some(c) = out.take() {
                return c;
            }
            std::thread::yield_now();
        }
        panic!("I/O did not complete");
    }

    pub fn buf(len: usize, fill: u8) -> IoBufs {
        let mut b = dma::DmaBuf::new(len).unwrap();
        b.fill(fill);
        smallvec::smallvec![b.into()]
    }

    /// A bdev that only has a name, aliases and a UUID: what the registry indexes.
    struct Named(BdevInfo);

    impl Bdev for Named {
        fn info(&self) -> &BdevInfo {
            &self.0
        }
        fn module(&self) -> &'static str {
            "named"
        }
        fn open_channel(
            &self,
            _: Option<&ReactorHandle>,
        ) -> Result<Box<dyn BdevChannel>, BdevError> {
            Err(BdevError::InvalidParam("no I/O here".into()))
        }
        fn config(&self) -> Option<(&'static str, Value)> {
            None
        }
    }

    fn named(name: &str, aliases: &[&str], uuid: Uuid) -> Arc<dyn Bdev> {
        let mut info = BdevInfo::new(name.into(), "test", 512, 8, uuid, IoTypes::all());
        info.aliases = aliases.iter().map(|a| a.to_string()).collect();
        Arc::new(Named(info))
    }

    #[test]
    fn the_registry_finds_names_aliases_and_uuids_and_forgets_them_on_delete() {
        let reg = BdevRegistry::default();
        let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
        reg.register(named("a", &["a-alias"], u1)).unwrap();
        reg.register(named("b", &[], u2)).unwrap();
        for key in ["a", "a-alias", &u1.to_string()] {
            assert_eq!(reg.get(key).unwrap().name(), "a", "{key}");
        }
        assert!(
            reg.get(&u1.to_string().to_uppercase()).is_err(),
            "UUIDs as SPDK prints them"
        );
        // A name, an alias or a UUID already in use is refused, whichever way it collides.
        for (name, aliases, uuid) in [
            ("a-alias", &[][..], Uuid::new_v4()),
            ("c", &["b"][..], Uuid::new_v4()),
            ("c", &["a-alias"][..], Uuid::new_v4()),
            ("c", &[][..], u2),
        ] {
            assert!(
                reg.register(named(name, aliases, uuid)).is_err(),
                "{name} {aliases:?}"
            );
        }
        reg.unregister("a-alias", "named").unwrap();
        for key in ["a", "a-alias", &u1.to_string()] {
            assert!(reg.get(key).is_err(), "{key} is gone");
        }
        // Its alias and UUID are free again; creation order survives the delete.
        reg.register(named("c", &["a-alias"], u1)).unwrap();
        let order: Vec<String> = reg.list().iter().map(|e| e.name().to_string()).collect();
        assert_eq!(order, ["b", "c"]);
    }

    fn null_entry(name: &str) -> (BdevRegistry, Arc<BdevEntry>) {
        let reg = BdevRegistry::default();
        let b = null::NullBdev::new(name.into(), 1 << 20, 512, Uuid::new_v4()).unwrap();
        let e = reg.register(Arc::new(b)).unwrap();
        (reg, e)
    }

    /// Limits `e` to `ios_per_sec` reads and writes a second, from now.
    fn limit_iops(e: &BdevEntry, ios_per_sec: u64) {
        crate::reactor::refresh_loop_clock();
        e.qos.set_limits(
            qos::QosLimits {
                rw_ios_per_sec: ios_per_sec,
                ..Default::default()
            },
            crate::reactor::now_ns(),
        );
    }

    /// Submits `n` reads at once and polls until all are back; returns the completions.
    /// The submissions see the clock as it was last read (by `limit_iops`, as a reactor's loop
    /// pass reads it once), so a slow first buffer allocation cannot spread them over slices;
    /// each poll pass reads the clock again.
    fn burst(ch: &mut IoChannel, n: u64) -> Vec<IoCompletion> {
        let bufs: Vec<IoBufs> = (0..n).map(|_| buf(512, 0)).collect();
        for (i, b) in bufs.into_iter().enumerate() {
            ch.submit(BdevIo::read(i as u64, 1, b, i as u64)).unwrap();
        }
        let mut out = Vec::new();
        while (out.len() as u64) < n {
            std::thread::yield_now();
            crate::reactor::refresh_loop_clock();
            ch.poll(&mut |c| out.push(c));
        }
        out
    }

    #[test]
    fn a_rate_limit_queues_a_burst_and_releases_it_one_slice_at_a_time() {
        let (_reg, e) = null_entry("q0");
        // 1000 IOPS: one I/O per 1 ms slice.
        limit_iops(&e, 1000);
        let mut ch = e.open_channel().unwrap();
        let refills = e.qos.refills_total();
        let t0 = std::time::Instant::now();
        let done = burst(&mut ch, 6);
        let took = t0.elapsed();
        // All completed, in order, none failed; five waited, each for a slice of its own.
        assert!(done.iter().all(|c| c.status.is_ok()));
        assert_eq!(
            done.iter().map(|c| c.tag).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!(e.qos.queued_total(), 5);
        // Five waited for a slice each: at least 4 ms passed (a lower bound only, which load
        // can only lengthen), and budget was refilled at least once (a descheduled thread may
        // get several slices in one refill, so not one refill per slice).
        assert!(took >= std::time::Duration::from_millis(4), "{took:?}");
        assert!(e.qos.refills_total() > refills);
        assert_eq!(ch.in_flight(), 0);
        assert_eq!(ch.throttled(), 0);
    }

    #[test]
    fn without_a_limit_nothing_waits_and_lifting_one_releases_the_queue() {
        let (_reg, e) = null_entry("q1");
        let mut ch = e.open_channel().unwrap();
        burst(&mut ch, 50);
        assert_eq!(e.qos.queued_total(), 0);
        limit_iops(&e, 1000);
        for i in 0..10 {
            ch.submit(BdevIo::read(i, 1, buf(512, 0), i)).unwrap();
        }
        // Flushes are not limited: it passes the queued reads.
        ch.submit(BdevIo::no_data(IoType::Flush, 0, 0, 99)).unwrap();
        assert!(ch.throttled() >= 9);
        e.qos
            .set_limits(qos::QosLimits::default(), crate::reactor::now_ns());
        let mut out = Vec::new();
        while out.len() < 11 {
            ch.poll(&mut |c| out.push(c.tag));
        }
        assert_eq!(out.iter().filter(|&&t| t != 99).count(), 10);
        assert_eq!(ch.throttled(), 0);
    }

    #[test]
    fn io_waiting_for_budget_is_aborted_when_its_bdev_is_deleted() {
        let (reg, e) = null_entry("q2");
        limit_iops(&e, 1000);
        let mut ch = e.open_channel().unwrap();
        for i in 0..4 {
            ch.submit(BdevIo::read(i, 1, buf(512, 0), i)).unwrap();
        }
        assert!(ch.throttled() >= 3);
        reg.unregister("q2", "null").unwrap();
        let mut out = Vec::new();
        while out.len() < 4 {
            ch.poll(&mut |c| out.push(c.status));
        }
        assert!(out.iter().filter(|s| **s == IoStatus::Aborted).count() >= 3);
        assert_eq!((ch.throttled(), ch.in_flight()), (0, 0));
    }

    #[test]
    fn latency_histogram_counts_each_completion_once() {
        let (_reg, e) = null_entry("h0");
        let mut ch = e.open_channel().unwrap();
        burst(&mut ch, 3);
        assert!(e.histogram.snapshot().is_none());
        e.histogram.enable(
            histogram::HistShape::new(histogram::GRANULARITY_DEFAULT, 0, u64::MAX).unwrap(),
            Some(IoType::Read),
        );
        burst(&mut ch, 7);
        ch.submit(BdevIo::write(0, 1, buf(512, 0), 0)).unwrap();
        while ch.in_flight() > 0 {
            ch.poll(&mut |_| {});
        }
        let (_, counts) = e.histogram.snapshot().unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 7, "only reads after the enable");
        drop(ch);
        let (_, counts) = e.histogram.snapshot().unwrap();
        assert_eq!(
            counts.iter().sum::<u64>(),
            7,
            "kept after the channel closed"
        );
    }

    #[test]
    fn subscribers_hear_of_resizes_and_removal_until_they_unsubscribe() {
        let (reg, e) = null_entry("ev0");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sub = e.subscribe(move |b, ev| lock(&s2).push((b.name().to_string(), ev)));
        let old = e.info().num_blocks();
        e.resize(old * 2);
        e.resize(old * 2);
        reg.unregister("ev0", "null").unwrap();
        assert_eq!(
            *lock(&seen),
            [
                (
                    "ev0".to_string(),
                    BdevEvent::Resized {
                        old_blocks: old,
                        new_blocks: old * 2
                    }
                ),
                ("ev0".to_string(), BdevEvent::Removed),
            ],
            "one event per change"
        );
        // A late subscriber to a removed bdev hears of it at once; an old one no longer.
        drop(sub);
        let late = Arc::new(AtomicU64::new(0));
        let l2 = late.clone();
        let _sub = e.subscribe(move |_, ev| {
            assert_eq!(ev, BdevEvent::Removed);
            l2.fetch_add(1, Ordering::Relaxed);
        });
        e.resize(1);
        assert_eq!(late.load(Ordering::Relaxed), 1);
        assert_eq!(lock(&seen).len(), 2);
    }

    #[test]
    fn examiners_see_each_new_bdev_and_may_claim_it() {
        let reg = BdevRegistry::default();
        reg.register(named("before", &[], Uuid::new_v4())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        reg.add_examiner(move |e| {
            lock(&s2).push(e.name().to_string());
            if e.name().starts_with("mine") {
                e.claim("examiner").unwrap();
            }
        });
        reg.register(named("mine0", &[], Uuid::new_v4())).unwrap();
        reg.register(named("other", &[], Uuid::new_v4())).unwrap();
        assert_eq!(*lock(&seen), ["mine0", "other"]);
        assert!(matches!(
            reg.unregister("mine0", "named"),
            Err(BdevError::Claimed { .. })
        ));
        assert!(reg.unregister("other", "named").is_ok());
    }

    #[test]
    fn a_read_into_a_shared_buffer_is_refused_by_the_layer() {
        let (_reg, e) = null_entry("rs0");
        let mut ch = e.open_channel().unwrap();
        let mut whole = buf(512, 0);
        let shared: IoBufs = smallvec::smallvec![whole[0].share()];
        let c = run_io(&mut ch, BdevIo::read(0, 1, shared, 1));
        assert_eq!(c.status, IoStatus::InvalidBuffer);
        // A write may go out from a shared buffer: the device only reads it.
        let shared: IoBufs = smallvec::smallvec![whole[0].share()];
        assert!(run_io(&mut ch, BdevIo::write(0, 1, shared, 2))
            .status
            .is_ok());
    }

    #[test]
    fn io_types_set() {
        let t = IoTypes::of(&[IoType::Read, IoType::Write]);
        assert!(t.contains(IoType::Read) && !t.contains(IoType::Unmap));
        assert!(IoTypes::all().contains(IoType::Reset));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("Malloc0").is_ok());
        assert!(validate_name("nvme0n1:p1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("x/../y").is_err());
    }
}
