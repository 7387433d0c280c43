//! The NVMe-oF target: subsystems, controllers, the discovery service and the NVMe/TCP
//! transport.
//!
//! Shape:
//! - [`NvmfTarget`] (held by `App`) owns the configuration: the transport's options, the
//!   subsystems and the listening sockets. It is touched by JSON-RPC and by Fabrics Connect,
//!   never per I/O.
//! - [`subsystem::Subsystem`]: NQN, serial, model, namespaces, allowed hosts, listeners and its
//!   live controllers. Namespace changes bump a generation counter that I/O queues check once
//!   per poll (one atomic load) to refresh their bdev channels.
//! - [`controller::Controller`]: one per admin queue; shared by its admin and I/O queues, which
//!   may live on different reactors. Admin commands run on the admin queue's reactor; I/O
//!   queues only read its `failed` flag.
//! - [`tcp`]: listeners accept on a thread of their own and hand each connection round-robin
//!   to a reactor's poll group; one poller per reactor drives all its connections with
//!   non-blocking sockets.

pub mod budget;
pub mod controller;
pub mod discovery;
pub mod io;
pub mod queue;
pub mod rdma;
pub mod reservation;
pub mod rpc;
pub mod subsystem;
pub mod tcp;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use subsystem::{ListenAddr, SubType, Subsystem};
use thiserror::Error;

/// Model number every plexstor controller reports.
pub const MODEL_NUMBER: &str = "plexstor";
/// Firmware revision: the crate's version.
pub const FIRMWARE_REVISION: &str = env!("CARGO_PKG_VERSION");
/// Default serial number (SPDK's default too).
pub const DEFAULT_SERIAL: &str = "00000000000000000000";

/// Options of one transport (`nvmf_create_transport`), with SPDK's names.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TransportOpts {
    /// "TCP" or "RDMA".
    pub trtype: String,
    pub max_queue_depth: u16,
    pub max_io_qpairs_per_ctrlr: u16,
    pub in_capsule_data_size: u32,
    pub max_io_size: u32,
    pub io_unit_size: u32,
    pub max_aq_depth: u16,
    pub num_shared_buffers: u32,
    pub buf_cache_size: u32,
    pub dif_insert_or_strip: bool,
    pub c2h_success: bool,
    pub sock_priority: u32,
    pub abort_timeout_sec: u32,
    pub zcopy: bool,
    /// A connection must finish ICReq and its Connect this long after it was accepted, or
    /// it is closed (0: never). Half-open or silent connections otherwise live forever.
    pub connect_timeout_ms: u32,
    /// A PDU begun and then left without a new byte this long is fatal to its connection
    /// (0: never).
    pub pdu_stall_timeout_ms: u32,
    /// A write whose R2T the host leaves unanswered this long fails with a transport error
    /// and frees its buffer; a connection whose host takes none of the data sent to it this
    /// long is closed (0: never).
    pub data_timeout_ms: u32,
    /// RDMA: receives a device's shared receive queue holds (unused with `no_srq`).
    pub max_srq_depth: u32,
    /// RDMA: every queue pair posts its own receives instead of sharing a queue of them.
    pub no_srq: bool,
    /// RDMA: SPDK's size for a poll group's shared completion queue. Checked and kept for
    /// SPDK's clients, not used: each queue pair here has a completion queue of its own,
    /// sized to every work request it can have posted.
    pub num_cqe: u32,
    /// RDMA: connect requests the listener holds before it answers them.
    pub acceptor_backlog: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            trtype: "TCP".into(),
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 8192,
            max_io_size: 1 << 20,
            io_unit_size: 131072,
            max_aq_depth: 128,
            num_shared_buffers: 511,
            buf_cache_size: 32,
            dif_insert_or_strip: false,
            c2h_success: true,
            sock_priority: 0,
            abort_timeout_sec: 1,
            zcopy: false,
            connect_timeout_ms: 10_000,
            pdu_stall_timeout_ms: 10_000,
            data_timeout_ms: 30_000,
            max_srq_depth: 4096,
            no_srq: false,
            num_cqe: 4096,
            acceptor_backlog: 100,
        }
    }
}

impl TransportOpts {
    /// SPDK's defaults for `trtype` ("TCP" or "RDMA", any case), or None for another.
    pub fn defaults_for(trtype: &str) -> Option<TransportOpts> {
        if trtype.eq_ignore_ascii_case("tcp") {
            return Some(TransportOpts::default());
        }
        if !trtype.eq_ignore_ascii_case("rdma") {
            return None;
        }
        // SPDK's RDMA defaults: smaller in-capsule data and I/O unit, more shared buffers.
        Some(TransportOpts {
            trtype: "RDMA".into(),
            in_capsule_data_size: 4096,
            max_io_size: 128 << 10,
            io_unit_size: 8192,
            num_shared_buffers: 4095,
            c2h_success: false,
            ..TransportOpts::default()
        })
    }

    pub fn is_rdma(&self) -> bool {
        self.trtype == "RDMA"
    }

    /// Checks the options against what this transport can do.
    pub fn validate(&self) -> Result<(), NvmfError> {
        let bad = |m: String| Err(NvmfError::InvalidParam(m));
        if !(2..=1024).contains(&self.max_queue_depth) {
            return bad(format!(
                "max_queue_depth {} must be 2..=1024",
                self.max_queue_depth
            ));
        }
        if !(2..=4096).contains(&self.max_aq_depth) {
            return bad(format!(
                "max_aq_depth {} must be 2..=4096",
                self.max_aq_depth
            ));
        }
        if self.max_io_qpairs_per_ctrlr == 0 || self.max_io_qpairs_per_ctrlr > 1024 {
            return bad(format!(
                "max_io_qpairs_per_ctrlr {} must be 1..=1024",
                self.max_io_qpairs_per_ctrlr
            ));
        }
        // MDTS is a power of two of 4 KiB pages; the buffer pool tops out at 4 MiB.
        if self.max_io_size < 4096
            || !self.max_io_size.is_power_of_two()
            || self.max_io_size > 4 << 20
        {
            return bad(format!(
                "max_io_size {} must be a power of two from 4096 to 4 MiB",
                self.max_io_size
            ));
        }
        if !self.in_capsule_data_size.is_multiple_of(16) || self.in_capsule_data_size > 128 << 10 {
            return bad(format!(
                "in_capsule_data_size {} must be a multiple of 16 up to 128 KiB",
                self.in_capsule_data_size
            ));
        }
        if self.io_unit_size < 4096 || !self.io_unit_size.is_multiple_of(4) {
            return bad(format!(
                "io_unit_size {} must be a multiple of 4 of at least 4096",
                self.io_unit_size
            ));
        }
        if self.dif_insert_or_strip {
            return bad("dif_insert_or_strip is not supported".into());
        }
        if self.zcopy {
            return bad("zcopy is not supported".into());
        }
        if self.is_rdma() && !(16..=65536).contains(&self.num_cqe) {
            return bad(format!("num_cqe {} must be 16..=65536", self.num_cqe));
        }
        Ok(())
    }

    /// MDTS in units of 4 KiB pages, as a power of two.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }

    /// IOCCSZ: command capsule size in 16-byte units (64-byte SQE + in-capsule data).
    pub fn ioccsz(&self) -> u32 {
        (64 + self.in_capsule_data_size) / 16
    }

    /// Largest data an H2CData PDU may carry (MAXH2CDATA).
    pub fn max_h2c_data(&self) -> u32 {
        self.io_unit_size.max(4096) & !3
    }
}

#[derive(Debug, Error)]
pub enum NvmfError {
    #[error("{0}")]
    InvalidParam(String),
    #[error("subsystem {0} already exists")]
    SubsystemExists(String),
    #[error("no subsystem with NQN {0}")]
    NoSubsystem(String),
    #[error("transport {0} does not exist; create it with nvmf_create_transport first")]
    NoTransport(String),
    #[error("transport {0} already exists")]
    TransportExists(String),
    #[error("namespace {nsid} already exists in {nqn}")]
    NsidExists { nqn: String, nsid: u32 },
    #[error("no namespace {nsid} in {nqn}")]
    NoNamespace { nqn: String, nsid: u32 },
    #[error("subsystem {0} has no room for another namespace (max_namespaces)")]
    NoNsidFree(String),
    #[error("listener {0} already added")]
    ListenerExists(String),
    #[error("no listener {0}")]
    NoListener(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ptpl(#[from] reservation::PtplError),
    #[error("host {0} already allowed")]
    HostExists(String),
    #[error("host {0} is not in the allowed list")]
    NoHost(String),
    #[error(transparent)]
    Bdev(#[from] crate::bdev::BdevError),
    #[error(transparent)]
    Reactor(#[from] crate::reactor::ReactorError),
}

impl NvmfError {
    pub fn errno(&self) -> i32 {
        match self {
            NvmfError::InvalidParam(_) | NvmfError::Listen { .. } | NvmfError::Ptpl(_) => {
                libc::EINVAL
            }
            NvmfError::SubsystemExists(_)
            | NvmfError::TransportExists(_)
            | NvmfError::NsidExists { .. }
            | NvmfError::ListenerExists(_)
            | NvmfError::HostExists(_) => libc::EEXIST,
            NvmfError::NoSubsystem(_)
            | NvmfError::NoTransport(_)
            | NvmfError::NoNamespace { .. }
            | NvmfError::NoListener(_)
            | NvmfError::NoHost(_) => libc::ENODEV,
            NvmfError::NoNsidFree(_) => libc::ENOSPC,
            NvmfError::Bdev(e) => e.errno(),
            NvmfError::Reactor(_) => libc::EIO,
        }
    }
}

impl From<NvmfError> for crate::rpc::RpcError {
    fn from(e: NvmfError) -> Self {
        crate::rpc::RpcError::errno(e.errno(), e.to_string())
    }
}

/// A listener of either transport.
enum ListenerHandle {
    Tcp(tcp::listener::ListenerHandle),
    Rdma(rdma::listener::ListenerHandle),
}

impl ListenerHandle {
    fn stop(&self) {
        match self {
            ListenerHandle::Tcp(h) => h.stop(),
            ListenerHandle::Rdma(h) => h.stop(),
        }
    }
}

/// A listener shared by the subsystems that added it.
struct ListenerEntry {
    addr: ListenAddr,
    users: usize,
    handle: ListenerHandle,
}

#[derive(Default)]
struct TargetInner {
    /// One per transport type, in creation order.
    transports: Vec<Arc<TransportOpts>>,
    /// In creation order (save_config replays them in order).
    subsystems: Vec<Arc<Subsystem>>,
    listeners: Vec<ListenerEntry>,
}

/// The NVMe-oF target of one plexd.
pub struct NvmfTarget {
    inner: Mutex<TargetInner>,
    /// The discovery subsystem (always present, not listed in its own log).
    pub discovery: Arc<Subsystem>,
    /// Discovery log generation counter.
    genctr: AtomicU64,
    /// Round-robin cursor for spreading connections over reactors.
    next_reactor: AtomicUsize,
    /// Counters of each reactor's poll group, by reactor id (`nvmf_get_stats`).
    poll_groups: Mutex<Vec<Arc<PollGroupStats>>>,
    /// In-flight data buffers lent to hosts (`num_shared_buffers` × `io_unit_size`).
    pub data_budget: budget::DataBudget,
}

/// What `nvmf_get_stats` reports of one poll group (one per reactor, as SPDK has one per
/// thread). Written only by connections of that reactor, with plain loads and stores.
#[derive(Default, Debug)]
pub struct PollGroupStats {
    pub admin_qpairs: AtomicU64,
    pub io_qpairs: AtomicU64,
    pub current_admin_qpairs: AtomicU64,
    pub current_io_qpairs: AtomicU64,
    /// Commands that found their bdev's queue full and waited to be resubmitted (SPDK counts
    /// its I/O-wait queue entries here).
    pub pending_bdev_io: AtomicU64,
    /// Commands completed on I/O queues.
    pub completed_nvme_io: AtomicU64,
    /// plexd's own: commands a host sent past its queue size, while every command slot (and,
    /// on RDMA, every wait) was taken, answered at once with Command Sequence Error. Any count
    /// here is a host breaking the protocol.
    pub commands_past_queue_size: AtomicU64,
    /// The NVMe/RDMA counters of this group's queue pairs, one entry per device.
    pub rdma_devices: Mutex<Vec<Arc<rdma::DeviceStats>>>,
}

impl PollGroupStats {
    pub fn qpair_opened(&self, admin: bool) {
        let (total, cur) = if admin {
            (&self.admin_qpairs, &self.current_admin_qpairs)
        } else {
            (&self.io_qpairs, &self.current_io_qpairs)
        };
        crate::bdev::bump(total, 1);
        crate::bdev::bump(cur, 1);
    }

    /// The RDMA counters of device `name` in this group, made on first use.
    pub fn rdma_device(&self, name: &str) -> Arc<rdma::DeviceStats> {
        let mut devices = self.rdma_devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.iter().find(|d| d.name == name) {
            return d.clone();
        }
        let d = Arc::new(rdma::DeviceStats {
            name: name.to_string(),
            ..Default::default()
        });
        devices.push(d.clone());
        d
    }

    pub fn qpair_closed(&self, admin: bool) {
        let cur = if admin {
            &self.current_admin_qpairs
        } else {
            &self.current_io_qpairs
        };
        crate::bdev::bump(cur, u64::MAX);
    }
}

impl Default for NvmfTarget {
    fn default() -> Self {
        NvmfTarget {
            inner: Mutex::new(TargetInner::default()),
            discovery: Arc::new(Subsystem::new_discovery()),
            genctr: AtomicU64::new(0),
            next_reactor: AtomicUsize::new(0),
            poll_groups: Mutex::new(Vec::new()),
            data_budget: budget::DataBudget::default(),
        }
    }
}

impl NvmfTarget {
    fn lock(&self) -> std::sync::MutexGuard<'_, TargetInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters of reactor `reactor`'s poll group.
    pub fn poll_group_stats(&self, reactor: usize) -> Arc<PollGroupStats> {
        let mut g = self.poll_groups.lock().unwrap_or_else(|e| e.into_inner());
        while g.len() <= reactor {
            g.push(Arc::default());
        }
        g[reactor].clone()
    }

    /// The transport of type `trtype` ("TCP", "RDMA"), if created.
    pub fn transport(&self, trtype: &str) -> Option<Arc<TransportOpts>> {
        self.lock()
            .transports
            .iter()
            .find(|t| t.trtype.eq_ignore_ascii_case(trtype))
            .cloned()
    }

    /// Every transport created, in creation order.
    pub fn transports(&self) -> Vec<Arc<TransportOpts>> {
        self.lock().transports.clone()
    }

    pub fn create_transport(&self, opts: TransportOpts) -> Result<(), NvmfError> {
        opts.validate()?;
        let mut g = self.lock();
        if g.transports.iter().any(|t| t.trtype == opts.trtype) {
            return Err(NvmfError::TransportExists(opts.trtype));
        }
        // One data budget for the target: the transports' shared buffers together.
        let shared =
            |t: &TransportOpts| u64::from(t.num_shared_buffers) * u64::from(t.io_unit_size);
        let limit = shared(&opts) + g.transports.iter().map(|t| shared(t)).sum::<u64>();
        self.data_budget.set_limit(limit);
        g.transports.push(Arc::new(opts));
        Ok(())
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.lock().subsystems.clone()
    }

    /// Finds a subsystem (or the discovery subsystem) by NQN.
    pub fn find(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == nvme_spec::fabrics::DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.lock()
            .subsystems
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    pub fn add_subsystem(&self, s: Subsystem) -> Result<Arc<Subsystem>, NvmfError> {
        let mut g = self.lock();
        if s.nqn == nvme_spec::fabrics::DISCOVERY_NQN || g.subsystems.iter().any(|x| x.nqn == s.nqn)
        {
            return Err(NvmfError::SubsystemExists(s.nqn));
        }
        let s = Arc::new(s);
        g.subsystems.push(s.clone());
        drop(g);
        self.bump_genctr();
        Ok(s)
    }

    /// Removes a subsystem: its controllers are failed (their connections close), its
    /// namespaces release their bdevs, its listeners are dropped.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), NvmfError> {
        let mut g = self.lock();
        let i = g
            .subsystems
            .iter()
            .position(|s| s.nqn == nqn)
            .ok_or_else(|| NvmfError::NoSubsystem(nqn.to_string()))?;
        let s = g.subsystems.remove(i);
        for addr in s.listeners() {
            Self::release_listener(&mut g, &addr);
        }
        drop(g);
        s.shut_down();
        self.bump_genctr();
        Ok(())
    }

    /// Adds `addr` to subsystem `nqn`, opening the socket if no other subsystem has.
    pub fn add_listener(
        &self,
        app: &crate::app::App,
        nqn: &str,
        addr: ListenAddr,
    ) -> Result<(), NvmfError> {
        let s = self
            .find(nqn)
            .ok_or_else(|| NvmfError::NoSubsystem(nqn.to_string()))?;
        let mut g = self.lock();
        let opts = g
            .transports
            .iter()
            .find(|t| t.trtype == addr.trtype)
            .cloned()
            .ok_or_else(|| NvmfError::NoTransport(addr.trtype.clone()))?;
        if s.listeners().contains(&addr) {
            return Err(NvmfError::ListenerExists(addr.to_string()));
        }
        if let Some(e) = g.listeners.iter_mut().find(|e| e.addr == addr) {
            e.users += 1;
        } else {
            let handle = if opts.is_rdma() {
                ListenerHandle::Rdma(rdma::listener::start(app, &addr, opts)?)
            } else {
                ListenerHandle::Tcp(tcp::listener::start(app, &addr, opts)?)
            };
            g.listeners.push(ListenerEntry {
                addr: addr.clone(),
                users: 1,
                handle,
            });
        }
        s.add_listener(addr);
        drop(g);
        self.bump_genctr();
        Ok(())
    }

    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddr) -> Result<(), NvmfError> {
        let s = self
            .find(nqn)
            .ok_or_else(|| NvmfError::NoSubsystem(nqn.to_string()))?;
        if !s.remove_listener(addr) {
            return Err(NvmfError::NoListener(addr.to_string()));
        }
        let mut g = self.lock();
        Self::release_listener(&mut g, addr);
        drop(g);
        self.bump_genctr();
        Ok(())
    }

    fn release_listener(g: &mut TargetInner, addr: &ListenAddr) {
        if let Some(i) = g.listeners.iter().position(|e| &e.addr == addr) {
            g.listeners[i].users -= 1;
            if g.listeners[i].users == 0 {
                let e = g.listeners.remove(i);
                e.handle.stop();
            }
        }
    }

    /// Every (subsystem, listener) pair `hostnqn` may see, for the discovery log.
    pub fn discovery_entries(&self, hostnqn: &str) -> Vec<(Arc<Subsystem>, ListenAddr)> {
        let g = self.lock();
        let mut out = Vec::new();
        for s in &g.subsystems {
            if !s.host_allowed(hostnqn) {
                continue;
            }
            for l in s.listeners() {
                out.push((s.clone(), l));
            }
        }
        out
    }

    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Acquire)
    }

    /// Records a change of the discovery information and tells discovery controllers.
    pub fn bump_genctr(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
        self.discovery.notify_discovery_change();
    }

    /// The reactor index to hand the next connection to.
    pub fn next_reactor(&self, n: usize) -> usize {
        self.next_reactor.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    /// The "nvmf" section of save_config.
    pub fn save_config(&self) -> Vec<serde_json::Value> {
        use serde_json::json;
        let g = self.lock();
        let mut out = Vec::new();
        for t in &g.transports {
            out.push(json!({"method": "nvmf_create_transport", "params": rpc::transport_json(t)}));
        }
        for s in &g.subsystems {
            out.extend(s.save_config());
        }
        out
    }

    /// Closes every listener (at shutdown).
    pub fn stop_listeners(&self) {
        let mut g = self.lock();
        for e in g.listeners.drain(..) {
            e.handle.stop();
        }
    }
}

impl SubType {
    pub fn name(self) -> &'static str {
        match self {
            SubType::Discovery => "Discovery",
            SubType::Nvme => "NVMe",
        }
    }
}
