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

// ---- create and load ------------------------------------------------------------------------

fn io_err(what: &str, s: IoStatus) -> String {
    format!("{what}: {s:?}")
}

/// Makes a new store on `base`: zeroes the data area unless told not to, writes an empty
/// checkpoint, then the superblocks (the superblock last: a crash before it leaves no store).
pub async fn create(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    name: &str,
    cluster_size: u64,
    clear: bool,
) -> Result<Arc<StoreCore>, String> {
    let bs = base.info().block_size;
    if !matches!(bs, 512 | 4096) {
        return Err(format!(
            "{}: block size {bs}; a store needs 512 or 4096",
            base.name()
        ));
    }
    if cluster_size < 64 << 10
        || !cluster_size.is_multiple_of(PAGE as u64)
        || cluster_size > 1 << 30
    {
        return Err(format!(
            "cluster size {cluster_size}: must be a multiple of 4 KiB from 64 KiB to 1 GiB"
        ));
    }
    let size = base.info().size_bytes();
    // Each cluster may cost 12 bytes in a checkpoint (an extent of its own), each blob ~320.
    let clusters_max = size / cluster_size;
    let ckpt_pages = (4096 + MAX_BLOBS * 320 + clusters_max * 12).div_ceil(PAGE as u64);
    let meta_pages = format::SUPER_SLOTS + JOURNAL_PAGES + 2 * ckpt_pages;
    let data_offset = (meta_pages * PAGE as u64).div_ceil(cluster_size) * cluster_size;
    let total = size.saturating_sub(data_offset) / cluster_size;
    if total == 0 || total > 1 << 26 {
        return Err(format!(
            "{}: {size} bytes make {total} clusters of {cluster_size} after {data_offset} bytes \
             of metadata; a store has 1 to 2^26 (use larger clusters)",
            base.name()
        ));
    }
    let uuid = Uuid::new_v4();
    let journal_page = format::SUPER_SLOTS;
    let ckpt0 = journal_page + JOURNAL_PAGES;
    let mut sb = Superblock {
        seq: 1,
        uuid,
        cluster_size,
        block_size: bs,
        data_offset,
        total_clusters: total,
        journal_page,
        journal_pages: JOURNAL_PAGES,
        ckpt_page: [ckpt0, ckpt0 + ckpt_pages],
        ckpt_pages,
        active: 0,
        ckpt_len: 0,
        ckpt_crc: 0,
        journal_seq: 1,
    };
    // Without clearing, no cluster is known to hold zeroes.
    let clean_from = if clear { 0 } else { total as u32 };
    let state = State::new(uuid, name.to_string(), total as u32, clean_from);
    let ckpt = state.to_checkpoint(sb.journal_seq).encode();
    sb.ckpt_len = ckpt.len() as u64;
    sb.ckpt_crc = crc32c::crc32c(&ckpt);
    let ckpt = pad(ckpt);

    base.claim(&format!("lvol store {name}"))
        .map_err(|e| e.to_string())?;
    let home = app.reactors.handles()[0].clone();
    let res = async {
        let page_lba = |p: u64| p * PAGE as u64 / bs as u64;
        // Old superblocks go first, on their own: a crash from here on leaves nothing that
        // looks like a store until the new superblock is written, last.
        let wipe = vec![
            BlockIo::write(base, 0, &[0u8; 2 * PAGE]).map_err(|s| io_err("superblock", s))?,
            BlockIo::flush(base),
        ];
        for r in blockio::run(&home, wipe).await {
            r.map_err(|s| io_err("wiping old superblocks", s))?;
        }
        let mut first = Vec::new();
        if clear {
            let mut lba = data_offset / bs as u64;
            let end = sb.end_bytes() / bs as u64;
            let step = (1u64 << 30) / bs as u64;
            while lba < end {
                let n = step.min(end - lba);
                first.push(BlockIo {
                    bdev: base.clone(),
                    io_type: IoType::WriteZeroes,
                    offset_blocks: lba,
                    nblocks: n,
                    data: None,
                });
                lba += n;
            }
        }
        // The journal ring is zeroed too, so no page of an older store can be replayed.
        first.push(BlockIo {
            bdev: base.clone(),
            io_type: IoType::WriteZeroes,
            offset_blocks: page_lba(journal_page),
            nblocks: page_lba(JOURNAL_PAGES),
            data: None,
        });
        first.push(
            BlockIo::write(base, page_lba(sb.ckpt_page[0]), &ckpt)
                .map_err(|s| io_err("checkpoint", s))?,
        );
        for r in blockio::run(&home, first).await {
            r.map_err(|s| io_err("clearing the store", s))?;
        }
        for r in blockio::run(&home, vec![BlockIo::flush(base)]).await {
            r.map_err(|s| io_err("flushing", s))?;
        }
        let slots = vec![
            // Slot seq % 2: each new superblock goes to the slot the current one is not in.
            BlockIo::write(base, page_lba(sb.seq % format::SUPER_SLOTS), &sb.encode())
                .map_err(|s| io_err("superblock", s))?,
        ];
        for r in blockio::run(&home, slots).await {
            r.map_err(|s| io_err("superblock", s))?;
        }
        for r in blockio::run(&home, vec![BlockIo::flush(base)]).await {
            r.map_err(|s| io_err("flushing", s))?;
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = res {
        base.release();
        return Err(e);
    }
    Ok(start(app, base, sb, state, home).await)
}

fn pad(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(b.len().div_ceil(PAGE) * PAGE, 0);
    b
}

/// What a base holds: `None` when it has no store; an error naming the damaged block when it
/// has one that cannot be loaded.
pub async fn read_store(
    home: &ReactorHandle,
    base: &Arc<BdevEntry>,
) -> Result<Option<(Superblock, State, Resume)>, String> {
    let bs = base.info().block_size as u64;
    if !matches!(bs, 512 | 4096) || base.info().size_bytes() < 2 * PAGE as u64 {
        return Ok(None);
    }
    let page_lba = |p: u64| p * PAGE as u64 / bs;
    let mut r = blockio::run(home, vec![BlockIo::read(base, 0, page_lba(2))]).await;
    let head = r
        .remove(0)
        .map_err(|s| io_err("reading the superblocks", s))?;
    let Some(sb) = image::pick_superblock(&head)? else {
        return Ok(None);
    };
    image::check_fits(&sb, bs, base.info().size_bytes(), base.name())?;
    let (ckpt_page, ckpt_pages) = image::checkpoint_pages(&sb);
    let reads = vec![
        BlockIo::read(base, page_lba(ckpt_page), page_lba(ckpt_pages)),
        BlockIo::read(base, page_lba(sb.journal_page), page_lba(sb.journal_pages)),
    ];
    let mut r = blockio::run(home, reads).await.into_iter();
    let ckpt = r
        .next()
        .unwrap_or(Err(IoStatus::Aborted))
        .map_err(|s| io_err("reading the checkpoint", s))?;
    let journal = r
        .next()
        .unwrap_or(Err(IoStatus::Aborted))
        .map_err(|s| io_err("reading the journal", s))?;
    let (state, resume) = image::replay(&sb, &ckpt, &journal)?;
    Ok(Some((sb, state, resume)))
}

/// Loads the store on `base` if it has one (the examine step).
pub async fn load(app: &Arc<App>, base: &Arc<BdevEntry>) -> Result<Option<Arc<StoreCore>>, String> {
    let home = app.reactors.handles()[0].clone();
    let Some((sb, state, resume)) = read_store(&home, base).await? else {
        return Ok(None);
    };
    if app.lvol.find(None, Some(&sb.uuid.to_string())).is_some() {
        return Err(format!(
            "store {} is loaded already (another copy?)",
            sb.uuid
        ));
    }
    base.claim(&format!("lvol store {}", state.name))
        .map_err(|e| e.to_string())?;
    let core = start_with_seq(app, base, sb, state, home, resume).await;
    Ok(Some(core))
}

async fn start(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    sb: Superblock,
    state: State,
    home: ReactorHandle,
) -> Arc<StoreCore> {
    let resume = Resume {
        seq: sb.journal_seq,
        prev: None,
        torn: false,
    };
    start_with_seq(app, base, sb, state, home, resume).await
}

async fn start_with_seq(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    sb: Superblock,
    state: State,
    home: ReactorHandle,
    resume: Resume,
) -> Arc<StoreCore> {
    let core = Arc::new(StoreCore {
        uuid: sb.uuid,
        name: Mutex::new(state.name.clone()),
        base: base.clone(),
        block_size: sb.block_size,
        cluster_size: sb.cluster_size,
        data_offset: sb.data_offset,
        total_clusters: sb.total_clusters as u32,
        home: home.clone(),
        state: Mutex::new(state),
        views: Mutex::new(HashMap::new()),
        lvols: Mutex::new(HashMap::new()),
        sb: Mutex::new(sb),
        requests: SegQueue::new(),
        failed: AtomicBool::new(false),
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let svc_core = core.clone();
    home.send(move |ctx| {
        let svc = Service::new(svc_core.clone(), resume);
        let name = format!("lvol store {}", lock(&svc_core.name));
        let mut svc = match svc {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{name}: {e}");
                let _ = tx.send(());
                return;
            }
        };
        let _ = tx.send(());
        ctx.add_poller(fn_poller(name, move |_| svc.poll()));
    });
    let _ = rx.await;
    app.lvol.add(core.clone());
    // Every lvol and snapshot becomes a bdev again.
    let blobs: Vec<(u32, Uuid, String, u64, bool)> = {
        let s = lock(&core.state);
        s.blobs
            .values()
            .map(|b| {
                (
                    b.rec.id,
                    b.rec.uuid,
                    b.rec.name.clone(),
                    b.rec.clusters,
                    b.is_read_only(),
                )
            })
            .collect()
    };
    for (id, uuid, name, clusters, ro) in blobs {
        if let Err(e) = register_lvol(app, &core, id, uuid, &name, clusters, ro) {
            tracing::error!("lvol {name}: not registered: {e}");
        }
    }
    core
}

/// Makes blob `id` a bdev (named by its UUID, aliased `store/name`, as SPDK's).
pub fn register_lvol(
    app: &App,
    core: &Arc<StoreCore>,
    id: u32,
    uuid: Uuid,
    name: &str,
    clusters: u64,
    read_only: bool,
) -> Result<Arc<LvolCore>, String> {
    let view = {
        let s = lock(&core.state);
        core.view_of(&s, id)
            .ok_or_else(|| format!("blob {id} does not exist"))?
    };
    let lvol = LvolCore::new(core.clone(), uuid, view, read_only);
    let alias = format!("{}/{name}", lock(&core.name));
    let bdev = LvolBdev::new(lvol.clone(), core.lvol_blocks(clusters), alias);
    app.bdevs
        .register(Arc::new(bdev))
        .map_err(|e| e.to_string())?;
    lock(&core.lvols).insert(id, lvol.clone());
    Ok(lvol)
}

// ---- the service ---------------------------------------------------------------------------

type Done = Box<dyn FnOnce(&mut Service, Result<(), String>) + Send>;

enum Meta {
    Journal,
    Checkpoint,
    Superblock,
    /// The flush after the checkpoint, before the superblock that points at it.
    CheckpointFlush,
    /// The flush after the superblock, before the journal ring is reused.
    SuperblockFlush,
    /// A fill of the cluster being allocated for `key` (a zeroing, or a copy's read or write).
    Fill {
        key: (u32, u32),
        read: bool,
    },
}

/// A journal batch goes: flush (when cluster fills precede it), write its pages, flush, and
/// only then apply and answer.
enum Stage {
    PreFlush,
    Write,
    PostFlush,
}

struct Batch {
    txns: Vec<(Vec<Op>, Done)>,
    /// The page writes (one, or two when the batch wraps around the ring).
    writes: Vec<(u64, u64, BufView)>,
    stage: Stage,
    left: u32,
    err: Option<IoStatus>,
}

struct Alloc {
    cluster: u32,
    tickets: Vec<Arc<Ticket>>,
}

struct Quarantine {
    lvol: Arc<LvolCore>,
    epoch: usize,
    clusters: Vec<u32>,
}

struct Quiesce {
    lvol: Arc<LvolCore>,
    epoch: usize,
    then: Box<dyn FnOnce(&mut Service) + Send>,
}

pub struct Service {
    pub core: Arc<StoreCore>,
    base: IoChannel,
    ops: HashMap<u64, Meta>,
    next_tag: u64,
    /// Transactions waiting for the journal, and what runs once each is on disk.
    queue: VecDeque<(Vec<Op>, Done)>,
    /// The batch being written.
    writing: Option<Batch>,
    /// Cluster fills completed since the last flush: the next journal write flushes first,
    /// so no mapping reaches the disk ahead of its cluster's data.
    fills_unflushed: bool,
    next_seq: u64,
    prev_crc: Option<u32>,
    ckpt: Option<(Superblock, u32)>,
    /// Clusters chosen or cooling off: not to be handed out.
    reserved: HashSet<u32>,
    /// Clusters from here up to the durable clean mark hold zeroes and are free.
    clean_next: u32,
    clean_asked: bool,
    awaiting_clean: Vec<(u32, u32, Arc<Ticket>)>,
    allocs: HashMap<(u32, u32), Alloc>,
    quarantine: Vec<Quarantine>,
    quiescing: Vec<Quiesce>,
    unsent: VecDeque<BdevIo>,
    stopped: bool,
}

impl Service {
    fn new(core: Arc<StoreCore>, resume: Resume) -> Result<Service, String> {
        let torn = resume.torn;
        let mut svc = Self::open(core, resume)?;
        if torn {
            tracing::warn!(
                "lvol store {}: the journal ends in a torn write; writing a checkpoint first",
                lock(&svc.core.name)
            );
            svc.start_checkpoint();
        }
        Ok(svc)
    }

    fn open(core: Arc<StoreCore>, resume: Resume) -> Result<Service, String> {
        let base = core
            .base
            .open_channel()
            .map_err(|e| format!("cannot open {}: {e}", core.base.name()))?;
        let clean = lock(&core.state).clean_from;
        Ok(Service {
            core,
            base,
            ops: HashMap::new(),
            next_tag: 1,
            queue: VecDeque::new(),
            writing: None,
            fills_unflushed: false,
            next_seq: resume.seq,
            prev_crc: resume.prev,
            ckpt: None,
            reserved: HashSet::new(),
            clean_next: clean,
            clean_asked: false,
            awaiting_clean: Vec::new(),
            allocs: HashMap::new(),
            quarantine: Vec::new(),
            quiescing: Vec::new(),
            unsent: VecDeque::new(),
            stopped: false,
        })
    }

    pub fn poll(&mut self) -> PollStatus {
        if self.stopped {
            return PollStatus::Done;
        }
        let mut busy = false;
        while let Some(r) = self.core.requests.pop() {
            busy = true;
            self.handle(r);
        }
        let mut back = Vec::new();
        if self.base.in_flight() > 0 {
            self.base.poll(&mut |c| back.push(c));
        }
        busy |= !back.is_empty();
        for c in back {
            self.io_done(c);
        }
        while let Some(io) = self.unsent.pop_front() {
            if let Err(io) = self.base.submit(io) {
                self.unsent.push_front(io);
                break;
            }
        }
        self.release_quarantine();
        self.check_quiescing();
        self.start_journal();
        if busy || !self.ops.is_empty() || !self.quiescing.is_empty() || !self.quarantine.is_empty()
        {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::Alloc {
                blob,
                index,
                ticket,
            } => self.alloc(blob, index, ticket),
            Request::Free {
                lvol,
                blob,
                index,
                count,
                ticket,
            } => self.free(lvol, blob, index, count, ticket),
            Request::Control(f) => f(self),
        }
    }

    fn submit(&mut self, io_type: IoType, lba: u64, nblocks: u64, buf: Option<BufView>, m: Meta) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.ops.insert(tag, m);
        let bufs = buf.map(|b| smallvec::smallvec![b]).unwrap_or_default();
        let io = BdevIo::new(io_type, lba, nblocks, bufs, tag);
        if let Err(io) = self.base.submit(io) {
            self.unsent.push_back(io);
        }
    }

    /// Queues a transaction; `done` runs once it is on disk and applied (or failed).
    pub fn commit(&mut self, ops: Vec<Op>, done: Done) {
        if self.core.failed.load(Ordering::Acquire) {
            done(self, Err(self.failed_msg()));
            return;
        }
        self.queue.push_back((ops, done));
    }

    fn failed_msg(&self) -> String {
        format!(
            "store {}: a metadata write failed; it takes no more changes",
            lock(&self.core.name)
        )
    }

    /// Commits `ops` once [`Service::validate`] finds they apply; `done` gets the refusal
    /// otherwise.
    pub fn commit_checked(&mut self, ops: Vec<Op>, done: Done) {
        match self.validate(&ops) {
            Ok(()) => self.commit(ops, done),
            Err(e) => done(self, Err(e)),
        }
    }

    /// Checks a transaction against the state as it is now, without changing it.
    pub fn validate(&self, ops: &[Op]) -> Result<(), String> {
        let mut s = lock(&self.core.state).clone();
        s.apply_txn(ops)
    }

    // ---- journal ---------------------------------------------------------------------------

    fn start_journal(&mut self) {
        if self.writing.is_some() || self.ckpt.is_some() || self.queue.is_empty() {
            return;
        }
        let (uuid, jp, jn, first) = {
            let sb = lock(&self.core.sb);
            (sb.uuid, sb.journal_page, sb.journal_pages, sb.journal_seq)
        };
        let mut stream = Vec::new();
        let mut batch = Vec::new();
        while let Some((ops, _)) = self.queue.front() {
            let mut t = Vec::new();
            format::encode_txn(ops, &mut t);
            let pages = (stream.len() + t.len()).div_ceil(format::JOURNAL_PAYLOAD);
            if !batch.is_empty() && pages > MAX_BATCH_PAGES {
                break;
            }
            stream.extend_from_slice(&t);
            batch.push(self.queue.pop_front().expect("front exists"));
        }
        let n = stream.len().div_ceil(format::JOURNAL_PAYLOAD) as u64;
        if self.next_seq + n - first > jn {
            // The ring would overwrite pages the current checkpoint still needs.
            for b in batch.into_iter().rev() {
                self.queue.push_front(b);
            }
            if n > jn / 2 {
                let (_, done) = self.queue.pop_front().expect("just pushed");
                done(self, Err("transaction larger than the journal".into()));
                return;
            }
            self.start_checkpoint();
            return;
        }
        let mut pages = Vec::with_capacity(n as usize * PAGE);
        for chunk in stream.chunks(format::JOURNAL_PAYLOAD) {
            let page =
                format::journal_page(&uuid, self.next_seq, self.prev_crc.unwrap_or(0), chunk);
            self.prev_crc = Some(format::sealed_crc(&page));
            pages.extend_from_slice(&page);
            self.next_seq += 1;
        }
        // One write, or two when the batch wraps around the end of the ring.
        let start = (self.next_seq - n) % jn;
        let first_len = (jn - start).min(n) as usize * PAGE;
        let mut writes = Vec::new();
        let bs = self.core.block_size as u64;
        let page_lba = move |p: u64| p * PAGE as u64 / bs;
        for (at, bytes) in [(start, &pages[..first_len]), (0, &pages[first_len..])] {
            if bytes.is_empty() {
                continue;
            }
            let Ok(mut buf) = BufView::new(bytes.len()) else {
                self.fail("no memory for a journal write");
                return;
            };
            if let Some(b) = buf.bytes_mut() {
                b.copy_from_slice(bytes);
            }
            let lba = page_lba(jp + at);
            let nb = page_lba((bytes.len() / PAGE) as u64);
            writes.push((lba, nb, buf));
        }
        let mut b = Batch {
            txns: batch,
            writes,
            stage: Stage::PreFlush,
            left: 0,
            err: None,
        };
        if std::mem::take(&mut self.fills_unflushed) {
            b.left = 1;
            self.writing = Some(b);
            self.submit(IoType::Flush, 0, 0, None, Meta::Journal);
        } else {
            self.writing = Some(b);
            self.write_batch();
        }
    }

    fn write_batch(&mut self) {
        let Some(b) = self.writing.as_mut() else {
            return;
        };
        b.stage = Stage::Write;
        let writes = std::mem::take(&mut b.writes);
        b.left = writes.len() as u32;
        for (lba, nb, buf) in writes {
            self.submit(IoType::Write, lba, nb, Some(buf), Meta::Journal);
        }
    }

    fn journal_done(&mut self, status: IoStatus) {
        let Some(b) = self.writing.as_mut() else {
            return;
        };
        b.left -= 1;
        if !status.is_ok() {
            b.err = Some(status);
        }
        if b.left > 0 {
            return;
        }
        match (&b.stage, b.err) {
            (Stage::PreFlush, None) => return self.write_batch(),
            (Stage::Write, None) => {
                b.stage = Stage::PostFlush;
                b.left = 1;
                self.submit(IoType::Flush, 0, 0, None, Meta::Journal);
                return;
            }
            _ => {}
        }
        let b = self.writing.take().expect("checked");
        let (batch, err) = (b.txns, b.err);
        if let Some(s) = err {
            self.fail(&format!("journal write failed: {s:?}"));
            for (_, done) in batch {
                done(self, Err(format!("journal write failed: {s:?}")));
            }
            return;
        }
        for (ops, done) in batch {
            let r = lock(&self.core.state).apply_txn(&ops);
            if let Err(e) = &r {
                // Validated before it was queued: this is a bug, and the disk now holds a
                // transaction the next load refuses. Stop changing anything.
                tracing::error!(
                    "lvol store {}: journaled transaction does not apply: {e}",
                    lock(&self.core.name)
                );
                self.core.failed.store(true, Ordering::Release);
            }
            done(self, r);
        }
    }

    fn start_checkpoint(&mut self) {
        let mut sb = lock(&self.core.sb).clone();
        let bytes = lock(&self.core.state).to_checkpoint(self.next_seq).encode();
        sb.ckpt_len = bytes.len() as u64;
        sb.ckpt_crc = crc32c::crc32c(&bytes);
        let bytes = pad(bytes);
        if bytes.len() as u64 > sb.ckpt_pages * PAGE as u64 {
            self.fail("checkpoint larger than its area (too many lvols?)");
            return;
        }
        let area = 1 - sb.active;
        sb.active = area;
        sb.seq += 1;
        sb.journal_seq = self.next_seq;
        let Ok(mut buf) = BufView::new(bytes.len()) else {
            self.fail("no memory for a checkpoint");
            return;
        };
        if let Some(b) = buf.bytes_mut() {
            b.copy_from_slice(&bytes);
        }
        let bs = self.core.block_size as u64;
        let lba = sb.ckpt_page[area as usize] * PAGE as u64 / bs;
        let nb = bytes.len() as u64 / bs;
        self.submit(IoType::Write, lba, nb, Some(buf), Meta::Checkpoint);
        self.ckpt = Some((sb, 0));
    }

    fn checkpoint_written(&mut self, status: IoStatus) {
        if !status.is_ok() {
            self.fail(&format!("checkpoint write failed: {status:?}"));
            return;
        }
        self.submit(IoType::Flush, 0, 0, None, Meta::CheckpointFlush);
    }

    fn checkpoint_flushed(&mut self, status: IoStatus) {
        let Some((sb, _)) = self.ckpt.clone() else {
            return;
        };
        if !status.is_ok() {
            self.fail(&format!("flush after the checkpoint failed: {status:?}"));
            return;
        }
        let page = sb.encode();
        let slot = sb.seq % format::SUPER_SLOTS;
        let Ok(mut buf) = BufView::new(PAGE) else {
            self.fail("no memory for a superblock");
            return;
        };
        if let Some(b) = buf.bytes_mut() {
            b.copy_from_slice(&page);
        }
        let bs = self.core.block_size as u64;
        self.submit(
            IoType::Write,
            slot * PAGE as u64 / bs,
            PAGE as u64 / bs,
            Some(buf),
            Meta::Superblock,
        );
    }

    fn superblock_written(&mut self, status: IoStatus) {
        if !status.is_ok() {
            self.fail(&format!("superblock write failed: {status:?}"));
            return;
        }
        self.submit(IoType::Flush, 0, 0, None, Meta::SuperblockFlush);
    }

    fn superblock_flushed(&mut self, status: IoStatus) {
        let Some((sb, _)) = self.ckpt.take() else {
            return;
        };
        if !status.is_ok() {
            self.fail(&format!("flush after the superblock failed: {status:?}"));
            return;
        }
        // The journal starts afresh after the checkpoint: the first page chains to nothing.
        self.prev_crc = None;
        *lock(&self.core.sb) = sb;
    }

    fn fail(&mut self, why: &str) {
        tracing::error!("lvol store {}: {why}", lock(&self.core.name));
        self.core.failed.store(true, Ordering::Release);
        let queued: Vec<_> = self.queue.drain(..).collect();
        for (_, done) in queued {
            done(self, Err(why.to_string()));
        }
        for (_, a) in std::mem::take(&mut self.allocs) {
            for t in a.tickets {
                t.set(Ticket::FAILED);
            }
        }
        for (_, _, t) in std::mem::take(&mut self.awaiting_clean) {
            t.set(Ticket::FAILED);
        }
    }

    // ---- clusters --------------------------------------------------------------------------

    fn alloc(&mut self, blob: u32, index: u32, ticket: Arc<Ticket>) {
        if self.core.failed.load(Ordering::Acquire) {
            ticket.set(Ticket::FAILED);
            return;
        }
        if let Some(a) = self.allocs.get_mut(&(blob, index)) {
            a.tickets.push(ticket);
            return;
        }
        let view = {
            let s = lock(&self.core.state);
            let known = s
                .blobs
                .get(&blob)
                .filter(|b| (index as u64) < b.rec.clusters)
                .map(|b| b.get(index));
            match known {
                Some(UNALLOCATED) => self.core.view_of(&s, blob),
                Some(_) => {
                    // Allocated meanwhile (a request that crossed the publication).
                    ticket.set(Ticket::DONE);
                    return;
                }
                _ => None,
            }
        };
        let Some(view) = view else {
            ticket.set(Ticket::FAILED);
            return;
        };
        let src = view.parent_has(index as u64);
        let state_clean = {
            let s = lock(&self.core.state);
            while self.clean_next < s.clean_from
                && (s.is_used(self.clean_next) || self.reserved.contains(&self.clean_next))
            {
                self.clean_next += 1;
            }
            s.clean_from
        };
        let (cluster, clean) = if self.clean_next < state_clean {
            self.clean_next += 1;
            (self.clean_next - 1, true)
        } else if state_clean < self.core.total_clusters {
            self.awaiting_clean.push((blob, index, ticket));
            self.advance_clean_mark(state_clean);
            return;
        } else {
            let reserved = &self.reserved;
            let found = lock(&self.core.state).find_free(0, &|c| reserved.contains(&c));
            match found {
                Some(c) => (c, false),
                None => {
                    ticket.set(Ticket::NO_SPACE);
                    return;
                }
            }
        };
        self.reserved.insert(cluster);
        self.allocs.insert(
            (blob, index),
            Alloc {
                cluster,
                tickets: vec![ticket],
            },
        );
        let key = (blob, index);
        let cb = self.core.cluster_blocks();
        match src {
            Some(p) => {
                let Ok(buf) = BufView::new(self.core.cluster_size as usize) else {
                    self.alloc_failed(key, Ticket::FAILED);
                    return;
                };
                let lba = self.core.cluster_lba(p);
                self.submit(
                    IoType::Read,
                    lba,
                    cb,
                    Some(buf),
                    Meta::Fill { key, read: true },
                );
            }
            None if !clean => {
                let lba = self.core.cluster_lba(cluster);
                self.submit(
                    IoType::WriteZeroes,
                    lba,
                    cb,
                    None,
                    Meta::Fill { key, read: false },
                );
            }
            None => self.journal_alloc(key),
        }
    }

    fn advance_clean_mark(&mut self, from: u32) {
        if self.clean_asked {
            return;
        }
        self.clean_asked = true;
        let to = from
            .saturating_add(CLEAN_STEP)
            .min(self.core.total_clusters);
        self.commit(
            vec![Op::CleanFrom { cluster: to }],
            Box::new(move |svc, r| {
                svc.clean_asked = false;
                let waiting = std::mem::take(&mut svc.awaiting_clean);
                match r {
                    Ok(()) => {
                        // [from, to) are ours to hand out as zeroes.
                        svc.clean_next = from;
                        for (b, i, t) in waiting {
                            svc.alloc(b, i, t);
                        }
                    }
                    Err(_) => waiting
                        .into_iter()
                        .for_each(|(_, _, t)| t.set(Ticket::FAILED)),
                }
            }),
        );
    }

    fn fill_done(&mut self, key: (u32, u32), read: bool, c: IoCompletion) {
        if !c.status.is_ok() {
            tracing::error!(
                "lvol store {}: filling a cluster for blob {} index {} failed: {:?}",
                lock(&self.core.name),
                key.0,
                key.1,
                c.status
            );
            self.alloc_failed(key, Ticket::FAILED);
            return;
        }
        if !read {
            self.fills_unflushed = true;
        }
        if read {
            let Some(a) = self.allocs.get(&key) else {
                return;
            };
            let buf = c.bufs.into_iter().next();
            let lba = self.core.cluster_lba(a.cluster);
            let cb = self.core.cluster_blocks();
            self.submit(IoType::Write, lba, cb, buf, Meta::Fill { key, read: false });
            return;
        }
        self.journal_alloc(key);
    }

    fn journal_alloc(&mut self, key: (u32, u32)) {
        let Some(a) = self.allocs.get(&key) else {
            return;
        };
        let op = Op::Alloc {
            blob: key.0,
            index: key.1,
            cluster: a.cluster,
            count: 1,
        };
        self.commit(
            vec![op],
            Box::new(move |svc, r| {
                let Some(a) = svc.allocs.remove(&key) else {
                    return;
                };
                svc.reserved.remove(&a.cluster);
                let v = match r {
                    Ok(()) => {
                        if let Some(v) = lock(&svc.core.views).get(&key.0) {
                            if let Some(m) = v.map.get(key.1 as usize) {
                                m.store(a.cluster, Ordering::Release);
                            }
                        }
                        Ticket::DONE
                    }
                    Err(_) => Ticket::FAILED,
                };
                a.tickets.iter().for_each(|t| t.set(v));
            }),
        );
    }

    fn alloc_failed(&mut self, key: (u32, u32), why: u8) {
        if let Some(a) = self.allocs.remove(&key) {
            self.reserved.remove(&a.cluster);
            a.tickets.iter().for_each(|t| t.set(why));
        }
    }

    fn free(
        &mut self,
        lvol: Arc<LvolCore>,
        blob: u32,
        index: u32,
        count: u32,
        ticket: Arc<Ticket>,
    ) {
        let clusters: Vec<u32> = {
            let s = lock(&self.core.state);
            s.blobs
                .get(&blob)
                .map(|b| {
                    let end = index.saturating_add(count);
                    b.map.range(index..end).map(|(_, &c)| c).collect()
                })
                .unwrap_or_default()
        };
        if clusters.is_empty() {
            ticket.set(Ticket::DONE);
            return;
        }
        self.commit(
            vec![Op::Free { blob, index, count }],
            Box::new(move |svc, r| {
                if r.is_err() {
                    ticket.set(Ticket::FAILED);
                    return;
                }
                if let Some(v) = lock(&svc.core.views).get(&blob) {
                    for i in index..index + count {
                        if let Some(m) = v.map.get(i as usize) {
                            m.store(UNALLOCATED, Ordering::Release);
                        }
                    }
                }
                // Writes that looked the clusters up before this may still be landing.
                svc.reserved.extend(clusters.iter().copied());
                let epoch = lvol.flip_epoch();
                svc.quarantine.push(Quarantine {
                    lvol,
                    epoch,
                    clusters,
                });
                ticket.set(Ticket::DONE);
            }),
        );
    }

    fn release_quarantine(&mut self) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quarantine)
            .into_iter()
            .partition(|q| q.lvol.drained(q.epoch));
        self.quarantine = keep;
        for q in done {
            for c in q.clusters {
                self.reserved.remove(&c);
            }
        }
    }

    /// Freezes `lvol`'s I/O, waits for what is in flight, then runs `then` (which unfreezes).
    pub fn quiesce(&mut self, lvol: Arc<LvolCore>, then: Box<dyn FnOnce(&mut Service) + Send>) {
        lvol.freeze(true);
        let epoch = lvol.flip_epoch();
        self.quiescing.push(Quiesce { lvol, epoch, then });
    }

    fn check_quiescing(&mut self) {
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quiescing)
            .into_iter()
            .partition(|q| q.lvol.drained(q.epoch));
        self.quiescing = keep;
        for q in ready {
            (q.then)(self);
        }
    }

    fn io_done(&mut self, c: IoCompletion) {
        let Some(m) = self.ops.remove(&c.tag) else {
            return;
        };
        match m {
            Meta::Journal => self.journal_done(c.status),
            Meta::Checkpoint => self.checkpoint_written(c.status),
            Meta::Superblock => self.superblock_written(c.status),
            Meta::CheckpointFlush => self.checkpoint_flushed(c.status),
            Meta::SuperblockFlush => self.superblock_flushed(c.status),
            Meta::Fill { key, read } => self.fill_done(key, read, c),
        }
    }

    /// Stops the poller once nothing is in flight (store deleted or unloaded).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    pub fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.queue.is_empty() && self.writing.is_none()
    }
}
