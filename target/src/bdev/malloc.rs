//! `malloc`: a RAM disk in hugepage memory, for tests and benchmarks.

use super::*;
use dma::DmaRegion;

pub struct MallocBdev {
    info: BdevInfo,
    /// The disk's bytes, shared with every channel so that a channel can never outlive them.
    /// Channels on several reactors copy in and out concurrently through raw pointers, as a
    /// device's DMA engine would; overlapping I/O races as it does on real disks.
    mem: Arc<DmaRegion>,
}

impl MallocBdev {
    pub fn new(
        name: String,
        num_blocks: u64,
        block_size: u32,
        uuid: Uuid,
    ) -> Result<Self, BdevError> {
        check_geometry(num_blocks, block_size)?;
        let len = num_blocks
            .checked_mul(block_size as u64)
            .filter(|&l| l <= 1 << 40)
            .ok_or_else(|| BdevError::InvalidParam("malloc bdev larger than 1 TiB".into()))?;
        let mem = Arc::new(DmaRegion::new(len as usize)?);
        let info = BdevInfo::new(
            name,
            "Malloc disk",
            block_size,
            num_blocks,
            uuid,
            IoTypes::all(),
        );
        Ok(MallocBdev { info, mem })
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "malloc"
    }

    fn open_channel(&self, _: Option<&ReactorHandle>) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            mem: Arc::clone(&self.mem),
            block_size: self.info.block_size as u64,
            ready: ReadyQueue::default(),
            queued: VecDeque::new(),
            unfenced: false,
        }))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        Some(("bdev_malloc_create", self.info.geometry_params()))
    }
}

/// Small I/O is carried out at the channel's poll, not at submit. A target submits every
/// command it has just parsed before it polls, so the copies of a batch run back to back
/// after the parsing instead of between the commands. Over NVMe/TCP that cut plexd's core
/// time per 4 KiB write by 14-16 % and per 4 KiB read by 0-6 %
/// (`benches/reports/nvmf_tcp_malloc-20261204.md`). Larger I/O is carried out at once,
/// while a write's data is still in cache, after what is queued, so the order of submission
/// holds. Completion comes only from a poll either way.
struct MallocChannel {
    mem: Arc<DmaRegion>,
    block_size: u64,
    ready: ReadyQueue,
    /// Submitted I/O whose range was checked, with its byte offset and length on the disk.
    queued: VecDeque<(BdevIo, usize, usize)>,
    /// Streaming stores were made since the last fence (see `copy_to_disk`).
    unfenced: bool,
}

/// The largest I/O a channel queues for its poll (bytes).
const QUEUED_MAX: usize = 16 * 1024;

impl MallocChannel {
    /// The disk bytes of `io`'s range, checked here rather than trusted from the bdev layer:
    /// `Bdev::open_channel` is public, so a channel must not let any caller reach memory
    /// outside its disk. Reads and writes must bring buffers of exactly the range's length.
    /// Returns the byte offset and length.
    fn range(&self, io: &BdevIo) -> Result<(usize, usize), IoStatus> {
        let bytes = |blocks: u64| blocks.checked_mul(self.block_size);
        let (off, len) = bytes(io.offset_blocks)
            .zip(bytes(io.num_blocks))
            .ok_or(IoStatus::OutOfRange)?;
        match off.checked_add(len) {
            Some(end) if end <= self.mem.len() as u64 => {}
            _ => return Err(IoStatus::OutOfRange),
        }
        let carries_data = matches!(io.io_type, IoType::Read | IoType::Write);
        if carries_data && io.buf_len() as u64 != len {
            return Err(IoStatus::InvalidBuffer);
        }
        Ok((off as usize, len as usize))
    }

    fn execute_queued(&mut self) {
        while let Some((io, off, len)) = self.queued.pop_front() {
            self.execute(io, off, len);
        }
    }

    /// Carries out an I/O whose range `range()` checked.
    fn execute(&mut self, mut io: BdevIo, off: usize, len: usize) {
        // Stays inside the region: off + len <= its length, checked by range().
        let disk = self.mem.as_ptr().wrapping_add(off) as *mut u8;
        match io.io_type {
            IoType::Read => {
                if io.bufs.iter().any(|b| !b.is_writable()) {
                    self.ready.push(io.complete(IoStatus::InvalidBuffer));
                    return;
                }
                let mut at = disk;
                for dst in io.bufs.iter_mut().filter_map(|b| b.bytes_mut()) {
                    // SAFETY: range() checked that [disk, disk + len) lies inside the region
                    // and that the buffers add up to len; the channel holds the region alive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(at, dst.as_mut_ptr(), dst.len());
                        at = at.add(dst.len());
                    }
                }
            }
            IoType::Write => {
                let mut at = disk;
                for b in io.bufs.iter() {
                    // SAFETY: as for reads: range() bounds the copy, and the Arc keeps the region.
                    unsafe {
                        self.unfenced |= copy_to_disk(b.as_ptr(), at, b.len());
                        at = at.add(b.len());
                    }
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: range() checked that [disk, disk + len) lies inside the region.
                unsafe { std::ptr::write_bytes(disk, 0, len) };
            }
            IoType::Flush | IoType::Reset => {}
        }
        self.ready.push(io.complete(IoStatus::Success));
    }
}

impl BdevChannel for MallocChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        match self.range(&io) {
            Ok((off, len)) if len <= QUEUED_MAX => self.queued.push_back((io, off, len)),
            Ok((off, len)) => {
                self.execute_queued();
                self.execute(io, off, len);
            }
            Err(status) => self.ready.push(io.complete(status)),
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        self.execute_queued();
        // Completions leave only here: the writes they report reach every core first.
        if std::mem::take(&mut self.unfenced) {
            fence_streams();
        }
        self.ready.drain(done)
    }
}

/// The smallest copy into the disk made with streaming stores (bytes).
const STREAM_MIN: usize = 4096;

/// Copies a write's data into the disk. From `STREAM_MIN` bytes up it uses non-temporal
/// stores: the disk's lines are rarely in cache (a random 4 KiB of hundreds of MiB), and an
/// ordinary copy first reads every line it overwrites. Like a device's DMA, streaming stores
/// go straight to memory and evict nothing from the cache: twice and more the rate of writes
/// in our bdevperf (`benches/reports/malloc_stream-20261204.md`). The threshold was chosen
/// when every streaming copy paid a fence of its own: from 4 KiB the gain was clear, below
/// 2 KiB the fence cost more than the stores saved. Now one fence per poll serves every copy
/// of the batch; whether smaller copies would gain too was not measured.
///
/// Streaming stores are weakly ordered: returns true when it made any, and then the caller
/// must call `fence_streams` before another core may learn that the data is written. The
/// channel does so once per poll, before it hands out completions.
///
/// # Safety
/// As for `std::ptr::copy_nonoverlapping(src, dst, len)`.
unsafe fn copy_to_disk(src: *const u8, dst: *mut u8, len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if len >= STREAM_MIN && (dst as usize).is_multiple_of(16) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let body = len & !63;
        let mut i = 0;
        while i < body {
            // SAFETY: i + 64 <= len, so both 64-byte spans lie inside the ranges the caller
            // vouched for; dst + i is 16-byte aligned, as streaming stores need; SSE2 is part
            // of every x86_64.
            unsafe {
                let s = src.add(i) as *const __m128i;
                let d = dst.add(i) as *mut __m128i;
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            i += 64;
        }
        // SAFETY: the tail [body, len) is inside both ranges.
        unsafe { std::ptr::copy_nonoverlapping(src.add(body), dst.add(body), len - body) };
        return true;
    }
    // SAFETY: the caller's.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    false
}

/// Orders the streaming stores made so far before every later store, such as the one that
/// publishes a completion.
fn fence_streams() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence only orders stores; SSE is part of every x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::super::tests::{buf, run_io};
    use super::*;

    fn malloc(reg: &BdevRegistry, blocks: u64, bs: u32) -> Arc<BdevEntry> {
        let b = MallocBdev::new("m0".into(), blocks, bs, Uuid::new_v4()).unwrap();
        reg.register(Arc::new(b)).unwrap()
    }

    #[test]
    fn write_then_read_back() {
        let reg = BdevRegistry::default();
        let e = malloc(&reg, 256, 512);
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::write(10, 8, buf(4096, 0x5a), 1));
        assert_eq!((c.tag, c.status), (1, IoStatus::Success));
        let c = run_io(&mut ch, BdevIo::read(10, 8, buf(4096, 0), 2));
        assert_eq!(c.status, IoStatus::Success);
        assert!(c.bufs[0].iter().all(|&b| b == 0x5a));
        let c = run_io(&mut ch, BdevIo::read(9, 1, buf(512, 0xff), 3));
        assert!(
            c.bufs[0].iter().all(|&b| b == 0),
            "neighbouring block untouched"
        );
        let s = e.io_stats();
        assert_eq!(s.num_read_ops.load(Ordering::Relaxed), 2);
        assert_eq!(s.bytes_written.load(Ordering::Relaxed), 4096);
    }

    #[test]
    fn vectored_io_spans_buffers_in_order() {
        let reg = BdevRegistry::default();
        let e = malloc(&reg, 64, 512);
        let mut ch = e.open_channel().unwrap();
        let mut bufs = buf(512, 1);
        bufs.extend(buf(1024, 2));
        run_io(&mut ch, BdevIo::write(0, 3, bufs, 1));
        let c = run_io(&mut ch, BdevIo::read(0, 3, buf(1536, 0), 2));
        assert!(c.bufs[0][..512].iter().all(|&b| b == 1));
        assert!(c.bufs[0][512..].iter().all(|&b| b == 2));
    }

    #[test]
    fn bad_io_is_an_error_not_a_panic() {
        let reg = BdevRegistry::default();
        let e = malloc(&reg, 16, 512);
        let mut ch = e.open_channel().unwrap();
        let cases = [
            (BdevIo::read(15, 2, buf(1024, 0), 1), IoStatus::OutOfRange),
            (
                BdevIo::read(u64::MAX, 2, buf(1024, 0), 2),
                IoStatus::OutOfRange,
            ),
            (BdevIo::write(0, 2, buf(512, 0), 3), IoStatus::InvalidBuffer),
            (BdevIo::write(0, 1, buf(700, 0), 4), IoStatus::InvalidBuffer),
            (
                BdevIo::read(0, 0, IoBufs::new(), 5),
                IoStatus::InvalidBuffer,
            ),
            (
                BdevIo::no_data(IoType::Unmap, 10, 7, 6),
                IoStatus::OutOfRange,
            ),
        ];
        for (io, want) in cases {
            let tag = io.tag;
            let c = run_io(&mut ch, io);
            assert_eq!((c.tag, c.status), (tag, want));
        }
        assert_eq!(ch.in_flight(), 0);
        assert_eq!(e.io_stats().num_io_errors.load(Ordering::Relaxed), 6);
    }

    /// Submits straight to the module's channel, past the bdev layer and its checks.
    fn raw_io(ch: &mut Box<dyn BdevChannel>, io: BdevIo) -> IoCompletion {
        assert!(ch.submit(io).is_ok(), "malloc never pushes back");
        let mut out = None;
        ch.poll(&mut |c| out = Some(c));
        out.expect("malloc completes on the next poll")
    }

    /// `Bdev::open_channel` is public: the channel itself keeps safe code inside the disk.
    #[test]
    fn a_raw_channel_checks_ranges_and_buffers_itself() {
        let bdev = MallocBdev::new("m0".into(), 16, 512, Uuid::new_v4()).unwrap();
        let mut ch = bdev.open_channel(None).unwrap();
        // The region is rounded up to a whole hugepage: the check is against it, and the
        // bdev layer's own check (against num_blocks) stays the tighter one.
        let past_the_region = (bdev.mem.len() / 512) as u64;
        // A read-only view (another holds a share of its buffer) must not be filled.
        let mut whole = buf(512, 0);
        let shared: IoBufs = smallvec::smallvec![whole[0].share()];
        let cases = [
            (
                BdevIo::read(past_the_region, 1, buf(512, 0), 1),
                IoStatus::OutOfRange,
            ),
            (
                BdevIo::read(u64::MAX / 256, 1, buf(512, 0), 2),
                IoStatus::OutOfRange,
            ),
            (
                BdevIo::write(0, 1, buf(4096, 0), 3),
                IoStatus::InvalidBuffer,
            ),
            (BdevIo::read(0, 8, buf(512, 0), 4), IoStatus::InvalidBuffer),
            (BdevIo::read(0, 1, shared, 6), IoStatus::InvalidBuffer),
            (
                BdevIo::no_data(IoType::WriteZeroes, past_the_region - 1, 2, 5),
                IoStatus::OutOfRange,
            ),
        ];
        for (io, want) in cases {
            let tag = io.tag;
            let c = raw_io(&mut ch, io);
            assert_eq!((c.tag, c.status), (tag, want));
        }
    }

    /// Streaming stores cover whole 64-byte spans of an aligned destination and the tail is
    /// copied plainly; neither may write a byte outside the destination.
    #[test]
    fn copies_into_the_disk_exactly_at_every_length_and_alignment() {
        let lens = [
            0,
            1,
            63,
            64,
            65,
            2047,
            4095,
            4096,
            4097,
            4096 + 63,
            8192 + 16,
            131072,
        ];
        for len in lens {
            for src_off in [0, 1, 7] {
                for dst_off in [0, 16, 8] {
                    let src: Vec<u8> = (0..len + src_off).map(|i| (i * 7 + 3) as u8).collect();
                    // 64 guard bytes either side; the Vec<u128> keeps dst_off 0 and 16 aligned.
                    let mut disk = vec![0u128; (len + 256) / 16];
                    let bytes = disk.len() * 16;
                    let base = disk.as_mut_ptr() as *mut u8;
                    // SAFETY: 64 + dst_off + len <= bytes; src has src_off + len bytes.
                    unsafe {
                        std::ptr::write_bytes(base, 0xee, bytes);
                        copy_to_disk(src.as_ptr().add(src_off), base.add(64 + dst_off), len);
                        fence_streams();
                    }
                    // SAFETY: base points at `bytes` initialised bytes the Vec owns.
                    let got = unsafe { std::slice::from_raw_parts(base, bytes) };
                    let at = 64 + dst_off;
                    assert_eq!(
                        &got[at..at + len],
                        &src[src_off..],
                        "len {len} src+{src_off} dst+{dst_off}"
                    );
                    assert!(got[..at].iter().all(|&b| b == 0xee), "before, len {len}");
                    assert!(
                        got[at + len..].iter().all(|&b| b == 0xee),
                        "after, len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_channel_keeps_the_disk_alive_after_the_bdev_is_gone() {
        let bdev = MallocBdev::new("m0".into(), 16, 512, Uuid::new_v4()).unwrap();
        let mut ch = bdev.open_channel(None).unwrap();
        raw_io(&mut ch, BdevIo::write(3, 1, buf(512, 0x42), 1));
        drop(bdev);
        let c = raw_io(&mut ch, BdevIo::read(3, 1, buf(512, 0), 2));
        assert_eq!(c.status, IoStatus::Success);
        assert!(c.bufs[0].iter().all(|&b| b == 0x42));
    }

    /// Small I/O waits for the poll and large I/O runs at submit: whatever mix is submitted
    /// before a poll, each I/O sees the disk as the ones submitted before it left it.
    #[test]
    fn io_submitted_before_a_poll_keeps_its_order() {
        let bdev = MallocBdev::new("m0".into(), 256, 512, Uuid::new_v4()).unwrap();
        let mut ch = bdev.open_channel(None).unwrap();
        let large = QUEUED_MAX * 2;
        let large_blocks = (large / 512) as u64;
        let ios = [
            BdevIo::write(0, 8, buf(4096, 1), 1),
            BdevIo::read(0, 8, buf(4096, 0), 2),
            // Large, over the first small write's blocks: runs after it although at once.
            BdevIo::write(0, large_blocks, buf(large, 2), 3),
            BdevIo::read(0, 8, buf(4096, 0), 4),
            BdevIo::no_data(IoType::WriteZeroes, 0, 1, 5),
            BdevIo::read(0, large_blocks, buf(large, 9), 6),
        ];
        for io in ios {
            assert!(ch.submit(io).is_ok());
        }
        let mut done = Vec::new();
        ch.poll(&mut |c| done.push(c));
        let tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        assert_eq!(tags, [1, 2, 3, 4, 5, 6], "completions in submission order");
        assert!(done.iter().all(|c| c.status == IoStatus::Success));
        assert!(
            done[1].bufs[0].iter().all(|&b| b == 1),
            "read after the small write"
        );
        assert!(
            done[3].bufs[0].iter().all(|&b| b == 2),
            "read after the large write"
        );
        let last = &done[5].bufs[0];
        assert!(
            last[..512].iter().all(|&b| b == 0),
            "zeroed after the large write"
        );
        assert!(last[512..].iter().all(|&b| b == 2));
    }

    #[test]
    fn unmap_and_write_zeroes_read_back_zero() {
        let reg = BdevRegistry::default();
        let e = malloc(&reg, 16, 4096);
        let mut ch = e.open_channel().unwrap();
        run_io(&mut ch, BdevIo::write(0, 4, buf(16384, 7), 1));
        run_io(&mut ch, BdevIo::no_data(IoType::Unmap, 1, 1, 2));
        run_io(&mut ch, BdevIo::no_data(IoType::WriteZeroes, 3, 1, 3));
        let c = run_io(&mut ch, BdevIo::read(0, 4, buf(16384, 9), 4));
        let blocks: Vec<u8> = c.bufs[0].chunks(4096).map(|b| b[0]).collect();
        assert_eq!(blocks, vec![7, 0, 7, 0]);
    }

    #[test]
    fn deleted_bdev_aborts_io_and_claims_block_delete() {
        let reg = BdevRegistry::default();
        let e = malloc(&reg, 16, 512);
        e.claim("nqn.test ns 1").unwrap();
        assert!(matches!(
            reg.unregister("m0", "malloc"),
            Err(BdevError::Claimed { .. })
        ));
        e.release();
        let mut ch = e.open_channel().unwrap();
        reg.unregister("m0", "malloc").unwrap();
        let c = run_io(&mut ch, BdevIo::read(0, 1, buf(512, 0), 1));
        assert_eq!(c.status, IoStatus::Aborted);
        assert!(reg.get("m0").is_err());
    }

    #[test]
    fn invalid_geometry_is_refused() {
        assert!(MallocBdev::new("x".into(), 0, 512, Uuid::new_v4()).is_err());
        assert!(MallocBdev::new("x".into(), 8, 1000, Uuid::new_v4()).is_err());
        assert!(MallocBdev::new("x".into(), u64::MAX, 4096, Uuid::new_v4()).is_err());
    }
}
