//! A registered bdev: claims, removal, resize and the events consumers subscribe to.

use super::*;

/// A registered bdev: the device plus what the layer tracks about it.
pub struct BdevEntry {
    pub(super) bdev: Arc<dyn Bdev>,
    claimed_by: Mutex<Option<String>>,
    removed: AtomicBool,
    /// Stats of open channels, and the sum of closed ones.
    pub(super) channel_stats: Mutex<Vec<Arc<IoStats>>>,
    pub(super) closed_stats: IoStats,
    /// Rate limits, shared by every channel (`bdev_set_qos_limit`).
    pub qos: qos::Qos,
    /// Latency histogram control (`bdev_enable_histogram`).
    pub histogram: histogram::HistogramCtl,
    /// Who wants to hear of removal and resizes.
    subscribers: Mutex<Vec<(u64, Arc<EventFn>)>>,
    /// The names it answers to besides its own: the device's at first, then as renamed
    /// ([`BdevRegistry::rename_alias`]).
    pub(super) aliases: Mutex<Vec<String>>,
}

/// What happened to a bdev, for those who use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev was deleted (or its device went away): I/O to it fails from now on.
    Removed,
    /// Its size changed; I/O is checked against the new size from now on.
    Resized { old_blocks: u64, new_blocks: u64 },
}

/// A subscriber's handler. It runs on the thread that changed the bdev (the control plane or a
/// controller's owner), so it must not block; a consumer on a reactor sends itself a message.
pub type EventFn = dyn Fn(&BdevEntry, BdevEvent) + Send + Sync;

static NEXT_SUBSCRIPTION: AtomicU64 = AtomicU64::new(1);

/// Keeps a subscription alive; dropping it unsubscribes.
#[must_use = "dropping a Subscription unsubscribes at once"]
pub struct Subscription {
    entry: std::sync::Weak<BdevEntry>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(e) = self.entry.upgrade() {
            lock(&e.subscribers).retain(|(id, _)| *id != self.id);
        }
    }
}

/// Locks a control-path mutex; a panic elsewhere ends plexd (see `fatal`), so poisoning only
/// means a test thread failed, and the data is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BdevEntry {
    /// A new entry for `bdev`, unclaimed, answering also to `aliases`.
    pub(super) fn new(bdev: Arc<dyn Bdev>, aliases: Vec<String>) -> BdevEntry {
        BdevEntry {
            bdev,
            claimed_by: Mutex::new(None),
            removed: AtomicBool::new(false),
            channel_stats: Mutex::new(Vec::new()),
            closed_stats: IoStats::default(),
            qos: Default::default(),
            histogram: Default::default(),
            subscribers: Mutex::new(Vec::new()),
            aliases: Mutex::new(aliases),
        }
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn info(&self) -> &BdevInfo {
        self.bdev.info()
    }

    pub fn name(&self) -> &str {
        &self.bdev.info().name
    }

    /// The names it answers to besides its own.
    pub fn aliases(&self) -> Vec<String> {
        lock(&self.aliases).clone()
    }

    /// Whether `name` is this bdev's name or one of its aliases (what the registry resolves).
    pub fn answers_to(&self, name: &str) -> bool {
        self.name() == name || lock(&self.aliases).iter().any(|a| a == name)
    }

    pub fn claimed_by(&self) -> Option<String> {
        self.claimed_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Marks the bdev as used by `owner` (a subsystem namespace, a mirror), so that it cannot
    /// be deleted or claimed twice.
    pub fn claim(&self, owner: &str) -> Result<(), BdevError> {
        let mut c = self.claimed_by.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = &*c {
            return Err(BdevError::Claimed {
                name: self.name().to_string(),
                owner: cur.clone(),
            });
        }
        *c = Some(owner.to_string());
        Ok(())
    }

    pub fn release(&self) {
        *self.claimed_by.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Opens a channel on the calling thread.
    pub fn open_channel(self: &Arc<Self>) -> Result<IoChannel, BdevError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed {
                name: self.name().to_string(),
            });
        }
        let reactor = crate::reactor::current();
        let inner = self.bdev.open_channel(reactor.as_ref())?;
        let stats = Arc::new(IoStats::default());
        self.channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats.clone());
        Ok(IoChannel::new(self.clone(), inner, stats))
    }

    /// The sum of every channel's counters, open and closed.
    pub fn io_stats(&self) -> IoStats {
        let total = IoStats::default();
        total.add(&self.closed_stats);
        for s in self
            .channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            total.add(s);
        }
        total
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Calls `f` when this bdev is removed or resized, until the returned guard is dropped.
    /// A bdev already removed gets `Removed` at once.
    pub fn subscribe(
        self: &Arc<Self>,
        f: impl Fn(&BdevEntry, BdevEvent) + Send + Sync + 'static,
    ) -> Subscription {
        let id = NEXT_SUBSCRIPTION.fetch_add(1, Ordering::Relaxed);
        let f: Arc<EventFn> = Arc::new(f);
        lock(&self.subscribers).push((id, f.clone()));
        if self.is_removed() {
            f(self, BdevEvent::Removed);
        }
        Subscription {
            entry: Arc::downgrade(self),
            id,
        }
    }

    /// Changes the size and tells the subscribers (a module whose device changed size calls it).
    /// Nothing happens once the bdev is removed.
    pub fn resize(&self, new_blocks: u64) {
        let old_blocks = self.info().num_blocks();
        // A removed bdev has no users left to tell.
        if old_blocks != new_blocks && !self.is_removed() {
            self.info().set_num_blocks(new_blocks);
            self.notify(BdevEvent::Resized {
                old_blocks,
                new_blocks,
            });
        }
    }

    /// Marks the bdev gone and tells the subscribers, once.
    pub(super) fn mark_removed(&self) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            self.notify(BdevEvent::Removed);
        }
    }

    fn notify(&self, ev: BdevEvent) {
        // Handlers run without the lock, so one may subscribe or unsubscribe.
        let subs: Vec<Arc<EventFn>> = lock(&self.subscribers)
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        for f in subs {
            f(self, ev);
        }
    }
}
