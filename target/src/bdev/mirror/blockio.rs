//! A batch of block I/O run on a reactor and awaited from the control plane: what assembly
//! uses to read superblocks and write the first ones, before the mirror (and its service)
//! exists. Channels are opened on the reactor, since remote plexes have their queues there.

use crate::bdev::{BdevEntry, BdevIo, BufView, IoStatus, IoType};
use crate::reactor::{fn_poller, PollStatus, ReactorHandle};
use std::sync::Arc;

/// One I/O of a batch. A read gets a buffer of `nblocks` blocks; a write brings `data`; any
/// other type (write zeroes, unmap) carries none.
pub struct BlockIo {
    pub bdev: Arc<BdevEntry>,
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub nblocks: u64,
    pub data: Option<BufView>,
}

impl BlockIo {
    pub fn read(bdev: &Arc<BdevEntry>, offset_blocks: u64, nblocks: u64) -> BlockIo {
        BlockIo {
            bdev: bdev.clone(),
            io_type: IoType::Read,
            offset_blocks,
            nblocks,
            data: None,
        }
    }

    /// A flush of the device's write cache.
    pub fn flush(bdev: &Arc<BdevEntry>) -> BlockIo {
        BlockIo {
            bdev: bdev.clone(),
            io_type: IoType::Flush,
            offset_blocks: 0,
            nblocks: 0,
            data: None,
        }
    }

    /// A write of `bytes`, padded with zeroes to whole blocks.
    pub fn write(
        bdev: &Arc<BdevEntry>,
        offset_blocks: u64,
        bytes: &[u8],
    ) -> Result<BlockIo, IoStatus> {
        let bs = bdev.info().block_size as usize;
        let len = bytes.len().div_ceil(bs) * bs;
        let mut buf = BufView::zeroed(len).map_err(|_| IoStatus::IoError(libc::ENOMEM))?;
        if let Some(b) = buf.bytes_mut() {
            b[..bytes.len()].copy_from_slice(bytes);
        }
        Ok(BlockIo {
            bdev: bdev.clone(),
            io_type: IoType::Write,
            offset_blocks,
            nblocks: (len / bs) as u64,
            data: Some(buf),
        })
    }
}

/// Writes of the empty bitmap chunks `chunks` of mirror `uuid` to `bdev`, where `layout` puts
/// them: a new mirror's bitmap, or the chunks a growth brings into use.
pub fn empty_chunks(
    bdev: &Arc<BdevEntry>,
    uuid: uuid::Uuid,
    layout: &super::superblock::Layout,
    chunks: std::ops::Range<u32>,
) -> Result<Vec<BlockIo>, IoStatus> {
    let bs = layout.block_size();
    chunks
        .map(|c| {
            // Only a bad block size fails to encode, and the layout has checked it.
            let bytes = super::superblock::encode_chunk(uuid, c, &[], bs)
                .unwrap_or_else(|_| vec![0u8; bs as usize]);
            BlockIo::write(bdev, layout.chunk_block(c), &bytes)
        })
        .collect()
}

/// Runs every I/O of `batch` at once on `home`, and returns, in order, each read's bytes (an
/// empty vector for a write) or the status it failed with.
pub async fn run(home: &ReactorHandle, batch: Vec<BlockIo>) -> Vec<Result<Vec<u8>, IoStatus>> {
    let n = batch.len();
    let (tx, rx) = tokio::sync::oneshot::channel();
    home.send(move |ctx| {
        let mut results: Vec<Option<Result<Vec<u8>, IoStatus>>> = (0..n).map(|_| None).collect();
        let mut chans = Vec::new();
        for (i, io) in batch.into_iter().enumerate() {
            let mut ch = match io.bdev.open_channel() {
                Ok(c) => c,
                Err(_) => {
                    results[i] = Some(Err(IoStatus::Aborted));
                    continue;
                }
            };
            let bs = io.bdev.info().block_size as usize;
            let bufs = match io.data {
                Some(b) => smallvec::smallvec![b],
                None if io.io_type != IoType::Read => smallvec::SmallVec::new(),
                None => match BufView::new(io.nblocks as usize * bs) {
                    Ok(b) => smallvec::smallvec![b],
                    Err(_) => {
                        results[i] = Some(Err(IoStatus::IoError(libc::ENOMEM)));
                        continue;
                    }
                },
            };
            let bio = BdevIo::new(io.io_type, io.offset_blocks, io.nblocks, bufs, i as u64);
            match ch.submit(bio) {
                Ok(()) => chans.push(ch),
                Err(_) => results[i] = Some(Err(IoStatus::IoError(libc::EAGAIN))),
            }
        }
        let mut tx = Some(tx);
        ctx.add_poller(fn_poller("mirror metadata I/O", move |_| {
            for ch in chans.iter_mut() {
                ch.poll(&mut |c| {
                    let r = if c.status.is_ok() {
                        Ok(if c.io_type == IoType::Read {
                            c.bufs.iter().flat_map(|b| b.iter().copied()).collect()
                        } else {
                            Vec::new()
                        })
                    } else {
                        Err(c.status)
                    };
                    results[c.tag as usize] = Some(r);
                });
            }
            if results.iter().all(Option::is_some) {
                if let Some(tx) = tx.take() {
                    let out = std::mem::take(&mut results).into_iter().flatten().collect();
                    let _ = tx.send(out);
                }
                chans.clear();
                return PollStatus::Done;
            }
            PollStatus::Busy
        }));
    });
    rx.await
        .unwrap_or_else(|_| (0..n).map(|_| Err(IoStatus::Aborted)).collect())
}
