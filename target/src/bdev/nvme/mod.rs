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
//!
//! Layout: this file holds the bdev and the types the parts share; `channel` the
//! per-reactor side (qpair map, channels, completion routing, buffer views); `owner` the
//! control-plane owner thread and attach/detach; `rpc` the JSON-RPC methods.

use super::*;
use crate::app::App;
use initiator::ctrlr::CtrlrInfo;
use initiator::{CtrlrOpts, CtrlrState, TrType, TransportId};
use std::sync::mpsc;
use std::time::Duration;

mod channel;
mod owner;
pub mod rpc;

use channel::NvmeChannel;

// ------------------------------------------------------------------------- bdev

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

    fn open_channel(&self, _: Option<&ReactorHandle>) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(NvmeChannel::open(self)?))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        // The controller's attach call recreates every namespace: see NvmeModule::save_config.
        None
    }

    fn driver_specific(&self) -> Value {
        serde_json::json!({"ctrlr_name": self.ctrlr_name, "nsid": self.nsid})
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
        let mut v = trid_json(&self.trid);
        let rest = serde_json::json!({
            "name": self.name,
            "hostnqn": self.hostnqn,
            "hdgst": self.hdgst,
            "ddgst": self.ddgst,
            "ctrlr_loss_timeout_sec": self.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": self.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": self.fast_io_fail_timeout_sec,
        });
        if let (Some(v), Value::Object(rest)) = (v.as_object_mut(), rest) {
            v.extend(rest);
        }
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
    /// Reset the controller now (`bdev_nvme_reset_controller`); answered once it started.
    Reset(tokio::sync::oneshot::Sender<Result<(), NvmeError>>),
    /// plexd is exiting and its reactors have stopped: shut the controller down (CC.SHN, so
    /// a PCIe device stops its DMA before the process's memory goes) and end the thread.
    Exit(mpsc::Sender<()>),
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
                "trid": trid_json(t),
                "host": {"nqn": self.spec.hostnqn},
                "model": p.info.as_ref().map(|i| i.model.clone()),
                "serial": p.info.as_ref().map(|i| i.serial.clone()),
                "max_transfer": p.info.as_ref().map(|i| i.max_transfer),
                "io_queues": p.info.as_ref().map(|i| i.io_queues),
                "sgls": p.info.as_ref().map(|i| i.sgls),
                "shadow_doorbells": p.info.as_ref().map(|i| i.shadow_doorbells),
                "hdgst": p.info.as_ref().map(|i| i.hdgst),
                "ddgst": p.info.as_ref().map(|i| i.ddgst),
                "bdevs": p.bdevs,
            }],
        })
    }

    /// The command channel of the owner thread, once the controller is attached.
    fn sender(&self) -> Option<mpsc::Sender<Cmd>> {
        self.cmds.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
    #[error(
        "controller {0} has failed (ctrlr_loss_timeout_sec passed): detach it and attach it again"
    )]
    Failed(String),
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
                initiator::Error::Device(e) => e.errno(),
                initiator::Error::Rdma(e) => e.errno(),
                initiator::Error::RdmaConnect(_) => libc::ECONNREFUSED,
                _ => libc::EIO,
            },
            NvmeError::Failed(_) => libc::ENXIO,
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
}

/// A transport ID as SPDK's RPCs spell it; a PCIe controller is named by its address alone.
fn trid_json(t: &TransportId) -> Value {
    if t.trtype == TrType::Pcie {
        return serde_json::json!({"trtype": t.trtype.as_str(), "traddr": t.traddr});
    }
    serde_json::json!({
        "trtype": t.trtype.as_str(),
        "adrfam": t.adrfam.as_str(),
        "traddr": t.traddr,
        "trsvcid": t.trsvcid.to_string(),
        "subnqn": t.subnqn,
    })
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
