//! A reactor's NVMe/TCP poll group: the connections it owns, and which of them a loop must
//! touch.
//!
//! The kernel says which sockets have news: the group keeps one epoll set of its own, every
//! socket in it edge-triggered for reading, writing and hang-up, and asks it (without
//! waiting) once per loop. A loop then polls only the connections on its active list: those
//! the kernel named, and those with work of their own (bytes still buffered or unsent, I/O in
//! flight, closing). An idle connection costs nothing per loop; a sweep every
//! `SWEEP_MS` polls each once more so keep-alive, controller events and timeouts still run.
//! The reactor sleeps on the group's epoll descriptor, which is readable while any socket in
//! it has news.

use super::conn::Conn;
use crate::nvmf::controller;
use crate::reactor::{PollStatus, ReactorCtx};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How often every connection is polled, news or not (keep-alive, AER, controller failure).
const SWEEP_MS: u64 = 50;
/// Events taken from the kernel per loop; more wait for the next loop.
const EVENTS: usize = 256;
/// After this many connections closed, the sweep hands freed heap back to the kernel.
const TRIM_AFTER_CLOSES: usize = 64;

pub struct PollGroup {
    epoll: OwnedFd,
    /// By token (the epoll user data); None where a connection closed.
    conns: Vec<Option<Box<Conn>>>,
    free_tokens: Vec<usize>,
    /// Tokens to poll in the next loop, each once (`queued`).
    active: Vec<usize>,
    polling: Vec<usize>,
    queued: Vec<bool>,
    events: Vec<libc::epoll_event>,
    last_sweep: u64,
    /// Connections closed since the heap was last trimmed.
    closed: usize,
}

impl PollGroup {
    /// A new group, whose epoll set the reactor `ctx` sleeps on.
    pub fn new(ctx: &mut ReactorCtx) -> std::io::Result<PollGroup> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        ctx.watch_fd(epoll.as_raw_fd(), false)?;
        Ok(PollGroup {
            epoll,
            conns: Vec::new(),
            free_tokens: Vec::new(),
            active: Vec::new(),
            polling: Vec::new(),
            queued: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
            last_sweep: 0,
            closed: 0,
        })
    }

    /// Takes `conn` into the group; it is polled in the next loop.
    pub fn add(&mut self, conn: Box<Conn>) {
        let token = match self.free_tokens.pop() {
            Some(t) => t,
            None => {
                self.conns.push(None);
                self.queued.push(false);
                self.conns.len() - 1
            }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token as u64,
        };
        // SAFETY: plain epoll_ctl on descriptors we hold open; `ev` outlives the call.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                conn.fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            // Still served: the sweep polls it, and it reads until the socket is empty.
            tracing::warn!(
                "nvmf/tcp: cannot watch connection from {}: {}",
                conn.peer,
                std::io::Error::last_os_error()
            );
        }
        self.conns[token] = Some(conn);
        self.enqueue(token);
    }

    fn enqueue(&mut self, token: usize) {
        if !self.queued[token] {
            self.queued[token] = true;
            self.active.push(token);
        }
    }

    /// One loop: what the kernel reports, the sweep if due, then every active connection once.
    pub fn poll(&mut self) -> PollStatus {
        // SAFETY: `events` has room for EVENTS entries, which the kernel fills; timeout 0.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS as i32,
                0,
            )
        };
        for i in 0..n.max(0) as usize {
            let ev = self.events[i];
            let token = ev.u64 as usize;
            let bits = ev.events as i32;
            let rx = bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR);
            let tx = bits & libc::EPOLLOUT;
            if let Some(Some(c)) = self.conns.get_mut(token) {
                c.set_ready(rx != 0, tx != 0);
                self.enqueue(token);
            }
        }
        let now = controller::now_ms();
        if now.saturating_sub(self.last_sweep) >= SWEEP_MS {
            self.last_sweep = now;
            if self.closed >= TRIM_AFTER_CLOSES {
                // Many small frees (slots, queues) sit in malloc's arenas otherwise: a
                // host that opened and closed thousands of connections would leave their
                // memory with plexd for good.
                self.closed = 0;
                // SAFETY: malloc_trim only returns free heap pages to the kernel.
                unsafe { libc::malloc_trim(0) };
            }
            for t in 0..self.conns.len() {
                if let Some(c) = self.conns[t].as_mut() {
                    c.sweep();
                    self.enqueue(t);
                }
            }
        }
        let mut busy = false;
        std::mem::swap(&mut self.active, &mut self.polling);
        for k in 0..self.polling.len() {
            let t = self.polling[k];
            self.queued[t] = false;
            let Some(c) = self.conns[t].as_mut() else {
                continue;
            };
            let (b, done) = c.step();
            busy |= b;
            if done {
                let c = self.conns[t].take().expect("polled above");
                // SAFETY: plain epoll_ctl; a null event is allowed for DEL.
                unsafe {
                    libc::epoll_ctl(
                        self.epoll.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        c.fd(),
                        std::ptr::null_mut(),
                    );
                }
                tracing::debug!("nvmf/tcp: connection from {} closed", c.peer);
                self.free_tokens.push(t);
                self.closed += 1;
            } else if c.wants_poll() {
                self.enqueue(t);
            }
        }
        self.polling.clear();
        // Connections left active only for I/O in flight do not keep the reactor spinning
        // by themselves: `step` says busy while a device owes completions, and a rate
        // limit wakes the reactor when it lets I/O go.
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}
