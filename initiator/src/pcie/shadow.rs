//! Shadow doorbells (NVMe's Doorbell Buffer Config), where the controller offers them.
//!
//! Each queue writes its new SQ tail or CQ head into a page of host memory the controller
//! reads, and writes the doorbell register only when the controller's EventIdx page says it
//! asked to hear of that value. An emulated controller (QEMU's, a cloud's) reads the shadow
//! while it works, so under load most doorbell writes, each an exit to the hypervisor, are
//! skipped. Both pages are laid out as the doorbell registers are: queue `qid`'s SQ word at
//! `2 * qid` strides, its CQ word one stride later.

use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};

use dma::DmaBuf;

use super::PAGE;

/// 32-bit words in one page.
const WORDS: usize = PAGE as usize / 4;

pub(crate) struct ShadowDoorbells {
    /// What we write: each queue's latest tail or head.
    doorbells: DmaBuf,
    /// What the controller writes: the value it wants a register write for.
    event_idx: DmaBuf,
    /// Words between two doorbells (CAP.DSTRD).
    stride: usize,
    /// Doorbell Buffer Config succeeded for the controller's current enable.
    enabled: AtomicBool,
}

impl ShadowDoorbells {
    /// A page for each buffer, or None if DMA memory with device addresses is not at hand
    /// (the controller then works with registers alone).
    pub fn new(doorbell_stride_bytes: usize) -> Option<ShadowDoorbells> {
        let page = || {
            DmaBuf::zeroed(PAGE as usize)
                .ok()
                .filter(|b| b.iova().is_some())
        };
        Some(ShadowDoorbells {
            doorbells: page()?,
            event_idx: page()?,
            stride: (doorbell_stride_bytes / 4).max(1),
            enabled: AtomicBool::new(false),
        })
    }

    fn words(&self) -> usize {
        WORDS
    }

    /// Word `i` of `buf`, which only we (atomically) and the device (by DMA) ever touch.
    fn word<'a>(&self, buf: &'a DmaBuf, i: usize) -> &'a AtomicU32 {
        assert!(
            i < self.words(),
            "shadow doorbell index {i} outside its page"
        );
        // SAFETY: `i` is inside the page `buf` owns, which is 4 KiB-aligned (pool buffers of
        // a page are aligned to their size), so the u32 is aligned and lives as long as
        // `buf`. Nothing reads or writes these bytes through a Rust reference to `[u8]`:
        // only through these atomics, and the device through DMA.
        unsafe { &*(buf.addr() as *const AtomicU32).add(i) }
    }

    /// The shadow word of queue `qid`'s SQ tail (`cq == false`) or CQ head, if the page
    /// reaches it (an admin queue never uses one).
    fn index(&self, qid: u16, cq: bool) -> Option<usize> {
        word_index(qid, cq, self.stride)
    }

    /// Whether the pages hold the words of every queue up to `max_qid`.
    pub fn reaches(&self, max_qid: u16) -> bool {
        max_qid == 0 || self.index(max_qid, true).is_some()
    }

    /// Before Doorbell Buffer Config, when every I/O queue is gone (controller enable):
    /// zeroes both pages and returns their IOVAs (PRP1: doorbells, PRP2: EventIdx).
    pub fn prepare(&self) -> (u64, u64) {
        for i in 0..self.words() {
            self.word(&self.doorbells, i).store(0, Ordering::Relaxed);
            self.word(&self.event_idx, i).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        let iova = |b: &DmaBuf| b.iova().expect("checked in new");
        (iova(&self.doorbells), iova(&self.event_idx))
    }

    /// The controller accepted Doorbell Buffer Config.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// The controller was disabled, which voids its Doorbell Buffer Config: registers
    /// alone until it is configured again.
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
    }

    /// Before queue `qid` is created on the controller: its words start at zero, as its
    /// positions do.
    pub fn reset_queue(&self, qid: u16) {
        for cq in [false, true] {
            if let Some(i) = self.index(qid, cq) {
                self.word(&self.doorbells, i).store(0, Ordering::Relaxed);
                self.word(&self.event_idx, i).store(0, Ordering::Relaxed);
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Records queue `qid`'s new tail or head; returns whether the doorbell register must
    /// still be written (no shadow for this queue, or the controller asked for this value).
    pub fn update(&self, qid: u16, cq: bool, value: u16) -> bool {
        if !self.enabled.load(Ordering::Acquire) {
            return true;
        }
        let Some(i) = self.index(qid, cq) else {
            return true;
        };
        let shadow = self.word(&self.doorbells, i);
        let old = shadow.load(Ordering::Relaxed) as u16;
        shadow.store(u32::from(value), Ordering::Release);
        // The new value must be visible to the device before we read what it asked for,
        // or both sides could miss each other (a store then a load: a full fence).
        fence(Ordering::SeqCst);
        let event = self.word(&self.event_idx, i).load(Ordering::Acquire) as u16;
        needs_event(event, value, old)
    }
}

/// Whether moving a doorbell from `old` to `new` passes the controller's EventIdx `event`,
/// that is, `event` is in `[old, new)` going forward around the 16-bit circle.
fn needs_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Where queue `qid`'s SQ tail (`cq == false`) or CQ head word lies in a page of `PAGE`
/// bytes at `stride` words per doorbell, if the page reaches it and the queue is not the
/// admin queue.
fn word_index(qid: u16, cq: bool, stride: usize) -> Option<usize> {
    let i = (2 * usize::from(qid) + usize::from(cq)) * stride;
    (qid != 0 && i < WORDS).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::{needs_event, word_index};

    #[test]
    fn a_page_reaches_the_queues_its_doorbell_stride_leaves_room_for() {
        // DSTRD 0 (4-byte stride): 1,024 words, queue 511's CQ head is the last.
        assert_eq!(word_index(511, true, 1), Some(1023));
        assert_eq!(word_index(512, false, 1), None);
        // DSTRD 2 (16 bytes): a quarter of that.
        assert_eq!(word_index(127, true, 4), Some(1020));
        assert_eq!(word_index(128, false, 4), None);
        // The admin queue writes its registers.
        assert_eq!(word_index(0, false, 1), None);
    }

    #[test]
    fn a_doorbell_is_written_only_when_the_move_passes_the_event_index() {
        // The controller has seen up to 5 and wants to hear when 5 is passed.
        assert!(needs_event(5, 6, 5));
        assert!(needs_event(5, 9, 5));
        assert!(needs_event(5, 9, 3));
        // Still working behind the value it asked about: it reads the shadow itself.
        assert!(!needs_event(5, 9, 6));
        assert!(!needs_event(10, 9, 6));
        // No move, no write.
        assert!(!needs_event(5, 5, 5));
        // Around the end of the 16-bit circle.
        assert!(needs_event(u16::MAX, 1, u16::MAX - 1));
        assert!(needs_event(0, 2, u16::MAX));
        assert!(!needs_event(u16::MAX - 5, 1, 0));
    }
}
