//! The per-reactor side of `nvme`: each reactor's qpair of a controller (in a thread-local
//! map), the channels sharing it, the routing of completions to them, and the views a large
//! I/O is sent as.

use super::*;
use crate::reactor::{fn_poller, PollStatus, ReactorCtx, ReactorHandle};
use initiator::{IoError, IoQpair, SubmitErrorKind};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Most blocks one Write Zeroes carries (NLB is 16 bits, 0-based).
const MAX_ZEROES_BLOCKS: u64 = 1 << 16;

/// The qpair carries pieces of bdev buffers: a buffer larger than the remote's max transfer is
/// split into views of at most that size (no copy), joined back when all are home.
pub(super) type Qpair = IoQpair<BufView>;

/// A command's tag: channel (16 bits), piece (16 bits) and I/O slot (32 bits), so a completion
/// finds its channel, I/O and the place of its buffer piece without a lookup.
fn tag(chan: u32, piece: usize, slot: u32) -> u64 {
    (u64::from(chan) << 48) | ((piece as u64) << 32) | u64::from(slot)
}

fn untag(tag: u64) -> (usize, usize, u32) {
    (
        (tag >> 48) as usize,
        (tag >> 32) as u16 as usize,
        tag as u32,
    )
}

/// Most channels one reactor's qpair serves (the tag has 16 bits for them).
const MAX_CHANNELS: usize = 1 << 16;

// ------------------------------------------------------------------------- per reactor

/// One I/O in flight on a channel: the bdev I/O, and its buffers' pieces as they come back.
struct Inflight {
    io: BdevIo,
    pending: u32,
    status: IoStatus,
    /// The pieces, by piece number; `None` while the qpair holds one. Almost every I/O is one
    /// piece (one buffer within the remote's max transfer): room for one keeps this small.
    pieces: SmallVec<[Option<BufView>; 1]>,
    /// How many pieces each of the I/O's buffers was cut into, in order.
    cuts: SmallVec<[u16; 2]>,
}

impl Inflight {
    /// Joins the pieces back into the buffers the consumer gave, in its order.
    fn rejoin(&mut self) {
        let mut pieces = std::mem::take(&mut self.pieces).into_iter();
        for &n in &self.cuts {
            let mut whole: Option<BufView> = None;
            for p in pieces.by_ref().take(n as usize).flatten() {
                match whole.as_mut() {
                    None => whole = Some(p),
                    Some(w) => {
                        if let Err(p) = w.unsplit(p) {
                            // Not its neighbour: a bug in the cutting; keep the bytes anyway.
                            tracing::error!("bdev_nvme: buffer piece out of order ({p:?})");
                        }
                    }
                }
            }
            if let Some(mut w) = whole {
                w.reclaim();
                self.io.bufs.push(w);
            }
        }
    }
}

#[derive(Default)]
struct ChanState {
    open: bool,
    ios: Vec<Option<Inflight>>,
    free: Vec<u32>,
    inflight: usize,
    ready: VecDeque<IoCompletion>,
}

impl ChanState {
    fn alloc(&mut self, f: Inflight) -> u32 {
        self.inflight += 1;
        match self.free.pop() {
            Some(i) => {
                self.ios[i as usize] = Some(f);
                i
            }
            None => {
                self.ios.push(Some(f));
                (self.ios.len() - 1) as u32
            }
        }
    }

    fn finish(&mut self, i: u32) {
        if let Some(mut f) = self.ios.get_mut(i as usize).and_then(Option::take) {
            f.rejoin();
            self.free.push(i);
            self.inflight -= 1;
            if self.open {
                self.ready.push_back(f.io.complete(f.status));
            }
        }
    }
}

/// A controller's qpair on one reactor and the channels sharing it.
#[derive(Default)]
struct ReactorQp {
    qp: Option<Qpair>,
    chans: Vec<ChanState>,
    free_chans: Vec<u32>,
    poller: u64,
}

impl ReactorQp {
    /// Routes one finished piece, and its buffer, to its channel.
    fn route(
        chans: &mut [ChanState],
        free_chans: &mut Vec<u32>,
        c: initiator::IoCompletion<BufView>,
    ) {
        let (ci, pi, ii) = untag(c.tag);
        let result = c.result;
        let Some(ch) = chans.get_mut(ci) else { return };
        let Some(f) = ch.ios.get_mut(ii as usize).and_then(Option::as_mut) else {
            return;
        };
        if let (Some(b), Some(slot)) = (c.buf, f.pieces.get_mut(pi)) {
            *slot = Some(b);
        }
        if let Err(e) = result {
            if f.status.is_ok() {
                f.status = io_status(e);
            }
        }
        f.pending -= 1;
        if f.pending == 0 {
            ch.finish(ii);
            if !ch.open && ch.inflight == 0 {
                // The channel was dropped with I/O in flight; its slot is free only now.
                *ch = ChanState::default();
                free_chans.push(ci as u32);
            }
        }
    }

    /// Completes everything in flight as a path failure and drops the qpair (detach).
    fn shut(&mut self) {
        if let Some(mut qp) = self.qp.take() {
            let (chans, free) = (&mut self.chans, &mut self.free_chans);
            qp.abort_all(|c| Self::route(chans, free, c));
        }
    }
}

thread_local! {
    /// This reactor's qpairs, by controller id.
    static QPAIRS: RefCell<HashMap<u64, Rc<RefCell<ReactorQp>>>> = RefCell::new(HashMap::new());
}

/// The status a bdev consumer sees for an initiator I/O error.
fn io_status(e: IoError) -> IoStatus {
    match e {
        // The remote's own status, for the consumer (or our NVMe-oF target) to pass on.
        IoError::Nvme(s) => IoStatus::Nvme {
            sct: s.sct,
            sc: s.sc,
        },
        // Path down past fast_io_fail_timeout, controller failed or detached.
        IoError::PathFailed => IoStatus::IoError(libc::EIO),
        IoError::TimedOut => IoStatus::IoError(libc::ETIMEDOUT),
    }
}

fn submit_status(k: SubmitErrorKind) -> IoStatus {
    match k {
        SubmitErrorKind::BadLength
        | SubmitErrorKind::ReadOnlyBuffer
        | SubmitErrorKind::NotDmaMemory => IoStatus::InvalidBuffer,
        SubmitErrorKind::PathFailed => IoStatus::IoError(libc::EIO),
        SubmitErrorKind::QueueFull => IoStatus::IoError(libc::EAGAIN),
    }
}
// ------------------------------------------------------------------------- channel

pub(super) struct NvmeChannel {
    slot: Rc<RefCell<ReactorQp>>,
    idx: u32,
    nsid: u32,
    block_size: u64,
    /// Largest piece, a whole number of blocks.
    max_xfer: usize,
    gone: Arc<AtomicBool>,
}
impl NvmeChannel {
    /// A channel of `bdev` on this reactor's qpair of its controller.
    pub(super) fn open(bdev: &NvmeBdev) -> Result<Self, BdevError> {
        let slot = QPAIRS
            .with(|m| m.borrow().get(&bdev.ctrlr_id).cloned())
            .ok_or_else(|| BdevError::Io {
                what: format!(
                    "{}: no I/O queue of controller {} on this thread (not a reactor, or the \
                     controller granted fewer queues than there are reactors)",
                    bdev.info.name, bdev.ctrlr_name
                ),
                source: std::io::Error::from_raw_os_error(libc::ENXIO),
            })?;
        let idx = {
            let mut s = slot.borrow_mut();
            if s.free_chans.is_empty() && s.chans.len() >= MAX_CHANNELS {
                return Err(BdevError::InvalidParam(format!(
                    "{}: {MAX_CHANNELS} channels already share this reactor's queue",
                    bdev.info.name
                )));
            }
            let st = ChanState {
                open: true,
                ..Default::default()
            };
            match s.free_chans.pop() {
                Some(i) => {
                    s.chans[i as usize] = st;
                    i
                }
                None => {
                    s.chans.push(st);
                    (s.chans.len() - 1) as u32
                }
            }
        };
        Ok(NvmeChannel {
            slot,
            idx,
            nsid: bdev.nsid,
            block_size: bdev.info.block_size as u64,
            max_xfer: bdev.max_xfer.max(bdev.info.block_size) as usize,
            gone: bdev.gone.clone(),
        })
    }

    /// How many pieces `submit` sends a buffer of `len` bytes in: whole when the remote takes
    /// it in one (even empty), else cut every `max_xfer` bytes. `submit`'s cutting loop cuts
    /// by the same rule, and the rejoin by what it recorded.
    fn pieces_of(&self, len: usize) -> usize {
        // The common case first: it costs a compare where a division costs tens of cycles.
        if len <= self.max_xfer {
            1
        } else {
            len.div_ceil(self.max_xfer)
        }
    }

    fn pieces(&self, io: &BdevIo) -> u64 {
        match io.io_type {
            IoType::Read | IoType::Write => {
                io.bufs.iter().map(|b| self.pieces_of(b.len()) as u64).sum()
            }
            IoType::Unmap | IoType::WriteZeroes => io.num_blocks.div_ceil(MAX_ZEROES_BLOCKS),
            IoType::Flush | IoType::Reset => 1,
        }
    }
}

impl BdevChannel for NvmeChannel {
    fn submit(&mut self, mut io: BdevIo) -> Result<(), BdevIo> {
        let mut guard = self.slot.borrow_mut();
        let s = &mut *guard;
        let ch = &mut s.chans[self.idx as usize];
        let Some(qp) = s.qp.as_mut().filter(|_| !self.gone.load(Ordering::Acquire)) else {
            ch.ready.push_back(io.complete(IoStatus::Aborted));
            return Ok(());
        };
        let pieces = self.pieces(&io);
        let room = (qp.depth() as usize).saturating_sub(qp.outstanding()) as u64;
        if pieces > qp.depth() as u64 {
            // Could never fit, however long the consumer waits.
            ch.ready.push_back(io.complete(IoStatus::InvalidBuffer));
            return Ok(());
        }
        if pieces > room {
            return Err(io);
        }
        let (io_type, offset, nblocks) = (io.io_type, io.offset_blocks, io.num_blocks);
        let bufs = std::mem::take(&mut io.bufs);
        let i = ch.alloc(Inflight {
            io,
            pending: pieces as u32,
            status: IoStatus::Success,
            pieces: (0..pieces).map(|_| None).collect(),
            cuts: SmallVec::new(),
        });
        let chan = self.idx;
        let nsid = self.nsid;
        let bs = self.block_size;
        let mut failed = 0u32;
        let mut first_err = None;
        let mut returned: SmallVec<[(usize, BufView); 1]> = SmallVec::new();
        let mut note = |piece: usize, r: Result<(), initiator::SubmitError<BufView>>| {
            if let Err(e) = r {
                failed += 1;
                first_err.get_or_insert(submit_status(e.kind));
                if let Some(b) = e.buf {
                    returned.push((piece, b));
                }
            }
        };
        match io_type {
            IoType::Read | IoType::Write => {
                // Each buffer goes in pieces the remote takes whole, as views (no copy), by
                // `pieces_of`'s rule: cut while more than `max_xfer` bytes are left.
                let mut cuts: SmallVec<[u16; 2]> = SmallVec::new();
                let (mut p, mut lba) = (0, offset);
                for mut rest in bufs {
                    let mut n = 0u16;
                    loop {
                        // A buffer the remote takes in one piece is not cut: cutting makes it a
                        // shared view, an allocation per I/O and its free when it comes home.
                        let tail = if rest.len() > self.max_xfer {
                            rest.split_off(self.max_xfer)
                        } else {
                            None
                        };
                        let blocks = rest.len() as u64 / bs;
                        let t = tag(chan, p, i);
                        note(
                            p,
                            if io_type == IoType::Read {
                                qp.read(nsid, lba, blocks as u32, rest, t)
                            } else {
                                qp.write(nsid, lba, blocks as u32, rest, t)
                            },
                        );
                        (p, lba, n) = (p + 1, lba + blocks, n + 1);
                        match tail {
                            Some(t) => rest = t,
                            None => break,
                        }
                    }
                    cuts.push(n);
                }
                if let Some(f) = ch.ios[i as usize].as_mut() {
                    f.cuts = cuts;
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // Unmap as Write Zeroes with Deallocate: the target may unmap, and reads return
                // zeroes either way (stronger than a bare DSM deallocate).
                let deac = io_type == IoType::Unmap;
                let mut lba = offset;
                let end = offset + nblocks;
                while lba < end {
                    let n = (end - lba).min(MAX_ZEROES_BLOCKS);
                    note(
                        0,
                        qp.write_zeroes(nsid, lba, n as u32, deac, tag(chan, 0, i)),
                    );
                    lba += n;
                }
            }
            IoType::Flush | IoType::Reset => note(0, qp.flush(nsid, tag(chan, 0, i))),
        }
        if failed > 0 {
            let ch = &mut s.chans[self.idx as usize];
            if let Some(f) = ch.ios[i as usize].as_mut() {
                for (p, b) in returned {
                    f.pieces[p] = Some(b);
                }
                f.pending -= failed;
                f.status = first_err.unwrap_or(IoStatus::IoError(libc::EIO));
                if f.pending == 0 {
                    ch.finish(i);
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut n = 0;
        loop {
            // The borrow ends before `done` runs: the consumer may submit from inside it.
            let c = self.slot.borrow_mut().chans[self.idx as usize]
                .ready
                .pop_front();
            match c {
                Some(c) => {
                    done(c);
                    n += 1;
                }
                None => return n,
            }
        }
    }
}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        let mut s = self.slot.borrow_mut();
        let ch = &mut s.chans[self.idx as usize];
        ch.open = false;
        ch.ready.clear();
        if ch.inflight == 0 {
            *ch = ChanState::default();
            s.free_chans.push(self.idx);
        }
        // Otherwise the slot stays taken until its last completion arrives (and is dropped):
        // reusing it earlier could hand a stale completion to a new channel.
    }
}

// ------------------------------------------------------------------------- reactor side

pub(super) fn install_qpair(
    h: &ReactorHandle,
    id: u64,
    name: &str,
    qp: Qpair,
) -> Result<(), crate::reactor::ReactorError> {
    let pname = format!("bdev_nvme {name}");
    h.call_blocking(move |ctx| {
        let slot = Rc::new(RefCell::new(ReactorQp {
            qp: Some(qp),
            ..Default::default()
        }));
        let s2 = slot.clone();
        let poller = ctx.add_poller(fn_poller(pname, move |_ctx| {
            let mut g = s2.borrow_mut();
            let ReactorQp {
                qp,
                chans,
                free_chans,
                ..
            } = &mut *g;
            let Some(qp) = qp.as_mut() else {
                return PollStatus::Done;
            };
            let n = qp.poll(|c| ReactorQp::route(chans, free_chans, c));
            // The qpair has no descriptor the reactor could sleep on, so it spins while I/O
            // is in flight; while disconnected or reconnecting (a step per poll), the
            // reactor's 10 ms nap is fine.
            if n > 0 || (qp.outstanding() > 0 && qp.is_connected()) {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        }));
        slot.borrow_mut().poller = poller;
        QPAIRS.with(|m| m.borrow_mut().insert(id, slot));
    })
}

/// On the reactor: takes controller `id`'s qpair off it, failing what is in flight.
pub(super) fn remove_qpair(ctx: &mut ReactorCtx, id: u64) {
    if let Some(slot) = QPAIRS.with(|m| m.borrow_mut().remove(&id)) {
        let mut s = slot.borrow_mut();
        s.shut();
        ctx.remove_poller(s.poller);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_bdev_status() {
        use nvme_spec::Status;
        assert_eq!(
            io_status(IoError::Nvme(Status::new(0, 0x80))),
            IoStatus::Nvme { sct: 0, sc: 0x80 }
        );
        assert_eq!(io_status(IoError::PathFailed), IoStatus::IoError(libc::EIO));
        assert_eq!(
            submit_status(SubmitErrorKind::BadLength),
            IoStatus::InvalidBuffer
        );
    }

    #[test]
    fn a_channel_off_a_reactor_is_a_clear_error() {
        let b = NvmeBdev {
            info: BdevInfo::new(
                "Nvme7n1".into(),
                "NVMe disk",
                512,
                8,
                Uuid::new_v4(),
                IoTypes::all(),
            ),
            ctrlr_id: u64::MAX,
            ctrlr_name: "Nvme7".into(),
            nsid: 1,
            max_xfer: 4096,
            gone: Arc::default(),
        };
        let e = b.open_channel(None).err().expect("no qpair on this thread");
        assert!(e.to_string().contains("no I/O queue"), "{e}");
    }
}
