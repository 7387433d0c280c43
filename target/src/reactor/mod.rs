//! Reactors: one polled-mode event loop per core of the core mask, pinned to its core.
//!
//! A reactor loops: drain its message queue (closures sent from other threads through a
//! lock-free queue), run every poller once, repeat. Pollers say whether they found work. After
//! `idle_poll_us` without any, the reactor sleeps in `epoll_wait` on an eventfd (rung by
//! senders) and on the file descriptors its pollers asked to be woken by (sockets), so an idle
//! plexd costs no CPU. With `idle_poll_us = 0` it never sleeps, as SPDK does.
//!
//! Everything a poller owns stays on its reactor: the I/O path takes no lock. The control plane
//! reaches a reactor only by [`ReactorHandle::call`] / [`ReactorHandle::send`].
//!
//! Here: the loop clock, pollers, handles and the per-reactor context; `run.rs` is one
//! reactor's loop, `set.rs` all reactors of a process, `cores.rs` core masks and pinning.

use crossbeam_queue::SegQueue;
use std::any::{Any, TypeId};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

/// Nanoseconds since the process's first call, from the clock the current reactor read at the
/// start of its loop pass; off a reactor, read fresh. The clock is the CPU's tick counter
/// (`initiator::ticks`: a few ns a read, where `Instant::now()` costs 20-70 ns on these
/// virtual machines, 3 % of a busy reactor at one read per pass); loop-pass precision is
/// enough for statistics and timeouts.
pub fn now_ns() -> u64 {
    let cached = LOOP_NOW_NS.with(Cell::get);
    if cached != 0 {
        cached
    } else {
        fresh_now_ns()
    }
}

/// Re-reads the clock for this thread's `now_ns`, and returns it: what a reactor does between
/// loop passes, for other polling loops (benchmarks) to do the same.
pub fn refresh_loop_clock() -> u64 {
    let now = fresh_now_ns();
    LOOP_NOW_NS.with(|c| c.set(now));
    now
}

fn fresh_now_ns() -> u64 {
    use initiator::ticks;
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(ticks::now);
    ticks::to_ns(ticks::now().saturating_sub(epoch)) + 1
}

/// The reactor running on this thread, if any (what `Bdev::open_channel` is given).
pub fn current() -> Option<ReactorHandle> {
    CURRENT.with(|c| c.borrow().clone())
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<ReactorHandle>> = const { std::cell::RefCell::new(None) };
    static LOOP_NOW_NS: Cell<u64> = const { Cell::new(0) };
    static WAKE_BY_NS: Cell<u64> = const { Cell::new(0) };
}

/// Asks the current reactor not to sleep past `deadline_ns` (on [`now_ns`]'s clock): work that
/// is waiting for time rather than for an event (I/O held back by a rate limit) calls it on
/// every pass it still waits. The earliest request of a pass wins; it is forgotten at the
/// start of the next pass. Off a reactor it does nothing that matters.
pub fn wake_by(deadline_ns: u64) {
    WAKE_BY_NS.with(|c| {
        let cur = c.get();
        if cur == 0 || deadline_ns < cur {
            c.set(deadline_ns.max(1));
        }
    });
}

/// A closure run on a reactor thread.
pub type Message = Box<dyn FnOnce(&mut ReactorCtx) + Send>;

/// What a poller found when it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Did work; keep the reactor polling.
    Busy,
    /// Found nothing to do.
    Idle,
    /// Finished for good: the reactor drops it.
    Done,
}

/// Work a reactor runs on every loop.
pub trait Poller {
    fn name(&self) -> &str;
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollStatus;
}

/// A poller made of a closure.
pub struct FnPoller<F> {
    name: String,
    f: F,
}

impl<F: FnMut(&mut ReactorCtx) -> PollStatus> Poller for FnPoller<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollStatus {
        (self.f)(ctx)
    }
}

pub fn fn_poller<F>(name: impl Into<String>, f: F) -> Box<dyn Poller>
where
    F: FnMut(&mut ReactorCtx) -> PollStatus + 'static,
{
    Box::new(FnPoller {
        name: name.into(),
        f,
    })
}

#[derive(Debug, Error)]
pub enum ReactorError {
    #[error("core mask {0:?} is not a hex mask (0x3) or a list ([0,1] or 0-1)")]
    BadMask(String),
    #[error("core mask selects no core")]
    EmptyMask,
    #[error("core {core} is not available: this machine has cores 0-{max}")]
    NoSuchCore { core: usize, max: usize },
    #[error("cannot pin reactor to core {core}: {source}")]
    Pin {
        core: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create reactor {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reactor on core {0} has stopped")]
    Gone(usize),
}

#[derive(Clone, Debug)]
pub struct ReactorConfig {
    pub cores: Vec<usize>,
    /// Busy-poll this long after the last work before sleeping; 0 = never sleep.
    pub idle_poll_us: u64,
    /// Pin each reactor thread to its core (tests on shared machines may turn it off).
    pub pin: bool,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: vec![0],
            idle_poll_us: 1000,
            pin: true,
        }
    }
}

/// The longest a sleeping reactor waits before running its pollers again, so that timers kept
/// by pollers (keep-alive, reconnect) fire without a wake-up of their own.
const MAX_SLEEP: Duration = Duration::from_millis(10);

/// Counters a reactor publishes for `framework_get_reactors`.
#[derive(Default)]
struct ReactorStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    sleeps: AtomicU64,
    wakeups: AtomicU64,
}

struct Shared {
    id: usize,
    core: usize,
    queue: SegQueue<Message>,
    eventfd: OwnedFd,
    sleeping: AtomicBool,
    stop: AtomicBool,
    stats: ReactorStats,
}

impl Shared {
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

/// A cheap, cloneable way to reach one reactor from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
}

impl ReactorHandle {
    /// The reactor's index (0..n) in the mask order.
    pub fn id(&self) -> usize {
        self.shared.id
    }

    /// The core it runs on.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// Runs `f` on the reactor, some time soon. Never blocks.
    pub fn send(&self, f: impl FnOnce(&mut ReactorCtx) + Send + 'static) {
        self.shared.queue.push(Box::new(f));
        // Pairs with the SeqCst store of `sleeping` before the reactor's last queue check: either
        // the reactor sees our message, or we see it asleep and wake it.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.ring();
        }
    }

    /// Runs `f` on the reactor and awaits its answer.
    pub async fn call<R, F>(&self, f: F) -> Result<R, ReactorError>
    where
        R: Send + 'static,
        F: FnOnce(&mut ReactorCtx) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(ReactorError::Gone(self.core()));
        }
        self.send(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        rx.await.map_err(|_| ReactorError::Gone(self.core()))
    }

    /// Runs `f` on the reactor and blocks this (non-reactor) thread for the answer.
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, ReactorError>
    where
        R: Send + 'static,
        F: FnOnce(&mut ReactorCtx) -> R + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        rx.recv().map_err(|_| ReactorError::Gone(self.core()))
    }
}

/// A poller's entry in its reactor.
struct PollerSlot {
    id: u64,
    /// The poller's name, kept for the panic report (`fatal`) and `framework_get_reactors`.
    name: Box<str>,
    poller: Box<dyn Poller>,
    runs: u64,
    busy_runs: u64,
}

/// One poller as `framework_get_reactors` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PollerInfo {
    pub name: String,
    pub id: u64,
    pub run_count: u64,
    pub busy_count: u64,
}

/// What the reactor lends to pollers and messages: its identity, a way to add pollers, the
/// epoll set for wake-ups, and per-reactor state of any type (`local`).
pub struct ReactorCtx {
    handle: ReactorHandle,
    all: Arc<Vec<ReactorHandle>>,
    epoll: OwnedFd,
    new_pollers: Vec<PollerSlot>,
    removed: Vec<u64>,
    next_poller_id: u64,
    locals: HashMap<TypeId, Box<dyn Any>>,
    poller_infos: Vec<PollerInfo>,
}

impl ReactorCtx {
    pub fn id(&self) -> usize {
        self.handle.id()
    }

    pub fn core(&self) -> usize {
        self.handle.core()
    }

    pub fn handle(&self) -> &ReactorHandle {
        &self.handle
    }

    /// Every reactor of this plexd, in mask order (to spread work over them).
    pub fn reactors(&self) -> &Arc<Vec<ReactorHandle>> {
        &self.all
    }

    /// Adds a poller; it first runs on the next loop. Returns its id for `remove_poller`.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) -> u64 {
        self.next_poller_id += 1;
        let id = self.next_poller_id;
        self.new_pollers.push(PollerSlot {
            id,
            name: poller.name().into(),
            poller,
            runs: 0,
            busy_runs: 0,
        });
        id
    }

    /// Removes a poller by id at the end of this loop.
    pub fn remove_poller(&mut self, id: u64) {
        self.removed.push(id);
    }

    /// Wakes a sleeping reactor when `fd` is readable (and writable if `writable`).
    pub fn watch_fd(&mut self, fd: RawFd, writable: bool) -> std::io::Result<()> {
        let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if writable {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: plain epoll_ctl on descriptors; `ev` outlives the call.
        let mut rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
            // SAFETY: as above.
            rc = unsafe {
                libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev)
            };
        }
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops waking on `fd` (call before closing it).
    pub fn unwatch_fd(&mut self, fd: RawFd) {
        // SAFETY: plain epoll_ctl; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// Per-reactor state of type `T`, created with `Default` on first use. Lets a module keep
    /// one poll group per reactor that messages can reach.
    pub fn local<T: Any + Default>(&mut self) -> &mut T {
        self.locals
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut::<T>()
            .expect("locals are keyed by their own TypeId")
    }

    /// The pollers as of the start of this loop.
    pub fn pollers(&self) -> &[PollerInfo] {
        &self.poller_infos
    }
}

/// A snapshot of one reactor for `framework_get_reactors`.
mod cores;
mod run;
mod set;

pub use cores::{core_mask_string, parse_core_mask};
use cores::{num_configured_cpus, pin_to_core};
use run::Reactor;
pub use set::{ReactorInfo, Reactors};

#[cfg(test)]
mod tests;
