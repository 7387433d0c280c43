//! The mirror bdev: one volume kept on 1–3 plexes (any bdevs: local ones, or other nodes'
//! namespaces attached with `bdev_nvme_attach_controller`).
//!
//! Layout, as Mayastor splits its nexus:
//! - `mod.rs`: the bdev and the state its parts share (`Core`);
//! - `plex.rs`: a plex, its role in the data path and its condition with the reason for it;
//! - `channel.rs`: the data path on each reactor: writes to every serving plex, reads from
//!   one, failures turned into faults;
//! - `intent.rs`: the write-intent log in memory, shared by every channel through atomics;
//! - `service/`: one poller per mirror on its home reactor, the only writer of metadata:
//!   assembly, faults and operator requests (`mod.rs`), superblocks, bitmaps and lazy
//!   clearing (`metadata.rs`), resync (`resync.rs`);
//! - `superblock/`: the on-disk format (docs/mirror-on-disk-format.md);
//! - `rpc.rs`: `bdev_mirror_*`.
//!
//! What never happens: a write acknowledged before its region is marked on every serving
//! plex; a write acknowledged after a plex failed it before the superblocks say that plex is
//! out of sync; a stale plex (older generation) used as a source.

pub mod assemble;
pub mod blockio;
pub mod channel;
pub mod fence;
pub mod intent;
pub mod plex;
pub mod rpc;
pub mod service;
pub mod superblock;

use crate::bdev::{Bdev, BdevChannel, BdevError, BdevInfo, IoTypes};
use crate::reactor::ReactorHandle;
use crossbeam_queue::SegQueue;
use intent::IntentLog;
use plex::{FaultReason, Plex};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use superblock::Layout;
use uuid::Uuid;

/// Default interval of bitmap clearing, ms.
pub const DEFAULT_CLEAR_INTERVAL_MS: u64 = 5000;

pub(crate) use crate::bdev::lock;

/// What channels ask of the service.
pub enum Request {
    /// A plex failed an I/O: take it out and record that before `ticket`'s I/O completes.
    Fault {
        plex: usize,
        why: FaultReason,
        ticket: u64,
    },
    /// Write chunk `chunk` of the bitmap: a write waits for one of its bits.
    Persist { chunk: u32 },
    /// A missing plex's bdev appeared again.
    Returned { plex: usize },
    /// Anything the RPC side wants done on the home reactor (add or remove a plex, stop).
    Control(Box<dyn FnOnce(&mut service::Service) + Send>),
}

/// The state shared by the bdev, its channels and its service.
pub struct Core {
    pub name: String,
    pub uuid: Uuid,
    /// The geometry, and the size the superblocks record; changes only when the mirror grows.
    layout: RwLock<Layout>,
    /// `layout`'s data blocks, for the data path's range check without the lock.
    data_blocks: AtomicU64,
    /// Where mirror data starts on every plex; fixed for the mirror's life.
    data_offset_blocks: u64,
    /// Plexes by index. Only ever appended to; a removed plex stays as an idle tombstone, so
    /// an index in a channel or an in-flight I/O always means the same plex.
    plexes: RwLock<Vec<Arc<Plex>>>,
    /// Bumped when `plexes` grows.
    plexes_version: AtomicU64,
    pub intent: IntentLog,
    pub generation: AtomicU64,
    requests: SegQueue<Request>,
    pub home: ReactorHandle,
    fault_tickets: AtomicU64,
    faults_recorded: AtomicU64,
    /// No serving plex is left, or another owner fenced this one: all I/O fails.
    pub failed: AtomicBool,
    /// Another owner took a plex's reservation: this instance must never acknowledge a write
    /// again (its writes would be lost to the new owner).
    pub fenced: AtomicBool,
    /// Resync rate limit, bytes per second (0 = none).
    pub resync_rate: AtomicU64,
    /// How often regions with no write in flight are cleared from the bitmap, in ms. Longer
    /// keeps hot regions marked (fewer bitmap writes), at the cost of more to resync after a
    /// crash; md's write-intent bitmap waits 5 s by default, and so do we.
    pub clear_interval_ms: AtomicU64,
    /// Bitmap chunks changed in memory and not yet written to every plex. Raised before the
    /// service clears a bit, so a reader that sees the bit gone and this at 0 knows the
    /// plexes' bitmaps say the same.
    pub bitmap_writes_pending: AtomicU64,
    /// How many plexes the operator asked for (scheduled), against those present (actual).
    pub scheduled: AtomicU64,
    /// Why the mirror was assembled the way it was, for `bdev_mirror_get_mirrors`.
    pub assembly_notes: Mutex<Vec<String>>,
    /// Removal and resize events of the plexes' bdevs.
    subscriptions: Mutex<Vec<crate::bdev::Subscription>>,
    /// New writes wait in their channels (`bdev_mirror_quiesce`): the plexes hold the same
    /// data, unchanging, while each is snapshotted.
    pub quiesced: AtomicBool,
    /// Bumped by every quiesce and resume, so an expiring lease knows whether it is still
    /// the one in force.
    pub quiesce_lease: AtomicU64,
    /// Each channel's count of writes in flight.
    writers: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

impl Core {
    pub fn layout(&self) -> Layout {
        *self.layout.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The mirror's size in blocks.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks.load(Ordering::Acquire)
    }

    /// Takes the layout of a grown mirror (its superblocks already record it).
    fn set_layout(&self, l: Layout) {
        *self.layout.write().unwrap_or_else(|e| e.into_inner()) = l;
        self.data_blocks.store(l.data_blocks(), Ordering::Release);
    }

    fn register_writer(&self, count: &Arc<AtomicU64>) {
        let mut w = lock(&self.writers);
        w.retain(|c| c.strong_count() > 0);
        w.push(Arc::downgrade(count));
    }

    /// Writes admitted by any channel and not yet completed.
    pub fn writes_in_flight(&self) -> u64 {
        lock(&self.writers)
            .iter()
            .filter_map(|c| c.upgrade())
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }

    pub fn plexes(&self) -> Vec<Arc<Plex>> {
        self.plexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn plex(&self, i: usize) -> Option<Arc<Plex>> {
        self.plexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(i)
            .cloned()
    }

    pub fn plexes_version(&self) -> u64 {
        self.plexes_version.load(Ordering::Acquire)
    }

    fn add_plex(&self, p: Arc<Plex>) -> usize {
        let mut v = self.plexes.write().unwrap_or_else(|e| e.into_inner());
        v.push(p);
        self.plexes_version.fetch_add(1, Ordering::AcqRel);
        v.len() - 1
    }

    /// Hands `r` to the service and wakes its reactor.
    pub fn request(&self, r: Request) {
        self.requests.push(r);
        self.home.send(|_| {});
    }

    /// Takes plex `i` out of the data path now and asks the service to record it. Returns the
    /// ticket an I/O that saw the failure waits for ([`Core::fault_recorded`]).
    pub fn fault(&self, i: usize, why: FaultReason) -> u64 {
        if let Some(p) = self.plex(i) {
            p.set_role(plex::Role::Idle);
        }
        let ticket = self.fault_tickets.fetch_add(1, Ordering::AcqRel) + 1;
        self.request(Request::Fault {
            plex: i,
            why,
            ticket,
        });
        ticket
    }

    /// The newest fault ticket handed out: a write issued now skips every plex faulted so far,
    /// so it may complete only once all of those faults are on disk.
    pub fn tickets_issued(&self) -> u64 {
        self.fault_tickets.load(Ordering::Acquire)
    }

    /// Whether the superblocks record every fault up to `ticket`.
    pub fn fault_recorded(&self, ticket: u64) -> bool {
        self.faults_recorded.load(Ordering::Acquire) >= ticket
    }

    /// Another owner took plex `location`'s reservation (a Reservation Conflict on any I/O to
    /// it, data or metadata): this instance stops.
    pub fn mark_fenced(&self, location: &str) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "mirror {}: plex {location} answered Reservation Conflict: another owner has \
                 taken over; this instance fails all I/O from now on",
                self.name
            );
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The status I/O of a failed mirror ends with.
    pub fn failed_status(&self) -> crate::bdev::IoStatus {
        if self.fenced.load(Ordering::Acquire) {
            crate::bdev::IoStatus::RESERVATION_CONFLICT
        } else {
            crate::bdev::IoStatus::IoError(libc::EIO)
        }
    }

    /// The smallest plex that holds the mirror as it is now.
    pub fn plex_blocks_needed(&self) -> u64 {
        self.data_offset_blocks + self.data_blocks()
    }

    /// Mirror block `b` on a plex.
    pub fn plex_block(&self, b: u64) -> u64 {
        b + self.data_offset_blocks
    }
}

/// The mirror as a bdev.
pub struct MirrorBdev {
    info: BdevInfo,
    pub core: Arc<Core>,
}

impl Bdev for MirrorBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "mirror"
    }

    fn open_channel(
        &self,
        _reactor: Option<&ReactorHandle>,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(channel::MirrorChannel::new(self.core.clone())))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        let plexes: Vec<Value> = self
            .core
            .plexes()
            .iter()
            .filter(|p| !p.is_removed())
            .map(|p| json!({"bdev": p.location, "node": p.node}))
            .collect();
        Some((
            "bdev_mirror_create",
            json!({
                "name": self.info.name,
                "uuid": self.core.uuid,
                "plexes": plexes,
                "region_size": self.core.layout().region_size(),
            }),
        ))
    }

    fn driver_specific(&self) -> Value {
        json!({"mirror": rpc::describe(&self.core)})
    }
}

impl MirrorBdev {
    fn new(core: Arc<Core>) -> MirrorBdev {
        let mut info = BdevInfo::new(
            core.name.clone(),
            "Mirror",
            core.layout().block_size(),
            core.data_blocks(),
            core.uuid,
            IoTypes::all(),
        );
        // Each leg gets the caller's buffer as it is, and a plex that joins later may sit on
        // a device that reads and writes with O_DIRECT: ask for what any such leg could
        // need, a block-aligned buffer.
        info.required_alignment = info.block_size;
        MirrorBdev { info, core }
    }
}

/// Every mirror of this plexd, by name.
#[derive(Default)]
pub struct MirrorModule {
    mirrors: Mutex<std::collections::BTreeMap<String, Arc<Core>>>,
    /// `bdev_mirror_set_options`: defaults for mirrors created later.
    default_resync_rate: AtomicU64,
    default_region_size: AtomicU64,
}

impl MirrorModule {
    pub fn default_resync_rate(&self) -> u64 {
        self.default_resync_rate.load(Ordering::Relaxed)
    }

    pub fn default_region_size(&self) -> u64 {
        match self.default_region_size.load(Ordering::Relaxed) {
            0 => superblock::DEFAULT_REGION_SIZE,
            n => n,
        }
    }

    fn insert(&self, core: Arc<Core>) {
        lock(&self.mirrors).insert(core.name.clone(), core);
    }

    fn remove(&self, name: &str) -> Option<Arc<Core>> {
        lock(&self.mirrors).remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Core>> {
        lock(&self.mirrors).get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Core>> {
        lock(&self.mirrors).values().cloned().collect()
    }

    /// The examine step: a bdev that appears under the name (or alias) of a missing plex is
    /// offered back to its mirror, which checks its superblock before using it.
    pub fn examine(&self, app: &crate::app::App, e: &Arc<crate::bdev::BdevEntry>) {
        for core in self.all() {
            for (i, p) in core.plexes().iter().enumerate() {
                let missing = p.bdev().is_none_or(|b| b.is_removed());
                // By alias too: an lvol plex is named by its UUID, known as `lvs/NAME`.
                if missing
                    && e.answers_to(&p.location)
                    && e.claim(&format!("mirror {}", core.name)).is_ok()
                {
                    tracing::info!(
                        "mirror {}: plex {} ({}) is back",
                        core.name,
                        p.uuid,
                        e.name()
                    );
                    p.set_bdev(Some(e.clone()));
                    let Some((spec, nsid)) = fence::remote_of(app, e) else {
                        core.request(Request::Returned { plex: i });
                        continue;
                    };
                    // A remote plex is fenced again before it is used: its node may have
                    // restarted without its reservations, or another owner may hold them.
                    // Off this (registering) thread: the commands wait for the network.
                    let (core, location) = (core.clone(), p.location.clone());
                    let key = fence::key_for(core.uuid, &spec.hostid);
                    let spawned = std::thread::Builder::new()
                        .name(format!("fence {location}"))
                        .spawn(move || match fence::take(&spec, nsid, key, false) {
                            Ok(f) => {
                                tracing::info!(
                                    "mirror {}: plex {location} reserved ({f:?})",
                                    core.name
                                );
                                core.request(Request::Returned { plex: i });
                            }
                            Err(fence::FenceError::HeldByOther { .. }) => {
                                core.mark_fenced(&location)
                            }
                            Err(err) => tracing::error!(
                                "mirror {}: returning plex {location} not used: cannot take its \
                                 reservation ({err})",
                                core.name
                            ),
                        });
                    if let Err(err) = spawned {
                        tracing::error!("mirror: no thread to fence {}: {err}", e.name());
                    }
                }
            }
        }
    }
}
