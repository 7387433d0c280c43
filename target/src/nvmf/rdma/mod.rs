//! The NVMe/RDMA transport (NVMe over Fabrics, RDMA binding): listeners and per-reactor
//! groups of queue pairs.
//!
//! - A listener's thread runs RDMA CM: it checks each connect request's private data (queue
//!   id and sizes), makes the queue pair with its completion queue, posts its receives,
//!   accepts with our receive queue size, and hands the queue to a reactor. Later events of
//!   the connection (disconnect, device removal) reach its queue through a flag.
//! - Capsules arrive by SEND into the receives, in-capsule data after the 64-byte command.
//!   Other data moves by the keyed SGL the host gives: host-to-controller by RDMA READ into
//!   the command's buffer, controller-to-host by RDMA WRITE from it, then the response by SEND
//!   (SEND with invalidate when the host asks for its key to be invalidated).
//! - Buffers come from the DMA pool; each pool chunk is registered with a device once, the
//!   first time a buffer in it is used there ([`memory::DeviceMemory`]); nothing is
//!   registered per I/O.
//! - Completions are polled on the reactor. A group arms its queues' completion channels
//!   when they go quiet, and the reactor sleeps on them.

pub mod conn;
pub mod listener;
pub mod memory;

use crate::nvmf::controller;
use crate::reactor::{fn_poller, PollStatus, ReactorCtx};
use conn::RdmaConn;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

/// What one reactor's queue pairs on one device counted, for `nvmf_get_stats` (the RDMA
/// transport's `devices` in SPDK's shape, with the counters plexd keeps). Bumped only on that
/// reactor; read from anywhere.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// The device's name (`rxe0`).
    pub name: String,
    /// Command capsules started.
    pub requests: AtomicU64,
    /// Capsules that arrived while every command slot of their queue pair was busy and waited
    /// in their receive for one (SPDK: a request waiting for a free request object).
    pub pending_free_request: AtomicU64,
    /// Writes whose RDMA READ of the host's data waited for room under the read depth agreed
    /// at connect.
    pub pending_rdma_read: AtomicU64,
}

/// How often every queue is looked at, news or not (keep-alive, controller events, timeouts).
const SWEEP_MS: u64 = 50;

/// The RDMA queues of one reactor, and the epoll set of their completion channels it sleeps
/// on.
#[derive(Default)]
struct Group {
    epoll: Option<OwnedFd>,
    // Boxed: a queue is large; moving pointers keeps hand-off cheap.
    #[allow(clippy::vec_box)]
    queues: Vec<Box<RdmaConn>>,
    started: bool,
    last_sweep: u64,
}

/// Hands `conn` to this reactor's RDMA group, starting the group's poller on first use.
pub fn add_conn(ctx: &mut ReactorCtx, conn: Box<RdmaConn>) {
    let group = ctx.local::<Group>();
    if group.epoll.is_none() {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            tracing::error!(
                "nvmf/rdma: no epoll set on reactor {}: {}; the queue is dropped",
                ctx.id(),
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = ctx.watch_fd(epoll.as_raw_fd(), false) {
            // Still served, by polling: the reactor only sleeps less well.
            tracing::warn!(
                "nvmf/rdma: reactor {} cannot sleep on RDMA queues: {e}",
                ctx.id()
            );
        }
        ctx.local::<Group>().epoll = Some(epoll);
    }
    let group = ctx.local::<Group>();
    if let Some(epoll) = &group.epoll {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: conn.t.wake_fd() as u64,
        };
        // SAFETY: plain epoll_ctl on descriptors we hold open; `ev` outlives the call.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                conn.t.wake_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            tracing::warn!(
                "nvmf/rdma {}: cannot watch the queue's completions: {}",
                conn.peer,
                std::io::Error::last_os_error()
            );
        }
    }
    group.queues.push(conn);
    if group.started {
        return;
    }
    group.started = true;
    let name = format!("nvmf_rdma_poll_group_{:03}", ctx.id());
    ctx.add_poller(fn_poller(name, |ctx| ctx.local::<Group>().poll()));
}

impl Group {
    /// Marks the queues whose completion channel has a notification (one epoll_wait without
    /// waiting, and only while some queue is armed): they take it in their next poll.
    fn take_notifications(&mut self) {
        let Some(epoll) = &self.epoll else { return };
        if !self.queues.iter().any(|q| q.t.is_armed()) {
            return;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: `events` has room for 32 entries, which the kernel fills; timeout 0.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), 32, 0) };
        for ev in &events[..n.max(0) as usize] {
            let fd = ev.u64 as RawFd;
            if let Some(q) = self.queues.iter_mut().find(|q| q.t.wake_fd() == fd) {
                q.t.notified = true;
            }
        }
    }

    fn poll(&mut self) -> PollStatus {
        self.take_notifications();
        let now = controller::now_ms();
        let sweep = now.saturating_sub(self.last_sweep) >= SWEEP_MS;
        if sweep {
            self.last_sweep = now;
        }
        let mut busy = false;
        let mut i = 0;
        while i < self.queues.len() {
            let q = &mut self.queues[i];
            if sweep {
                q.sweep();
            }
            let (b, done) = q.step();
            busy |= b;
            if done {
                let q = self.queues.swap_remove(i);
                if let Some(epoll) = &self.epoll {
                    // SAFETY: plain epoll_ctl; a null event is allowed for DEL.
                    unsafe {
                        libc::epoll_ctl(
                            epoll.as_raw_fd(),
                            libc::EPOLL_CTL_DEL,
                            q.t.wake_fd(),
                            std::ptr::null_mut(),
                        );
                    }
                }
                tracing::debug!("nvmf/rdma: queue pair from {} closed", q.peer);
                continue;
            }
            i += 1;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}
