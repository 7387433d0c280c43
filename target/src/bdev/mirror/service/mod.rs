//! The mirror's service: one poller on its home reactor, the only writer of metadata.
//!
//! - **Faults**: a channel takes a failing plex out of the data path at once and sends a
//!   ticket; the service bumps the generation and writes the superblocks of the plexes still
//!   taking writes, then marks the ticket recorded, which releases the I/O that waited for it.
//! - **Bitmap**: a write to a clean region asks for its chunk; the service writes the chunk
//!   (a snapshot of the dirty bits) to every plex taking writes, at most one write per chunk at
//!   a time, so chunks on disk only ever gain bits between clearings; then the bits are on disk.
//! - **Clearing**: every `clear_interval_ms` (5 s), when every plex is in sync, regions with no write in flight
//!   are cleared (see `intent.rs` for the ordering) and their chunks rewritten.
//! - **Resync**: one plex at a time, region by region from a serving plex (local preferred),
//!   each region locked against writes while it is copied; rate-limited; progress is written to
//!   the superblocks every few seconds so a restart resumes where it stood.
//! - **Probing**: a faulted plex whose bdev is present is read every few seconds; once its
//!   superblock reads back as this mirror's, it is out of sync and resync takes it.

use super::plex::{Behind, Condition, FaultReason, Plex, ResyncProgress, Role};
use super::superblock::{self, Layout, PlexRecord, Slot, Superblock};
use super::{lock, Core, Request};
use crate::bdev::{BdevIo, BufView, IoChannel, IoCompletion};
use crate::reactor::{now_ns, PollStatus};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

mod metadata;
mod resync;

const SEC: u64 = 1_000_000_000;

/// Where an operator request's answer goes.
type Reply<T> = tokio::sync::oneshot::Sender<T>;
type RemoveReply = Reply<Result<(), String>>;

/// A growth waiting for its headers: the layout they will record, and who to tell.
struct Growth {
    layout: Layout,
    reply: RemoveReply,
}
/// How often a faulted plex with a bdev is read to see whether it is usable again.
const PROBE_EVERY_NS: u64 = 2 * SEC;
/// How often, with no resync running, a plex to resync is looked for.
const PICK_EVERY_NS: u64 = SEC / 10;
/// How often resync progress is written to the superblocks.
const PROGRESS_EVERY_NS: u64 = 2 * SEC;
/// The largest piece resync copies at once (a region may be larger).
const COPY_PIECE: u64 = 1 << 20;

/// What a metadata or resync I/O was for.
enum Op {
    Header { plex: usize },
    Chunk { chunk: u32, plex: usize },
    ProbeHeader { plex: usize, slot: Slot },
    CopyRead { region: u64 },
    CopyWrite { region: u64 },
    Wipe { plex: usize },
}

struct ChunkWrite {
    words: Vec<u64>,
    first_region: u64,
    pending: u32,
}

#[derive(Default)]
struct HeaderRound {
    busy: bool,
    wanted: bool,
    /// Tickets this round (when done) records, and the highest asked for so far.
    ticket_in_flight: u64,
    ticket_wanted: u64,
    pending: u32,
    serving_ok: u32,
    /// Set on the next round: the mirror is being stopped cleanly.
    clean: bool,
    /// Told when a round with `clean` is on disk.
    on_clean: Option<Reply<()>>,
    /// Told when the next round to start is done (true if a serving plex took it).
    next_waiters: Vec<Reply<bool>>,
    waiters: Vec<Reply<bool>>,
    /// A growth asked for; the next round records its layout.
    growth: Option<Growth>,
    /// The growth the round in flight records.
    growth_in_flight: Option<Growth>,
}

struct Probe {
    pending: u32,
    slots: [Option<Vec<u8>>; 2],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CopyStep {
    /// Waiting for writes in the region to drain.
    Locking,
    Reading,
    Writing,
}

/// One region being copied.
struct Copy {
    region: u64,
    /// Blocks of it copied so far.
    done: u64,
    step: CopyStep,
}

/// Regions copied at once: reads from the source overlap writes to the target.
const COPY_WINDOW: usize = 4;

struct Resync {
    target: usize,
    source: usize,
    regions: Vec<u64>,
    /// Index in `regions` of the next region to start.
    next: usize,
    /// Regions finished.
    finished: usize,
    active: Vec<Copy>,
    started_ns: u64,
    bytes: u64,
    last_progress_ns: u64,
}

impl Resync {
    /// The region a restart resumes at: every region before it is copied.
    fn resume_point(&self, regions: u64) -> u64 {
        let started = self.active.iter().map(|c| c.region).min();
        started
            .or_else(|| self.regions.get(self.next).copied())
            .unwrap_or(regions)
    }
}

pub struct Service {
    core: Arc<Core>,
    legs: Vec<Option<IoChannel>>,
    ops: HashMap<u64, Op>,
    next_tag: u64,
    seq: u64,
    chunks_wanted: BTreeSet<u32>,
    chunks_busy: HashMap<u32, ChunkWrite>,
    header: HeaderRound,
    resync: Option<Resync>,
    probes: HashMap<usize, Probe>,
    /// Plexes being erased on removal: writes left, and who to tell.
    wipes: HashMap<usize, (u32, Option<RemoveReply>)>,
    last_clear_ns: u64,
    last_probe_ns: u64,
    /// When a plex to resync was last looked for (not on every pass: it takes locks).
    last_pick_ns: u64,
    /// The plexes as of `plexes_seen`, and the bdev change count each leg was opened at.
    plexes: Vec<Arc<Plex>>,
    plexes_seen: u64,
    leg_seen: Vec<Option<u64>>,
    stopped: bool,
}

impl Service {
    pub fn new(core: Arc<Core>, seq: u64) -> Service {
        Service {
            core,
            legs: Vec::new(),
            ops: HashMap::new(),
            next_tag: 1,
            seq,
            chunks_wanted: BTreeSet::new(),
            chunks_busy: HashMap::new(),
            header: HeaderRound::default(),
            resync: None,
            probes: HashMap::new(),
            wipes: HashMap::new(),
            last_clear_ns: now_ns(),
            last_probe_ns: now_ns(),
            last_pick_ns: 0,
            plexes: Vec::new(),
            plexes_seen: u64::MAX,
            leg_seen: Vec::new(),
            stopped: false,
        }
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// One pass; the poller's body.
    pub fn poll(&mut self) -> PollStatus {
        if self.stopped {
            return PollStatus::Done;
        }
        let mut busy = false;
        while let Some(r) = self.core.requests.pop() {
            busy = true;
            self.handle(r);
            if self.stopped {
                // Stopping is final: a fault queued behind the stop (a plex detached right
                // after the delete) must not start a header round on the plexes let go.
                return PollStatus::Done;
            }
        }
        self.sync_legs();
        let mut back = Vec::new();
        for (i, leg) in self.legs.iter_mut().enumerate() {
            if let Some(ch) = leg.as_mut().filter(|c| c.in_flight() > 0) {
                ch.poll(&mut |c| back.push((i, c)));
            }
        }
        busy |= !back.is_empty();
        for (i, c) in back {
            self.io_done(i, c);
        }
        self.start_chunks();
        self.start_header();
        let now = now_ns();
        let clear_every = self
            .core
            .clear_interval_ms
            .load(Ordering::Relaxed)
            .saturating_mul(1_000_000);
        if now - self.last_clear_ns >= clear_every {
            self.last_clear_ns = now;
            self.clear_idle_regions();
        }
        if now - self.last_probe_ns >= PROBE_EVERY_NS {
            self.last_probe_ns = now;
            self.probe_faulted();
        }
        busy |= self.step_resync();
        self.core
            .bitmap_writes_pending
            .store(self.bitmap_chunks_unwritten(), Ordering::SeqCst);
        if busy || !self.ops.is_empty() || self.resync.is_some() {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Opens a channel to each plex that has a bdev; drops stale ones. Runs on every pass, so
    /// it reads atomics only, and takes the plex list and a plex's lock only when they changed.
    fn sync_legs(&mut self) {
        let v = self.core.plexes_version();
        if v != self.plexes_seen {
            self.plexes_seen = v;
            self.plexes = self.core.plexes();
            self.legs.resize_with(self.plexes.len(), || None);
            self.leg_seen.resize(self.plexes.len(), None);
        }
        for ((leg, seen), p) in self
            .legs
            .iter_mut()
            .zip(&mut self.leg_seen)
            .zip(&self.plexes)
        {
            let changes = p.bdev_changes();
            let stale = leg
                .as_ref()
                .is_some_and(|c| c.entry().is_removed() || *seen != Some(changes));
            if stale && leg.as_ref().is_some_and(|c| c.in_flight() == 0) {
                *leg = None;
            }
            if leg.is_none() && *seen != Some(changes) {
                *seen = Some(changes);
                *leg = p
                    .bdev()
                    .filter(|b| !b.is_removed())
                    .and_then(|b| b.open_channel().ok());
            }
        }
    }

    fn submit(&mut self, plex: usize, io: BdevIo, op: Op) -> bool {
        let tag = self.next_tag;
        self.next_tag += 1;
        let io = BdevIo::new(io.io_type, io.offset_blocks, io.num_blocks, io.bufs, tag);
        let Some(ch) = self.legs.get_mut(plex).and_then(Option::as_mut) else {
            return false;
        };
        match ch.submit(io) {
            Ok(()) => {
                self.ops.insert(tag, op);
                true
            }
            Err(_) => false,
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::Fault { plex, why, ticket } => self.fault(plex, why, ticket),
            Request::Persist { chunk } => {
                self.chunks_wanted.insert(chunk);
            }
            Request::Returned { plex } => self.start_probe(plex),
            Request::Control(f) => f(self),
        }
    }

    /// Takes plex `i` out (if it is not already) and asks for a header round.
    pub fn fault(&mut self, i: usize, why: FaultReason, ticket: u64) {
        let core = self.core.clone();
        let Some(p) = core.plex(i) else { return };
        p.set_role(Role::Idle);
        let removing = why == FaultReason::Removing;
        let already = matches!(
            p.condition(),
            Condition::Faulted { .. } | Condition::OutOfSync { .. }
        );
        if !already || removing {
            tracing::warn!(
                "mirror {}: plex {} ({}) faulted: {why}",
                core.name,
                p.uuid,
                p.location
            );
            let since = p
                .condition()
                .out_of_sync_since()
                .unwrap_or_else(SystemTime::now);
            p.set_condition(Condition::Faulted { since, why });
            core.generation.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(rs) = &self.resync {
            if rs.target == i || rs.source == i {
                self.abort_resync("a plex it used faulted");
            }
        }
        if !core.plexes().iter().any(|p| p.role() == Role::Serving)
            && !core.failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                "mirror {}: no plex in sync is left; I/O fails until one returns",
                core.name
            );
        }
        self.header.wanted = true;
        self.header.ticket_wanted = self.header.ticket_wanted.max(ticket);
    }

    // ---- completions -----------------------------------------------------------------------

    fn io_done(&mut self, plex: usize, c: IoCompletion) {
        let Some(op) = self.ops.remove(&c.tag) else {
            return;
        };
        let ok = c.status.is_ok();
        if c.status.is_reservation_conflict() {
            if let Some(p) = self.core.plex(plex) {
                self.core.mark_fenced(&p.location);
            }
        }
        match op {
            Op::Header { plex } => {
                let serving = self
                    .core
                    .plex(plex)
                    .is_some_and(|p| p.role() == Role::Serving);
                if ok && serving {
                    self.header.serving_ok += 1;
                } else if !ok {
                    let t = self
                        .core
                        .fault(plex, FaultReason::MetadataWrite { status: c.status });
                    self.header.ticket_wanted = self.header.ticket_wanted.max(t);
                }
                self.header.pending -= 1;
                if self.header.pending == 0 {
                    self.header_round_done();
                }
            }
            Op::Chunk { chunk, plex } => {
                if !ok {
                    self.core
                        .fault(plex, FaultReason::MetadataWrite { status: c.status });
                }
                if let Some(cw) = self.chunks_busy.get_mut(&chunk) {
                    cw.pending -= 1;
                    if cw.pending == 0 {
                        let cw = self.chunks_busy.remove(&chunk).expect("present");
                        // A failed plex is out before the bits count as on disk: the I/O
                        // waiting for them then waits for that fault too (channel tickets).
                        self.chunk_on_disk(&cw);
                    }
                }
            }
            Op::ProbeHeader { plex, slot } => self.probe_done(plex, slot, c),
            Op::CopyRead { region } | Op::CopyWrite { region } => self.copy_done(plex, region, c),
            Op::Wipe { plex } => {
                if let Some((pending, _)) = self.wipes.get_mut(&plex) {
                    *pending -= 1;
                    if *pending == 0 {
                        let (_, tx) = self.wipes.remove(&plex).expect("present");
                        self.finish_removal(plex, tx, ok);
                    }
                }
            }
        }
    }

    // ---- faulted plexes coming back ----------------------------------------------------------

    fn probe_faulted(&mut self) {
        for (i, p) in self.core.plexes().iter().enumerate() {
            let faulted = matches!(&p.condition(), Condition::Faulted { why, .. } if *why != FaultReason::Removing);
            if faulted && p.is_up() && !self.probes.contains_key(&i) {
                self.start_probe(i);
            }
        }
    }

    fn start_probe(&mut self, i: usize) {
        self.sync_legs();
        let mut pending = 0;
        for slot in [Slot::A, Slot::B] {
            let r = self.core.layout().slot_range(slot);
            let bs = self.core.layout().block_size() as usize;
            let Ok(buf) = BufView::new((r.end - r.start) as usize * bs) else {
                continue;
            };
            let io = BdevIo::read(r.start, r.end - r.start, smallvec::smallvec![buf], 0);
            if self.submit(i, io, Op::ProbeHeader { plex: i, slot }) {
                pending += 1;
            }
        }
        if pending > 0 {
            self.probes.insert(
                i,
                Probe {
                    pending,
                    slots: [None, None],
                },
            );
        }
    }

    fn probe_done(&mut self, i: usize, slot: Slot, c: IoCompletion) {
        let Some(pr) = self.probes.get_mut(&i) else {
            return;
        };
        pr.pending -= 1;
        if c.status.is_ok() {
            let bytes: Vec<u8> = c.bufs.iter().flat_map(|b| b.iter().copied()).collect();
            pr.slots[slot_index(slot)] = Some(bytes);
        }
        if pr.pending > 0 {
            return;
        }
        let pr = self.probes.remove(&i).expect("present");
        let core = self.core.clone();
        let Some(p) = core.plex(i) else { return };
        let [Some(a), Some(b)] = pr.slots else {
            return; // Still unreadable: try again at the next probe.
        };
        match superblock::pick_header(&a, &b, Some(core.uuid)) {
            Ok(picked) if picked.superblock.this_plex == p.uuid => {
                let sb = picked.superblock;
                let since = p
                    .condition()
                    .out_of_sync_since()
                    .unwrap_or_else(SystemTime::now);
                let why = if sb.generation < core.generation.load(Ordering::Acquire) {
                    Behind::Returned
                } else {
                    Behind::StaleGeneration {
                        had: sb.generation,
                        newest: core.generation.load(Ordering::Acquire),
                    }
                };
                tracing::info!(
                    "mirror {}: plex {} ({}) is readable again (generation {}); it will be resynced",
                    core.name, p.uuid, p.location, sb.generation
                );
                p.set_condition(Condition::OutOfSync { since, why });
            }
            Ok(picked) => tracing::warn!(
                "mirror {}: {} now holds plex {} of this mirror, not {}: left out",
                core.name,
                p.location,
                picked.superblock.this_plex,
                p.uuid
            ),
            Err(e) => {
                tracing::warn!(
                "mirror {}: plex {} ({}) is back but its superblock is unusable ({e}); left out",
                core.name, p.uuid, p.location
            )
            }
        }
    }

    // ---- operator requests -----------------------------------------------------------------

    /// Adds a plex (its bdev already claimed), which resync then fills.
    pub fn add_plex(&mut self, p: Plex) -> usize {
        let i = self.core.add_plex(Arc::new(p));
        self.core.generation.fetch_add(1, Ordering::AcqRel);
        self.header.wanted = true;
        i
    }

    /// Takes plex `i` out, erases its superblock so it can never be assembled as a stale copy
    /// of this mirror, and answers on `tx`.
    pub fn remove_plex(&mut self, i: usize, tx: Reply<Result<(), String>>) {
        self.fault(i, FaultReason::Removing, 0);
        self.sync_legs();
        let layout = self.core.layout();
        let end = layout
            .data_offset_blocks()
            .min(layout.slot_range(Slot::B).end);
        let bs = layout.block_size() as usize;
        let Ok(zero) = BufView::zeroed(end as usize * bs) else {
            let _ = tx.send(Err("no memory for the erase".into()));
            return;
        };
        let io = BdevIo::write(0, end, smallvec::smallvec![zero], 0);
        if self.submit(i, io, Op::Wipe { plex: i }) {
            self.wipes.insert(i, (1, Some(tx)));
        } else {
            self.finish_removal(i, Some(tx), false);
        }
    }

    fn finish_removal(&mut self, i: usize, tx: Option<Reply<Result<(), String>>>, erased: bool) {
        let core = &self.core;
        if let Some(p) = core.plex(i) {
            if let Some(b) = p.bdev() {
                b.release();
            }
            p.set_bdev(None);
            if !erased {
                tracing::warn!(
                    "mirror {}: the superblock of removed plex {} could not be erased",
                    core.name,
                    p.location
                );
            }
        }
        if let Some(l) = self.legs.get_mut(i) {
            *l = None;
        }
        self.header.wanted = true;
        if let Some(tx) = tx {
            let _ = tx.send(Ok(()));
        }
    }

    /// Writes the superblocks with the clean flag and stops; `tx` hears when they are down.
    pub fn stop_clean(&mut self, tx: Reply<()>) {
        self.abort_resync("the mirror is being stopped");
        self.header.clean = true;
        self.header.wanted = true;
        self.header.on_clean = Some(tx);
    }

    /// Grows the mirror to `layout` (its plexes already hold it): the superblocks record the
    /// new size first, then the data path takes it. `tx` hears how it went.
    pub fn grow(&mut self, layout: Layout, tx: RemoveReply) {
        let core = &self.core;
        let refuse = if self.resync.is_some() {
            Some("a resync is running; grow the mirror once it is done".to_string())
        } else if self.header.growth.is_some() || self.header.growth_in_flight.is_some() {
            Some("another resize is in progress".to_string())
        } else if layout.data_blocks() <= core.data_blocks() {
            Some(format!(
                "{} blocks is not more than the {} the mirror has",
                layout.data_blocks(),
                core.data_blocks()
            ))
        } else {
            None
        };
        if let Some(why) = refuse {
            let _ = tx.send(Err(why));
            return;
        }
        core.generation.fetch_add(1, Ordering::AcqRel);
        self.header.growth = Some(Growth { layout, reply: tx });
        self.header.wanted = true;
    }

    fn grown(&mut self, g: Growth, on_disk: bool) {
        let core = &self.core;
        if !on_disk {
            let _ = g
                .reply
                .send(Err("no plex in sync took the new superblock".into()));
            return;
        }
        let old = core.data_blocks();
        core.set_layout(g.layout);
        core.intent.grow(g.layout.regions());
        tracing::info!(
            "mirror {}: grown from {old} to {} blocks",
            core.name,
            g.layout.data_blocks()
        );
        let _ = g.reply.send(Ok(()));
    }

    /// Asks for a header round; `tx` hears whether it reached a serving plex.
    pub fn write_headers(&mut self, tx: Reply<bool>) {
        self.header.wanted = true;
        self.header.next_waiters.push(tx);
    }

    /// Asks for every chunk holding a dirty bit to be written (after assembly, whose bitmap is
    /// the union of several plexes').
    pub fn rewrite_dirty_chunks(&mut self) {
        let layout = self.core.layout();
        let chunks: BTreeSet<u32> = self
            .core
            .intent
            .dirty
            .iter_set()
            .map(|r| layout.chunk_of(r))
            .collect();
        self.chunks_wanted.extend(chunks);
    }

    fn bitmap_chunks_unwritten(&self) -> u64 {
        (self.chunks_wanted.len() + self.chunks_busy.len()) as u64
    }

    pub fn is_quiet(&self) -> bool {
        self.ops.is_empty()
            && !self.header.busy
            && !self.header.wanted
            && self.chunks_wanted.is_empty()
    }

    pub fn stop(&mut self) {
        self.stopped = true;
        // No more plex events: their bdevs may be deleted by the caller at once.
        lock(&self.core.subscriptions).clear();
        for p in self.core.plexes() {
            if let Some(b) = p.bdev() {
                b.release();
            }
        }
    }
}

fn slot_index(s: Slot) -> usize {
    match s {
        Slot::A => 0,
        Slot::B => 1,
    }
}

/// `bytes` in a DMA buffer.
fn dma_copy(bytes: &[u8]) -> Option<BufView> {
    let mut b = BufView::new(bytes.len()).ok()?;
    b.bytes_mut()?.copy_from_slice(bytes);
    Some(b)
}
