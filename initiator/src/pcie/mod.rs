//! NVMe over PCIe through VFIO: the controller's registers in BAR0, queues in DMA memory.
//!
//! - [`PcieDevice`]: one controller opened through the process's VFIO container, its BAR0
//!   mapped and bus mastering on. Opening the first device registers the DMA pool with the
//!   container, so every pool buffer has an IOVA from then on.
//! - [`queue::PcieQueue`]: a submission/completion queue pair in DMA memory; the admin queue's
//!   "connect" disables the controller and programs AQA/ASQ/ACQ, an I/O queue's is the
//!   Create I/O CQ/SQ pair the controller sends for it ([`queue::PcieQueue::setup_commands`]).

pub(crate) mod queue;
mod shadow;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvme_spec::regs::{offset as reg, Cap, Cc, Csts};
use vfio::{Bar, Container, PciAddress};

pub(crate) use shadow::ShadowDoorbells;

use crate::error::{Error, Result};

/// The memory page size we run controllers at (CC.MPS = 0): PRP entries are 4 KiB pages.
pub(crate) const PAGE: u64 = 4096;
/// The largest transfer one command carries: one PRP list page of 512 entries plus PRP1.
pub(crate) const MAX_TRANSFER: u32 = 2 << 20;
/// The first IOVA handed to pool memory: above the low 4 GiB, where platforms keep their
/// MSI windows and other reserved ranges.
const IOVA_BASE: u64 = 1 << 32;

/// The process's VFIO container, opened with the first device.
fn container() -> Result<Arc<Container>> {
    static C: Mutex<Option<Arc<Container>>> = Mutex::new(None);
    let mut c = lock(&C);
    if let Some(c) = c.as_ref() {
        return Ok(c.clone());
    }
    let opened = Container::open()?;
    *c = Some(opened.clone());
    Ok(opened)
}

/// Registers the DMA pool with `c` once its IOMMU is set up (after the first device opens).
fn register_pool(c: &Arc<Container>) -> Result<()> {
    if dma::iova::is_registered() {
        return Ok(());
    }
    let ranges = c.iova_ranges()?;
    // The largest usable range above IOVA_BASE.
    let range = ranges
        .iter()
        .map(|r| (*r.start()).max(IOVA_BASE)..r.end().saturating_add(1))
        .filter(|r| r.start < r.end)
        .max_by_key(|r| r.end - r.start)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "the IOMMU offers no IOVA range above 4 GiB: {ranges:?}"
            ))
        })?;
    let mapper = c.clone();
    dma::iova::register(
        range,
        Box::new(move |vaddr, len, iova| {
            // SAFETY: the pool calls this only for its own chunks, which are never unmapped or
            // returned to the kernel for the life of the process.
            unsafe { mapper.map_dma(vaddr, len, iova) }.map_err(|e| e.to_string())
        }),
    )
    .map_err(|e| Error::Unsupported(e.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The admin commands that make I/O queue `qid` exist on the controller.
pub(crate) struct QueueSetup {
    pub qid: u16,
    /// Delete I/O SQ/CQ of a queue the same ID may have left; refused when there is none.
    pub deletes: Vec<nvme_spec::Command>,
    /// Create I/O CQ, then SQ: these must succeed.
    pub creates: Vec<nvme_spec::Command>,
}

/// One NVMe controller on PCIe.
pub(crate) struct PcieDevice {
    pub addr: PciAddress,
    pub bar: Bar,
    /// Bytes between doorbells (4 << CAP.DSTRD).
    pub doorbell_stride: usize,
    pub cap: Cap,
    /// Shadow doorbell pages, if DMA memory for them was at hand; in use once the controller
    /// accepted Doorbell Buffer Config.
    pub shadow: Option<ShadowDoorbells>,
    /// Identify's SGLS bits 1:0 while SGLs are in use for I/O data (0: PRPs only).
    sgls: AtomicU32,
    /// I/O queues waiting for the controller to create them again after a reset: the queue
    /// owner posts, the admin queue's owner runs the Create commands and marks them ready.
    setups: Mutex<Vec<QueueSetup>>,
    ready: Mutex<Vec<u16>>,
    _device: vfio::Device,
}

impl std::fmt::Debug for PcieDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcieDevice({})", self.addr)
    }
}

impl PcieDevice {
    /// Opens the controller at `traddr` (bound to vfio-pci) and maps its registers.
    pub fn open(traddr: &str) -> Result<Arc<PcieDevice>> {
        let addr: PciAddress = traddr.parse()?;
        // What sysfs says about the device comes first: it names the usual mistakes.
        addr.vfio_group()?;
        let c = container()?;
        let device = c.open_device(addr)?;
        register_pool(&c)?;
        device.enable_bus_master()?;
        let bar = device.map_bar(0)?;
        if bar.len() < 0x1000 + 8 {
            return Err(Error::Protocol(format!(
                "{addr}: BAR0 of {} bytes is too small for an NVMe controller",
                bar.len()
            )));
        }
        let cap = Cap(bar.read64(reg::CAP as usize));
        if cap.min_page_size() > PAGE {
            return Err(Error::Unsupported(format!(
                "{addr}: the controller's smallest memory page is {} bytes; only 4 KiB is supported",
                cap.min_page_size()
            )));
        }
        let doorbell_stride = 4usize << ((cap.0 >> 32) & 0xf);
        Ok(Arc::new(PcieDevice {
            addr,
            bar,
            doorbell_stride,
            cap,
            shadow: ShadowDoorbells::new(doorbell_stride),
            sgls: AtomicU32::new(0),
            setups: Mutex::new(Vec::new()),
            ready: Mutex::new(Vec::new()),
            _device: device,
        }))
    }

    /// An I/O queue asks to be created again.
    pub fn post_setup(&self, setup: QueueSetup) {
        lock(&self.ready).retain(|q| *q != setup.qid);
        let mut s = lock(&self.setups);
        s.retain(|p| p.qid != setup.qid);
        s.push(setup);
    }

    /// The queue setups posted since the last call, for the admin queue's owner.
    pub fn take_setups(&self) -> Vec<QueueSetup> {
        std::mem::take(&mut *lock(&self.setups))
    }

    /// The controller created queue `qid` again.
    pub fn mark_ready(&self, qid: u16) {
        lock(&self.ready).push(qid);
    }

    /// Whether queue `qid` was created again since it asked (and forgets that it was).
    pub fn take_ready(&self, qid: u16) -> bool {
        let mut r = lock(&self.ready);
        let was = r.contains(&qid);
        r.retain(|q| *q != qid);
        was
    }

    /// The offset of queue `qid`'s submission tail (`cq == false`) or completion head doorbell,
    /// if it is inside BAR0.
    pub fn doorbell(&self, qid: u16, cq: bool) -> Option<usize> {
        let off =
            reg::DOORBELL_BASE as usize + (2 * qid as usize + cq as usize) * self.doorbell_stride;
        (off + 4 <= self.bar.len()).then_some(off)
    }

    /// Writes queue `qid`'s SQ tail (`cq == false`) or CQ head `value`: into its shadow
    /// doorbell where those are in use, and into the register at `offset` unless the
    /// controller's EventIdx says it does not need to hear of it.
    pub fn ring(&self, qid: u16, cq: bool, offset: usize, value: u16) {
        if self
            .shadow
            .as_ref()
            .is_none_or(|s| s.update(qid, cq, value))
        {
            self.bar.write32(offset, u32::from(value));
        }
    }

    /// What Identify's SGLS says of SGLs for I/O data (bits 1:0), or 0 to use PRPs only.
    pub fn set_sgls(&self, sgls: u32) {
        self.sgls.store(
            sgls & nvme_spec::identify::sgls::SUPPORT_MASK,
            Ordering::Relaxed,
        );
    }

    /// Whether `len` bytes at `iova` may go as one SGL data block: SGLs are in use and the
    /// controller's alignment rule (none, or dwords) holds.
    pub fn sgl_fits(&self, iova: u64, len: usize) -> bool {
        use nvme_spec::identify::sgls;
        match self.sgls.load(Ordering::Relaxed) {
            sgls::SUPPORTED => true,
            sgls::SUPPORTED_DWORD_ALIGNED => iova.is_multiple_of(4) && len.is_multiple_of(4),
            _ => false,
        }
    }

    pub fn read32(&self, offset: u32) -> u32 {
        self.bar.read32(offset as usize)
    }

    pub fn write32(&self, offset: u32, v: u32) {
        self.bar.write32(offset as usize, v)
    }

    /// CC.EN = 0 and waits for CSTS.RDY = 0 (within CAP.TO): the controller stops every
    /// queue and all DMA.
    pub fn disable(&self) -> Result<()> {
        if let Some(s) = &self.shadow {
            s.disable();
        }
        let cc = Cc(self.read32(reg::CC));
        if cc.en() {
            self.write32(reg::CC, cc.with_en(false).0);
        }
        let to = Duration::from_millis(u64::from(self.cap.timeout_ms().max(500)));
        let deadline = Instant::now() + to;
        loop {
            let s = Csts(self.read32(reg::CSTS));
            if s.0 == u32::MAX {
                return Err(Error::Protocol(format!(
                    "{}: registers read all ones: the device is gone",
                    self.addr
                )));
            }
            if !s.rdy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout("CSTS.RDY = 0 after CC.EN = 0 (CAP.TO)"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
