//! `nvme`: namespaces of a remote NVMe-oF controller as bdevs, through the `initiator` crate.
//!
//! Ownership, as built:
//! - **Controller**: one control-plane thread per attached controller (`bdev_nvme-{name}`)
//!   owns the `initiator::Controller` from connect to detach. It polls it every few ms
//!   (keep-alive, AER, the controller's reset/reconnect, whose admin-queue bring-up may block
//!   for the connect timeout, so never on a reactor), turns namespace events into bdev registrations and resizes, publishes the state
//!   for `bdev_nvme_get_controllers`, and runs detach. Being the only owner serialises attach,
//!   namespace events and detach without locks on the controller. A controller that stays
//!   down past a positive `ctrlr_loss_timeout_sec` deletes itself and its bdevs, as SPDK's
//!   does; a bdev still claimed (an NVMe-oF namespace) holds that up, failing I/O, until
//!   its claim is released.
//! - **Queue pairs**: at attach the owner allocates one I/O qpair per reactor and moves each
//!   to its reactor, where it lives in a thread-local map keyed by controller id
//!   (`Bdev::open_channel` gets no `ReactorCtx`, so `ctx.local` is out of reach there; the map
//!   has the same per-reactor lifetime). One poller per (controller, reactor) polls it.
//!   After a controller reset the qpair rejoins the new association from that poller: its
//!   connection advances a step per poll with non-blocking calls only, so a slow or dead
//!   target never stalls the reactor; a step stuck past the connect timeout fails the
//!   attempt, retried after `reconnect_delay_sec`.
//! - **Channels**: every channel of every namespace of that controller on that reactor shares
//!   the qpair. A command's tag is `channel index << 32 | I/O slot`; the poller routes each
//!   completion into that channel's slab slot and, when the I/O's last piece is in, onto the
//!   channel's ready queue, which the consumer drains with `poll`. Slabs and queues are reused,
//!   so nothing is allocated per I/O once they have grown to the working depth.
//! - **Large I/O**: a bdev buffer is sent as views of at most the controller's max transfer
//!   (MDTS), no copy; the I/O completes when every piece has, with the first error seen.

use super::*;
use crate::app::App;
use crate::reactor::{fn_poller, PollStatus, ReactorHandle};
use initiator::ctrlr::CtrlrInfo;
use initiator::{
    Controller, CtrlrEvent, CtrlrOpts, CtrlrState, IoError, IoQpair, SubmitErrorKind, TrType,
    TransportId,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Weak;
use std::time::Duration;

/// How often the owner thread polls its controller.
const CTRLR_POLL: Duration = Duration::from_millis(5);
/// Most blocks one Write Zeroes carries (NLB is 16 bits, 0-based).
const MAX_ZEROES_BLOCKS: u64 = 1 << 16;

// ------------------------------------------------------------------------- buffer views

/// A piece of a bdev buffer handed to the qpair. The `DmaBuf` it points into stays in the
/// channel's in-flight slot until every piece has completed, and DMA memory never moves or
/// is unmapped, so the view stays valid for as long as the qpair holds it.
struct View {
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

type Qpair = IoQpair<View>;

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

// ------------------------------------------------------------------------- bdev + channel

pub struct NvmeBdev {
    info: BdevInfo,
    ctrlr_id: u64,
    ctrlr_name: String,
    nsid: u32,
    max_xfer: u32,
    /// The namespace went away (AEN or rescan): new I/O is aborted.
    gone: Arc<AtomicBool>,
}

impl Bdev for NvmeBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "nvme"
    }

    fn open_channel(&self) -> Result<Box<dyn BdevChannel>, BdevError> {
        let slot = QPAIRS
            .with(|m| m.borrow().get(&self.ctrlr_id).cloned())
            .ok_or_else(|| BdevError::Io {
                what: format!(
                    "{}: no I/O queue of controller {} on this thread (not a reactor, or the \
                     controller granted fewer queues than there are reactors)",
                    self.info.name, self.ctrlr_name
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
        Ok(Box::new(NvmeChannel {
            slot,
            idx,
            nsid: self.nsid,
            block_size: self.info.block_size as u64,
            max_xfer: self.max_xfer.max(self.info.block_size) as usize,
            gone: self.gone.clone(),
        }))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        // The controller's attach call recreates every namespace: see NvmeModule::save_config.
        None
    }

    fn driver_specific(&self) -> Value {
        serde_json::json!({"ctrlr_name": self.ctrlr_name, "nsid": self.nsid})
    }
}

struct NvmeChannel {
    slot: Rc<RefCell<ReactorQp>>,
    idx: u32,
    nsid: u32,
    block_size: u64,
    /// Largest piece, a whole number of blocks.
    max_xfer: usize,
    gone: Arc<AtomicBool>,
}

impl NvmeChannel {
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

// ------------------------------------------------------------------------- controllers

/// What `bdev_nvme_attach_controller` was given, in SPDK's terms, for save_config.
#[derive(Clone, Debug)]
pub struct AttachSpec {
    pub name: String,
    pub trid: TransportId,
    pub hostnqn: String,
    /// Host ID sent with hostnqn (derived from it).
    pub hostid: [u8; 16],
    pub hdgst: bool,
    pub ddgst: bool,
    pub num_io_queues: Option<u16>,
    pub ctrlr_loss_timeout_sec: i64,
    pub reconnect_delay_sec: u64,
    pub fast_io_fail_timeout_sec: u64,
    /// SPDK's `fabrics_connect_timeout_us`; None = the initiator's default.
    pub connect_timeout_us: Option<u64>,
}

impl AttachSpec {
    pub fn to_params(&self) -> Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "trtype": self.trid.trtype.as_str(),
            "adrfam": self.trid.adrfam.as_str(),
            "traddr": self.trid.traddr,
            "trsvcid": self.trid.trsvcid.to_string(),
            "subnqn": self.trid.subnqn,
            "hostnqn": self.hostnqn,
            "hdgst": self.hdgst,
            "ddgst": self.ddgst,
            "ctrlr_loss_timeout_sec": self.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": self.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": self.fast_io_fail_timeout_sec,
        });
        if let Some(n) = self.num_io_queues {
            v["num_io_queues"] = n.into();
        }
        if let Some(t) = self.connect_timeout_us {
            v["fabrics_connect_timeout_us"] = t.into();
        }
        v
    }

    fn opts(&self, reactors: usize) -> CtrlrOpts {
        let mut o = CtrlrOpts {
            hostnqn: self.hostnqn.clone(),
            hostid: self.hostid,
            hdgst: self.hdgst,
            ddgst: self.ddgst,
            num_io_queues: self.num_io_queues.unwrap_or(reactors.clamp(1, 1024) as u16),
            ..CtrlrOpts::default()
        };
        o.reconnect_delay = Duration::from_secs(self.reconnect_delay_sec.max(1));
        if self.reconnect_delay_sec == 0 {
            // SPDK's 0 means "at once"; a small pause keeps a dead peer from being hammered.
            o.reconnect_delay = Duration::from_millis(100);
        }
        o.ctrlr_loss_timeout = match self.ctrlr_loss_timeout_sec {
            -1 => None,
            n => Some(Duration::from_secs(n.max(0) as u64)),
        };
        if let Some(us) = self.connect_timeout_us {
            o.connect_timeout = Duration::from_micros(us);
        }
        o.fast_io_fail_timeout = (self.fast_io_fail_timeout_sec > 0)
            .then(|| Duration::from_secs(self.fast_io_fail_timeout_sec));
        o
    }
}

/// What `bdev_nvme_get_controllers` shows, published by the owner thread.
#[derive(Clone, Debug)]
struct Published {
    state: CtrlrState,
    info: Option<CtrlrInfo>,
    bdevs: Vec<String>,
}

enum Cmd {
    Detach(tokio::sync::oneshot::Sender<Result<(), NvmeError>>),
}

/// One attached controller as the module (and the RPCs) see it.
pub struct NvmeCtrlr {
    pub spec: AttachSpec,
    id: u64,
    published: Mutex<Published>,
    cmds: Mutex<Option<mpsc::Sender<Cmd>>>,
}

impl NvmeCtrlr {
    /// The entry `bdev_nvme_get_controllers` returns (SPDK's shape).
    pub fn describe(&self) -> Value {
        let p = self
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t = &self.spec.trid;
        serde_json::json!({
            "name": self.spec.name,
            "ctrlrs": [{
                "state": p.state,
                "cntlid": p.info.as_ref().map(|i| i.cntlid),
                "trid": {
                    "trtype": t.trtype.as_str(),
                    "adrfam": t.adrfam.as_str(),
                    "traddr": t.traddr,
                    "trsvcid": t.trsvcid.to_string(),
                    "subnqn": t.subnqn,
                },
                "host": {"nqn": self.spec.hostnqn},
                "model": p.info.as_ref().map(|i| i.model.clone()),
                "serial": p.info.as_ref().map(|i| i.serial.clone()),
                "max_transfer": p.info.as_ref().map(|i| i.max_transfer),
                "io_queues": p.info.as_ref().map(|i| i.io_queues),
                "hdgst": p.info.as_ref().map(|i| i.hdgst),
                "ddgst": p.info.as_ref().map(|i| i.ddgst),
                "bdevs": p.bdevs,
            }],
        })
    }

    pub fn state(&self) -> CtrlrState {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
    }
}

#[derive(Debug, Error)]
pub enum NvmeError {
    #[error("controller {0} already exists")]
    Exists(String),
    #[error("no NVMe controller named {0}")]
    NotFound(String),
    #[error("cannot attach {name} ({trid}): {source}")]
    Attach {
        name: String,
        trid: String,
        #[source]
        source: initiator::Error,
    },
    #[error("{0}")]
    Bdev(#[from] BdevError),
    #[error("{0}")]
    Internal(String),
}

impl NvmeError {
    pub fn errno(&self) -> i32 {
        match self {
            NvmeError::Exists(_) => libc::EEXIST,
            NvmeError::NotFound(_) => libc::ENODEV,
            NvmeError::Attach { source, .. } => match source {
                initiator::Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
                initiator::Error::Timeout(_) => libc::ETIMEDOUT,
                initiator::Error::Unsupported(_) => libc::EOPNOTSUPP,
                _ => libc::EIO,
            },
            NvmeError::Bdev(e) => e.errno(),
            NvmeError::Internal(_) => libc::EIO,
        }
    }
}

/// The module's state, held by `App`.
#[derive(Default)]
pub struct NvmeModule {
    ctrlrs: Mutex<BTreeMap<String, Arc<NvmeCtrlr>>>,
    next_id: AtomicU64,
    /// Attach order, so save_config replays controllers in the order they came.
    order: Mutex<Vec<String>>,
}

impl NvmeModule {
    pub fn get(&self, name: &str) -> Option<Arc<NvmeCtrlr>> {
        self.ctrlrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<NvmeCtrlr>> {
        let order = self.order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        order.iter().filter_map(|n| self.get(n)).collect()
    }

    /// The attach calls that recreate every controller (and so its namespaces' bdevs).
    pub fn save_config(&self) -> Vec<Value> {
        self.list()
            .iter()
            .map(|c| serde_json::json!({"method": "bdev_nvme_attach_controller", "params": c.spec.to_params()}))
            .collect()
    }

    /// Drops controller `id` from the list. By id, not name alone: once a controller deleted
    /// itself, its name may already belong to a new attach.
    fn forget(&self, name: &str, id: u64) {
        let mut map = self.ctrlrs.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|c| c.id == id) {
            map.remove(name);
            self.order
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|n| n != name);
        }
    }

    /// Connects, spreads qpairs over the reactors, registers one bdev per namespace and hands
    /// the controller to its owner thread. Returns the bdev names.
    pub async fn attach(app: &Arc<App>, spec: AttachSpec) -> Result<Vec<String>, NvmeError> {
        let m = &app.nvme;
        let name = spec.name.clone();
        validate_name(&name)?;
        let id = m.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let ctrlr = Arc::new(NvmeCtrlr {
            spec: spec.clone(),
            id,
            published: Mutex::new(Published {
                state: CtrlrState::Resetting,
                info: None,
                bdevs: Vec::new(),
            }),
            cmds: Mutex::new(None),
        });
        {
            // Reserve the name now: two concurrent attaches of one name must not both connect.
            let mut map = m.ctrlrs.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&name) {
                return Err(NvmeError::Exists(name));
            }
            map.insert(name.clone(), ctrlr.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let weak = Arc::downgrade(app);
        let c2 = ctrlr.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("bdev_nvme-{name}"))
            .spawn(move || owner_main(weak, c2, tx));
        let result = match spawned {
            Ok(_) => rx
                .await
                .unwrap_or_else(|_| Err(NvmeError::Internal("controller thread ended".into()))),
            Err(e) => Err(NvmeError::Internal(format!("cannot start a thread: {e}"))),
        };
        match result {
            Ok(names) => {
                m.order.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                Ok(names)
            }
            Err(e) => {
                m.forget(&name, id);
                Err(e)
            }
        }
    }

    /// Removes the controller's bdevs (refused while one is claimed), its qpairs, and shuts
    /// the controller down.
    pub async fn detach(app: &Arc<App>, name: &str) -> Result<(), NvmeError> {
        let c = app
            .nvme
            .get(name)
            .ok_or_else(|| NvmeError::NotFound(name.to_string()))?;
        let sender = c
            .cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| NvmeError::NotFound(format!("{name} (still attaching)")))?;
        // The owner may delete the controller itself meanwhile (ctrlr_loss_timeout_sec): then
        // it is simply not there any more.
        let gone = || NvmeError::NotFound(name.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        sender.send(Cmd::Detach(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())??;
        app.nvme.forget(name, c.id);
        Ok(())
    }
}

// ------------------------------------------------------------------------- owner thread

struct Owner {
    app: Weak<App>,
    c: Arc<NvmeCtrlr>,
    ctrlr: Controller,
    bdevs: BTreeMap<u32, (Arc<NvmeBdev>, Arc<BdevEntry>)>,
    /// Namespaces gone while their bdev was claimed: unregistered once released.
    zombies: Vec<Arc<BdevEntry>>,
    /// Reactors that got a qpair.
    reactors: Vec<ReactorHandle>,
    /// ctrlr_loss_timeout_sec passed and a claimed bdev holds up the deletion; said once.
    loss_held_logged: bool,
}

fn owner_main(
    app: Weak<App>,
    c: Arc<NvmeCtrlr>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<String>, NvmeError>>,
) {
    let (tx, rx) = mpsc::channel();
    let mut owner = match bring_up(app, c.clone()) {
        Ok(o) => o,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    *c.cmds.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    let names: Vec<String> = owner
        .bdevs
        .values()
        .map(|(b, _)| b.info.name.clone())
        .collect();
    owner.publish();
    if reply.send(Ok(names)).is_err() {
        // The RPC went away mid-attach; nobody knows the controller exists.
        owner.teardown();
        return;
    }
    loop {
        match rx.recv_timeout(CTRLR_POLL) {
            Ok(Cmd::Detach(done)) => match owner.claimed() {
                Some(e) => {
                    let _ = done.send(Err(e));
                }
                None => {
                    owner.teardown();
                    let _ = done.send(Ok(()));
                    return;
                }
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                owner.teardown();
                return;
            }
        }
        if owner.app.strong_count() == 0 {
            // plexd is shutting down.
            owner.teardown();
            return;
        }
        owner.ctrlr.poll();
        let mut changed = false;
        while let Some(ev) = owner.ctrlr.next_event() {
            changed = true;
            owner.on_event(ev);
        }
        if !owner.zombies.is_empty() {
            owner.reap_zombies();
        }
        if owner.loss_timed_out() {
            changed |= owner.unregister_unclaimed();
            if owner.bdevs.is_empty() && owner.zombies.is_empty() {
                owner.delete_lost(&rx);
                return;
            }
        }
        if changed || owner.c.state() != owner.ctrlr.state() {
            owner.publish();
        }
    }
}

fn bring_up(app: Weak<App>, c: Arc<NvmeCtrlr>) -> Result<Owner, NvmeError> {
    let a = app
        .upgrade()
        .ok_or_else(|| NvmeError::Internal("plexd is shutting down".into()))?;
    let handles: Vec<ReactorHandle> = a.reactors.handles().iter().cloned().collect();
    let spec = &c.spec;
    let err = |source| NvmeError::Attach {
        name: spec.name.clone(),
        trid: trid_string(&spec.trid),
        source,
    };
    let ctrlr = Controller::connect(&spec.trid, &spec.opts(handles.len())).map_err(err)?;
    if ctrlr.namespaces().is_empty() && ctrlr.info().io_queues == 0 {
        return Err(err(initiator::Error::Unsupported(
            "a discovery controller has no namespaces to attach".into(),
        )));
    }
    let mut owner = Owner {
        app,
        c: c.clone(),
        bdevs: BTreeMap::new(),
        zombies: Vec::new(),
        reactors: Vec::new(),
        loss_held_logged: false,
        ctrlr,
    };
    for h in &handles {
        let qp = match owner.ctrlr.alloc_io_qpair::<View>(None) {
            Ok(q) => q,
            Err(e) if !owner.reactors.is_empty() => {
                tracing::warn!(
                    "bdev_nvme {}: {} of {} reactors got an I/O queue ({e}); the others cannot \
                     open its bdevs",
                    spec.name,
                    owner.reactors.len(),
                    handles.len()
                );
                break;
            }
            Err(e) => {
                owner.teardown();
                return Err(err(e));
            }
        };
        if let Err(e) = install_qpair(h, c.id, &spec.name, qp) {
            owner.teardown();
            return Err(NvmeError::Internal(e.to_string()));
        }
        owner.reactors.push(h.clone());
    }
    let nss: Vec<u32> = owner.ctrlr.namespaces().iter().map(|n| n.nsid).collect();
    for nsid in nss {
        if let Err(e) = owner.add_ns(nsid) {
            owner.teardown();
            return Err(e.into());
        }
    }
    tracing::info!(
        "bdev_nvme: attached {} ({}), bdevs {:?}",
        spec.name,
        trid_string(&spec.trid),
        owner
            .bdevs
            .values()
            .map(|(b, _)| &b.info.name)
            .collect::<Vec<_>>()
    );
    Ok(owner)
}

fn install_qpair(
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

fn trid_string(t: &TransportId) -> String {
    format!(
        "trtype:{} adrfam:{} traddr:{} trsvcid:{} subnqn:{}",
        t.trtype.as_str(),
        t.adrfam.as_str(),
        t.traddr,
        t.trsvcid,
        t.subnqn
    )
}

impl Owner {
    fn publish(&self) {
        let mut p = self.c.published.lock().unwrap_or_else(|e| e.into_inner());
        p.state = self.ctrlr.state();
        p.info = Some(self.ctrlr.info().clone());
        p.bdevs = self
            .bdevs
            .values()
            .map(|(b, _)| b.info.name.clone())
            .collect();
    }

    fn add_ns(&mut self, nsid: u32) -> Result<(), BdevError> {
        let Some(ns) = self.ctrlr.namespace(nsid).cloned() else {
            return Ok(());
        };
        let Some(app) = self.app.upgrade() else {
            return Ok(());
        };
        let spec = &self.c.spec;
        let name = format!("{}n{}", spec.name, nsid);
        // Stable across restarts and distinct per controller (two paths to one namespace
        // under two names must not collide in the registry).
        let uuid = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!(
                "plexstor bdev_nvme {} {} {}",
                spec.name, spec.trid.subnqn, nsid
            )
            .as_bytes(),
        );
        let mut info = BdevInfo::new(
            name,
            "NVMe disk",
            ns.block_size,
            ns.blocks,
            uuid,
            IoTypes::of(&[
                IoType::Read,
                IoType::Write,
                IoType::Flush,
                IoType::Unmap,
                IoType::WriteZeroes,
            ]),
        );
        info.write_cache = false;
        let bdev = Arc::new(NvmeBdev {
            info,
            ctrlr_id: self.c.id,
            ctrlr_name: spec.name.clone(),
            nsid,
            max_xfer: self.ctrlr.info().max_transfer,
            gone: Arc::new(AtomicBool::new(false)),
        });
        let entry = app.bdevs.register(bdev.clone())?;
        self.bdevs.insert(nsid, (bdev, entry));
        Ok(())
    }

    fn on_event(&mut self, ev: CtrlrEvent) {
        let name = self.c.spec.name.clone();
        match ev {
            CtrlrEvent::State(s) => {
                tracing::info!("bdev_nvme {name}: controller {s:?}");
            }
            CtrlrEvent::NamespacesChanged {
                added,
                removed,
                resized,
            } => {
                for nsid in removed {
                    if let Some((b, e)) = self.bdevs.remove(&nsid) {
                        b.gone.store(true, Ordering::Release);
                        tracing::info!("bdev_nvme {name}: namespace {nsid} removed");
                        self.zombies.push(e);
                    }
                }
                for nsid in added {
                    if self.bdevs.contains_key(&nsid) {
                        continue;
                    }
                    match self.add_ns(nsid) {
                        Ok(()) => tracing::info!("bdev_nvme {name}: namespace {nsid} added"),
                        Err(e) => tracing::warn!("bdev_nvme {name}: namespace {nsid}: {e}"),
                    }
                }
                for nsid in resized {
                    let (Some((b, _)), Some(ns)) =
                        (self.bdevs.get(&nsid), self.ctrlr.namespace(nsid))
                    else {
                        continue;
                    };
                    if ns.block_size != b.info.block_size {
                        // A new LBA format is a different disk to every consumer.
                        tracing::warn!(
                            "bdev_nvme {name}: namespace {nsid} block size changed \
                             {} -> {}: I/O to {} now fails",
                            b.info.block_size,
                            ns.block_size,
                            b.info.name
                        );
                        b.gone.store(true, Ordering::Release);
                        continue;
                    }
                    tracing::info!(
                        "bdev_nvme {name}: namespace {nsid} resized {} -> {} blocks",
                        b.info.num_blocks(),
                        ns.blocks
                    );
                    b.info.set_num_blocks(ns.blocks);
                }
                self.reap_zombies();
            }
            CtrlrEvent::Aen { .. } => {}
        }
    }

    fn reap_zombies(&mut self) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        self.zombies.retain(|e| {
            let name = e.name().to_string();
            match app.bdevs.unregister(&name, "nvme") {
                Ok(_) | Err(BdevError::NotFound(_)) => false,
                Err(_) => true,
            }
        });
    }

    /// SPDK deletes a controller that did not come back within ctrlr_loss_timeout_sec (a
    /// positive one: 0 means "never reconnect" and -1 "forever", and both leave it failed).
    /// The initiator turns Failed only for that reason or on our own detach.
    fn loss_timed_out(&self) -> bool {
        self.c.spec.ctrlr_loss_timeout_sec > 0 && self.ctrlr.state() == CtrlrState::Failed
    }

    /// After the loss timeout: unregisters every bdev nothing claims. A claimed one keeps
    /// failing I/O and is retried on the next poll. Returns whether the bdev list changed.
    fn unregister_unclaimed(&mut self) -> bool {
        let Some(app) = self.app.upgrade() else {
            return false;
        };
        let before = self.bdevs.len();
        let mut held = None;
        self.bdevs.retain(|_, (b, e)| {
            let r = match e.claimed_by() {
                Some(owner) => Err(BdevError::Claimed {
                    name: e.name().to_string(),
                    owner,
                }),
                None => app.bdevs.unregister(e.name(), "nvme"),
            };
            match r {
                Ok(_) | Err(BdevError::NotFound(_)) => {
                    b.gone.store(true, Ordering::Release);
                    false
                }
                Err(err) => {
                    held.get_or_insert(err);
                    true
                }
            }
        });
        if let Some(err) = held.filter(|_| !self.loss_held_logged) {
            self.loss_held_logged = true;
            tracing::warn!(
                "bdev_nvme {}: ctrlr_loss_timeout_sec passed, but {err}: its I/O fails until it \
                 is released, then the controller is deleted",
                self.c.spec.name
            );
        }
        self.bdevs.len() != before
    }

    /// Deletes a controller whose loss timeout passed and whose bdevs are all unregistered:
    /// tears it down and takes it off the module's list, so its name is free again.
    fn delete_lost(self, cmds: &mpsc::Receiver<Cmd>) {
        let (name, id) = (self.c.spec.name.clone(), self.c.id);
        tracing::warn!(
            "bdev_nvme {name}: not reconnected within ctrlr_loss_timeout_sec ({} s): deleting \
             the controller",
            self.c.spec.ctrlr_loss_timeout_sec
        );
        let app = self.app.upgrade();
        self.teardown();
        if let Some(app) = app {
            app.nvme.forget(&name, id);
        }
        // A detach that raced with the deletion asked for what happened anyway.
        while let Ok(Cmd::Detach(done)) = cmds.try_recv() {
            let _ = done.send(Ok(()));
        }
    }

    /// The first bdev of this controller that something still uses.
    fn claimed(&self) -> Option<NvmeError> {
        let e = self
            .bdevs
            .values()
            .map(|(_, e)| e)
            .chain(self.zombies.iter())
            .find_map(|e| {
                e.claimed_by().map(|owner| BdevError::Claimed {
                    name: e.name().to_string(),
                    owner,
                })
            })?;
        Some(e.into())
    }

    /// Unregisters the bdevs, takes the qpairs off the reactors (failing what is in flight)
    /// and shuts the controller down.
    fn teardown(mut self) {
        let name = self.c.spec.name.clone();
        for (b, _) in self.bdevs.values() {
            b.gone.store(true, Ordering::Release);
        }
        // Without the app its reactors are stopped too: their qpairs went with their threads,
        // and a message to them would never be answered.
        let app = self.app.upgrade();
        if let Some(app) = &app {
            for (_, (_, e)) in std::mem::take(&mut self.bdevs) {
                self.zombies.push(e);
            }
            for e in std::mem::take(&mut self.zombies) {
                let _ = app.bdevs.unregister(e.name(), "nvme");
            }
        }
        let id = self.c.id;
        for h in self.reactors.iter().filter(|_| app.is_some()) {
            let _ = h.call_blocking(move |ctx| {
                if let Some(slot) = QPAIRS.with(|m| m.borrow_mut().remove(&id)) {
                    let mut s = slot.borrow_mut();
                    s.shut();
                    ctx.remove_poller(s.poller);
                }
            });
        }
        *self.c.cmds.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(e) = self.ctrlr.detach() {
            tracing::warn!("bdev_nvme {name}: shutdown: {e}");
        }
        tracing::info!("bdev_nvme: detached {name}");
    }
}

/// Parses SPDK's trtype / adrfam spellings.
pub fn parse_trtype(s: &str) -> Option<TrType> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(TrType::Tcp),
        "rdma" => Some(TrType::Rdma),
        "pcie" => Some(TrType::Pcie),
        _ => None,
    }
}

// ------------------------------------------------------------------------- JSON-RPC

pub mod rpc {
    //! `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`,
    //! `bdev_nvme_get_controllers`, with SPDK's parameter names.

    use super::*;
    use crate::rpc::{Methods, RpcError};
    use serde::Deserialize;
    use std::str::FromStr;

    impl From<NvmeError> for RpcError {
        fn from(e: NvmeError) -> Self {
            RpcError::errno(e.errno(), e.to_string())
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Attach {
        name: String,
        trtype: String,
        traddr: String,
        adrfam: Option<String>,
        /// SPDK sends a string; a number is accepted too.
        trsvcid: Option<Value>,
        subnqn: Option<String>,
        hostnqn: Option<String>,
        #[serde(default)]
        hdgst: bool,
        #[serde(default)]
        ddgst: bool,
        fabrics_connect_timeout_us: Option<u64>,
        num_io_queues: Option<u32>,
        #[serde(default)]
        ctrlr_loss_timeout_sec: i64,
        #[serde(default)]
        reconnect_delay_sec: u64,
        #[serde(default)]
        fast_io_fail_timeout_sec: u64,
        /// SPDK's bound on the names returned; every namespace gets a bdev here.
        #[allow(dead_code)]
        max_bdevs: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Detach {
        name: String,
        trtype: Option<String>,
        traddr: Option<String>,
        adrfam: Option<String>,
        trsvcid: Option<Value>,
        subnqn: Option<String>,
        hostaddr: Option<String>,
        hostsvcid: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GetControllers {
        name: Option<String>,
    }

    fn bad(msg: impl Into<String>) -> RpcError {
        RpcError::invalid_params(msg)
    }

    fn svcid(v: &Option<Value>) -> Result<Option<String>, RpcError> {
        match v {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(bad("trsvcid must be a port number (string or integer)")),
        }
    }

    /// SPDK's rules for the three coupled reconnect parameters.
    pub(super) fn check_resiliency(loss: i64, delay: u64, fast: u64) -> Result<(), RpcError> {
        if loss < -1 {
            return Err(bad("ctrlr_loss_timeout_sec must be -1 (retry forever), 0 (never retry) or a number of seconds"));
        }
        if loss == 0 {
            if delay != 0 || fast != 0 {
                return Err(bad("reconnect_delay_sec and fast_io_fail_timeout_sec need ctrlr_loss_timeout_sec other than 0"));
            }
            return Ok(());
        }
        if delay == 0 {
            return Err(bad(
                "reconnect_delay_sec must be at least 1 when ctrlr_loss_timeout_sec is not 0",
            ));
        }
        if loss > 0 && delay > loss as u64 {
            return Err(bad(
                "reconnect_delay_sec must not exceed ctrlr_loss_timeout_sec",
            ));
        }
        if fast != 0 {
            if loss > 0 && fast > loss as u64 {
                return Err(bad(
                    "fast_io_fail_timeout_sec must not exceed ctrlr_loss_timeout_sec",
                ));
            }
            if fast < delay {
                return Err(bad(
                    "fast_io_fail_timeout_sec must be at least reconnect_delay_sec",
                ));
            }
        }
        Ok(())
    }

    /// The host ID that goes with a host NQN: the UUID in a `…:uuid:` NQN (as the kernel
    /// does), else one derived from the NQN, so a saved config reconnects as the same host.
    pub(super) fn hostid_for(hostnqn: &str) -> [u8; 16] {
        hostnqn
            .rsplit_once(":uuid:")
            .and_then(|(_, u)| Uuid::parse_str(u).ok())
            .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, hostnqn.as_bytes()))
            .into_bytes()
    }

    fn spec_of(p: Attach) -> Result<(AttachSpec, [u8; 16], Option<u64>), RpcError> {
        validate_name(&p.name).map_err(|e| bad(e.to_string()))?;
        let tt = parse_trtype(&p.trtype)
            .ok_or_else(|| bad(format!("trtype {:?}: known are TCP, RDMA, PCIe", p.trtype)))?;
        if tt != TrType::Tcp {
            return Err(RpcError::errno(
                libc::EOPNOTSUPP,
                format!("trtype {}: only TCP is implemented", tt.as_str()),
            ));
        }
        if p.num_io_queues.is_some_and(|n| n == 0 || n > 1024) {
            return Err(bad("num_io_queues must be 1-1024"));
        }
        check_resiliency(
            p.ctrlr_loss_timeout_sec,
            p.reconnect_delay_sec,
            p.fast_io_fail_timeout_sec,
        )?;
        let mut s = format!("trtype:{} traddr:{}", tt.as_str(), p.traddr);
        if p.traddr.is_empty() || p.traddr.contains(char::is_whitespace) {
            return Err(bad(format!("traddr {:?} is not an address", p.traddr)));
        }
        for (k, v) in [
            ("adrfam", p.adrfam.clone()),
            ("trsvcid", svcid(&p.trsvcid)?),
            ("subnqn", p.subnqn.clone()),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(bad(format!("{k} {v:?} is empty or has spaces")));
                }
                s.push_str(&format!(" {k}:{v}"));
            }
        }
        let trid = TransportId::from_str(&s).map_err(|e| bad(e.to_string()))?;
        if trid.is_discovery() {
            return Err(bad(
                "subnqn is the discovery NQN (or missing): name the subsystem to attach",
            ));
        }
        let hostnqn = match p.hostnqn {
            Some(h) if h.is_empty() || h.len() > 223 => {
                return Err(bad("hostnqn must be 1-223 bytes"))
            }
            Some(h) => h,
            None => CtrlrOpts::default().hostnqn,
        };
        let hostid = hostid_for(&hostnqn);
        let spec = AttachSpec {
            name: p.name,
            trid,
            hostnqn,
            hdgst: p.hdgst,
            ddgst: p.ddgst,
            num_io_queues: p.num_io_queues.map(|n| n as u16),
            ctrlr_loss_timeout_sec: p.ctrlr_loss_timeout_sec,
            reconnect_delay_sec: p.reconnect_delay_sec,
            fast_io_fail_timeout_sec: p.fast_io_fail_timeout_sec,
            hostid: [0; 16],
            connect_timeout_us: None,
        };
        Ok((spec, hostid, p.fabrics_connect_timeout_us))
    }

    pub fn register(m: &mut Methods) {
        m.add(
            "bdev_nvme_attach_controller",
            |app: Arc<App>, p: Attach| async move {
                let (mut spec, hostid, connect_us) = spec_of(p)?;
                spec.hostid = hostid;
                spec.connect_timeout_us = connect_us.filter(|&t| t > 0);
                let names = NvmeModule::attach(&app, spec).await?;
                Ok::<_, RpcError>(names)
            },
        );
        m.add(
            "bdev_nvme_detach_controller",
            |app: Arc<App>, p: Detach| async move {
                let c = app
                    .nvme
                    .get(&p.name)
                    .ok_or_else(|| NvmeError::NotFound(p.name.clone()))?;
                let t = &c.spec.trid;
                // A path selector that does not match our only path names nothing to remove.
                let port = svcid(&p.trsvcid)?;
                let mismatch = p
                    .trtype
                    .as_deref()
                    .is_some_and(|x| parse_trtype(x) != Some(t.trtype))
                    || p.traddr.as_deref().is_some_and(|x| x != t.traddr)
                    || p.adrfam
                        .as_deref()
                        .is_some_and(|x| !x.eq_ignore_ascii_case(t.adrfam.as_str()))
                    || port.is_some_and(|x| x != t.trsvcid.to_string())
                    || p.subnqn.as_deref().is_some_and(|x| x != t.subnqn)
                    || p.hostaddr.is_some()
                    || p.hostsvcid.is_some();
                if mismatch {
                    return Err(RpcError::errno(
                        libc::ENODEV,
                        format!(
                            "controller {} has no path matching that transport ID",
                            p.name
                        ),
                    ));
                }
                NvmeModule::detach(&app, &p.name).await?;
                Ok::<_, RpcError>(true)
            },
        );
        m.add(
            "bdev_nvme_get_controllers",
            |app: Arc<App>, p: GetControllers| async move {
                let list = match p.name {
                    Some(n) => vec![app.nvme.get(&n).ok_or(NvmeError::NotFound(n))?],
                    None => app.nvme.list(),
                };
                Ok::<_, RpcError>(list.iter().map(|c| c.describe()).collect::<Vec<_>>())
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::rpc::{check_resiliency, hostid_for};
    use super::*;

    #[test]
    fn resiliency_rules_are_spdks() {
        assert!(check_resiliency(0, 0, 0).is_ok());
        assert!(check_resiliency(-1, 1, 0).is_ok());
        assert!(check_resiliency(-1, 2, 5).is_ok());
        assert!(check_resiliency(30, 5, 10).is_ok());
        assert!(check_resiliency(-2, 1, 0).is_err());
        assert!(
            check_resiliency(0, 1, 0).is_err(),
            "delay without loss timeout"
        );
        assert!(
            check_resiliency(-1, 0, 0).is_err(),
            "retry forever without delay"
        );
        assert!(
            check_resiliency(5, 10, 0).is_err(),
            "delay beyond loss timeout"
        );
        assert!(
            check_resiliency(30, 5, 40).is_err(),
            "fast fail beyond loss timeout"
        );
        assert!(
            check_resiliency(30, 5, 2).is_err(),
            "fast fail before first retry"
        );
    }

    #[test]
    fn host_id_follows_the_host_nqn() {
        let u = "4a9c2c7e-1b2d-4e3f-8a5b-6c7d8e9f0a1b";
        let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{u}");
        assert_eq!(hostid_for(&nqn), *Uuid::parse_str(u).unwrap().as_bytes());
        assert_eq!(hostid_for("nqn.x:host"), hostid_for("nqn.x:host"));
        assert_ne!(hostid_for("nqn.x:host"), hostid_for("nqn.x:other"));
    }

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
