//! A volume store at run time.
//!
//! Metadata changes go through one service per store, a poller on the store's home reactor.
//! It writes the journal one batch at a time (a torn batch was never acknowledged, and replay
//! stops at it), applies a transaction to the in-memory [`State`] only once its pages are on
//! disk, and then runs what waited for it: publishing a new cluster to the data path, an RPC's
//! answer. When the journal ring would wrap onto pages not yet covered by a checkpoint, it
//! writes the whole state to the idle checkpoint area and then the older superblock slot.
//!
//! A cluster is handed out in three steps: choose it (a clean one, past the clean mark, needs
//! no fill); fill it (zeroes, or a copy of the parent's cluster for a clone); journal the
//! mapping. Only then do the writes that wanted it go on. Clusters freed by an unmap wait until
//! every I/O that might still be using them has finished before they can be handed out again.

use super::format::{self, Op, Superblock, PAGE};
use super::image::{self, Resume};
use super::state::{State, UNALLOCATED};
use super::{lock, BlobView, LvolBdev, LvolCore};
use crate::app::App;
use crate::bdev::mirror::blockio::{self, BlockIo};
use crate::bdev::{BdevEntry, BdevIo, BufView, IoChannel, IoCompletion, IoStatus, IoType};
use crate::reactor::{fn_poller, PollStatus, ReactorHandle};
use crossbeam_queue::SegQueue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

mod open;
mod service;

pub use open::{create, load, read_store, register_lvol};
pub use service::Service;

pub const DEFAULT_CLUSTER_SIZE: u64 = 4 << 20;
/// Journal ring size, pages.
const JOURNAL_PAGES: u64 = 1024;
/// Most blobs a store holds (the checkpoint area is sized for them).
pub const MAX_BLOBS: u64 = 4096;
/// Clean clusters claimed per journal write of the clean mark.
const CLEAN_STEP: u32 = 256;
/// Most journal pages one write carries.
const MAX_BATCH_PAGES: usize = 64;

/// How a request from the data path ended.
pub struct Ticket(AtomicU8);

impl Ticket {
    pub const PENDING: u8 = 0;
    pub const DONE: u8 = 1;
    pub const NO_SPACE: u8 = 2;
    pub const FAILED: u8 = 3;

    pub fn new() -> Arc<Ticket> {
        Arc::new(Ticket(AtomicU8::new(Self::PENDING)))
    }
    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release)
    }
}

/// Work for the service.
pub enum Request {
    /// A cluster for index `index` of blob `blob` (a write found none).
    Alloc {
        blob: u32,
        index: u32,
        ticket: Arc<Ticket>,
    },
    /// Give back the clusters of whole-cluster indexes (an unmap).
    Free {
        lvol: Arc<LvolCore>,
        blob: u32,
        index: u32,
        count: u32,
        ticket: Arc<Ticket>,
    },
    Control(Box<dyn FnOnce(&mut Service) + Send>),
}

/// A store's geometry and shared state.
pub struct StoreCore {
    pub uuid: Uuid,
    pub name: Mutex<String>,
    pub base: Arc<BdevEntry>,
    pub block_size: u32,
    pub cluster_size: u64,
    pub data_offset: u64,
    pub total_clusters: u32,
    pub home: ReactorHandle,
    /// The metadata as on disk (the service changes it; others read).
    pub state: Mutex<State>,
    pub views: Mutex<HashMap<u32, Arc<BlobView>>>,
    /// Open lvols by blob id.
    pub lvols: Mutex<HashMap<u32, Arc<LvolCore>>>,
    pub sb: Mutex<Superblock>,
    requests: SegQueue<Request>,
    /// A metadata write failed: the store takes no more changes.
    pub failed: AtomicBool,
}

impl StoreCore {
    pub fn cluster_blocks(&self) -> u64 {
        self.cluster_size / self.block_size as u64
    }

    /// The base block where cluster `c` starts.
    pub fn cluster_lba(&self, c: u32) -> u64 {
        (self.data_offset + c as u64 * self.cluster_size) / self.block_size as u64
    }

    pub fn request(&self, r: Request) {
        self.requests.push(r);
        self.home.send(|_| {});
    }

    /// Runs `f` on the service and awaits its answer.
    pub async fn on_service<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Service, tokio::sync::oneshot::Sender<R>) + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.request(Request::Control(Box::new(move |s: &mut Service| f(s, tx))));
        rx.await
            .map_err(|_| format!("store {}: its service stopped", lock(&self.name)))
    }

    /// The view of blob `id`, made (with its parents') from the state when first asked.
    pub fn view_of(&self, s: &State, id: u32) -> Option<Arc<BlobView>> {
        let mut views = lock(&self.views);
        Self::view_in(&mut views, s, id, 0)
    }

    fn view_in(
        views: &mut HashMap<u32, Arc<BlobView>>,
        s: &State,
        id: u32,
        depth: u32,
    ) -> Option<Arc<BlobView>> {
        if let Some(v) = views.get(&id) {
            return Some(v.clone());
        }
        let b = s.blobs.get(&id)?;
        let parent = match b.parent() {
            Some(p) if depth < 256 => Some(Self::view_in(views, s, p, depth + 1)?),
            _ => None,
        };
        let v = BlobView::new(id, &b.dense(), parent);
        views.insert(id, v.clone());
        Some(v)
    }

    /// Gives `lvol` (blob `id`) a new view of its map and its parent as the state has them
    /// now (after a resize, inflate or decouple).
    pub fn republish(&self, lvol: &LvolCore, id: u32) {
        let st = lock(&self.state);
        if let Some(b) = st.blobs.get(&id) {
            let parent = b.parent().and_then(|p| self.view_of(&st, p));
            let v = BlobView::new(id, &b.dense(), parent);
            lock(&self.views).insert(id, v.clone());
            lvol.set_view(v);
        }
    }

    /// Base blocks one lvol block is.
    pub fn lvol_blocks(&self, clusters: u64) -> u64 {
        clusters * self.cluster_blocks()
    }
}

/// `b` zero-padded to whole metadata pages.
fn pad(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(b.len().div_ceil(PAGE) * PAGE, 0);
    b
}
