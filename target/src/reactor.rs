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

use crossbeam_queue::SegQueue;
use std::any::{Any, TypeId};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Nanoseconds since the process's first call, from the clock the current reactor read at the
/// start of its loop pass; off a reactor, read fresh. Reading a clock costs ~70 ns on these
/// virtual machines, too much to do twice per I/O; loop-pass precision is enough for
/// statistics and timeouts.
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
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
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

/// Parses an SPDK-style core mask: `0x3`, `3` (hex), `[0,1]` or `0-1,4`.
pub fn parse_core_mask(s: &str) -> Result<Vec<usize>, ReactorError> {
    let bad = || ReactorError::BadMask(s.to_string());
    let t = s.trim();
    let mut cores = Vec::new();
    if t.starts_with('[') || t.contains(',') || t.contains('-') {
        let inner = t.trim_start_matches('[').trim_end_matches(']');
        for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b || b >= 1024 {
                    return Err(bad());
                }
                cores.extend(a..=b);
            } else {
                let c: usize = part.parse().map_err(|_| bad())?;
                if c >= 1024 {
                    return Err(bad());
                }
                cores.push(c);
            }
        }
    } else {
        let hex = t.trim_start_matches("0x").trim_start_matches("0X");
        if hex.is_empty() || hex.len() > 32 {
            return Err(bad());
        }
        let mask = u128::from_str_radix(hex, 16).map_err(|_| bad())?;
        cores.extend((0..128).filter(|i| mask & (1u128 << i) != 0));
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(ReactorError::EmptyMask);
    }
    Ok(cores)
}

/// Renders cores back as a hex mask, as SPDK prints them.
pub fn core_mask_string(cores: &[usize]) -> String {
    let mask = cores.iter().fold(0u128, |m, &c| m | (1u128 << c.min(127)));
    format!("0x{mask:x}")
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
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReactorInfo {
    pub lcore: usize,
    pub busy: u64,
    pub idle: u64,
    pub in_interrupt: bool,
    pub sleeps: u64,
    pub wakeups: u64,
    pub pollers: Vec<PollerInfo>,
}

/// All reactors of a process.
pub struct Reactors {
    handles: Arc<Vec<ReactorHandle>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    config: ReactorConfig,
}

impl Reactors {
    /// Starts one pinned reactor thread per core.
    pub fn start(config: ReactorConfig) -> Result<Reactors, ReactorError> {
        Self::start_with_max_sleep(config, MAX_SLEEP)
    }

    /// `start` with another bound on one sleep: tests make it long, so that only a wake-up
    /// can end a sleep.
    fn start_with_max_sleep(
        config: ReactorConfig,
        max_sleep: Duration,
    ) -> Result<Reactors, ReactorError> {
        if config.cores.is_empty() {
            return Err(ReactorError::EmptyMask);
        }
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ncpu = num_configured_cpus().max(online);
        if let Some(&core) = config.cores.iter().find(|&&c| c >= ncpu) {
            return Err(ReactorError::NoSuchCore {
                core,
                max: ncpu - 1,
            });
        }
        let mut shareds = Vec::new();
        for (id, &core) in config.cores.iter().enumerate() {
            // SAFETY: eventfd returns a new descriptor or -1.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(ReactorError::Sys {
                    what: "eventfd",
                    source: std::io::Error::last_os_error(),
                });
            }
            shareds.push(Arc::new(Shared {
                id,
                core,
                queue: SegQueue::new(),
                // SAFETY: fd is a fresh descriptor we own.
                eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
                sleeping: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                stats: ReactorStats::default(),
            }));
        }
        let handles: Arc<Vec<ReactorHandle>> = Arc::new(
            shareds
                .iter()
                .map(|s| ReactorHandle { shared: s.clone() })
                .collect(),
        );
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for shared in shareds {
            let all = handles.clone();
            let cfg = config.clone();
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("reactor_{}", shared.core))
                .spawn(move || {
                    // A panic on a reactor ends the process (see `fatal`): a reactor that
                    // died alone would leave its connections and callers hanging.
                    crate::fatal::enter_reactor();
                    match Reactor::new(shared, all, &cfg, max_sleep) {
                        Ok(mut r) => {
                            let _ = ready.send(Ok(()));
                            r.run();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })
                .map_err(|source| ReactorError::Sys {
                    what: "thread",
                    source,
                })?;
            threads.push(t);
        }
        drop(ready_tx);
        let reactors = Reactors {
            handles,
            threads: Mutex::new(threads),
            config,
        };
        for _ in 0..reactors.handles.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    reactors.stop();
                    return Err(e);
                }
                Err(_) => {
                    reactors.stop();
                    return Err(ReactorError::Gone(0));
                }
            }
        }
        Ok(reactors)
    }

    pub fn handles(&self) -> &Arc<Vec<ReactorHandle>> {
        &self.handles
    }

    pub fn get(&self, id: usize) -> Option<&ReactorHandle> {
        self.handles.get(id)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    pub fn config(&self) -> &ReactorConfig {
        &self.config
    }

    /// Snapshots every reactor (busy/idle time in ns, pollers).
    pub async fn info(&self) -> Vec<ReactorInfo> {
        let mut out = Vec::new();
        for h in self.handles.iter() {
            let pollers = h
                .call(|ctx| ctx.pollers().to_vec())
                .await
                .unwrap_or_default();
            let s = &h.shared.stats;
            out.push(ReactorInfo {
                lcore: h.core(),
                busy: s.busy_ns.load(Ordering::Relaxed),
                idle: s.idle_ns.load(Ordering::Relaxed),
                in_interrupt: h.shared.sleeping.load(Ordering::Relaxed),
                sleeps: s.sleeps.load(Ordering::Relaxed),
                wakeups: s.wakeups.load(Ordering::Relaxed),
                pollers,
            });
        }
        out
    }

    /// Asks every reactor to finish its loop and waits for the threads. Pollers are dropped on
    /// their own reactor, so their Drop impls run there.
    pub fn stop(&self) {
        for h in self.handles.iter() {
            h.shared.stop.store(true, Ordering::Release);
            h.shared.ring();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop();
    }
}

fn num_configured_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

fn pin_to_core(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) targets
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

struct Reactor {
    shared: Arc<Shared>,
    pollers: Vec<PollerSlot>,
    ctx: ReactorCtx,
    idle_poll: Duration,
    /// Longest single `epoll_wait` (MAX_SLEEP outside tests).
    max_sleep: Duration,
    /// The kernel lacks `epoll_pwait2`.
    no_pwait2: bool,
}

impl Reactor {
    fn new(
        shared: Arc<Shared>,
        all: Arc<Vec<ReactorHandle>>,
        cfg: &ReactorConfig,
        max_sleep: Duration,
    ) -> Result<Reactor, ReactorError> {
        if cfg.pin {
            pin_to_core(shared.core).map_err(|source| ReactorError::Pin {
                core: shared.core,
                source,
            })?;
        }
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(ReactorError::Sys {
                what: "epoll",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: ep is a fresh descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: shared.eventfd.as_raw_fd() as u64,
        };
        // SAFETY: registering our eventfd in our epoll set.
        if unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                shared.eventfd.as_raw_fd(),
                &mut ev,
            )
        } < 0
        {
            return Err(ReactorError::Sys {
                what: "epoll registration",
                source: std::io::Error::last_os_error(),
            });
        }
        let handle = ReactorHandle {
            shared: shared.clone(),
        };
        Ok(Reactor {
            shared,
            pollers: Vec::new(),
            ctx: ReactorCtx {
                handle,
                all,
                epoll,
                new_pollers: Vec::new(),
                removed: Vec::new(),
                next_poller_id: 0,
                locals: HashMap::new(),
                poller_infos: Vec::new(),
            },
            idle_poll: Duration::from_micros(cfg.idle_poll_us),
            max_sleep,
            no_pwait2: false,
        })
    }

    fn run(&mut self) {
        let me = self.ctx.handle.clone();
        CURRENT.with(|c| *c.borrow_mut() = Some(me));
        // One clock read per pass: the time a pass ends is the next one's loop clock.
        let mut pass_start = refresh_loop_clock();
        let mut last_busy = pass_start;
        let idle_poll_ns = self.idle_poll.as_nanos() as u64;
        // Held outside the loop: a clone per pass would cost two atomic operations each.
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut loops: u64 = 0;
        while !self.shared.stop.load(Ordering::Acquire) {
            WAKE_BY_NS.with(|c| c.set(0));
            let busy = self.run_once();
            let now = refresh_loop_clock();
            let spent = now.saturating_sub(pass_start);
            pass_start = now;
            if busy {
                last_busy = now;
                stats.busy_ns.fetch_add(spent, Ordering::Relaxed);
            } else {
                stats.idle_ns.fetch_add(spent, Ordering::Relaxed);
                if idle_poll_ns != 0 && now.saturating_sub(last_busy) >= idle_poll_ns {
                    self.sleep();
                    let woke = refresh_loop_clock();
                    stats
                        .idle_ns
                        .fetch_add(woke.saturating_sub(pass_start), Ordering::Relaxed);
                    pass_start = woke;
                }
            }
            loops += 1;
            if loops.is_multiple_of(1024) {
                self.refresh_poller_infos();
            }
        }
        // Drop pollers and per-reactor state here, on the reactor's own thread.
        self.pollers.clear();
        self.ctx.new_pollers.clear();
        self.ctx.locals.clear();
        while let Some(m) = self.shared.queue.pop() {
            drop(m);
        }
    }

    /// One pass: messages, then pollers. Returns whether anything did work.
    fn run_once(&mut self) -> bool {
        let mut busy = false;
        // Bound the messages per pass so a flood cannot starve the pollers.
        for _ in 0..64 {
            match self.shared.queue.pop() {
                Some(m) => {
                    m(&mut self.ctx);
                    busy = true;
                }
                None => break,
            }
        }
        let mut finished = false;
        for slot in &mut self.pollers {
            slot.runs += 1;
            crate::fatal::set_poller(Some(&slot.name));
            match slot.poller.poll(&mut self.ctx) {
                PollStatus::Busy => {
                    slot.busy_runs += 1;
                    busy = true;
                }
                PollStatus::Idle => {}
                PollStatus::Done => {
                    self.ctx.removed.push(slot.id);
                    finished = true;
                }
            }
        }
        crate::fatal::set_poller(None);
        if finished || !self.ctx.removed.is_empty() {
            let removed = std::mem::take(&mut self.ctx.removed);
            self.pollers.retain(|s| !removed.contains(&s.id));
            self.ctx.new_pollers.retain(|s| !removed.contains(&s.id));
            self.refresh_poller_infos();
        }
        if !self.ctx.new_pollers.is_empty() {
            self.pollers.append(&mut self.ctx.new_pollers);
            self.refresh_poller_infos();
            busy = true;
        }
        busy
    }

    fn refresh_poller_infos(&mut self) {
        self.ctx.poller_infos.clear();
        self.ctx
            .poller_infos
            .extend(self.pollers.iter().map(|s| PollerInfo {
                name: s.name.to_string(),
                id: s.id,
                run_count: s.runs,
                busy_count: s.busy_runs,
            }));
    }

    /// `epoll_wait` with a nanosecond timeout (`epoll_pwait2`), or milliseconds rounded up on
    /// kernels before 5.11.
    fn epoll_wait(&mut self, events: &mut [libc::epoll_event; 16], timeout: Duration) -> i32 {
        let epfd = self.ctx.epoll.as_raw_fd();
        if !self.no_pwait2 {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: epoll_pwait2 writes at most 16 events into our array and reads `ts`.
            let n =
                unsafe { libc::epoll_pwait2(epfd, events.as_mut_ptr(), 16, &ts, std::ptr::null()) };
            if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return n;
            }
            self.no_pwait2 = true;
        }
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: epoll_wait writes at most 16 events into our array.
        unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), 16, ms) }
    }

    fn sleep(&mut self) {
        let shared = self.shared.clone();
        shared.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        // A poller waiting for time (a rate limit's next slice) bounds the sleep.
        let mut timeout = self.max_sleep;
        let deadline = WAKE_BY_NS.with(Cell::get);
        if deadline != 0 {
            timeout = timeout.min(Duration::from_nanos(
                deadline.saturating_sub(fresh_now_ns()),
            ));
        }
        if shared.queue.is_empty() && !shared.stop.load(Ordering::Acquire) && !timeout.is_zero() {
            shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            let mut events: [libc::epoll_event; 16] = [libc::epoll_event { events: 0, u64: 0 }; 16];
            let n = self.epoll_wait(&mut events, timeout);
            if n > 0 {
                shared.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            let efd = shared.eventfd.as_raw_fd() as u64;
            if events.iter().take(n.max(0) as usize).any(|e| e.u64 == efd) {
                let mut v: u64 = 0;
                // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
                unsafe { libc::read(efd as RawFd, &mut v as *mut u64 as *mut libc::c_void, 8) };
            }
        }
        shared.sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::AtomicUsize;

    fn test_config(n: usize, idle_poll_us: u64) -> ReactorConfig {
        ReactorConfig {
            cores: vec![0; n]
                .iter()
                .enumerate()
                .map(|(i, _)| i % num_configured_cpus())
                .collect(),
            idle_poll_us,
            pin: false,
        }
    }

    #[test]
    fn core_masks_parse_like_spdk() {
        assert_eq!(parse_core_mask("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_core_mask("5").unwrap(), vec![0, 2]);
        assert_eq!(parse_core_mask("[0,1]").unwrap(), vec![0, 1]);
        assert_eq!(parse_core_mask("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(matches!(
            parse_core_mask("0x0"),
            Err(ReactorError::EmptyMask)
        ));
        assert!(parse_core_mask("zz").is_err());
        assert!(parse_core_mask("3-1").is_err());
        assert_eq!(core_mask_string(&[0, 1]), "0x3");
    }

    #[test]
    fn a_core_the_machine_lacks_is_refused() {
        let cfg = ReactorConfig {
            cores: vec![1000],
            idle_poll_us: 0,
            pin: true,
        };
        assert!(matches!(
            Reactors::start(cfg),
            Err(ReactorError::NoSuchCore { core: 1000, .. })
        ));
    }

    #[test]
    fn messages_run_on_their_reactor_and_answer() {
        let r = Reactors::start(test_config(2, 100)).unwrap();
        for h in r.handles().iter() {
            let (id, name) = h
                .call_blocking(|ctx| (ctx.id(), std::thread::current().name().map(String::from)))
                .unwrap();
            assert_eq!(id, h.id());
            assert_eq!(name.unwrap(), format!("reactor_{}", h.core()));
        }
    }

    #[test]
    fn pollers_run_until_done_and_locals_persist() {
        let r = Reactors::start(test_config(1, 0)).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        r.get(0).unwrap().send(move |ctx| {
            let n = Rc::new(std::cell::Cell::new(0));
            ctx.add_poller(fn_poller("count_to_10", move |ctx| {
                *ctx.local::<u32>() += 1;
                n.set(n.get() + 1);
                c.store(n.get(), Ordering::SeqCst);
                if n.get() == 10 {
                    PollStatus::Done
                } else {
                    PollStatus::Busy
                }
            }));
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(Ordering::SeqCst) < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), 10);
        let (pollers, local) = r
            .get(0)
            .unwrap()
            .call_blocking(|ctx| (ctx.pollers().len(), *ctx.local::<u32>()))
            .unwrap();
        assert_eq!(pollers, 0, "a Done poller is removed");
        assert_eq!(local, 10);
    }

    /// Polls `cond` until it holds; panics with `what` after a deadline far beyond any
    /// scheduling delay on a loaded machine.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn idle_reactor_sleeps_and_wakes_for_messages() {
        // A sleep only an event can end: without the wake-up the message would wait an hour,
        // far past the 30 s the test waits for it.
        let r =
            Reactors::start_with_max_sleep(test_config(1, 50), Duration::from_secs(3600)).unwrap();
        let h = r.get(0).unwrap().clone();
        let shared = h.shared.clone();
        wait_until("the idle reactor to sleep", || {
            shared.sleeping.load(Ordering::SeqCst) && shared.stats.sleeps.load(Ordering::SeqCst) > 0
        });
        let sleeps = shared.stats.sleeps.load(Ordering::SeqCst);
        let wakeups = shared.stats.wakeups.load(Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        h.send(move |_| tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a message wakes a sleeping reactor");
        // Exactly one sleep ended, by an event (the eventfd), not by its time running out.
        assert_eq!(shared.stats.wakeups.load(Ordering::SeqCst), wakeups + 1);
        // Idle again afterwards, it goes back to sleep.
        wait_until("the reactor to sleep again", || {
            shared.stats.sleeps.load(Ordering::SeqCst) > sleeps
        });
        assert_eq!(shared.stats.wakeups.load(Ordering::SeqCst), wakeups + 1);
    }

    #[test]
    fn a_reactor_sleeps_until_a_requested_wake_up() {
        // A poller waiting for time (as rate-limited I/O does): idle, but asks to be run again
        // 2 ms on. Sleeps last an hour unless cut short, so every deadline the poller sees
        // pass proves a sleep ended at the time it asked for, not at MAX_SLEEP.
        let r =
            Reactors::start_with_max_sleep(test_config(1, 50), Duration::from_secs(3600)).unwrap();
        let h = r.get(0).unwrap().clone();
        let seen = Arc::new(AtomicUsize::new(0));
        let seen2 = seen.clone();
        let mut deadline = 0u64;
        h.send(move |ctx| {
            ctx.add_poller(fn_poller("timer", move |_| {
                let now = now_ns();
                if deadline != 0 && now >= deadline {
                    seen2.fetch_add(1, Ordering::SeqCst);
                    deadline = 0;
                }
                if deadline == 0 {
                    deadline = now + 2_000_000;
                }
                wake_by(deadline);
                PollStatus::Idle
            }));
        });
        wait_until("five timed wake-ups", || seen.load(Ordering::SeqCst) >= 5);
        assert!(h.shared.stats.sleeps.load(Ordering::SeqCst) >= 5);
    }

    #[test]
    fn stop_drops_pollers_on_their_thread() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let on_reactor = std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("reactor_"));
                self.0.store(on_reactor, Ordering::SeqCst);
            }
        }
        let dropped_on_reactor = Arc::new(AtomicBool::new(false));
        let r = Reactors::start(test_config(1, 100)).unwrap();
        let d = dropped_on_reactor.clone();
        r.get(0)
            .unwrap()
            .call_blocking(move |ctx| {
                let flag = Flag(d);
                ctx.add_poller(fn_poller("holder", move |_| {
                    let _ = &flag;
                    PollStatus::Idle
                }));
            })
            .unwrap();
        r.stop();
        assert!(dropped_on_reactor.load(Ordering::SeqCst));
    }
}
