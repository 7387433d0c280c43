//! One reactor thread's loop: messages, pollers, busy and idle time, sleep and wake-up.

use super::*;

pub(super) struct Reactor {
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
    pub(super) fn new(
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

    pub(super) fn run(&mut self) {
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
