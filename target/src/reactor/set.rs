//! All reactors of a process: starting them, reaching them, stopping them.

use super::*;

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
    pub(super) fn start_with_max_sleep(
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
