//! One NVMe queue pair on PCIe: rings in DMA memory, doorbells in BAR0, completions found by
//! their phase bit.
//!
//! - Submission: the command goes into the ring at the tail with its PRPs; the tail doorbell
//!   is written once per batch, at the next poll or flush, after a fence so the device sees
//!   the entries before the doorbell.
//! - Data: the buffer's IOVA gives PRP1; a transfer crossing one page boundary takes PRP2 as
//!   the second page, a longer one a PRP list from the command slot's own list page, written
//!   in place: nothing is allocated per I/O. The admin queue copies buffers without an IOVA
//!   (its `Vec<u8>` control buffers) through a DMA bounce buffer; an I/O queue refuses them.
//! - Completion: entries whose phase bit matches the expected phase are new; the head wraps
//!   and the expected phase flips at the end of the ring; the head doorbell is written once
//!   per poll.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dma::DmaBuf;
use nvme_spec::cmd::CreateIoQueue;
use nvme_spec::cmd::SglDescriptor;
use nvme_spec::opcode::admin;
use nvme_spec::regs::offset as reg;
use nvme_spec::{Command, Completion, IntoBytes, Status};

use super::{PcieDevice, QueueSetup, MAX_TRANSFER, PAGE};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::slots::{SlotPart, Slots};
use crate::transport::{ConnParams, ConnectProgress, Dir, Done};

const SQE: usize = 64;
const CQE: usize = 16;
/// PRP entries in one list page.
const PRP_PER_PAGE: usize = (PAGE as usize) / 8;
/// Largest ring we build: 1024 entries keep each ring and the PRP lists within one pool buffer.
pub(crate) const MAX_DEPTH: u16 = 1024;

/// What a PCIe queue keeps per command besides the common slot (`crate::slots`, whose
/// command is written into the ring again if a controller reset cuts it off).
#[derive(Default)]
struct PcieSlot {
    /// The DMA copy of a buffer without an IOVA (admin queue only).
    bounce: Option<DmaBuf>,
}

impl SlotPart for PcieSlot {
    fn finished(&mut self) {
        self.bounce = None;
    }
}

pub(crate) struct PcieQueue<B> {
    pub params: ConnParams,
    dev: Arc<PcieDevice>,
    depth: u16,
    sq: Option<DmaBuf>,
    cq: Option<DmaBuf>,
    /// One PRP list page per command slot.
    prp: Option<DmaBuf>,
    sq_tail: u16,
    /// Submissions written since the tail doorbell was last rung.
    sq_unrung: bool,
    cq_head: u16,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
    /// `depth - 1` command slots: a ring of N entries holds N - 1 commands. (The slots'
    /// internal one, for a fabrics Connect, is never used here.)
    slots: Slots<B, PcieSlot>,
    connected: bool,
    /// Waiting for the controller to create this I/O queue again.
    connecting: bool,
}

impl<B: IoBuf> PcieQueue<B> {
    pub fn new(params: ConnParams, dev: Arc<PcieDevice>) -> Self {
        let depth = params
            .qsize
            .clamp(2, MAX_DEPTH)
            .min((dev.cap.max_queue_entries()).clamp(2, u32::from(MAX_DEPTH)) as u16);
        PcieQueue {
            params,
            dev,
            depth,
            sq: None,
            cq: None,
            prp: None,
            sq_tail: 0,
            sq_unrung: false,
            cq_head: 0,
            phase: true,
            sq_doorbell: 0,
            cq_doorbell: 0,
            slots: Slots::new(depth - 1),
            connected: false,
            connecting: false,
        }
    }

    fn qid(&self) -> u16 {
        self.params.qid
    }

    pub fn device(&self) -> &PcieDevice {
        &self.dev
    }

    /// Allocates the rings (zeroed: no entry carries the first expected phase) and resets the
    /// queue's positions.
    fn prepare(&mut self) -> Result<()> {
        // At least a page each: pool buffers of 4 KiB and more are aligned to their size, and
        // rings must start on a page.
        let dma = |len: usize| {
            DmaBuf::zeroed(len.max(PAGE as usize)).map_err(|e| Error::Unsupported(e.to_string()))
        };
        let depth = self.depth as usize;
        let sq = dma(depth * SQE)?;
        let cq = dma(depth * CQE)?;
        let prp = dma(depth * PAGE as usize)?;
        for b in [&sq, &cq, &prp] {
            if b.iova().is_none() {
                return Err(Error::Unsupported(
                    "DMA memory has no IOVA: the VFIO container is not registered".into(),
                ));
            }
        }
        let (Some(sqd), Some(cqd)) = (
            self.dev.doorbell(self.qid(), false),
            self.dev.doorbell(self.qid(), true),
        ) else {
            return Err(Error::Unsupported(format!(
                "queue {} has no doorbell inside BAR0 of {}",
                self.qid(),
                self.dev.addr
            )));
        };
        self.sq = Some(sq);
        self.cq = Some(cq);
        self.prp = Some(prp);
        self.reset_shadow();
        self.sq_doorbell = sqd;
        self.cq_doorbell = cqd;
        self.reset_positions();
        self.slots = Slots::new(self.depth - 1);
        Ok(())
    }

    /// A queue about to be created starts its shadow doorbells at zero, as its positions.
    fn reset_shadow(&self) {
        if let Some(s) = &self.dev.shadow {
            s.reset_queue(self.qid());
        }
    }

    fn ring_iova(b: &Option<DmaBuf>) -> u64 {
        b.as_ref().and_then(DmaBuf::iova).unwrap_or(0)
    }

    /// The admin commands that make an I/O queue exist on the controller: Create I/O CQ, then
    /// Create I/O SQ on it. Allocates the rings. None for the admin queue (its registers do it).
    pub fn setup_commands(&mut self) -> Result<Vec<Command>> {
        if self.qid() == 0 {
            return Ok(Vec::new());
        }
        self.prepare()?;
        Ok(self.create_commands())
    }

    /// Create I/O CQ, then Create I/O SQ on it, for this queue's rings.
    fn create_commands(&self) -> Vec<Command> {
        let create = |opcode, ring: u64, is_sq: bool| {
            let mut c = Command::new(opcode);
            CreateIoQueue {
                qid: self.qid(),
                qsize: u32::from(self.depth),
                pc: true,
                iv_or_cqid: if is_sq { self.qid() } else { 0 },
                ..Default::default()
            }
            .apply(&mut c, is_sq);
            c.set_prps(ring, 0);
            c
        };
        vec![
            create(admin::CREATE_IO_CQ, Self::ring_iova(&self.cq), false),
            create(admin::CREATE_IO_SQ, Self::ring_iova(&self.sq), true),
        ]
    }

    /// The admin commands that remove this I/O queue from the controller (SQ first).
    pub fn teardown_commands(&self) -> Vec<Command> {
        if self.qid() == 0 {
            return Vec::new();
        }
        [admin::DELETE_IO_SQ, admin::DELETE_IO_CQ]
            .into_iter()
            .map(|op| {
                let mut c = Command::new(op);
                c.cdw10.set(u32::from(self.qid()));
                c
            })
            .collect()
    }

    /// Admin queue: disables the controller (stopping all DMA) and programs AQA/ASQ/ACQ; the
    /// controller layer then enables it. I/O queue: the Create commands already ran.
    pub fn connect(&mut self, cntlid: u16) -> Result<u16> {
        if self.qid() == 0 {
            self.dev.disable()?;
            self.prepare()?;
            let d = u32::from(self.depth - 1);
            self.dev.write32(reg::AQA, d | (d << 16));
            self.dev
                .bar
                .write64(reg::ASQ as usize, Self::ring_iova(&self.sq));
            self.dev
                .bar
                .write64(reg::ACQ as usize, Self::ring_iova(&self.cq));
            // PCIe has no Connect to hand out a controller ID; Identify reports it.
            self.connected = true;
            return Ok(0);
        } else if self.sq.is_none() {
            return Err(Error::Unsupported(
                "a PCIe I/O queue is created by the controller (setup_commands) before it connects"
                    .into(),
            ));
        }
        self.connected = true;
        Ok(cntlid)
    }

    /// After a controller reset (which deleted every I/O queue on the device): asks the
    /// controller's owner to create this queue again on the same rings; [`Self::poll_connect`]
    /// finishes once it has, resubmitting the commands the reset cut off.
    pub fn start_connect(&mut self, cntlid: u16) -> Result<()> {
        if self.qid() == 0 {
            return self.connect(cntlid).map(drop);
        }
        if self.sq.is_none() {
            return Err(Error::Disconnected);
        }
        self.reset_shadow();
        self.dev.post_setup(QueueSetup {
            qid: self.qid(),
            deletes: self.teardown_commands(),
            creates: self.create_commands(),
        });
        self.connecting = true;
        Ok(())
    }

    pub fn poll_connect(&mut self) -> Result<ConnectProgress> {
        if self.connected {
            return Ok(ConnectProgress::Connected { cntlid: 0 });
        }
        if !self.connecting {
            return Err(Error::Disconnected);
        }
        if !self.dev.take_ready(self.qid()) {
            return Ok(ConnectProgress::InProgress);
        }
        self.connecting = false;
        self.restart_rings();
        self.connected = true;
        Ok(ConnectProgress::Connected { cntlid: 0 })
    }

    /// Fresh positions on the same rings, and every command still outstanding written into
    /// the submission ring again (its PRPs and list page are unchanged).
    fn restart_rings(&mut self) {
        if let Some(cq) = self.cq.as_mut() {
            cq.fill(0);
        }
        self.reset_positions();
        let now = crate::ticks::now();
        for cid in 0..self.slots.len() {
            if !self.slots[cid].active {
                continue;
            }
            let sqe = self.slots[cid].sqe;
            self.push_sqe(&sqe);
            self.slots[cid].started = now;
        }
        self.ring_sq();
    }

    pub fn is_connecting(&self) -> bool {
        self.connecting
    }

    pub fn disconnect(&mut self) {
        self.connected = false;
        self.connecting = false;
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn depth(&self) -> u16 {
        self.slots.depth()
    }

    pub fn outstanding(&self) -> usize {
        self.slots.outstanding()
    }

    pub fn busy(&self) -> bool {
        self.slots.outstanding() > 0
    }

    pub fn flush(&mut self) -> Result<()> {
        self.ring_sq();
        Ok(())
    }

    /// Polled mode: nothing to wait on but time.
    pub fn wait_readable(&self, t: Duration) {
        std::thread::sleep(t.min(Duration::from_micros(200)));
    }

    pub fn submit(
        &mut self,
        mut sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
    ) -> Result<u16, Option<B>> {
        // An I/O queue between a controller reset and its re-creation holds new commands in
        // their slots; they go into the ring with those the reset cut off.
        let hold = !self.connected;
        if hold && (self.qid() == 0 || self.sq.is_none()) {
            return Err(buf);
        }
        let Some(cid) = self.slots.take() else {
            return Err(buf);
        };
        let mut bounce = None;
        let data_iova = match &buf {
            None => None,
            Some(b) if b.is_empty() => None,
            Some(b) => match b.iova() {
                Some(i) => Some((i, b.len())),
                None if self.qid() == 0 => match DmaBuf::new(b.len()) {
                    Ok(mut d) => {
                        if dir == Dir::ToCtrl {
                            d.copy_from_slice(b);
                        }
                        let at = d.iova().map(|i| (i, d.len()));
                        bounce = Some(d);
                        at
                    }
                    Err(_) => None,
                },
                None => None,
            },
        };
        if buf.as_ref().is_some_and(|b| !b.is_empty()) && data_iova.is_none() {
            self.slots.put_back(cid);
            return Err(buf);
        }
        // Without data the command keeps its own pointer (Create I/O CQ/SQ name their rings).
        if let Some((iova, len)) = data_iova {
            // One SGL data block instead of a PRP list where the controller takes it (an
            // admin command always uses PRPs).
            if self.qid() != 0 && needs_prp_list(iova, len) && self.dev.sgl_fits(iova, len) {
                sqe.set_sgl1(SglDescriptor::data_block(iova, len as u32));
            } else {
                let Some((prp1, prp2)) = self.prps(cid, iova, len) else {
                    self.slots.put_back(cid);
                    return Err(buf);
                };
                sqe.set_prps(prp1, prp2);
            }
        }
        let s = self.slots.start(cid, sqe, dir, buf, tag, false);
        s.t.bounce = bounce;
        let sqe = s.sqe;
        if !hold {
            self.push_sqe(&sqe);
        }
        Ok(cid)
    }

    /// Writes `sqe` at the submission ring's tail. The doorbell waits for the next poll or
    /// flush: one register write per batch of submissions, not per command (each is a bus
    /// transaction, or a VM exit when emulated).
    fn push_sqe(&mut self, sqe: &Command) {
        let at = self.sq_tail as usize * SQE;
        if let Some(ring) = self.sq.as_mut() {
            ring[at..at + SQE].copy_from_slice(sqe.as_bytes());
        }
        self.sq_tail = (self.sq_tail + 1) % self.depth;
        self.sq_unrung = true;
    }

    /// Both rings from their start, as the controller takes a queue it has just created.
    fn reset_positions(&mut self) {
        self.sq_tail = 0;
        self.sq_unrung = false;
        self.cq_head = 0;
        self.phase = true;
    }

    /// Tells the device of the submissions since the last doorbell.
    fn ring_sq(&mut self) {
        if self.sq_unrung {
            self.sq_unrung = false;
            // The entries must be in memory before the device hears of them.
            fence(Ordering::SeqCst);
            self.dev
                .ring(self.qid(), false, self.sq_doorbell, self.sq_tail);
        }
    }

    /// PRP1/PRP2 for `len` bytes at `iova`, with slot `cid`'s list page if needed.
    fn prps(&mut self, cid: u16, iova: u64, len: usize) -> Option<(u64, u64)> {
        let list = self.prp.as_mut()?;
        let at = cid as usize * PAGE as usize;
        let list_iova = list.iova()? + at as u64;
        prp_entries(iova, len, &mut list[at..at + PAGE as usize], list_iova)
    }

    /// The completion at the head, if the device has posted it (its phase bit is current).
    fn peek(&self) -> Option<Completion> {
        let cq = self.cq.as_ref()?;
        let at = self.cq_head as usize * CQE;
        let entry = cq[at..at + CQE].as_ptr();
        // SAFETY: `entry` points at CQE in-bounds bytes of our ring; the device writes them
        // asynchronously, hence a volatile read of the status word first and of the whole
        // entry only once its phase bit says it is complete.
        let status = unsafe { entry.add(14).cast::<u16>().read_volatile() };
        if (u16::from_le(status) & 1 != 0) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        // SAFETY: as above; the entry is complete and the device will not touch it again
        // until we move the head past it.
        let bytes = unsafe { entry.cast::<[u8; CQE]>().read_volatile() };
        Completion::read(&bytes)
    }

    /// Rings the submission doorbell and takes up to `max` completions.
    pub fn poll(&mut self, max: usize, on_done: &mut impl FnMut(Done<B>)) -> Result<usize> {
        if !self.connected {
            return Err(Error::Disconnected);
        }
        self.ring_sq();
        let (mut n, head) = (0, self.cq_head);
        while n < max {
            let Some(c) = self.peek() else { break };
            self.cq_head += 1;
            if self.cq_head == self.depth {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            let cid = c.cid();
            if !self.slots.is_active(cid) {
                tracing::warn!(
                    qid = self.qid(),
                    cid,
                    "completion for no outstanding command; ignored"
                );
                continue;
            }
            n += 1;
            on_done(self.finish(cid, c.status(), c.result.get(), c.dw1.get()));
        }
        // Every consumed entry frees its slot for the device, a stray one included.
        if self.cq_head != head {
            self.dev
                .ring(self.qid(), true, self.cq_doorbell, self.cq_head);
        }
        Ok(n)
    }

    /// Ends `cid`'s command; read data that went through a bounce buffer is copied out first.
    fn finish(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) -> Done<B> {
        let s = &mut self.slots[cid as usize];
        if let (Some(bounce), Some(b)) = (s.t.bounce.take(), s.buf.as_mut()) {
            if s.dir == Dir::ToHost {
                if let Some(dst) = b.bytes_mut() {
                    dst.copy_from_slice(&bounce);
                }
            }
        }
        self.slots.finish(cid, status, dw0, dw1)
    }

    /// Completes every outstanding command with `status`. Only sound once the controller is
    /// disabled (the admin queue's connect does that first): until then it may still DMA.
    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        self.slots.fail_all(status, on_done);
    }

    /// Completes active command `cid` with `status` now (`Queue::fail_aborted`).
    pub fn fail_one(&mut self, cid: u16, status: Status) -> Done<B> {
        self.finish(cid, status, 0, 0)
    }

    pub fn for_each_active(&mut self, f: impl FnMut(u16, &mut u64, &mut bool, u64)) {
        self.slots.for_each_active(f)
    }
}

impl<B> Drop for PcieQueue<B> {
    fn drop(&mut self) {
        let outstanding = self.slots.outstanding();
        if outstanding == 0 {
            return;
        }
        // The device may still read or write the rings and the data of commands it has not
        // completed: that memory must never go back to the pool for someone else. (The admin
        // queue always has its Asynchronous Event Request out: expected, not worth a warning.)
        if self.params.qid == 0 {
            tracing::debug!(outstanding, "admin queue dropped; its rings are leaked");
        } else {
            tracing::warn!(
                qid = self.params.qid,
                outstanding,
                "PCIe queue dropped with commands outstanding; their memory is leaked, not reused"
            );
        }
        std::mem::forget(self.sq.take());
        std::mem::forget(self.cq.take());
        std::mem::forget(self.prp.take());
        for s in self.slots.iter_mut() {
            std::mem::forget(s.buf.take());
            std::mem::forget(s.t.bounce.take());
        }
    }
}

/// Whether `len` bytes at `iova` span more than two pages, so PRPs would need a list.
fn needs_prp_list(iova: u64, len: usize) -> bool {
    len as u64 > 2 * PAGE - iova % PAGE
}

/// PRP1 and PRP2 for `len` bytes at `iova` (4 KiB pages): PRP2 is the second page when the
/// data ends there, else the IOVA of `list` (at `list_iova`), filled with the pages after the
/// first. None when the transfer does not fit one list page or is not dword-aligned.
fn prp_entries(iova: u64, len: usize, list: &mut [u8], list_iova: u64) -> Option<(u64, u64)> {
    if !iova.is_multiple_of(4) || len > MAX_TRANSFER as usize {
        return None;
    }
    let first = (PAGE - iova % PAGE) as usize;
    if len <= first {
        return Some((iova, 0));
    }
    let second = (iova & !(PAGE - 1)) + PAGE;
    let pages = (len - first).div_ceil(PAGE as usize);
    if pages == 1 {
        return Some((iova, second));
    }
    if pages > PRP_PER_PAGE || list.len() < pages * 8 {
        return None;
    }
    for (k, e) in list.chunks_exact_mut(8).take(pages).enumerate() {
        e.copy_from_slice(&(second + k as u64 * PAGE).to_le_bytes());
    }
    Some((iova, list_iova))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[u8], n: usize) -> Vec<u64> {
        list.chunks_exact(8)
            .take(n)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn only_a_transfer_past_two_pages_needs_a_prp_list() {
        assert!(!needs_prp_list(0x1000, 4096));
        assert!(!needs_prp_list(0x1000, 8192));
        assert!(needs_prp_list(0x1000, 8193));
        // Starting inside a page: the first page holds less.
        assert!(!needs_prp_list(0x1800, 6144));
        assert!(needs_prp_list(0x1800, 6145));
        assert!(needs_prp_list(0x1000, 128 << 10));
    }

    #[test]
    fn prps_follow_the_page_boundaries() {
        let mut list = vec![0u8; PAGE as usize];
        let l = 0x9_0000_0000;
        assert_eq!(
            prp_entries(0x1_0000_1000, 4096, &mut list, l),
            Some((0x1_0000_1000, 0)),
            "one page"
        );
        assert_eq!(
            prp_entries(0x1_0000_1200, 0xe00, &mut list, l),
            Some((0x1_0000_1200, 0)),
            "rest of a page"
        );
        assert_eq!(
            prp_entries(0x1_0000_1000, 8192, &mut list, l),
            Some((0x1_0000_1000, 0x1_0000_2000)),
            "two pages: PRP2 is the second"
        );
        assert_eq!(
            prp_entries(0x1_0000_1200, 8192, &mut list, l),
            Some((0x1_0000_1200, l)),
            "three pages: a list"
        );
        assert_eq!(entries(&list, 2), [0x1_0000_2000, 0x1_0000_3000]);
        // 128 KiB aligned: PRP1 and a list of the 31 pages after it.
        assert_eq!(
            prp_entries(0x2_0000_0000, 128 << 10, &mut list, l),
            Some((0x2_0000_0000, l))
        );
        let e = entries(&list, 31);
        assert_eq!((e[0], e[30]), (0x2_0000_1000, 0x2_0001_f000));
        // The largest transfer, unaligned, fills the list page exactly; past it is refused.
        assert_eq!(
            prp_entries(0x3_0000_0200, 2 << 20, &mut list, l),
            Some((0x3_0000_0200, l))
        );
        assert_eq!(entries(&list, 512)[511], 0x3_0000_0000 + 512 * PAGE);
        assert_eq!(
            prp_entries(0x3_0000_0000, (2 << 20) + 4096, &mut list, l),
            None
        );
        assert_eq!(
            prp_entries(0x3_0000_0002, 512, &mut list, l),
            None,
            "not dword-aligned"
        );
    }
}
