//! `null`: discards writes and returns unspecified data on reads, for measuring everything but
//! the device.

use super::*;

pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    pub fn new(
        name: String,
        num_blocks: u64,
        block_size: u32,
        uuid: Uuid,
    ) -> Result<Self, BdevError> {
        check_geometry(num_blocks, block_size)?;
        let info = BdevInfo::new(
            name,
            "Null disk",
            block_size,
            num_blocks,
            uuid,
            IoTypes::all(),
        );
        Ok(NullBdev { info })
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "null"
    }

    fn open_channel(&self, _: Option<&ReactorHandle>) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(NullChannel {
            ready: ReadyQueue::default(),
        }))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        Some(("bdev_null_create", self.info.geometry_params()))
    }
}

struct NullChannel {
    ready: ReadyQueue,
}

impl BdevChannel for NullChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
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

    #[test]
    fn completes_everything_in_range() {
        let reg = BdevRegistry::default();
        let e = reg
            .register(Arc::new(
                NullBdev::new("n0".into(), 1 << 30, 4096, Uuid::new_v4()).unwrap(),
            ))
            .unwrap();
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::write((1 << 30) - 1, 1, buf(4096, 1), 7));
        assert_eq!((c.tag, c.status), (7, IoStatus::Success));
        let c = run_io(&mut ch, BdevIo::write(1 << 30, 1, buf(4096, 1), 8));
        assert_eq!(c.status, IoStatus::OutOfRange);
    }
}
