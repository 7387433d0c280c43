//! The DMA pool's memory as one RDMA device sees it: each pool chunk registered once with
//! the device's protection domain, the first time a buffer in it moves data there.
//!
//! Only local keys are used: the target reads and writes the host's memory, never the other
//! way round, so no chunk is ever reachable from the network.

use rdma::{Access, Device, MemoryRegion, ProtectionDomain, Sge};
use std::sync::{Arc, RwLock};

/// One device's protection domain and its registrations of pool chunks.
pub struct DeviceMemory {
    pub device: Device,
    pub pd: Arc<ProtectionDomain>,
    /// By first byte; chunks never overlap.
    chunks: RwLock<Vec<(usize, MemoryRegion)>>,
}

impl DeviceMemory {
    pub fn new(device: Device) -> rdma::Result<DeviceMemory> {
        let pd = ProtectionDomain::new(&device)?;
        Ok(DeviceMemory {
            device,
            pd,
            chunks: RwLock::new(Vec::new()),
        })
    }

    /// The registered pool chunk holding `addr`, registering it on first use. Queues keep
    /// what this returns ([`ChunkKeys`]), so the lock is taken once per chunk and queue, not
    /// per I/O.
    pub fn chunk(&self, addr: usize) -> Result<RegisteredChunk, String> {
        if let Some(c) = self.lookup(addr) {
            return Ok(c);
        }
        let (base, chunk_len) = dma::chunk_of(addr)
            .ok_or_else(|| format!("buffer at {addr:#x} is not DMA pool memory"))?;
        let mut chunks = self.chunks.write().unwrap_or_else(|e| e.into_inner());
        if !chunks.iter().any(|(b, _)| *b == base) {
            // SAFETY: pool chunks are never unmapped (the pool keeps them for the process), and
            // the device touches a buffer only while work naming it is outstanding, during which
            // its owner (a command slot) leaves it alone.
            let mr = unsafe {
                MemoryRegion::register(&self.pd, base as *mut u8, chunk_len, Access::LOCAL_WRITE)
            }
            .map_err(|e| format!("cannot register {chunk_len} bytes of pool memory: {e}"))?;
            tracing::debug!("nvmf/rdma: registered pool chunk {base:#x} ({chunk_len} bytes)");
            chunks.push((base, mr));
        }
        drop(chunks);
        self.lookup(addr)
            .ok_or_else(|| format!("buffer at {addr:#x} is in no registered chunk"))
    }

    fn lookup(&self, addr: usize) -> Option<RegisteredChunk> {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        chunks.iter().find_map(|(base, mr)| {
            (addr >= *base && addr - base < mr.len()).then(|| RegisteredChunk {
                base: *base,
                len: mr.len(),
                lkey: mr.lkey(),
            })
        })
    }
}

/// A pool chunk as registered with one device: its span and local key.
#[derive(Clone, Copy, Debug)]
pub struct RegisteredChunk {
    base: usize,
    len: usize,
    lkey: u32,
}

/// One queue's copy of the chunks it has used, looked up without a lock.
#[derive(Default)]
pub struct ChunkKeys(Vec<RegisteredChunk>);

impl ChunkKeys {
    /// The element for `len` bytes of a pool buffer at `addr`.
    pub fn sge(&mut self, mem: &DeviceMemory, addr: usize, len: u32) -> Result<Sge, String> {
        let known = self
            .0
            .iter()
            .find(|c| addr >= c.base && addr - c.base < c.len);
        let chunk = match known {
            Some(c) => *c,
            None => {
                let c = mem.chunk(addr)?;
                self.0.push(c);
                c
            }
        };
        if addr - chunk.base + len as usize > chunk.len {
            return Err(format!(
                "buffer at {addr:#x} ({len} bytes) crosses a chunk's end"
            ));
        }
        Ok(Sge {
            addr: addr as u64,
            len,
            lkey: chunk.lkey,
        })
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let chunks = self.chunks.get_mut().map_or(0, |c| c.len());
        tracing::debug!("nvmf/rdma: device released ({chunks} pool chunks deregistered)");
    }
}
