//! Logical volumes: a thin-provisioned volume store on any bdev, with snapshots and clones.
//!
//! Layout, as the mirror is split:
//! - `format.rs`: the on-disk format in bytes (docs/lvol-on-disk-format.md);
//! - `state.rs`: the metadata as a value, the ops that change it, and the checker;
//! - `store.rs`: a store at run time: create, load (examine), and its service, the one poller
//!   that writes metadata (the journal, checkpoints) and hands out clusters;
//! - `channel.rs`: an lvol's data path on each reactor;
//! - `inflate.rs`: giving an lvol clusters of its own (thick creation, inflate, decouple);
//! - `rpc.rs`: SPDK's `bdev_lvol_*` methods.
//!
//! What never happens: a cluster mapped before it holds its data (zeroes, or the parent's);
//! a write acknowledged into a cluster whose mapping is not on disk; a cluster owned twice.

pub mod channel;
pub mod format;
pub mod image;
pub mod inflate;
pub mod rpc;
pub mod state;
pub mod store;

use crate::bdev::{Bdev, BdevChannel, BdevError, BdevInfo, IoTypes};
use crate::reactor::ReactorHandle;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use store::StoreCore;
use uuid::Uuid;

pub(crate) use crate::bdev::lock;

/// One blob's cluster map as the data path reads it: atomics, so the service can publish a
/// new mapping while channels on other reactors read.
pub struct BlobView {
    pub id: u32,
    pub map: Box<[AtomicU32]>,
    pub parent: Option<Arc<BlobView>>,
}

impl BlobView {
    pub fn new(id: u32, map: &[u32], parent: Option<Arc<BlobView>>) -> Arc<BlobView> {
        Arc::new(BlobView {
            id,
            map: map.iter().map(|&c| AtomicU32::new(c)).collect(),
            parent,
        })
    }

    pub fn own(&self, index: u64) -> Option<u32> {
        let c = self.map.get(index as usize)?.load(Ordering::Acquire);
        (c != state::UNALLOCATED).then_some(c)
    }

    /// The cluster whose data index `index` reads: this blob's, else the nearest parent's.
    pub fn resolve(&self, index: u64) -> Option<u32> {
        let mut v = self;
        loop {
            if let Some(c) = v.own(index) {
                return Some(c);
            }
            v = v.parent.as_deref()?;
        }
    }

    /// Whether a parent holds data at `index` (a first write there copies it).
    pub fn parent_has(&self, index: u64) -> Option<u32> {
        self.parent.as_deref().and_then(|p| p.resolve(index))
    }
}

/// An lvol's run-time state shared by its bdev and its channels.
pub struct LvolCore {
    pub store: Arc<StoreCore>,
    pub uuid: Uuid,
    view: RwLock<Arc<BlobView>>,
    view_gen: AtomicU64,
    /// While set, new I/O waits in its channel (snapshot, resize, delete).
    frozen: AtomicBool,
    /// I/O in flight, counted in one of two epochs; the service flips the epoch and waits for
    /// the old one to empty, to know no I/O still uses what it is about to change.
    epoch: AtomicU64,
    inflight: [AtomicU64; 2],
    pub read_only: AtomicBool,
    /// The control operation under way (snapshot, resize, inflate…): one at a time.
    busy: Mutex<Option<&'static str>>,
}

/// Holds an lvol's control operation slot; frees it when dropped.
pub struct Busy(Arc<LvolCore>);

impl Drop for Busy {
    fn drop(&mut self) {
        *lock(&self.0.busy) = None;
    }
}

impl LvolCore {
    pub fn new(store: Arc<StoreCore>, uuid: Uuid, view: Arc<BlobView>, ro: bool) -> Arc<Self> {
        Arc::new(LvolCore {
            store,
            uuid,
            view: RwLock::new(view),
            view_gen: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            inflight: [AtomicU64::new(0), AtomicU64::new(0)],
            read_only: AtomicBool::new(ro),
            busy: Mutex::new(None),
        })
    }

    /// Starts control operation `what`, or says which one is under way.
    pub fn begin(self: &Arc<Self>, what: &'static str) -> Result<Busy, String> {
        let mut b = lock(&self.busy);
        if let Some(other) = *b {
            return Err(format!("{other} is under way"));
        }
        *b = Some(what);
        Ok(Busy(self.clone()))
    }

    pub fn view(&self) -> Arc<BlobView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn view_gen(&self) -> u64 {
        self.view_gen.load(Ordering::Acquire)
    }

    pub fn set_view(&self, v: Arc<BlobView>) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
        self.view_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// An I/O enters: counted before it looks at the map (see [`LvolCore::flip_epoch`]).
    /// `None` while frozen.
    pub fn enter(&self) -> Option<usize> {
        let e = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.inflight[e].fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            self.inflight[e].fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(e)
    }

    pub fn leave(&self, e: usize) {
        self.inflight[e].fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts a new epoch; returns the old one, which only drains from now on.
    pub fn flip_epoch(&self) -> usize {
        (self.epoch.fetch_add(1, Ordering::SeqCst) & 1) as usize
    }

    pub fn drained(&self, e: usize) -> bool {
        self.inflight[e].load(Ordering::SeqCst) == 0
    }

    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }
}

/// An lvol or a snapshot, as a bdev.
pub struct LvolBdev {
    info: BdevInfo,
    pub core: Arc<LvolCore>,
}

impl LvolBdev {
    pub fn new(core: Arc<LvolCore>, num_blocks: u64, alias: String) -> LvolBdev {
        let st = &core.store;
        let mut info = BdevInfo::new(
            core.uuid.to_string(),
            "Logical Volume",
            st.block_size,
            num_blocks,
            core.uuid,
            IoTypes::all(),
        );
        info.aliases = vec![alias];
        info.required_alignment = st.base.info().required_alignment;
        LvolBdev { info, core }
    }
}

impl Bdev for LvolBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "lvol"
    }

    fn open_channel(
        &self,
        _reactor: Option<&ReactorHandle>,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(channel::LvolChannel::new(self.core.clone())?))
    }

    /// Recreated by examine of the base, not by a call of its own (as SPDK's lvols).
    fn config(&self) -> Option<(&'static str, Value)> {
        None
    }

    fn driver_specific(&self) -> Value {
        let st = &self.core.store;
        let s = lock(&st.state);
        let view = self.core.view();
        let blob = s.blobs.get(&view.id);
        json!({"lvol": {
            "lvol_store_uuid": st.uuid,
            "base_bdev": st.base.name(),
            "thin_provision": blob.is_some_and(|b| b.is_thin()),
            "snapshot": blob.is_some_and(|b| b.is_snapshot()),
            "clone": blob.is_some_and(|b| b.parent().is_some()),
            "num_allocated_clusters": blob.map_or(0, |b| b.allocated()),
        }})
    }
}

/// Every volume store of this plexd.
#[derive(Default)]
pub struct LvolModule {
    stores: Mutex<Vec<Arc<StoreCore>>>,
}

impl LvolModule {
    pub fn all(&self) -> Vec<Arc<StoreCore>> {
        lock(&self.stores).clone()
    }

    pub fn add(&self, s: Arc<StoreCore>) {
        lock(&self.stores).push(s);
    }

    pub fn remove(&self, uuid: Uuid) {
        lock(&self.stores).retain(|s| s.uuid != uuid);
    }

    /// A store by name or UUID.
    pub fn find(&self, name: Option<&str>, uuid: Option<&str>) -> Option<Arc<StoreCore>> {
        self.all().into_iter().find(|s| {
            name.is_some_and(|n| *lock(&s.name) == n)
                || uuid.is_some_and(|u| s.uuid.to_string() == u)
        })
    }

    /// The examine step: a bdev that starts with a store's superblock is loaded as that store.
    pub fn examine(&self, app: &Arc<crate::app::App>, e: &Arc<crate::bdev::BdevEntry>) {
        if e.bdev().module() == "lvol" || e.claimed_by().is_some() {
            return;
        }
        let (app, e) = (app.clone(), e.clone());
        let load = async move {
            match store::load(&app, &e).await {
                Ok(Some(s)) => tracing::info!(
                    "lvol: store {} ({}) found on {}",
                    lock(&s.name),
                    s.uuid,
                    e.name()
                ),
                Ok(None) => {}
                Err(err) => tracing::error!("lvol: {}: store not loaded: {err}", e.name()),
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(load);
            }
            Err(_) => {
                let spawned = std::thread::Builder::new()
                    .name("lvol examine".into())
                    .spawn(
                        move || match tokio::runtime::Builder::new_current_thread().build() {
                            Ok(rt) => rt.block_on(load),
                            Err(err) => tracing::error!("lvol examine: no runtime: {err}"),
                        },
                    );
                if let Err(err) = spawned {
                    tracing::error!("lvol examine: no thread: {err}");
                }
            }
        }
    }
}
