//! The per-reactor side of `nvme`: each reactor's qpair of a controller (in a thread-local
//! map), the channels sharing it, the routing of completions to them, and the views a large
//! I/O is sent as.

use super::*;
use crate::reactor::{fn_poller, PollStatus, ReactorCtx, ReactorHandle};
use initiator::{IoError, IoQpair, SubmitErrorKind};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;

/// Most blocks one Write Zeroes carries (NLB is 16 bits, 0-based).
const MAX_ZEROES_BLOCKS: u64 = 1 << 16;

// ------------------------------------------------------------------------- buffer views

/// A piece of a bdev buffer handed to the qpair. The `DmaBuf` it points into stays in the
/// channel's in-flight slot until every piece has completed, and DMA memory never moves or
/// is unmapped, so the view stays valid for as long as the qpair holds it.
pub(super) struct View {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a View is the exclusive window on its bytes (pieces of one I/O never overlap, and
// the owning BdevIo is not touched until all pieces are back); moving it between threads is
// moving that exclusive access.
unsafe impl Send for View {}

impl Deref for View {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in a live DmaBuf held by the in-flight slot (see View).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for View {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; the view is the only access to these bytes while it exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

pub(super) type Qpair = IoQpair<View>;

// ------------------------------------------------------------------------- per reactor

/// One I/O in flight on a channel: the bdev I/O (owning the buffers) and its pieces.
struct Inflight {
    io: BdevIo,
    pending: u32,
    status: IoStatus,
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
        if let Some(f) = self.ios.get_mut(i as usize).and_then(Option::take) {
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
    /// Routes one finished piece to its channel.
    fn route(
        chans: &mut [ChanState],
        free_chans: &mut Vec<u32>,
        tag: u64,
        result: Result<(), IoError>,
    ) {
        let (ci, ii) = ((tag >> 32) as usize, tag as u32);
        let Some(ch) = chans.get_mut(ci) else { return };
        let Some(f) = ch.ios.get_mut(ii as usize).and_then(Option::as_mut) else {
            return;
        };
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
            qp.abort_all(|c| Self::route(chans, free, c.tag, c.result));
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
        SubmitErrorKind::BadLength => IoStatus::InvalidBuffer,
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

    fn pieces(&self, io: &BdevIo) -> u64 {
        match io.io_type {
            IoType::Read | IoType::Write => io
                .bufs
                .iter()
                .map(|b| b.len().div_ceil(self.max_xfer) as u64)
                .sum(),
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
        // Views are taken before the I/O moves into its slot; its buffers' bytes do not move.
        let mut views: SmallVec<[(u64, View); 4]> = SmallVec::new();
        if io.io_type.has_data() {
            let mut lba = io.offset_blocks;
            for b in io.bufs.iter_mut() {
                let base = b.as_mut_ptr();
                let mut off = 0;
                while off < b.len() {
                    let len = (b.len() - off).min(self.max_xfer);
                    // SAFETY: off + len <= b.len(), so the pointer stays inside the buffer.
                    let p = unsafe { base.add(off) };
                    if let Some(ptr) = NonNull::new(p) {
                        views.push((lba, View { ptr, len }));
                    }
                    lba += len as u64 / self.block_size;
                    off += len;
                }
            }
        }
        let (io_type, offset, nblocks) = (io.io_type, io.offset_blocks, io.num_blocks);
        let i = ch.alloc(Inflight {
            io,
            pending: pieces as u32,
            status: IoStatus::Success,
        });
        let tag = (u64::from(self.idx) << 32) | u64::from(i);
        let nsid = self.nsid;
        let bs = self.block_size;
        let mut failed = 0u32;
        let mut first_err = None;
        let mut note = |r: Result<(), initiator::SubmitError<View>>| {
            if let Err(e) = r {
                failed += 1;
                first_err.get_or_insert(submit_status(e.kind));
            }
        };
        match io_type {
            IoType::Read | IoType::Write => {
                for (lba, v) in views {
                    let n = (v.len as u64 / bs) as u32;
                    note(if io_type == IoType::Read {
                        qp.read(nsid, lba, n, v, tag)
                    } else {
                        qp.write(nsid, lba, n, v, tag)
                    });
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
                    note(qp.write_zeroes(nsid, lba, n as u32, deac, tag));
                    lba += n;
                }
            }
            IoType::Flush | IoType::Reset => note(qp.flush(nsid, tag)),
        }
        if failed > 0 {
            let ch = &mut s.chans[self.idx as usize];
            if let Some(f) = ch.ios[i as usize].as_mut() {
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
            let n = qp.poll(|c| ReactorQp::route(chans, free_chans, c.tag, c.result));
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
        let e = b.open_channel().err().expect("no qpair on this thread");
        assert!(e.to_string().contains("no I/O queue"), "{e}");
    }
}
