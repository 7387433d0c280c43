//! RDMA connection management: an event channel, identifiers that listen or connect, and the
//! queue pair of each connection.

use std::ffi::{c_void, CStr};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use crate::sys::{self, Libraries};
use crate::verbs::{
    post_one_recv, set_nonblocking, to_sys, CompletionQueue, Device, ProtectionDomain, QueueCaps,
    SendOp, Sge, SharedReceiveQueue,
};
use crate::{libraries, os_error, returned_error, Error, Result};

/// Where librdmacm reports connection events, as a non-blocking descriptor a reactor can
/// watch.
pub struct EventChannel {
    raw: NonNull<sys::rdma_event_channel>,
    libs: &'static Libraries,
}

// SAFETY: the channel is a descriptor; librdmacm's calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub fn new() -> Result<Arc<Self>> {
        let libs = libraries()?;
        // SAFETY: no arguments; a null return sets errno.
        let raw = unsafe { (libs.cm.rdma_create_event_channel)() };
        let raw = NonNull::new(raw).ok_or_else(|| match os_error("rdma_create_event_channel") {
            Error::Os { source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
                Error::Unavailable("this machine has no RDMA device".into())
            }
            other => other,
        })?;
        let channel = Self { raw, libs };
        set_nonblocking(channel.fd())?;
        Ok(Arc::new(channel))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live; fd never changes.
        unsafe { (*self.raw.as_ptr()).fd }
    }

    /// The next event, already acknowledged, or None when none is waiting.
    pub fn next_event(self: &Arc<Self>) -> Result<Option<CmEvent>> {
        let mut raw = ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; raw is a valid out-pointer.
        if unsafe { (self.libs.cm.rdma_get_cm_event)(self.raw.as_ptr(), &mut raw) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(Error::Os {
                call: "rdma_get_cm_event",
                source: err,
            });
        }
        // SAFETY: a successful call returns a live event we must acknowledge; everything we
        // keep is copied out of it before the acknowledgement frees it.
        let event = unsafe { &*raw };
        let kind = CmEventKind::from_raw(event.event);
        let conn = event.conn;
        let private_data = if conn.private_data.is_null() {
            Vec::new()
        } else {
            // SAFETY: librdmacm gives private_data_len readable bytes at private_data.
            unsafe {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    conn.private_data_len.into(),
                )
            }
            .to_vec()
        };
        // SAFETY: the event's id is live until it is destroyed, which for a connected or
        // listening id is its owner's job and cannot happen while this event is unacknowledged.
        let context = unsafe { (*event.id).context } as usize;
        let request = (kind == CmEventKind::ConnectRequest).then(|| {
            // SAFETY: a connect request carries a new, non-null id that the receiver owns.
            CmId::adopt(unsafe { NonNull::new_unchecked(event.id) }, self.clone())
        });
        let out = CmEvent {
            kind,
            status: event.status,
            context,
            id: event.id as usize,
            private_data,
            responder_resources: conn.responder_resources,
            initiator_depth: conn.initiator_depth,
            request,
        };
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged once. A connect
        // request may be accepted after its event is acknowledged (SPDK's target does).
        unsafe { (self.libs.cm.rdma_ack_cm_event)(raw) };
        Ok(Some(out))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel holds an Arc to it, so none is left.
        unsafe { (self.libs.cm.rdma_destroy_event_channel)(self.raw.as_ptr()) };
    }
}

/// The events a connection goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmEventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    ConnectRequest,
    ConnectResponse,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    AddrChange,
    TimewaitExit,
    Other(u32),
}

impl CmEventKind {
    fn from_raw(raw: u32) -> Self {
        use CmEventKind::*;
        match raw {
            0 => AddrResolved,
            1 => AddrError,
            2 => RouteResolved,
            3 => RouteError,
            4 => ConnectRequest,
            5 => ConnectResponse,
            6 => ConnectError,
            7 => Unreachable,
            8 => Rejected,
            9 => Established,
            10 => Disconnected,
            11 => DeviceRemoval,
            14 => AddrChange,
            15 => TimewaitExit,
            other => Other(other),
        }
    }

    fn raw(self) -> u32 {
        use CmEventKind::*;
        match self {
            AddrResolved => 0,
            AddrError => 1,
            RouteResolved => 2,
            RouteError => 3,
            ConnectRequest => 4,
            ConnectResponse => 5,
            ConnectError => 6,
            Unreachable => 7,
            Rejected => 8,
            Established => 9,
            Disconnected => 10,
            DeviceRemoval => 11,
            AddrChange => 14,
            TimewaitExit => 15,
            Other(raw) => raw,
        }
    }

    /// librdmacm's name of the event.
    pub fn name(self) -> String {
        match libraries() {
            Ok(libs) => {
                // SAFETY: rdma_event_str returns a static string for any value.
                let name = unsafe { CStr::from_ptr((libs.cm.rdma_event_str)(self.raw())) };
                name.to_string_lossy().into_owned()
            }
            Err(_) => format!("{self:?}"),
        }
    }
}

/// One connection event, copied out of librdmacm and acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    pub kind: CmEventKind,
    /// The event's status: for `Rejected`, the reject reason; for errors, a negative errno.
    pub status: i32,
    /// The context of the identifier the event is about (`CmId::set_context`); a connect
    /// request inherits its listener's.
    pub context: usize,
    /// The identifier the event is about, to match against `CmId::key`.
    pub id: usize,
    /// The peer's private data (connect request, accept, reject), as delivered: the
    /// transport may pad it past what the peer sent.
    pub private_data: Vec<u8>,
    /// For a connect request, seen from this (the accepting) side, as the kernel swaps
    /// them: the RDMA READs the peer may have outstanding against us …
    pub responder_resources: u8,
    /// … and the RDMA READs we may have outstanding against the peer.
    pub initiator_depth: u8,
    /// For `ConnectRequest`: the new connection's identifier, to accept or reject.
    pub request: Option<CmId>,
}

/// What a connect or accept offers the peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnParam<'a> {
    pub private_data: &'a [u8],
    /// RDMA READs the peer may have outstanding against us.
    pub responder_resources: u8,
    /// RDMA READs we may have outstanding against the peer.
    pub initiator_depth: u8,
    /// Retries on transport errors (connect only; 7 is the most).
    pub retry_count: u8,
    /// Retries when the peer has no receive posted (7 means forever).
    pub rnr_retry_count: u8,
}

impl ConnParam<'_> {
    fn to_sys(self) -> Result<sys::rdma_conn_param> {
        let len = u8::try_from(self.private_data.len())
            .map_err(|_| Error::Invalid("RDMA CM private data is longer than 255 bytes".into()))?;
        Ok(sys::rdma_conn_param {
            private_data: if len == 0 {
                ptr::null()
            } else {
                self.private_data.as_ptr().cast()
            },
            private_data_len: len,
            responder_resources: self.responder_resources,
            initiator_depth: self.initiator_depth,
            flow_control: 0,
            retry_count: self.retry_count,
            rnr_retry_count: self.rnr_retry_count,
            srq: 0,
            qp_num: 0,
        })
    }
}

/// A connection identifier: a listener, or one end of a reliable connection with its queue
/// pair.
pub struct CmId {
    raw: NonNull<sys::rdma_cm_id>,
    /// The id's existence, shared with every `Device` taken from it.
    handle: Arc<IdHandle>,
    qp: Option<QueuePairResources>,
    libs: &'static Libraries,
}

/// Keeps an identifier alive; the last holder destroys it. A `CmId` holds one, and so does
/// every `Device` (and so every PD, queue and channel) made from it: librdmacm closes a
/// removed device's context with its last identifier, so the identifier must outlive them.
pub(crate) struct IdHandle {
    raw: NonNull<sys::rdma_cm_id>,
    /// Released after the id, which reports to it.
    _channel: Arc<EventChannel>,
    libs: &'static Libraries,
}

// SAFETY: the handle only destroys the id, once, when the last holder drops it.
unsafe impl Send for IdHandle {}
// SAFETY: as above: no method reads or writes through the pointer.
unsafe impl Sync for IdHandle {}

impl Drop for IdHandle {
    fn drop(&mut self) {
        // SAFETY: the id is ours, its queue pair was destroyed by its CmId, and every event
        // about it was acknowledged when read (`EventChannel::next_event`, the only reader),
        // so destroying it cannot block.
        unsafe { (self.libs.cm.rdma_destroy_id)(self.raw.as_ptr()) };
    }
}

impl CmId {
    fn adopt(raw: NonNull<sys::rdma_cm_id>, channel: Arc<EventChannel>) -> Self {
        let libs = channel.libs;
        let handle = Arc::new(IdHandle {
            raw,
            _channel: channel,
            libs,
        });
        CmId {
            raw,
            handle,
            qp: None,
            libs,
        }
    }
}

/// What a queue pair uses, kept alive until the queue pair is destroyed.
struct QueuePairResources {
    post_send: sys::PostSend,
    post_recv: sys::PostRecvTo<sys::ibv_qp>,
    qp: NonNull<sys::ibv_qp>,
    _pd: Arc<ProtectionDomain>,
    _send_cq: Arc<CompletionQueue>,
    _recv_cq: Arc<CompletionQueue>,
    _srq: Option<Arc<SharedReceiveQueue>>,
}

impl std::fmt::Debug for CmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmId")
            .field("key", &self.key())
            .field("peer", &self.peer_addr())
            .field("has_qp", &self.qp.is_some())
            .finish()
    }
}

// SAFETY: an id may move to another thread: librdmacm's calls on it and the verbs on its
// queue pair are thread-safe. It is not Sync: reading an event writes the id's route and
// device fields, which `&self` methods read.
unsafe impl Send for CmId {}

impl CmId {
    /// A new identifier for a reliable connection (RDMA_PS_TCP), reporting to `channel`.
    pub fn new(channel: &Arc<EventChannel>) -> Result<Self> {
        let libs = channel.libs;
        let mut raw = ptr::null_mut();
        // SAFETY: the channel is live; raw is a valid out-pointer.
        let rc = unsafe {
            (libs.cm.rdma_create_id)(
                channel.raw.as_ptr(),
                &mut raw,
                ptr::null_mut(),
                sys::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(os_error("rdma_create_id"));
        }
        let raw = NonNull::new(raw).ok_or_else(|| os_error("rdma_create_id"))?;
        Ok(Self::adopt(raw, channel.clone()))
    }

    /// A listener on `addr`, which must be an RDMA device's address (or unspecified for all).
    pub fn listen(channel: &Arc<EventChannel>, addr: SocketAddr, backlog: i32) -> Result<Self> {
        let id = Self::new(channel)?;
        let mut reuse: i32 = 1;
        // SAFETY: the id is live; the option value is an int of the size given.
        let rc = unsafe {
            (id.libs.cm.rdma_set_option)(
                id.raw.as_ptr(),
                sys::RDMA_OPTION_ID,
                sys::RDMA_OPTION_ID_REUSEADDR,
                (&mut reuse as *mut i32).cast(),
                std::mem::size_of::<i32>(),
            )
        };
        if rc != 0 {
            return Err(os_error("rdma_set_option(REUSEADDR)"));
        }
        let mut storage = to_storage(addr);
        // SAFETY: the id is live; storage holds a sockaddr of addr's family.
        if unsafe {
            (id.libs.cm.rdma_bind_addr)(
                id.raw.as_ptr(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
            )
        } != 0
        {
            return Err(os_error("rdma_bind_addr"));
        }
        // SAFETY: the id is live and bound.
        if unsafe { (id.libs.cm.rdma_listen)(id.raw.as_ptr(), backlog) } != 0 {
            return Err(os_error("rdma_listen"));
        }
        Ok(id)
    }

    /// The value `CmEvent::id` carries for events about this identifier.
    pub fn key(&self) -> usize {
        self.raw.as_ptr() as usize
    }

    /// A number carried by every event about this identifier as `CmEvent::context`.
    pub fn set_context(&mut self, context: usize) {
        // SAFETY: the context field belongs to the application; &mut self excludes readers.
        unsafe { (*self.raw.as_ptr()).context = context as *mut c_void };
    }

    /// The RDMA device this identifier is bound to, once bound (listen on a specific address,
    /// resolve, or a connect request).
    pub fn device(&self) -> Option<Device> {
        // SAFETY: the id is live; verbs is set by librdmacm when the id binds to a device.
        NonNull::new(unsafe { (*self.raw.as_ptr()).verbs }).map(|raw| Device {
            raw,
            _id: self.handle.clone(),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is live; src_addr is a sockaddr_storage librdmacm fills.
        from_storage(unsafe { &(*self.raw.as_ptr()).src_addr })
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as for local_addr.
        from_storage(unsafe { &(*self.raw.as_ptr()).dst_addr })
    }

    /// Starts resolving `dst` to a device and address; `AddrResolved` or `AddrError` follows.
    pub fn resolve_addr(&self, dst: SocketAddr, timeout_ms: i32) -> Result<()> {
        let mut storage = to_storage(dst);
        // SAFETY: the id is live; storage holds a sockaddr of dst's family.
        let rc = unsafe {
            (self.libs.cm.rdma_resolve_addr)(
                self.raw.as_ptr(),
                ptr::null_mut(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                timeout_ms,
            )
        };
        if rc != 0 {
            return Err(os_error("rdma_resolve_addr"));
        }
        Ok(())
    }

    /// Starts resolving a route; `RouteResolved` or `RouteError` follows.
    pub fn resolve_route(&self, timeout_ms: i32) -> Result<()> {
        // SAFETY: the id is live and its address resolved.
        if unsafe { (self.libs.cm.rdma_resolve_route)(self.raw.as_ptr(), timeout_ms) } != 0 {
            return Err(os_error("rdma_resolve_route"));
        }
        Ok(())
    }

    /// Creates this connection's reliable queue pair. Completions go to the given queues;
    /// receives come from `srq` when given.
    pub fn create_qp(
        &mut self,
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        srq: Option<&Arc<SharedReceiveQueue>>,
        caps: QueueCaps,
    ) -> Result<u32> {
        if self.qp.is_some() {
            return Err(Error::Invalid(
                "this connection already has a queue pair".into(),
            ));
        }
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: send_cq.as_ptr(),
            recv_cq: recv_cq.as_ptr(),
            srq: srq.map_or(ptr::null_mut(), |s| s.as_ptr()),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: if srq.is_some() { 0 } else { caps.max_recv_wr },
                max_send_sge: caps.max_send_sge,
                max_recv_sge: if srq.is_some() { 0 } else { caps.max_recv_sge },
                max_inline_data: caps.max_inline_data,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the id, PD, CQs and SRQ are live; attr is a valid init struct.
        if unsafe { (self.libs.cm.rdma_create_qp)(self.raw.as_ptr(), pd.as_ptr(), &mut attr) } != 0
        {
            return Err(os_error("rdma_create_qp"));
        }
        // SAFETY: rdma_create_qp succeeded, so id->qp is the new queue pair, whose context's
        // ops table the provider filled.
        let (qp, ops) = unsafe {
            let qp = NonNull::new_unchecked((*self.raw.as_ptr()).qp);
            (qp, &(*(*qp.as_ptr()).context).ops)
        };
        let (Some(post_send), Some(post_recv)) = (ops.post_send, ops.post_recv) else {
            // SAFETY: the queue pair is ours and has no work.
            unsafe { (self.libs.cm.rdma_destroy_qp)(self.raw.as_ptr()) };
            return Err(Error::Unavailable(
                "the RDMA provider cannot post work".into(),
            ));
        };
        // SAFETY: the queue pair is live.
        let qp_num = unsafe { (*qp.as_ptr()).qp_num };
        self.qp = Some(QueuePairResources {
            post_send,
            post_recv,
            qp,
            _pd: pd.clone(),
            _send_cq: send_cq.clone(),
            _recv_cq: recv_cq.clone(),
            _srq: srq.cloned(),
        });
        Ok(qp_num)
    }

    /// Connects (after the route resolved); `Established`, `Rejected` or an error follows.
    /// librdmacm finishes the handshake (sends the RTU) while this side reads the response
    /// event, so the peer's end is established only after that read: read the channel
    /// promptly.
    pub fn connect(&self, param: ConnParam<'_>) -> Result<()> {
        let mut raw = param.to_sys()?;
        // SAFETY: the id is live; raw and its private data outlive the call (librdmacm copies).
        if unsafe { (self.libs.cm.rdma_connect)(self.raw.as_ptr(), &mut raw) } != 0 {
            return Err(os_error("rdma_connect"));
        }
        Ok(())
    }

    /// Accepts a connect request; `Established` follows.
    pub fn accept(&self, param: ConnParam<'_>) -> Result<()> {
        let mut raw = param.to_sys()?;
        // SAFETY: as for connect.
        if unsafe { (self.libs.cm.rdma_accept)(self.raw.as_ptr(), &mut raw) } != 0 {
            return Err(os_error("rdma_accept"));
        }
        Ok(())
    }

    /// Refuses a connect request, telling the peer why in `private_data`.
    pub fn reject(&self, private_data: &[u8]) -> Result<()> {
        let len = u8::try_from(private_data.len())
            .map_err(|_| Error::Invalid("RDMA CM private data is longer than 255 bytes".into()))?;
        // SAFETY: the id is live; the bytes outlive the call.
        if unsafe {
            (self.libs.cm.rdma_reject)(self.raw.as_ptr(), private_data.as_ptr().cast(), len)
        } != 0
        {
            return Err(os_error("rdma_reject"));
        }
        Ok(())
    }

    /// Starts tearing the connection down, or answers the peer's request to: all outstanding
    /// work completes with flush errors, and `Disconnected` follows on this side once the
    /// peer answers (or the request times out). On `Disconnected`, call this to answer.
    pub fn disconnect(&self) -> Result<()> {
        // SAFETY: the id is live.
        if unsafe { (self.libs.cm.rdma_disconnect)(self.raw.as_ptr()) } != 0 {
            return Err(os_error("rdma_disconnect"));
        }
        Ok(())
    }

    fn queue_pair(&self) -> Result<&QueuePairResources> {
        self.qp
            .as_ref()
            .ok_or_else(|| Error::Invalid("this connection has no queue pair".into()))
    }

    /// Posts one receive into `sge`.
    ///
    /// # Safety
    /// The memory `sge` names must stay registered and untouched by anything but the device
    /// until this work completes (or is flushed).
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<()> {
        let qp = self.queue_pair()?;
        // SAFETY: the queue pair is live and post_recv is its provider's; the caller
        // guarantees the memory.
        unsafe {
            post_one_recv(
                Some(qp.post_recv),
                qp.qp.as_ptr(),
                wr_id,
                sge,
                "ibv_post_recv",
            )
        }
    }

    /// Posts one send-queue operation over `sges`; with `signaled`, it produces a completion
    /// (an unsignaled one completes silently, in order, with the next signaled one).
    ///
    /// # Safety
    /// The local memory `sges` names must stay registered, and untouched by anything but the
    /// device, until this work completes (or is flushed). Remote memory is the peer's to
    /// guard: a bad remote address or key fails the work, not this process.
    pub unsafe fn post_send(
        &self,
        wr_id: u64,
        op: SendOp,
        sges: &[Sge],
        signaled: bool,
    ) -> Result<()> {
        let qp = self.queue_pair()?;
        let mut list: [sys::ibv_sge; 4] = std::array::from_fn(|_| sys::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        });
        if sges.len() > list.len() {
            return Err(Error::Invalid(format!(
                "{} scatter-gather elements; at most {}",
                sges.len(),
                list.len()
            )));
        }
        for (slot, sge) in list.iter_mut().zip(sges) {
            *slot = to_sys(*sge);
        }
        let (opcode, imm, remote_addr, rkey) = match op {
            SendOp::Send => (sys::IBV_WR_SEND, 0, 0, 0),
            SendOp::SendInvalidate { rkey } => (sys::IBV_WR_SEND_WITH_INV, rkey, 0, 0),
            SendOp::RdmaWrite { remote_addr, rkey } => {
                (sys::IBV_WR_RDMA_WRITE, 0, remote_addr, rkey)
            }
            SendOp::RdmaRead { remote_addr, rkey } => (sys::IBV_WR_RDMA_READ, 0, remote_addr, rkey),
        };
        let mut wr = sys::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: list.as_mut_ptr(),
            num_sge: sges.len() as i32,
            opcode,
            send_flags: if signaled { sys::IBV_SEND_SIGNALED } else { 0 },
            imm_or_invalidate: imm,
            remote_addr,
            rkey,
            _wr_rest: [0; 5],
            _qp_type: 0,
            _pad: 0,
            _bind_mw_or_tso: [0; 6],
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is live; wr and the list outlive the call (the provider
        // copies them); the caller guarantees the local memory.
        let rc = unsafe { (qp.post_send)(qp.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(returned_error("ibv_post_send", rc));
        }
        Ok(())
    }
}

impl CmId {
    /// Destroys the queue pair (all its work stops), then lets go of what it used. A caller
    /// that also holds the PD, CQs and regions releases them next, and this id last: the id
    /// keeps the device context open.
    pub fn destroy_qp(&mut self) {
        if let Some(resources) = self.qp.take() {
            // SAFETY: the queue pair is this id's, destroyed before what it uses.
            unsafe { (self.libs.cm.rdma_destroy_qp)(self.raw.as_ptr()) };
            drop(resources);
        }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // The id itself goes with the last holder of its handle (see `IdHandle`).
        self.destroy_qp();
    }
}

fn to_storage(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    storage
}

fn from_storage(raw: &[u64; 16]) -> Option<SocketAddr> {
    let storage = (raw as *const [u64; 16]).cast::<libc::sockaddr_storage>();
    // SAFETY: 128 bytes aligned to 8 hold a sockaddr_storage; we read the variant its family
    // names, which fits inside.
    unsafe {
        match (*storage).ss_family as i32 {
            libc::AF_INET => {
                let sin = &*storage.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*storage.cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_survive_the_c_layout() {
        for addr in ["10.0.2.15:4420", "[fe80::1%3]:4421", "0.0.0.0:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let storage = to_storage(addr);
            // SAFETY: sockaddr_storage is 128 bytes, 8-aligned, like [u64; 16].
            let raw: [u64; 16] = unsafe { std::mem::transmute(storage) };
            assert_eq!(from_storage(&raw), Some(addr));
        }
        assert_eq!(from_storage(&[0; 16]), None, "AF_UNSPEC is no address");
    }

    #[test]
    fn every_event_kind_maps_back_to_its_number() {
        for raw in 0..20 {
            assert_eq!(CmEventKind::from_raw(raw).raw(), raw);
        }
    }
}
