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
use super::{Core, Request};
use crate::bdev::{BdevIo, BufView, IoChannel, IoCompletion};
use crate::reactor::{now_ns, PollStatus};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

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

    // ---- superblocks -----------------------------------------------------------------------

    /// The plex table as the superblocks keep it (tombstones of removed plexes left out).
    fn records(&self) -> Vec<PlexRecord> {
        self.core
            .plexes()
            .iter()
            .filter(|p| !p.is_removed())
            .map(|p| PlexRecord {
                uuid: p.uuid,
                node: p.node.clone(),
                location: p.location.clone(),
                state: p.condition().on_disk(),
                in_sync_generation: p.in_sync_generation.load(Ordering::Acquire),
            })
            .collect()
    }

    /// The header for plex `this` at the current generation.
    pub fn header_for(&self, this: &Plex, seq: u64, clean: bool) -> Option<Vec<u8>> {
        let core = &self.core;
        // `new` starts at generation 1; the table goes in once the generation is set.
        let records = self.records();
        let at_one: Vec<PlexRecord> = records
            .iter()
            .map(|r| PlexRecord {
                in_sync_generation: r.in_sync_generation.min(1),
                ..r.clone()
            })
            .collect();
        // A round that grows the mirror records the new size; the data path keeps the old one
        // until the round is on disk.
        let layout = match &self.header.growth_in_flight {
            Some(g) => g.layout,
            None => core.layout(),
        };
        let mut sb = Superblock::new(core.uuid, &core.name, this.uuid, &layout, at_one)
            .map_err(|e| tracing::error!("mirror {}: cannot build a superblock: {e}", core.name))
            .ok()?;
        sb.plexes = records;
        sb.seq = seq;
        sb.generation = core.generation.load(Ordering::Acquire);
        sb.clean = clean;
        let mut bytes = sb
            .encode()
            .map_err(|e| tracing::error!("mirror {}: cannot encode its superblock: {e}", core.name))
            .ok()?;
        let slot_bytes =
            (core.layout().slot_blocks() * u64::from(core.layout().block_size())) as usize;
        bytes.resize(slot_bytes, 0);
        Some(bytes)
    }

    fn start_header(&mut self) {
        if self.header.busy || !self.header.wanted {
            return;
        }
        self.header.wanted = false;
        self.header.growth_in_flight = self.header.growth.take();
        let clean = self.header.clean;
        for p in self.core.plexes() {
            if p.role() == Role::Serving {
                p.in_sync_generation.store(
                    self.core.generation.load(Ordering::Acquire),
                    Ordering::Release,
                );
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let slot = Slot::for_seq(seq);
        let range = self.core.layout().slot_range(slot);
        let mut pending = 0;
        for (i, p) in self.core.plexes().iter().enumerate() {
            if p.role() == Role::Idle {
                continue;
            }
            let Some(bytes) = self.header_for(p, seq, clean) else {
                continue;
            };
            let Some(buf) = dma_copy(&bytes) else {
                continue;
            };
            let io = BdevIo::write(
                range.start,
                range.end - range.start,
                smallvec::smallvec![buf],
                0,
            );
            if self.submit(i, io, Op::Header { plex: i }) {
                pending += 1;
            }
        }
        self.header.waiters = std::mem::take(&mut self.header.next_waiters);
        self.header.busy = true;
        self.header.pending = pending;
        self.header.serving_ok = 0;
        self.header.ticket_in_flight = self.header.ticket_wanted;
        if pending == 0 {
            self.header_round_done();
        }
    }

    fn header_round_done(&mut self) {
        self.header.busy = false;
        let core = &self.core;
        if self.header.serving_ok == 0 && !core.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "mirror {}: no plex took the superblock; the mirror has failed",
                core.name
            );
        }
        core.faults_recorded
            .fetch_max(self.header.ticket_in_flight, Ordering::AcqRel);
        let ok = self.header.serving_ok > 0;
        if let Some(g) = self.header.growth_in_flight.take() {
            self.grown(g, ok);
        }
        for tx in self.header.waiters.drain(..) {
            let _ = tx.send(ok);
        }
        if self.header.clean && !self.header.wanted {
            if let Some(tx) = self.header.on_clean.take() {
                let _ = tx.send(());
            }
        }
    }

    // ---- bitmap ----------------------------------------------------------------------------

    fn start_chunks(&mut self) {
        let wanted: Vec<u32> = self
            .chunks_wanted
            .iter()
            .copied()
            .filter(|c| !self.chunks_busy.contains_key(c))
            .collect();
        for c in wanted {
            self.chunks_wanted.remove(&c);
            let layout = self.core.layout();
            let regions = layout.regions_in_chunk(c);
            let words = (regions.start / 64) as usize..(regions.end.div_ceil(64)) as usize;
            let snap = self.core.intent.dirty.snapshot(words);
            let Ok(bytes) = superblock::encode_chunk(self.core.uuid, c, &snap, layout.block_size())
            else {
                continue;
            };
            let mut pending = 0;
            for (i, p) in self.core.plexes().iter().enumerate() {
                if p.role() == Role::Idle {
                    continue;
                }
                let Some(buf) = dma_copy(&bytes) else {
                    continue;
                };
                let io = BdevIo::write(layout.chunk_block(c), 1, smallvec::smallvec![buf], 0);
                if self.submit(i, io, Op::Chunk { chunk: c, plex: i }) {
                    pending += 1;
                }
            }
            let cw = ChunkWrite {
                words: snap,
                first_region: regions.start,
                pending,
            };
            if pending == 0 {
                self.chunk_on_disk(&cw);
            } else {
                self.chunks_busy.insert(c, cw);
            }
        }
    }

    fn chunk_on_disk(&self, cw: &ChunkWrite) {
        let intent = &self.core.intent;
        for (wi, w) in cw.words.iter().enumerate() {
            let mut v = *w;
            while v != 0 {
                let r = cw.first_region + wi as u64 * 64 + v.trailing_zeros() as u64;
                v &= v - 1;
                if r < intent.regions() {
                    intent.on_disk.set(r);
                }
            }
        }
    }

    /// Clears regions that are the same everywhere and have no write in flight.
    fn clear_idle_regions(&mut self) {
        let plexes = self.core.plexes();
        let all_in_sync = plexes
            .iter()
            .filter(|p| !p.is_removed())
            .all(|p| p.role() == Role::Serving);
        if !all_in_sync || self.resync.is_some() || self.core.failed.load(Ordering::Acquire) {
            return;
        }
        let intent = &self.core.intent;
        let dirty: Vec<u64> = intent.dirty.iter_set().collect();
        // Counted before any bit goes (see `Core::bitmap_writes_pending`); made exact at the
        // end of the pass.
        self.core.bitmap_writes_pending.store(
            self.bitmap_chunks_unwritten() + dirty.len() as u64,
            Ordering::SeqCst,
        );
        for r in dirty {
            let c = self.core.layout().chunk_of(r);
            if self.chunks_busy.contains_key(&c) || self.chunks_wanted.contains(&c) {
                continue;
            }
            if intent.try_clear(r) {
                self.chunks_wanted.insert(c);
            }
        }
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

    // ---- resync ----------------------------------------------------------------------------

    fn pick_resync(&mut self) -> Option<Resync> {
        let plexes = self.core.plexes();
        let target = plexes
            .iter()
            .position(|p| matches!(p.condition(), Condition::OutOfSync { .. }) && p.is_up())?;
        if self.legs.get(target).is_none_or(Option::is_none) {
            return None;
        }
        let source = plexes
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                p.role() == Role::Serving && self.legs.get(*i).is_some_and(Option::is_some)
            })
            .min_by_key(|(_, p)| !p.is_local())
            .map(|(i, _)| i)?;
        let t = &plexes[target];
        let Condition::OutOfSync { since, why } = t.condition() else {
            return None;
        };
        let intent = &self.core.intent;
        // An interrupted copy resumes where it stood: all regions from there if the plex was
        // never in sync (a new plex's full copy), else the marked ones from there (the bits of
        // regions a plex missed stay set until every plex is in sync again).
        let never_in_sync = t.in_sync_generation.load(Ordering::Acquire) == 0;
        let (full, start) = match &why {
            Behind::New => (true, 0),
            Behind::Interrupted { next_region } => (never_in_sync, *next_region),
            _ => (false, 0),
        };
        // Writes reach the plex from now on, so what is copied stays current.
        t.set_role(Role::WriteOnly);
        let regions: Vec<u64> = if full {
            (start..intent.regions()).collect()
        } else {
            intent.dirty.iter_set().filter(|&r| r >= start).collect()
        };
        tracing::info!(
            "mirror {}: resync of plex {} ({}) from {} starts: {} of {} regions ({})",
            self.core.name,
            t.uuid,
            t.location,
            plexes[source].location,
            regions.len(),
            intent.regions(),
            if full {
                "full copy"
            } else {
                "regions written while it was out"
            }
        );
        t.set_condition(Condition::Resyncing {
            since,
            why,
            progress: ResyncProgress {
                full,
                regions_total: regions.len() as u64,
                next_region: regions.first().copied().unwrap_or(intent.regions()),
                ..Default::default()
            },
        });
        self.header.wanted = true;
        let now = now_ns();
        Some(Resync {
            target,
            source,
            regions,
            next: 0,
            finished: 0,
            active: Vec::new(),
            started_ns: now,
            bytes: 0,
            last_progress_ns: now,
        })
    }

    /// Advances resync by what can be done now; true if it did anything.
    fn step_resync(&mut self) -> bool {
        if self.resync.is_none() {
            let now = now_ns();
            if self.core.failed.load(Ordering::Acquire) || now - self.last_pick_ns < PICK_EVERY_NS {
                return false;
            }
            self.last_pick_ns = now;
            self.resync = self.pick_resync();
            return self.resync.is_some();
        }
        let core = self.core.clone();
        let rs = self.resync.as_mut().expect("checked");
        if rs.next >= rs.regions.len() && rs.active.is_empty() {
            return self.finish_resync();
        }
        let rate = core.resync_rate.load(Ordering::Relaxed);
        let over_rate = rate > 0 && {
            let elapsed = now_ns().saturating_sub(rs.started_ns).max(1);
            rs.bytes as u128 * SEC as u128 > rate as u128 * elapsed as u128
        };
        if over_rate {
            crate::reactor::wake_by(now_ns() + SEC / 100);
        } else {
            while rs.active.len() < COPY_WINDOW && rs.next < rs.regions.len() {
                rs.active.push(Copy {
                    region: rs.regions[rs.next],
                    done: 0,
                    step: CopyStep::Locking,
                });
                rs.next += 1;
            }
        }
        let locked: Vec<u64> = rs
            .active
            .iter_mut()
            .filter(|c| c.step == CopyStep::Locking && core.intent.try_lock(c.region))
            .map(|c| c.region)
            .collect();
        let waiting = rs.active.iter().any(|c| c.step == CopyStep::Locking);
        for r in &locked {
            self.copy_next_piece(*r);
        }
        !locked.is_empty() || waiting
    }

    /// Reads the next piece of region `r` (locked) from the source.
    fn copy_next_piece(&mut self, r: u64) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let Some(c) = rs.active.iter_mut().find(|c| c.region == r) else {
            return;
        };
        let range = core.layout().region_range(r);
        let bs = u64::from(core.layout().block_size());
        let start = range.start + c.done;
        let n = (range.end - start).min(COPY_PIECE / bs).max(1);
        let Ok(buf) = BufView::new((n * bs) as usize) else {
            // No memory now: let the region go and try it again on a later pass.
            core.intent.unlock(r);
            c.step = CopyStep::Locking;
            return;
        };
        c.step = CopyStep::Reading;
        let io = BdevIo::read(core.plex_block(start), n, smallvec::smallvec![buf], 0);
        let source = rs.source;
        if !self.submit(source, io, Op::CopyRead { region: r }) {
            self.abort_resync("the source plex refused a read");
        }
    }

    fn copy_done(&mut self, plex: usize, r: u64, c: IoCompletion) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let Some(copy) = rs.active.iter_mut().find(|x| x.region == r) else {
            return;
        };
        if !c.status.is_ok() {
            let why = FaultReason::IoFailed {
                io_type: c.io_type,
                status: c.status,
            };
            let t = core.fault(plex, why);
            self.header.ticket_wanted = self.header.ticket_wanted.max(t);
            self.abort_resync("a copy I/O failed");
            return;
        }
        let at = core.plex_block(core.layout().region_range(r).start + copy.done);
        match copy.step {
            CopyStep::Reading => {
                copy.step = CopyStep::Writing;
                let io = BdevIo::write(at, c.num_blocks, c.bufs, 0);
                let target = rs.target;
                if !self.submit(target, io, Op::CopyWrite { region: r }) {
                    self.abort_resync("the plex being resynced refused a write");
                }
            }
            CopyStep::Writing => {
                rs.bytes += c.num_blocks * u64::from(core.layout().block_size());
                copy.done += c.num_blocks;
                let range = core.layout().region_range(r);
                if range.start + copy.done < range.end {
                    self.copy_next_piece(r);
                    return;
                }
                core.intent.unlock(r);
                rs.active.retain(|x| x.region != r);
                rs.finished += 1;
                self.note_progress();
            }
            CopyStep::Locking => {}
        }
    }

    fn note_progress(&mut self) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let now = now_ns();
        // The average since the copy began: regions finish in bursts (four at a time, and a
        // rate limit lets them go in steps), so a short window swings by 10x.
        let elapsed = now.saturating_sub(rs.started_ns).max(1);
        let rate = (rs.bytes as u128 * SEC as u128 / elapsed as u128) as u64;
        let next = rs.resume_point(core.intent.regions());
        let (done, bytes) = (rs.finished as u64, rs.bytes);
        if let Some(t) = core.plex(rs.target) {
            t.update_progress(|p| {
                p.regions_done = done;
                p.next_region = next;
                p.bytes_copied = bytes;
                if rate > 0 {
                    p.rate_bps = rate;
                }
            });
        }
        if now - rs.last_progress_ns >= PROGRESS_EVERY_NS {
            rs.last_progress_ns = now;
            self.header.wanted = true;
        }
    }

    fn finish_resync(&mut self) -> bool {
        let rs = self.resync.take().expect("resync running");
        let core = self.core.clone();
        let Some(t) = core.plex(rs.target) else {
            return false;
        };
        let secs = (now_ns() - rs.started_ns) as f64 / SEC as f64;
        tracing::info!(
            "mirror {}: plex {} ({}) is in sync: {} regions, {} bytes copied in {secs:.1} s",
            core.name,
            t.uuid,
            t.location,
            rs.regions.len(),
            rs.bytes
        );
        if let Condition::Resyncing { mut progress, .. } = t.condition() {
            progress.regions_done = rs.regions.len() as u64;
            progress.bytes_copied = rs.bytes;
            progress.next_region = core.intent.regions();
            progress.duration_ms = (now_ns() - rs.started_ns) / 1_000_000;
            *super::lock(&t.last_resync) = Some(progress);
        }
        t.set_condition(Condition::InUse);
        t.set_role(Role::Serving);
        core.generation.fetch_add(1, Ordering::AcqRel);
        if !core.fenced.load(Ordering::Acquire) {
            core.failed.store(false, Ordering::Release);
        }
        self.header.wanted = true;
        true
    }

    fn abort_resync(&mut self, why: &str) {
        let Some(rs) = self.resync.take() else { return };
        for c in &rs.active {
            self.core.intent.unlock(c.region);
        }
        let core = &self.core;
        if let Some(t) = core.plex(rs.target) {
            tracing::warn!(
                "mirror {}: resync of plex {} stopped: {why}",
                core.name,
                t.uuid
            );
            if let Condition::Resyncing {
                since,
                why,
                progress,
            } = t.condition()
            {
                // Not faulted itself (the source was): it waits for the next resync, resuming.
                let why = match why {
                    Behind::New if progress.next_region == 0 => Behind::New,
                    Behind::New | Behind::Interrupted { .. } => Behind::Interrupted {
                        next_region: progress.next_region,
                    },
                    other => other,
                };
                t.set_role(Role::Idle);
                t.set_condition(Condition::OutOfSync { since, why });
            }
        }
        self.header.wanted = true;
    }

    /// The bytes a running resync has copied and how far it is, for tests and the table.
    pub fn resync_bytes(&self) -> Option<u64> {
        self.resync.as_ref().map(|r| r.bytes)
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
        super::lock(&self.core.subscriptions).clear();
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
