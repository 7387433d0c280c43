//! Protection domains, memory regions, completion queues and channels, shared receive queues.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use crate::sys::{self, Libraries};
use crate::{libraries, os_error, returned_error, Error, Result};

/// An RDMA device context, owned by librdmacm and shared by every identifier bound to the
/// device. It holds the identifier it was taken from, and the PD, queues and channels made
/// on it hold it: librdmacm closes a removed device's context with the device's last
/// identifier, which therefore outlives them all.
#[derive(Clone)]
pub struct Device {
    pub(crate) raw: NonNull<sys::ibv_context>,
    pub(crate) _id: Arc<crate::cm::IdHandle>,
}

// SAFETY: verbs on a device context are thread-safe in libibverbs.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

/// The device limits a transport sizes its queues by.
#[derive(Clone, Copy, Debug)]
pub struct DeviceLimits {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_srq_wr: u32,
    /// RDMA READs this device serves at once per queue pair, as the responder.
    pub max_qp_rd_atom: u32,
    /// RDMA READs this device issues at once per queue pair, as the initiator.
    pub max_qp_init_rd_atom: u32,
}

impl Device {
    /// Identifies the device: equal for every identifier bound to the same one.
    pub fn key(&self) -> usize {
        self.raw.as_ptr() as usize
    }

    /// The kernel's name for the device (`rxe0`, `mlx5_0`), as `ibv_devices` lists it.
    pub fn name(&self) -> Result<String> {
        let libs = libraries()?;
        // SAFETY: the context is live (see `Device`); its `device` field is set by libibverbs
        // when the context is opened and stays valid as long as the context.
        let device = unsafe { (*self.raw.as_ptr()).device };
        // SAFETY: `device` is the context's own device; the name is a NUL-terminated string
        // inside it, copied out before the context can go.
        let name = unsafe { (libs.verbs.ibv_get_device_name)(device) };
        if name.is_null() {
            return Err(os_error("ibv_get_device_name"));
        }
        // SAFETY: non-null, NUL-terminated (above).
        Ok(unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned())
    }

    pub fn limits(&self) -> Result<DeviceLimits> {
        let libs = libraries()?;
        // SAFETY: all-zero is a valid ibv_device_attr (integers and a byte array).
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is live (see `Device`) and attr is a full-size, writable struct.
        let rc = unsafe { (libs.verbs.ibv_query_device)(self.raw.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(returned_error("ibv_query_device", rc));
        }
        let count = |v: i32| v.max(0) as u32;
        Ok(DeviceLimits {
            max_qp_wr: count(attr.max_qp_wr),
            max_sge: count(attr.max_sge),
            max_cqe: count(attr.max_cqe),
            max_srq_wr: count(attr.max_srq_wr),
            max_qp_rd_atom: count(attr.max_qp_rd_atom),
            max_qp_init_rd_atom: count(attr.max_qp_init_rd_atom),
        })
    }
}

/// A protection domain: the memory regions and queue pairs that may work together.
pub struct ProtectionDomain {
    raw: NonNull<sys::ibv_pd>,
    _device: Device,
    libs: &'static Libraries,
}

// SAFETY: a PD is only passed to thread-safe verbs.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub fn new(device: &Device) -> Result<Arc<Self>> {
        let libs = libraries()?;
        // SAFETY: the device context is live (see `Device`).
        let raw = unsafe { (libs.verbs.ibv_alloc_pd)(device.raw.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| os_error("ibv_alloc_pd"))?;
        Ok(Arc::new(Self {
            raw,
            _device: device.clone(),
            libs,
        }))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.raw.as_ptr()
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every region and queue made in this PD holds an Arc to it, so none is left.
        unsafe { (self.libs.verbs.ibv_dealloc_pd)(self.raw.as_ptr()) };
    }
}

/// What the peer (and the local device) may do with a memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access(i32);

impl Access {
    /// The local device may write it (receives, RDMA READ responses).
    pub const LOCAL_WRITE: Access = Access(sys::IBV_ACCESS_LOCAL_WRITE);
    /// The peer may RDMA WRITE into it.
    pub const REMOTE_WRITE: Access = Access(sys::IBV_ACCESS_REMOTE_WRITE);
    /// The peer may RDMA READ from it.
    pub const REMOTE_READ: Access = Access(sys::IBV_ACCESS_REMOTE_READ);

    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
}

/// One scatter-gather element: `len` bytes at `addr` inside the region of `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// Memory registered with the device: its pages are pinned and the device may reach them by
/// `lkey` (locally) and `rkey` (from the peer, as `Access` allows).
pub struct MemoryRegion {
    raw: NonNull<sys::ibv_mr>,
    addr: u64,
    len: usize,
    _pd: Arc<ProtectionDomain>,
    libs: &'static Libraries,
}

// SAFETY: a registration is immutable after creation and deregistration is thread-safe.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must stay allocated until the region is dropped, and while work that names
    /// it is outstanding, nothing else may write what the device reads or read what it writes.
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Self> {
        if len == 0 {
            return Err(Error::Invalid(
                "cannot register an empty memory region".into(),
            ));
        }
        // SAFETY: the caller guarantees the memory outlives the registration; the PD is live.
        let raw = unsafe { (pd.libs.verbs.ibv_reg_mr)(pd.as_ptr(), addr.cast(), len, access.0) };
        let raw = NonNull::new(raw).ok_or_else(|| os_error("ibv_reg_mr"))?;
        Ok(Self {
            raw,
            addr: addr as u64,
            len,
            _pd: pd.clone(),
            libs: pd.libs,
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the registration is live and lkey never changes.
        unsafe { (*self.raw.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as for lkey.
        unsafe { (*self.raw.as_ptr()).rkey }
    }

    /// First address of the region.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An element for `len` bytes at `offset`, if that lies inside the region.
    pub fn sge(&self, offset: usize, len: u32) -> Option<Sge> {
        let end = offset.checked_add(len as usize)?;
        (end <= self.len).then(|| Sge {
            addr: self.addr + offset as u64,
            len,
            lkey: self.lkey(),
        })
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the registration is ours; the owner ensures no work still names it.
        unsafe { (self.libs.verbs.ibv_dereg_mr)(self.raw.as_ptr()) };
    }
}

/// A file descriptor that becomes readable when an armed completion queue gets an entry: what
/// lets an idle poller sleep in epoll.
pub struct CompletionChannel {
    raw: NonNull<sys::ibv_comp_channel>,
    _device: Device,
    libs: &'static Libraries,
}

// SAFETY: the channel is a file descriptor; its verbs are thread-safe.
unsafe impl Send for CompletionChannel {}
// SAFETY: as above.
unsafe impl Sync for CompletionChannel {}

impl CompletionChannel {
    /// A channel whose descriptor never blocks.
    pub fn new(device: &Device) -> Result<Arc<Self>> {
        let libs = libraries()?;
        // SAFETY: the device context is live.
        let raw = unsafe { (libs.verbs.ibv_create_comp_channel)(device.raw.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| os_error("ibv_create_comp_channel"))?;
        let channel = Self {
            raw,
            _device: device.clone(),
            libs,
        };
        set_nonblocking(channel.fd())?;
        Ok(Arc::new(channel))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live; fd never changes.
        unsafe { (*self.raw.as_ptr()).fd }
    }

    /// Takes and acknowledges every notification waiting; returns how many there were. Each
    /// queue that notified must be armed again to notify again.
    pub fn drain(&self) -> Result<usize> {
        let mut count = 0;
        loop {
            let mut cq = ptr::null_mut();
            let mut context = ptr::null_mut();
            // SAFETY: the channel is live; the out-pointers are valid.
            let rc = unsafe {
                (self.libs.verbs.ibv_get_cq_event)(self.raw.as_ptr(), &mut cq, &mut context)
            };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(count);
                }
                return Err(Error::Os {
                    call: "ibv_get_cq_event",
                    source: err,
                });
            }
            // SAFETY: cq is the live queue the event came from (a queue cannot be destroyed
            // while it has unacknowledged events, so it is still there).
            unsafe { (self.libs.verbs.ibv_ack_cq_events)(cq, 1) };
            count += 1;
        }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: every queue on this channel holds an Arc to it, so none is left.
        unsafe { (self.libs.verbs.ibv_destroy_comp_channel)(self.raw.as_ptr()) };
    }
}

/// One work completion.
#[derive(Clone, Copy, Default, Debug)]
#[repr(transparent)]
pub struct WorkCompletion(sys::ibv_wc);

/// What a completed work request was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletedOp {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    Other(u32),
}

impl WorkCompletion {
    pub fn wr_id(&self) -> u64 {
        self.0.wr_id
    }

    /// Ok, or the device's reason the work failed (`IBV_WC_*` status and its name). A failed
    /// completion also moves the queue pair to the error state: everything still queued on
    /// it completes with a flush error.
    pub fn result(&self) -> std::result::Result<(), WorkError> {
        if self.0.status == 0 {
            Ok(())
        } else {
            Err(WorkError {
                status: self.0.status,
                vendor_err: self.0.vendor_err,
            })
        }
    }

    /// The operation; meaningful only when `result()` is Ok.
    pub fn op(&self) -> CompletedOp {
        match self.0.opcode {
            0 => CompletedOp::Send,
            1 => CompletedOp::RdmaWrite,
            2 => CompletedOp::RdmaRead,
            128 => CompletedOp::Recv,
            other => CompletedOp::Other(other),
        }
    }

    /// Bytes received (receives only).
    pub fn byte_len(&self) -> u32 {
        self.0.byte_len
    }

    /// The key the peer's SEND WITH INVALIDATE invalidated, if it did.
    pub fn invalidated_rkey(&self) -> Option<u32> {
        (self.0.wc_flags & sys::IBV_WC_WITH_INV != 0).then_some(self.0.imm_or_invalidated)
    }

    pub fn qp_num(&self) -> u32 {
        self.0.qp_num
    }
}

/// A failed work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("work completion failed: {} (status {status}, vendor error {vendor_err:#x})", status_name(*.status))]
pub struct WorkError {
    pub status: u32,
    pub vendor_err: u32,
}

impl WorkError {
    /// `IBV_WC_WR_FLUSH_ERR`: the queue pair was already in error; not a fault of this work.
    pub fn is_flush(&self) -> bool {
        self.status == 5
    }
}

fn status_name(status: u32) -> String {
    match libraries() {
        Ok(libs) => {
            // SAFETY: ibv_wc_status_str returns a static string for any value.
            let name = unsafe { CStr::from_ptr((libs.verbs.ibv_wc_status_str)(status)) };
            name.to_string_lossy().into_owned()
        }
        Err(_) => format!("status {status}"),
    }
}

/// A completion queue, polled by its owner.
pub struct CompletionQueue {
    raw: NonNull<sys::ibv_cq>,
    poll: unsafe extern "C" fn(*mut sys::ibv_cq, i32, *mut sys::ibv_wc) -> i32,
    _channel: Option<Arc<CompletionChannel>>,
    _device: Device,
    libs: &'static Libraries,
}

// SAFETY: polling and arming are thread-safe in libibverbs (providers lock the CQ).
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// A queue of at least `entries` completions, notifying `channel` when armed.
    pub fn new(
        device: &Device,
        entries: u32,
        channel: Option<&Arc<CompletionChannel>>,
    ) -> Result<Arc<Self>> {
        let libs = libraries()?;
        let entries = i32::try_from(entries)
            .map_err(|_| Error::Invalid(format!("{entries} completion entries is too many")))?;
        let channel_ptr = channel.map_or(ptr::null_mut(), |c| c.raw.as_ptr());
        // SAFETY: the device context and the channel are live.
        let raw = unsafe {
            (libs.verbs.ibv_create_cq)(
                device.raw.as_ptr(),
                entries,
                ptr::null_mut(),
                channel_ptr,
                0,
            )
        };
        let raw = NonNull::new(raw).ok_or_else(|| os_error("ibv_create_cq"))?;
        // SAFETY: the new queue's context is the live device context; its ops table is filled
        // by the provider at open.
        let poll = unsafe { (*(*raw.as_ptr()).context).ops.poll_cq };
        let Some(poll) = poll else {
            // SAFETY: the queue is ours and has no work yet.
            unsafe { (libs.verbs.ibv_destroy_cq)(raw.as_ptr()) };
            return Err(Error::Unavailable(
                "the RDMA provider has no poll_cq".into(),
            ));
        };
        Ok(Arc::new(Self {
            raw,
            poll,
            _channel: channel.cloned(),
            _device: device.clone(),
            libs,
        }))
    }

    /// Fills `out` from the front with completed work; returns how many.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        let max = out.len().min(i32::MAX as usize) as i32;
        // SAFETY: the queue is live, and out is `max` writable ibv_wc (WorkCompletion is a
        // transparent wrapper of one).
        let n = unsafe { (self.poll)(self.raw.as_ptr(), max, out.as_mut_ptr().cast()) };
        if n < 0 {
            // Providers return -1 (some a negative errno): the queue is unusable.
            return Err(returned_error(
                "ibv_poll_cq",
                if n == -1 { libc::EIO } else { n },
            ));
        }
        Ok(n as usize)
    }

    /// Asks for one notification on the channel at the next completion. Poll once more after
    /// arming: a completion that arrived before arming does not notify.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: the queue and its context are live.
        let rc = unsafe {
            let notify = (*(*self.raw.as_ptr()).context).ops.req_notify_cq;
            match notify {
                Some(notify) => notify(self.raw.as_ptr(), 0),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(returned_error("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.raw.as_ptr()
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: every queue pair using this CQ holds an Arc to it, so none is left, and the
        // channel acknowledges each notification as it takes it.
        unsafe { (self.libs.verbs.ibv_destroy_cq)(self.raw.as_ptr()) };
    }
}

/// Receive buffers shared by many queue pairs, so a target need not post a full queue's
/// worth per connection.
pub struct SharedReceiveQueue {
    raw: NonNull<sys::ibv_srq>,
    _pd: Arc<ProtectionDomain>,
    libs: &'static Libraries,
}

// SAFETY: posting to and destroying an SRQ are thread-safe in libibverbs.
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: as above.
unsafe impl Sync for SharedReceiveQueue {}

impl SharedReceiveQueue {
    pub fn new(pd: &Arc<ProtectionDomain>, max_wr: u32, max_sge: u32) -> Result<Arc<Self>> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr,
                max_sge,
                srq_limit: 0,
            },
        };
        // SAFETY: the PD is live; attr is a valid init struct.
        let raw = unsafe { (pd.libs.verbs.ibv_create_srq)(pd.as_ptr(), &mut attr) };
        let raw = NonNull::new(raw).ok_or_else(|| os_error("ibv_create_srq"))?;
        Ok(Arc::new(Self {
            raw,
            _pd: pd.clone(),
            libs: pd.libs,
        }))
    }

    /// Posts one receive of `sge`.
    ///
    /// # Safety
    /// The memory `sge` names must stay registered and untouched by anything but the device
    /// until this work completes.
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<()> {
        // SAFETY: the SRQ and its context are live; the caller guarantees the memory.
        unsafe {
            let post = (*(*self.raw.as_ptr()).context).ops.post_srq_recv;
            post_one_recv(post, self.raw.as_ptr(), wr_id, sge, "ibv_post_srq_recv")
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_srq {
        self.raw.as_ptr()
    }
}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: every queue pair using this SRQ holds an Arc to it, so none is left.
        unsafe { (self.libs.verbs.ibv_destroy_srq)(self.raw.as_ptr()) };
    }
}

/// The sizes of a queue pair's queues.
#[derive(Clone, Copy, Debug)]
pub struct QueueCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// What a posted send does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// A message into the peer's next receive.
    Send,
    /// A message that also invalidates the peer's key `rkey`.
    SendInvalidate { rkey: u32 },
    /// Writes the local elements into the peer's memory.
    RdmaWrite { remote_addr: u64, rkey: u32 },
    /// Reads the peer's memory into the local elements.
    RdmaRead { remote_addr: u64, rkey: u32 },
}

/// Posts one receive of `sge` to `target` through the provider's `post`: what a queue pair's
/// and a shared receive queue's `post_recv` share.
///
/// # Safety
/// `target` is live and `post` is its provider's entry point; the memory `sge` names stays
/// registered and untouched by anything but the device until the receive completes.
pub(crate) unsafe fn post_one_recv<T>(
    post: Option<sys::PostRecvTo<T>>,
    target: *mut T,
    wr_id: u64,
    sge: Sge,
    call: &'static str,
) -> Result<()> {
    let mut sge = to_sys(sge);
    let mut wr = sys::ibv_recv_wr {
        wr_id,
        next: ptr::null_mut(),
        sg_list: &mut sge,
        num_sge: 1,
    };
    let mut bad = ptr::null_mut();
    let rc = match post {
        // SAFETY: per the contract above; wr and sge outlive the call (the provider copies
        // them).
        Some(post) => unsafe { post(target, &mut wr, &mut bad) },
        None => libc::EOPNOTSUPP,
    };
    if rc != 0 {
        return Err(returned_error(call, rc));
    }
    Ok(())
}

pub(crate) fn to_sys(sge: Sge) -> sys::ibv_sge {
    sys::ibv_sge {
        addr: sge.addr,
        length: sge.len,
        lkey: sge.lkey,
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor we own changes only its flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(os_error("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}
