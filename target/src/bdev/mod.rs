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
//!
//! Here: the traits a module implements and what it tells about itself; `io.rs` an I/O and its
//! completion, `channel.rs` a consumer's channel, `entry.rs` a registered bdev and its events,
//! `stats.rs` the counters, `registry.rs` the names.

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

mod channel;
mod entry;
mod io;
mod stats;

pub use channel::{IoChannel, ReadyQueue};
pub(crate) use entry::lock;
pub use entry::{BdevEntry, BdevEvent, EventFn, Subscription};
pub use io::{BdevIo, IoBufs, IoCompletion, IoStatus, IoType, IoTypes};
pub(crate) use stats::bump;
pub use stats::IoStats;

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
