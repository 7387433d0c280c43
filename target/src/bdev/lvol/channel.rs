//! An lvol's data path on one reactor.
//!
//! An I/O is cut at cluster boundaries into parts (most I/O is one part, and keeps its buffers
//! whole). Each part finds its cluster in the lvol's map, else in its parents':
//! - a read of a cluster nobody wrote is zeroes, filled here;
//! - a write to an index without a cluster of its own asks the store's service for one and
//!   waits; the service fills it (zeroes, or the parent's data) and journals the mapping
//!   before the write goes on;
//! - an unmap of whole clusters gives them back (after the journal says so); of part of one,
//!   writes zeroes there.
//!
//! Every I/O is counted in the lvol's epoch while it runs, so the service can wait for what
//! is in flight before a snapshot, a resize or a free takes effect.
//!
//! Most I/O is a read or a write within one cluster that is already mapped: that I/O goes to
//! the base as it came, only re-aimed at the cluster, and no request is built around it
//! ("direct" below); a request of parts is for everything else.

use super::store::{Request, StoreCore, Ticket};
use super::{BlobView, LvolCore};
use crate::bdev::{
    BdevChannel, BdevError, BdevIo, BufView, IoBufs, IoChannel, IoCompletion, IoStatus, IoType,
    ReadyQueue,
};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::Arc;

/// NVMe's "Capacity Exceeded": the store has no free cluster for this write.
pub const CAPACITY_EXCEEDED: IoStatus = IoStatus::Nvme { sct: 0, sc: 0x81 };
/// NVMe's "Namespace is Write Protected": a write to a snapshot or a read-only lvol.
pub const WRITE_PROTECTED: IoStatus = IoStatus::Nvme { sct: 0, sc: 0x20 };

#[derive(Clone)]
enum Stage {
    /// To be looked up and issued.
    Resolve,
    WaitAlloc(Arc<Ticket>),
    WaitFree(Arc<Ticket>),
    Issued,
    Done,
}

struct Part {
    index: u64,
    /// Blocks into the cluster, and how many.
    offset: u64,
    nblocks: u64,
    bufs: IoBufs,
    stage: Stage,
}

struct Req {
    io: BdevIo,
    epoch: usize,
    parts: SmallVec<[Part; 1]>,
    pending: usize,
    status: IoStatus,
    /// How many pieces each of the I/O's buffers was cut into (empty: not cut).
    cuts: SmallVec<[u16; 2]>,
}

pub struct LvolChannel {
    core: Arc<LvolCore>,
    store: Arc<StoreCore>,
    base: IoChannel,
    view: Arc<BlobView>,
    view_gen: u64,
    reqs: Vec<Option<Req>>,
    free: Vec<u32>,
    /// Direct I/O at the base, by slot; `direct_free` lists the slots not in use.
    direct: Vec<Direct>,
    direct_free: Vec<u32>,
    /// I/O that arrived while the lvol was frozen.
    parked: VecDeque<BdevIo>,
    /// Requests with a part waiting for the service.
    waiting: Vec<u32>,
    unsent: VecDeque<BdevIo>,
    ready: ReadyQueue,
    /// The base's completions of one poll (kept to reuse its allocation).
    completions: Vec<IoCompletion>,
}

fn tag(slot: u32, part: usize) -> u64 {
    (slot as u64) << 16 | part as u64
}

/// A slot of `slots` that `free` lists, else a new one holding `vacant`.
fn take_slot<T>(slots: &mut Vec<T>, free: &mut Vec<u32>, vacant: T) -> u32 {
    free.pop().unwrap_or_else(|| {
        slots.push(vacant);
        (slots.len() - 1) as u32
    })
}

/// Marks the base tag of a direct I/O; the rest of the tag is its slot in `direct`.
const DIRECT: u64 = 1 << 63;

/// What a direct I/O's completion must give back to its submitter, and its epoch.
#[derive(Clone, Copy, Default)]
struct Direct {
    tag: u64,
    offset_blocks: u64,
    submitted_ns: u64,
    epoch: usize,
}

impl LvolChannel {
    pub fn new(core: Arc<LvolCore>) -> Result<LvolChannel, BdevError> {
        let store = core.store.clone();
        let base = store.base.open_channel()?;
        let view = core.view();
        Ok(LvolChannel {
            view_gen: core.view_gen(),
            core,
            store,
            base,
            view,
            reqs: Vec::new(),
            free: Vec::new(),
            direct: Vec::new(),
            direct_free: Vec::new(),
            parked: VecDeque::new(),
            waiting: Vec::new(),
            unsent: VecDeque::new(),
            ready: ReadyQueue::default(),
            completions: Vec::new(),
        })
    }

    fn start(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        let Some(epoch) = self.core.enter() else {
            self.parked.push_back(io);
            return Ok(());
        };
        if self.core.view_gen() != self.view_gen {
            self.view_gen = self.core.view_gen();
            self.view = self.core.view();
        }
        if io.io_type.changes_data()
            && self
                .core
                .read_only
                .load(std::sync::atomic::Ordering::Acquire)
        {
            self.core.leave(epoch);
            self.ready.push(io.complete(WRITE_PROTECTED));
            return Ok(());
        }
        if matches!(io.io_type, IoType::Reset) {
            self.core.leave(epoch);
            self.ready.push(io.complete(IoStatus::Success));
            return Ok(());
        }
        let mut io = match self.try_direct(io, epoch) {
            Ok(()) => return Ok(()),
            Err(io) => io,
        };
        let cb = self.store.cluster_blocks();
        let mut parts: SmallVec<[Part; 1]> = SmallVec::new();
        let mut cuts = SmallVec::new();
        if io.io_type == IoType::Flush {
            parts.push(Part {
                index: 0,
                offset: 0,
                nblocks: 0,
                bufs: IoBufs::new(),
                stage: Stage::Resolve,
            });
        } else {
            let (mut lba, end) = (io.offset_blocks, io.offset_blocks + io.num_blocks);
            while lba < end {
                let off = lba % cb;
                let n = (cb - off).min(end - lba);
                parts.push(Part {
                    index: lba / cb,
                    offset: off,
                    nblocks: n,
                    bufs: IoBufs::new(),
                    stage: Stage::Resolve,
                });
                lba += n;
            }
            if io.io_type.has_data() {
                let bs = self.store.block_size as usize;
                if parts.len() == 1 {
                    parts[0].bufs = std::mem::take(&mut io.bufs);
                } else {
                    let sizes: SmallVec<[usize; 4]> =
                        parts.iter().map(|p| p.nblocks as usize * bs).collect();
                    let (pieces, c) = cut(std::mem::take(&mut io.bufs), &sizes);
                    for (p, b) in parts.iter_mut().zip(pieces) {
                        p.bufs = b;
                    }
                    cuts = c;
                }
            }
        }
        let pending = parts.len();
        let req = Req {
            io,
            epoch,
            parts,
            pending,
            status: IoStatus::Success,
            cuts,
        };
        let slot = take_slot(&mut self.reqs, &mut self.free, None);
        // Issued before it is stored: most requests are moved once, into their slot.
        self.advance_req(slot, req);
        Ok(())
    }

    /// Sends a read or write within one mapped cluster straight to the base, re-aimed; gives
    /// back any other I/O.
    fn try_direct(&mut self, mut io: BdevIo, epoch: usize) -> Result<(), BdevIo> {
        let cb = self.store.cluster_blocks();
        let (index, offset) = (io.offset_blocks / cb, io.offset_blocks % cb);
        if io.num_blocks == 0 || io.num_blocks > cb - offset {
            return Err(io);
        }
        let cluster = match io.io_type {
            IoType::Read => self.view.resolve(index),
            IoType::Write | IoType::WriteZeroes => self.view.own(index),
            _ => None,
        };
        let Some(c) = cluster else {
            return Err(io);
        };
        let slot = take_slot(&mut self.direct, &mut self.direct_free, Direct::default());
        self.direct[slot as usize] = Direct {
            tag: io.tag,
            offset_blocks: io.offset_blocks,
            submitted_ns: io.submitted_ns,
            epoch,
        };
        io.offset_blocks = self.store.cluster_lba(c) + offset;
        io.tag = DIRECT | slot as u64;
        if let Err(io) = self.base.submit(io) {
            self.unsent.push_back(io);
        }
        Ok(())
    }

    /// A direct I/O is back from the base: it goes to the caller as the caller sent it.
    fn direct_done(&mut self, mut c: IoCompletion) {
        let slot = (c.tag & !DIRECT) as u32;
        let Some(&d) = self.direct.get(slot as usize) else {
            return;
        };
        self.direct_free.push(slot);
        self.core.leave(d.epoch);
        c.tag = d.tag;
        c.offset_blocks = d.offset_blocks;
        c.submitted_ns = d.submitted_ns;
        self.ready.push(c);
    }

    /// Moves every part of request `slot` as far as it can go; finishes the request when all
    /// parts are done.
    fn advance(&mut self, slot: u32) {
        if let Some(req) = self.reqs[slot as usize].take() {
            self.advance_req(slot, req);
        }
    }

    fn advance_req(&mut self, slot: u32, mut req: Req) {
        let mut waits = false;
        for i in 0..req.parts.len() {
            let stage = req.parts[i].stage.clone();
            let next = match stage {
                Stage::Resolve => self.issue(slot, i, &mut req),
                Stage::WaitAlloc(t) => match t.get() {
                    Ticket::PENDING => Stage::WaitAlloc(t),
                    Ticket::DONE => self.issue(slot, i, &mut req),
                    Ticket::NO_SPACE => self.part_failed(&mut req, CAPACITY_EXCEEDED),
                    _ => self.part_failed(&mut req, IoStatus::IoError(libc::EIO)),
                },
                Stage::WaitFree(t) => match t.get() {
                    Ticket::PENDING => Stage::WaitFree(t),
                    Ticket::DONE => {
                        req.pending -= 1;
                        Stage::Done
                    }
                    _ => self.part_failed(&mut req, IoStatus::IoError(libc::EIO)),
                },
                s => s,
            };
            waits |= matches!(next, Stage::WaitAlloc(_) | Stage::WaitFree(_));
            req.parts[i].stage = next;
        }
        if waits && !self.waiting.contains(&slot) {
            self.waiting.push(slot);
        }
        if req.pending == 0 {
            self.finish(slot, req);
        } else {
            self.reqs[slot as usize] = Some(req);
        }
    }

    fn part_failed(&mut self, req: &mut Req, s: IoStatus) -> Stage {
        if req.status.is_ok() {
            req.status = s;
        }
        req.pending -= 1;
        Stage::Done
    }

    /// Looks part `i` up and sends it to the base, or decides it needs nothing from it.
    fn issue(&mut self, slot: u32, i: usize, req: &mut Req) -> Stage {
        let st = &self.store;
        let p = &mut req.parts[i];
        let io_type = req.io.io_type;
        let whole = p.offset == 0 && p.nblocks == st.cluster_blocks();
        let base_io = |c: u32, t: IoType, bufs: IoBufs| {
            BdevIo::new(
                t,
                st.cluster_lba(c) + p.offset,
                p.nblocks,
                bufs,
                tag(slot, i),
            )
        };
        let io = match io_type {
            IoType::Flush => BdevIo::new(IoType::Flush, 0, 0, IoBufs::new(), tag(slot, i)),
            IoType::Read => match self.view.resolve(p.index) {
                Some(c) => base_io(c, IoType::Read, std::mem::take(&mut p.bufs)),
                None => {
                    for b in p.bufs.iter_mut() {
                        if let Some(bytes) = b.bytes_mut() {
                            bytes.fill(0);
                        }
                    }
                    req.pending -= 1;
                    return Stage::Done;
                }
            },
            IoType::Write | IoType::WriteZeroes => match self.view.own(p.index) {
                Some(c) => base_io(c, io_type, std::mem::take(&mut p.bufs)),
                None if io_type == IoType::WriteZeroes
                    && self.view.parent_has(p.index).is_none() =>
                {
                    // Reads zeroes already.
                    req.pending -= 1;
                    return Stage::Done;
                }
                None => {
                    let ticket = Ticket::new();
                    st.request(Request::Alloc {
                        blob: self.view.id,
                        index: p.index as u32,
                        ticket: ticket.clone(),
                    });
                    return Stage::WaitAlloc(ticket);
                }
            },
            IoType::Unmap => match self.view.own(p.index) {
                Some(_) if whole && self.view.parent_has(p.index).is_none() => {
                    let ticket = Ticket::new();
                    st.request(Request::Free {
                        lvol: self.core.clone(),
                        blob: self.view.id,
                        index: p.index as u32,
                        count: 1,
                        ticket: ticket.clone(),
                    });
                    return Stage::WaitFree(ticket);
                }
                Some(c) => base_io(c, IoType::WriteZeroes, IoBufs::new()),
                // Nothing of its own there: it reads what it read before (the parent's data
                // or zeroes), as an unmap allows.
                None => {
                    req.pending -= 1;
                    return Stage::Done;
                }
            },
            IoType::Reset => {
                req.pending -= 1;
                return Stage::Done;
            }
        };
        if let Err(io) = self.base.submit(io) {
            self.unsent.push_back(io);
        }
        Stage::Issued
    }

    fn finish(&mut self, slot: u32, mut req: Req) {
        self.core.leave(req.epoch);
        if req.io.io_type.has_data() {
            if req.parts.len() == 1 {
                // Most I/O: one part, its buffers whole.
                req.io.bufs = std::mem::take(&mut req.parts[0].bufs);
            } else {
                let mut pieces = req.parts.into_iter().flat_map(|p| p.bufs);
                if req.cuts.is_empty() {
                    req.io.bufs.extend(pieces);
                } else {
                    req.io.bufs = rejoin(&mut pieces, &req.cuts);
                }
            }
        }
        self.free.push(slot);
        self.ready.push(req.io.complete(req.status));
    }

    fn base_done(&mut self, c: IoCompletion) {
        if c.tag & DIRECT != 0 {
            return self.direct_done(c);
        }
        let (slot, i) = ((c.tag >> 16) as u32, (c.tag & 0xffff) as usize);
        let Some(Some(req)) = self.reqs.get_mut(slot as usize) else {
            return;
        };
        if let Some(p) = req.parts.get_mut(i) {
            p.bufs = c.bufs;
            p.stage = Stage::Done;
        }
        if !c.status.is_ok() && req.status.is_ok() {
            req.status = c.status;
        }
        req.pending -= 1;
        if req.pending == 0 {
            let req = self.reqs[slot as usize].take().expect("present");
            self.finish(slot, req);
        }
    }
}

impl BdevChannel for LvolChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        if !self.parked.is_empty() {
            self.parked.push_back(io);
            return Ok(());
        }
        self.start(io)
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut back = std::mem::take(&mut self.completions);
        if self.base.in_flight() > 0 {
            self.base.poll(&mut |c| back.push(c));
        }
        for c in back.drain(..) {
            self.base_done(c);
        }
        self.completions = back;
        while let Some(io) = self.unsent.pop_front() {
            if let Err(io) = self.base.submit(io) {
                self.unsent.push_front(io);
                break;
            }
        }
        if !self.waiting.is_empty() {
            for slot in std::mem::take(&mut self.waiting) {
                self.advance(slot);
            }
        }
        while !self.core.is_frozen() {
            let Some(io) = self.parked.pop_front() else {
                break;
            };
            let _ = self.start(io);
        }
        self.ready.drain(done)
    }
}

/// Cuts `bufs` into consecutive groups of `sizes` bytes (views, no copy). Returns the groups
/// and how many pieces each original buffer became, for [`rejoin`].
fn cut(bufs: IoBufs, sizes: &[usize]) -> (Vec<IoBufs>, SmallVec<[u16; 2]>) {
    let mut out: Vec<IoBufs> = sizes.iter().map(|_| IoBufs::new()).collect();
    let mut cuts = SmallVec::new();
    let mut src = bufs.into_iter();
    let mut cur: Option<BufView> = None;
    let mut pieces = 0u16;
    for (group, &size) in out.iter_mut().zip(sizes) {
        let mut need = size;
        while need > 0 {
            let mut b = match cur.take() {
                Some(b) => b,
                None => match src.next() {
                    Some(b) => {
                        pieces = 0;
                        b
                    }
                    None => return (out, cuts),
                },
            };
            if b.len() > need {
                let tail = b.split_off(need);
                cur = tail;
            }
            need -= b.len();
            pieces += 1;
            group.push(b);
            if cur.is_none() {
                cuts.push(pieces);
            }
        }
    }
    (out, cuts)
}

/// Joins pieces made by [`cut`] back into the buffers they came from.
fn rejoin(pieces: &mut impl Iterator<Item = BufView>, cuts: &[u16]) -> IoBufs {
    let mut out = IoBufs::new();
    for &n in cuts {
        let mut whole: Option<BufView> = None;
        for p in pieces.by_ref().take(n as usize) {
            match whole.as_mut() {
                None => whole = Some(p),
                Some(w) => {
                    if let Err(p) = w.unsplit(p) {
                        tracing::error!("lvol: buffer piece out of order ({p:?})");
                    }
                }
            }
        }
        if let Some(mut w) = whole {
            w.reclaim();
            out.push(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_and_rejoin_give_back_the_same_buffers() {
        let mut a = BufView::new(8192).unwrap();
        a.bytes_mut().unwrap().fill(1);
        let mut b = BufView::new(4096).unwrap();
        b.bytes_mut().unwrap().fill(2);
        let bufs: IoBufs = smallvec::smallvec![a, b];
        let (groups, cuts) = cut(bufs, &[2048, 8192, 2048]);
        let lens: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|b| b.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![2048], vec![6144, 2048], vec![2048]]);
        assert!(groups[1][0].iter().all(|&x| x == 1) && groups[1][1].iter().all(|&x| x == 2));
        let back = rejoin(&mut groups.into_iter().flatten(), &cuts);
        assert_eq!(back.len(), 2);
        assert!(back[0].is_whole() && back[0].len() == 8192);
        assert!(back[1].is_whole() && back[1].len() == 4096);
    }
}
