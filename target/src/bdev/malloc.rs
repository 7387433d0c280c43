//! `malloc`: a RAM disk in hugepage memory, for tests and benchmarks.

use super::*;
use dma::DmaRegion;

pub struct MallocBdev {
    info: BdevInfo,
    /// The disk's bytes. Channels on several reactors copy in and out concurrently through raw
    /// pointers, as a device's DMA engine would; overlapping I/O races as it does on real disks.
    mem: DmaRegion,
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
        let mem = DmaRegion::new(len as usize)?;
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

    fn open_channel(&self) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            base: self.mem.as_ptr() as usize,
            block_size: self.info.block_size as u64,
            ready: ReadyQueue::default(),
        }))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        Some(("bdev_malloc_create", self.info.geometry_params()))
    }
}

struct MallocChannel {
    base: usize,
    block_size: u64,
    ready: ReadyQueue,
}

impl MallocChannel {
    /// The disk bytes of `io`'s range. The layer has checked the range against the size.
    fn range(&self, io: &BdevIo) -> (*mut u8, usize) {
        let off = (io.offset_blocks * self.block_size) as usize;
        (
            (self.base + off) as *mut u8,
            (io.num_blocks * self.block_size) as usize,
        )
    }
}

impl BdevChannel for MallocChannel {
    fn submit(&mut self, mut io: BdevIo) -> Result<(), BdevIo> {
        let (disk, len) = self.range(&io);
        match io.io_type {
            IoType::Read => {
                let mut at = disk;
                for b in io.bufs.iter_mut() {
                    // SAFETY: the layer checked offset+len against the disk size and that the
                    // buffers add up to len; the region lives as long as the bdev, which the
                    // channel's entry keeps alive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(at, b.as_mut_ptr(), b.len());
                        at = at.add(b.len());
                    }
                }
            }
            IoType::Write => {
                let mut at = disk;
                for b in io.bufs.iter() {
                    // SAFETY: as for reads.
                    unsafe {
                        std::ptr::copy_nonoverlapping(b.as_ptr(), at, b.len());
                        at = at.add(b.len());
                    }
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: the range is inside the region (checked by the layer).
                unsafe { std::ptr::write_bytes(disk, 0, len) };
            }
            IoType::Flush | IoType::Reset => {}
        }
        self.ready.push(io.complete(IoStatus::Success));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        self.ready.drain(done)
    }
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
