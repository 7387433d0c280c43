//! The mirror's data path on one reactor.
//!
//! - Writes, write-zeroes and unmaps enter their regions in the write-intent log, wait until
//!   those are recorded on disk, then go to every plex that takes writes, each leg getting a
//!   shared view of the caller's buffer (no copy). They complete once every leg has; they
//!   succeed if at least one serving plex took them. A leg that failed is faulted, and the I/O
//!   waits until the superblocks say so before completing: otherwise a crash could bring the
//!   failed plex back as in sync, without this write.
//! - Flush and reset go to every plex that takes writes.
//! - Reads go to a local serving plex when there is one, else to the serving plex with the
//!   fewest reads in flight from this channel. A failed read faults its plex and is retried on
//!   another; it fails when none is left.

use super::intent::Entry;
use super::plex::{FaultReason, Plex, Role};
use super::superblock::Layout;
use super::Core;
use crate::bdev::{
    BdevChannel, BdevIo, IoBufs, IoChannel, IoCompletion, IoStatus, IoType, ReadyQueue,
};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A leg: this channel's view of one plex.
struct Leg {
    plex: Arc<Plex>,
    ch: Option<IoChannel>,
    reads: u32,
    /// A plex on this node, read first (taken when the channel opens: no lock per read).
    local: bool,
    /// The plex's bdev change count and role when the channel was last opened (or tried).
    opened: Option<(u64, Role)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for its regions (on disk, or unlocked by resync).
    Regions,
    /// At the legs.
    Issued,
    /// Done at the legs; waiting for a fault it caused to be on disk.
    Recording,
}

struct MirrorIo {
    io: BdevIo,
    stage: Stage,
    /// Regions entered (counted in flight), for writes.
    entered: Range<u64>,
    pending: u32,
    /// Serving plexes that completed it.
    served: u32,
    first_error: Option<IoStatus>,
    /// Fault ticket to wait for before completing.
    ticket: u64,
    /// Legs a read has tried (a read tries each serving plex at most once).
    tried: SmallVec<[usize; 3]>,
}

pub struct MirrorChannel {
    core: Arc<Core>,
    /// The mirror's geometry for region arithmetic (its size is read from `core`: it grows).
    geometry: Layout,
    legs: Vec<Leg>,
    version: u64,
    ios: Vec<Option<MirrorIo>>,
    free: Vec<u32>,
    /// I/O in `Regions` or `Recording`, rechecked on each poll.
    waiting: VecDeque<u32>,
    /// Leg I/O the leg's queue was too full for, retried on each poll.
    unsent: VecDeque<(usize, BdevIo)>,
    /// Writes held while the mirror is quiesced (a snapshot of its plexes), in order.
    held: VecDeque<BdevIo>,
    /// Writes of this channel admitted and not completed; the quiesce sums every channel's.
    writes: Arc<AtomicU64>,
    ready: ReadyQueue,
}

fn leg_tag(slot: u32, leg: usize) -> u64 {
    (leg as u64) << 32 | u64::from(slot)
}

/// Hands leg `li` its I/O at once, unless older leg I/O waits for room (legs take I/O in
/// order) or the leg cannot take it now; then it waits in `unsent` for `push_unsent`.
fn send(unsent: &mut VecDeque<(usize, BdevIo)>, leg: &mut Leg, li: usize, io: BdevIo) {
    let io = match leg.ch.as_mut() {
        Some(ch) if unsent.is_empty() => match ch.submit(io) {
            Ok(()) => return,
            Err(io) => io,
        },
        _ => io,
    };
    unsent.push_back((li, io));
}

impl MirrorChannel {
    pub fn new(core: Arc<Core>) -> MirrorChannel {
        let mut ch = MirrorChannel {
            geometry: core.layout(),
            core,
            legs: Vec::new(),
            version: u64::MAX,
            ios: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            unsent: VecDeque::new(),
            held: VecDeque::new(),
            writes: Arc::new(AtomicU64::new(0)),
            ready: ReadyQueue::default(),
        };
        ch.core.register_writer(&ch.writes);
        ch.sync_legs();
        ch
    }

    /// Follows plexes added since the last look, and opens legs to plexes that came back.
    fn sync_legs(&mut self) {
        let v = self.core.plexes_version();
        if v != self.version {
            self.version = v;
            for p in self.core.plexes().into_iter().skip(self.legs.len()) {
                self.legs.push(Leg {
                    plex: p,
                    ch: None,
                    reads: 0,
                    local: false,
                    opened: None,
                });
            }
        }
        // Atomic loads only, on every submit; the plex's lock only when something changed.
        for leg in &mut self.legs {
            let changes = leg.plex.bdev_changes();
            let role = leg.plex.role();
            let stale = leg.ch.as_ref().is_some_and(|c| {
                c.entry().is_removed() || leg.opened.is_some_and(|(seen, _)| seen != changes)
            });
            if stale && leg.ch.as_ref().is_some_and(|c| c.in_flight() == 0) {
                leg.ch = None;
            }
            if leg.ch.is_none() && role != Role::Idle && leg.opened != Some((changes, role)) {
                // Tried once per bdev and role: a plex that cannot be opened here is not
                // retried on every I/O.
                leg.opened = Some((changes, role));
                let bdev = leg.plex.bdev();
                leg.local = bdev.as_ref().is_some_and(|b| b.bdev().module() != "nvme");
                leg.ch = bdev.and_then(|b| b.open_channel().ok());
            }
        }
    }

    fn alloc(&mut self, m: MirrorIo) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.ios[i as usize] = Some(m);
                i
            }
            None => {
                self.ios.push(Some(m));
                (self.ios.len() - 1) as u32
            }
        }
    }

    fn regions_of(&self, io: &BdevIo) -> Range<u64> {
        match io.io_type {
            IoType::Write | IoType::WriteZeroes | IoType::Unmap if io.num_blocks > 0 => self
                .geometry
                .regions_of(io.offset_blocks..io.offset_blocks + io.num_blocks),
            _ => 0..0,
        }
    }

    /// Enters every region of slot `s` not yet entered; true when all are on disk.
    fn enter_regions(&mut self, s: u32) -> bool {
        let m = self.ios[s as usize].as_mut().expect("live slot");
        let want = self
            .geometry
            .regions_of(m.io.offset_blocks..m.io.offset_blocks + m.io.num_blocks.max(1));
        let intent = &self.core.intent;
        let mut all_ready = true;
        // Regions are entered in order; `entered` grows as each is admitted.
        while m.entered.end < want.end {
            let r = m.entered.end;
            match intent.enter(r) {
                Entry::Ready => m.entered.end += 1,
                Entry::Persisting => {
                    m.entered.end += 1;
                    all_ready = false;
                    self.core.request(super::Request::Persist {
                        chunk: self.geometry.chunk_of(r),
                    });
                }
                Entry::Locked => return false,
            }
        }
        all_ready && m.entered.clone().all(|r| intent.on_disk.test(r))
    }

    fn issue(&mut self, s: u32) {
        let m = self.ios[s as usize].as_mut().expect("live slot");
        m.stage = Stage::Issued;
        if m.io.io_type == IoType::Read {
            return self.issue_read(s);
        }
        // Borrowed, not cloned: the fields below are disjoint, and an `Arc` clone is a locked
        // instruction per I/O.
        let core = &self.core;
        let (io_type, off, n) = (
            m.io.io_type,
            core.plex_block(m.io.offset_blocks),
            m.io.num_blocks,
        );
        // Plexes faulted before now get none of this write: it completes once that is on disk.
        m.ticket = m.ticket.max(core.tickets_issued());
        let mut sent = 0;
        for (li, leg) in self.legs.iter_mut().enumerate() {
            if leg.plex.role() == Role::Idle {
                continue;
            }
            if leg.ch.is_none() {
                // A plex that should take this write but cannot be reached here: out it goes,
                // and the write waits until that is on disk.
                let t = core.fault(
                    li,
                    FaultReason::IoFailed {
                        io_type,
                        status: IoStatus::Aborted,
                    },
                );
                m.ticket = m.ticket.max(t);
                continue;
            }
            let bufs: IoBufs = m.io.bufs.iter_mut().map(|b| b.share()).collect();
            let (off, n) = match io_type {
                IoType::Flush | IoType::Reset => (0, 0),
                _ => (off, n),
            };
            let io = BdevIo::new(io_type, off, n, bufs, leg_tag(s, li));
            send(&mut self.unsent, leg, li, io);
            sent += 1;
        }
        m.pending = sent;
        if sent == 0 {
            m.first_error.get_or_insert(IoStatus::IoError(libc::ENODEV));
            self.finish(s);
        }
    }

    fn issue_read(&mut self, s: u32) {
        let m = self.ios[s as usize].as_mut().expect("live slot");
        // Local first, then the least busy from this channel, among serving plexes not tried.
        let pick = self
            .legs
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                !m.tried.contains(i) && l.plex.role() == Role::Serving && l.ch.is_some()
            })
            .min_by_key(|(_, l)| (!l.local, l.reads))
            .map(|(i, _)| i);
        let Some(li) = pick else {
            m.first_error.get_or_insert(IoStatus::IoError(libc::EIO));
            return self.finish(s);
        };
        m.tried.push(li);
        m.pending = 1;
        let bufs = std::mem::take(&mut m.io.bufs);
        let io = BdevIo::read(
            self.core.plex_block(m.io.offset_blocks),
            m.io.num_blocks,
            bufs,
            leg_tag(s, li),
        );
        self.legs[li].reads += 1;
        send(&mut self.unsent, &mut self.legs[li], li, io);
    }

    /// Sends what waits for room at its leg, in order.
    fn push_unsent(&mut self) {
        while let Some((li, io)) = self.unsent.pop_front() {
            let Some(ch) = self.legs[li].ch.as_mut() else {
                // The leg went away: the I/O fails there.
                self.leg_done(li, io.complete(IoStatus::Aborted));
                continue;
            };
            if let Err(io) = ch.submit(io) {
                self.unsent.push_front((li, io));
                return;
            }
        }
    }

    /// One leg's part of an I/O is back. The mirror's and the plex's `Arc`s are borrowed, not
    /// cloned: a clone and its drop are a locked instruction each, on every I/O.
    fn leg_done(&mut self, li: usize, c: IoCompletion) {
        let s = c.tag as u32;
        let Some(m) = self.ios.get_mut(s as usize).and_then(Option::as_mut) else {
            return;
        };
        if c.io_type == IoType::Read {
            self.legs[li].reads -= 1;
            let plex = &self.legs[li].plex;
            m.io.bufs = c.bufs;
            m.pending = 0;
            if c.status.is_ok() {
                m.served = 1;
                return self.finish(s);
            }
            m.first_error = Some(c.status);
            if c.status != IoStatus::InvalidBuffer {
                let core = &self.core;
                tracing::warn!(
                    "mirror {}: read from plex {} failed ({:?}); trying another",
                    core.name,
                    plex.uuid,
                    c.status
                );
                core.fault(
                    li,
                    FaultReason::IoFailed {
                        io_type: IoType::Read,
                        status: c.status,
                    },
                );
                return self.issue_read(s);
            }
            return self.finish(s);
        }
        let plex = &self.legs[li].plex;
        // The leg's shares of the buffer are dropped here; the caller's view reclaims them.
        drop(c.bufs);
        m.pending -= 1;
        // A plex with nothing to flush is done with a flush, as far as it goes.
        let took_it = c.status.is_ok()
            || (c.status == IoStatus::Unsupported
                && matches!(c.io_type, IoType::Flush | IoType::Reset));
        if took_it {
            if plex.role() == Role::Serving {
                m.served += 1;
            }
        } else if c.status.is_reservation_conflict() {
            // Another owner took this plex: this instance must stop acknowledging writes at
            // once, or they would be lost to the new owner.
            self.core.mark_fenced(&plex.location);
            m.first_error = Some(c.status);
        } else {
            let core = &self.core;
            let was_serving = plex.role() == Role::Serving;
            tracing::warn!(
                "mirror {}: {:?} to plex {} failed ({:?})",
                core.name,
                c.io_type,
                plex.uuid,
                c.status
            );
            let t = core.fault(
                li,
                FaultReason::IoFailed {
                    io_type: c.io_type,
                    status: c.status,
                },
            );
            if was_serving {
                m.ticket = m.ticket.max(t);
            }
            m.first_error.get_or_insert(c.status);
        }
        if m.pending == 0 {
            self.finish(s);
        }
    }

    /// Completes slot `s` if nothing holds it, else parks it.
    fn finish(&mut self, s: u32) {
        let core = &self.core;
        let m = self.ios[s as usize].as_mut().expect("live slot");
        if m.ticket > 0 && !core.fault_recorded(m.ticket) && !core.failed.load(Ordering::Acquire) {
            m.stage = Stage::Recording;
            self.waiting.push_back(s);
            return;
        }
        let mut m = self.ios[s as usize].take().expect("live slot");
        self.free.push(s);
        if m.io.io_type.changes_data() {
            self.writes.fetch_sub(1, Ordering::SeqCst);
        }
        for r in m.entered.clone() {
            core.intent.leave(r);
        }
        for b in m.io.bufs.iter_mut() {
            b.reclaim();
        }
        // A write the superblocks could not record a fault for, in a mirror that failed, may
        // be missing from the plex a crash would bring back: it fails. So does anything a
        // fenced instance did.
        let fenced = core.fenced.load(Ordering::Acquire);
        let ok = m.served > 0 && !fenced && !(m.ticket > 0 && core.failed.load(Ordering::Acquire));
        let status = if ok {
            IoStatus::Success
        } else if fenced {
            // Whichever I/O met the other owner's reservation first, this one ends the same way.
            IoStatus::RESERVATION_CONFLICT
        } else {
            m.first_error.unwrap_or(IoStatus::IoError(libc::EIO))
        };
        self.ready.push(m.io.complete(status));
    }

    /// Rechecks parked I/O.
    fn recheck(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            let stage = self.ios[s as usize].as_ref().map(|m| m.stage);
            match stage {
                Some(Stage::Regions) => {
                    if self.core.failed.load(Ordering::Acquire) {
                        let m = self.ios[s as usize].as_mut().expect("live");
                        m.first_error = Some(self.core.failed_status());
                        self.finish(s);
                    } else if self.enter_regions(s) {
                        self.issue(s);
                    } else {
                        self.waiting.push_back(s);
                    }
                }
                Some(Stage::Recording) => self.finish(s),
                _ => {}
            }
        }
    }
}

impl MirrorChannel {
    /// Counts a write in before looking at the quiesce flag (both SeqCst), so a quiesce that
    /// sees no write in flight knows every later one will see the flag and wait.
    fn admit_write(&mut self) -> bool {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.core.quiesced.load(Ordering::SeqCst) {
            self.writes.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Starts the held writes once the mirror resumes.
    fn release_held(&mut self) {
        while !self.held.is_empty() && self.admit_write() {
            let io = self.held.pop_front().expect("not empty");
            self.start(io);
        }
    }

    fn start(&mut self, io: BdevIo) {
        self.sync_legs();
        let first = self.regions_of(&io).start;
        let s = self.alloc(MirrorIo {
            io,
            stage: Stage::Regions,
            entered: first..first,
            pending: 0,
            served: 0,
            first_error: None,
            ticket: 0,
            tried: SmallVec::new(),
        });
        let writes = self.ios[s as usize]
            .as_ref()
            .is_some_and(|m| m.io.io_type.changes_data());
        if !writes || self.enter_regions(s) {
            self.issue(s);
        } else {
            self.waiting.push_back(s);
        }
    }
}

impl BdevChannel for MirrorChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        if self.core.failed.load(Ordering::Acquire) {
            self.ready.push(io.complete(self.core.failed_status()));
            return Ok(());
        }
        // The bdev layer checks ranges, but `open_channel` is public: past the end, the region
        // arithmetic below would index past the write-intent log.
        let end = io.offset_blocks.checked_add(io.num_blocks);
        let ranged = !matches!(io.io_type, IoType::Flush | IoType::Reset);
        if ranged && end.is_none_or(|e| e > self.core.data_blocks()) {
            self.ready.push(io.complete(IoStatus::OutOfRange));
            return Ok(());
        }
        if io.io_type.changes_data() && (!self.held.is_empty() || !self.admit_write()) {
            self.held.push_back(io);
            return Ok(());
        }
        self.start(io);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut back: SmallVec<[(usize, IoCompletion); 16]> = SmallVec::new();
        for (li, leg) in self.legs.iter_mut().enumerate() {
            if let Some(ch) = leg.ch.as_mut() {
                if ch.in_flight() > 0 {
                    ch.poll(&mut |c| back.push((li, c)));
                }
            }
        }
        for (li, c) in back {
            self.leg_done(li, c);
        }
        if !self.unsent.is_empty() {
            self.push_unsent();
        }
        if !self.waiting.is_empty() {
            self.recheck();
        }
        if !self.held.is_empty() {
            self.release_held();
        }
        self.ready.drain(done)
    }
}

impl Drop for MirrorChannel {
    fn drop(&mut self) {
        // Regions still entered are left, so resync and clearing do not wait for them forever.
        for m in self.ios.iter().flatten() {
            for r in m.entered.clone() {
                self.core.intent.leave(r);
            }
        }
    }
}
