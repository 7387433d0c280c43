//! RDMA listeners: one connection-manager thread per listen address. It answers connect
//! requests (checks the NVMe/RDMA private data, makes the queue pair, accepts or rejects with
//! a reason), hands each accepted queue round-robin to a reactor, and passes later events of
//! a connection (disconnect, device removal) to its queue.
//!
//! The thread waits on the event channel's descriptor with a short timeout, so stopping a
//! listener is a flag and a join.
//!
//! When the RDMA device goes away, the kernel waits until every object made on it is gone:
//! the listener lets go of its identifier and of the device's protection domain at once (its
//! queues close on their own flags), and tries to listen again every second, so the listener
//! comes back with the device.

use super::conn::{
    ConnEvents, QueueBuffers, RdmaConn, Setup, SharedReceives, CAPSULE_LEN, SPARE_RESPONSES,
};
use super::memory::DeviceMemory;
use crate::app::App;
use crate::nvmf::queue::max_slots;
use crate::nvmf::subsystem::ListenAddr;
use crate::nvmf::{NvmfError, NvmfTarget, TransportOpts};
use crate::reactor::ReactorHandle;
use nvme_spec::rdma::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use rdma::{
    CmEvent, CmEventKind, CmId, CompletionChannel, CompletionQueue, ConnParam, EventChannel,
    QueueCaps,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How long the thread waits for an event before it looks at its stop flag.
const WAIT_MS: i32 = 100;

/// Stops a listener: ends its thread, which destroys the listening identifier.
pub struct ListenerHandle {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ListenerHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// Binds `addr` on the RDMA device that owns it (errors reach the RPC caller) and starts
/// its thread.
pub fn start(
    app: &App,
    addr: &ListenAddr,
    opts: Arc<TransportOpts>,
) -> Result<ListenerHandle, NvmfError> {
    let sa = addr
        .socket_addr()
        .ok_or_else(|| NvmfError::InvalidParam(format!("bad address {addr}")))?;
    let listen_err = |e: rdma::Error| NvmfError::Listen {
        addr: addr.to_string(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    };
    rdma::available()
        .map_err(|e| NvmfError::InvalidParam(format!("cannot listen on {addr}: {e}")))?;
    let channel = EventChannel::new().map_err(listen_err)?;
    let backlog = i32::try_from(opts.acceptor_backlog).unwrap_or(i32::MAX);
    let id = CmId::listen(&channel, sa, backlog).map_err(|e| {
        NvmfError::InvalidParam(format!(
            "cannot listen on {addr}: {e} (is {} an RDMA device's address?)",
            addr.traddr
        ))
    })?;
    let reactors = app.reactors.handles().clone();
    if reactors.is_empty() {
        return Err(NvmfError::InvalidParam("no reactor".into()));
    }
    // Every poll group lists the device from now on, as SPDK's do, not only once a queue
    // pair on it lands there.
    if let Some(name) = id.device().and_then(|d| d.name().ok()) {
        for h in reactors.iter() {
            app.nvmf.poll_group_stats(h.id()).rdma_device(&name);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut cm = ConnectionManager {
        channel,
        listener: Some(id),
        backlog,
        last_listen_try: std::time::Instant::now(),
        target: app.nvmf.clone(),
        opts,
        addr: addr.clone(),
        reactors,
        devices: HashMap::new(),
        shared: HashMap::new(),
        conns: HashMap::new(),
    };
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("nvmf_rdma_cm_{}", addr.trsvcid))
        .spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                cm.wait_and_handle();
            }
            tracing::info!("nvmf/rdma: stopped listening on {}", cm.addr);
        })
        .map_err(|source| NvmfError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!("nvmf/rdma: listening on {addr}");
    Ok(ListenerHandle {
        stop,
        thread: Mutex::new(Some(thread)),
    })
}

struct ConnectionManager {
    channel: Arc<EventChannel>,
    /// The listening identifier: dropped (and so destroyed) with the thread, or when its
    /// device goes away (None until it is back).
    listener: Option<CmId>,
    backlog: i32,
    last_listen_try: std::time::Instant,
    target: Arc<NvmfTarget>,
    opts: Arc<TransportOpts>,
    addr: ListenAddr,
    reactors: Arc<Vec<ReactorHandle>>,
    /// Each device's protection domain and registrations, by `Device::key`.
    devices: HashMap<usize, Arc<DeviceMemory>>,
    /// Each device's shared receive queue (unless `no_srq`), by `Device::key`.
    shared: HashMap<usize, Arc<SharedReceives>>,
    /// The event flags of each live connection and the reactor it is on, by `CmId::key`.
    conns: HashMap<usize, (Arc<ConnEvents>, usize)>,
}

impl ConnectionManager {
    fn wait_and_handle(&mut self) {
        if self.listener.is_none() {
            self.listen_again();
        }
        let mut pfd = libc::pollfd {
            fd: self.channel.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, WAIT_MS) } <= 0 {
            return;
        }
        loop {
            match self.channel.next_event() {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) => return,
                Err(e) => {
                    crate::log_limited!(WARN, "nvmf/rdma {}: reading CM events: {e}", self.addr);
                    std::thread::sleep(std::time::Duration::from_millis(WAIT_MS as u64));
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: CmEvent) {
        match ev.kind {
            CmEventKind::ConnectRequest => self.connect_request(ev),
            CmEventKind::Established => {}
            CmEventKind::Disconnected
            | CmEventKind::TimewaitExit
            | CmEventKind::ConnectError
            | CmEventKind::Unreachable
            | CmEventKind::Rejected
            | CmEventKind::DeviceRemoval => {
                if let Some((events, reactor)) = self.conns.remove(&ev.id) {
                    events.gone.store(true, Ordering::Release);
                    // The reactor may be asleep with nothing else to wake it (a removed
                    // device completes no work).
                    self.reactors[reactor].send(|_| {});
                }
                let ours = self.listener.as_ref().is_some_and(|l| l.key() == ev.id);
                if ev.kind == CmEventKind::DeviceRemoval && ours {
                    tracing::error!(
                        "nvmf/rdma {}: the RDMA device went away; listening again when it is back",
                        self.addr
                    );
                    // Everything made on the device must go before the kernel can let it go.
                    self.listener = None;
                    self.devices.clear();
                    self.shared.clear();
                    self.last_listen_try = std::time::Instant::now();
                } else if ev.kind == CmEventKind::DeviceRemoval {
                    self.devices.clear();
                    self.shared.clear();
                }
            }
            other => tracing::debug!("nvmf/rdma {}: CM event {}", self.addr, other.name()),
        }
    }

    /// Listens again after the device went away, at most once a second.
    fn listen_again(&mut self) {
        if self.last_listen_try.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        self.last_listen_try = std::time::Instant::now();
        let Some(sa) = self.addr.socket_addr() else {
            return;
        };
        if let Ok(id) = CmId::listen(&self.channel, sa, self.backlog) {
            tracing::info!("nvmf/rdma: listening on {} again", self.addr);
            self.listener = Some(id);
        }
    }

    fn connect_request(&mut self, mut ev: CmEvent) {
        let Some(id) = ev.request.take() else { return };
        let peer = id
            .peer_addr()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let req = match CmRequest::parse(&ev.private_data).and_then(|r| {
            let depth = if r.qid() == 0 {
                self.opts.max_aq_depth
            } else {
                self.opts.max_queue_depth
            };
            r.validate(depth, self.opts.max_io_qpairs_per_ctrlr)
                .map(|()| r)
        }) {
            Ok(r) => r,
            Err(status) => {
                crate::log_limited!(INFO, "nvmf/rdma {peer}: connect request refused: {status}");
                return reject(&id, status);
            }
        };
        match self.accept(id, &req, &ev, &peer) {
            Ok(()) => {}
            Err((id, why)) => {
                crate::log_limited!(WARN, "nvmf/rdma {peer}: cannot accept: {why}");
                reject(&id, CmRejectStatus::NoResources);
            }
        }
    }

    /// Makes the queue pair for `req`, accepts and hands the queue to a reactor. On error the
    /// identifier comes back to be rejected.
    fn accept(
        &mut self,
        mut id: CmId,
        req: &CmRequest,
        ev: &CmEvent,
        peer: &str,
    ) -> Result<(), (CmId, String)> {
        let Some(device) = id.device() else {
            return Err((id, "the request names no RDMA device".into()));
        };
        let mem = match self.devices.get(&device.key()) {
            Some(m) => m.clone(),
            None => match DeviceMemory::new(device.clone()) {
                Ok(m) => {
                    let m = Arc::new(m);
                    self.devices.insert(device.key(), m.clone());
                    m
                }
                Err(e) => return Err((id, format!("no protection domain: {e}"))),
            },
        };
        let limits = match device.limits() {
            Ok(l) => l,
            Err(e) => return Err((id, format!("cannot query the device: {e}"))),
        };
        let recvs = req.sq_entries() as usize;
        let slots = max_slots(self.opts.max_queue_depth.max(self.opts.max_aq_depth));
        let send_wr = (2 * slots + SPARE_RESPONSES) as u32;
        let caps = QueueCaps {
            max_send_wr: send_wr,
            max_recv_wr: recvs as u32,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        if send_wr > limits.max_qp_wr || caps.max_recv_wr > limits.max_qp_wr {
            return Err((
                id,
                format!(
                    "the device takes {} work requests per queue; {send_wr} needed",
                    limits.max_qp_wr
                ),
            ));
        }
        let capsule_len = CAPSULE_LEN + self.opts.in_capsule_data_size as usize;
        let shared = match self.shared_receives(&device, &mem, limits.max_srq_wr, capsule_len) {
            Ok(s) => s,
            Err(e) => return Err((id, format!("no shared receive queue: {e}"))),
        };
        let built = (|| -> rdma::Result<_> {
            let channel = CompletionChannel::new(&device)?;
            let cq = CompletionQueue::new(&device, send_wr + caps.max_recv_wr, Some(&channel))?;
            let srq = shared.as_ref().map(|s| s.srq());
            id.create_qp(&mem.pd, &cq, &cq, srq, caps)?;
            let own = if shared.is_some() { 0 } else { recvs };
            let buffers = QueueBuffers::new(&mem, own, capsule_len, slots)?;
            buffers.post_all(&id)?;
            Ok((channel, cq, buffers))
        })();
        let (channel, cq, buffers) = match built {
            Ok(b) => b,
            Err(e) => return Err((id, e.to_string())),
        };
        // RDMA READs: as many as both the host and our device allow.
        let max_reads = u32::from(ev.initiator_depth).min(limits.max_qp_init_rd_atom);
        let param = ConnParam {
            private_data: &CmAccept::new(req.sq_entries() as u16).to_bytes(),
            responder_resources: u32::from(ev.responder_resources).min(limits.max_qp_rd_atom) as u8,
            initiator_depth: max_reads as u8,
            retry_count: 7,
            rnr_retry_count: 7,
        };
        if let Err(e) = id.accept(param) {
            return Err((id, e.to_string()));
        }
        let events = Arc::new(ConnEvents::default());
        let index = self.target.next_reactor(self.reactors.len());
        self.conns.insert(id.key(), (events.clone(), index));
        let setup = Setup {
            id,
            cq,
            channel,
            mem,
            buffers,
            shared,
            events,
            max_reads: max_reads.max(1) as u16,
            device_name: device.name().unwrap_or_else(|_| "unknown".into()),
        };
        let h = &self.reactors[index];
        let (t, o, a, p) = (
            self.target.clone(),
            self.opts.clone(),
            self.addr.clone(),
            peer.to_string(),
        );
        let reactor = h.id();
        tracing::debug!(
            "nvmf/rdma {peer}: queue {} accepted ({} entries) on reactor {reactor}",
            req.qid(),
            req.sq_entries()
        );
        h.send(move |ctx| {
            let conn = RdmaConn::new_rdma(setup, t, o, a, p, reactor);
            super::add_conn(ctx, Box::new(conn));
        });
        Ok(())
    }
}

impl ConnectionManager {
    /// The device's shared receive queue, made on first use: None with `no_srq`, or where the
    /// device has none (every queue pair then posts its own receives).
    fn shared_receives(
        &mut self,
        device: &rdma::Device,
        mem: &DeviceMemory,
        max_srq_wr: u32,
        capsule_len: usize,
    ) -> rdma::Result<Option<Arc<SharedReceives>>> {
        if self.opts.no_srq || max_srq_wr == 0 {
            return Ok(None);
        }
        if let Some(s) = self.shared.get(&device.key()) {
            return Ok(Some(s.clone()));
        }
        let depth = self.opts.max_srq_depth.min(max_srq_wr).max(1);
        let s = Arc::new(SharedReceives::new(mem, depth, capsule_len)?);
        tracing::info!(
            "nvmf/rdma {}: shared receive queue of {depth} capsules of {capsule_len} bytes",
            self.addr
        );
        self.shared.insert(device.key(), s.clone());
        Ok(Some(s))
    }
}

fn reject(id: &CmId, status: CmRejectStatus) {
    if let Err(e) = id.reject(&CmReject::new(status).to_bytes()) {
        crate::log_limited!(WARN, "nvmf/rdma: cannot reject a connect request: {e}");
    }
}
