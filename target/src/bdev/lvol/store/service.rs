//! The store's metadata service: journal batches, checkpoints, cluster allocation and
//! quarantine of freed clusters, on the store's home reactor.

use super::*;

type Done = Box<dyn FnOnce(&mut Service, Result<(), String>) + Send>;

enum Meta {
    Journal,
    Checkpoint,
    Superblock,
    /// The flush after the checkpoint, before the superblock that points at it.
    CheckpointFlush,
    /// The flush after the superblock, before the journal ring is reused.
    SuperblockFlush,
    /// A fill of the cluster being allocated for `key` (a zeroing, or a copy's read or write).
    Fill {
        key: (u32, u32),
        read: bool,
    },
}

/// A journal batch goes: flush (when cluster fills precede it), write its pages, flush, and
/// only then apply and answer.
enum Stage {
    PreFlush,
    Write,
    PostFlush,
}

struct Batch {
    txns: Vec<(Vec<Op>, Done)>,
    /// The page writes (one, or two when the batch wraps around the ring).
    writes: Vec<(u64, u64, BufView)>,
    stage: Stage,
    left: u32,
    err: Option<IoStatus>,
}

struct Alloc {
    cluster: u32,
    tickets: Vec<Arc<Ticket>>,
}

struct Quarantine {
    lvol: Arc<LvolCore>,
    epoch: usize,
    clusters: Vec<u32>,
}

struct Quiesce {
    lvol: Arc<LvolCore>,
    epoch: usize,
    then: Box<dyn FnOnce(&mut Service) + Send>,
}

pub struct Service {
    pub core: Arc<StoreCore>,
    base: IoChannel,
    ops: HashMap<u64, Meta>,
    next_tag: u64,
    /// Transactions waiting for the journal, and what runs once each is on disk.
    queue: VecDeque<(Vec<Op>, Done)>,
    /// The batch being written.
    writing: Option<Batch>,
    /// Cluster fills completed since the last flush: the next journal write flushes first,
    /// so no mapping reaches the disk ahead of its cluster's data.
    fills_unflushed: bool,
    next_seq: u64,
    prev_crc: Option<u32>,
    ckpt: Option<(Superblock, u32)>,
    /// Clusters chosen or cooling off: not to be handed out.
    reserved: HashSet<u32>,
    /// Clusters from here up to the durable clean mark hold zeroes and are free.
    clean_next: u32,
    clean_asked: bool,
    awaiting_clean: Vec<(u32, u32, Arc<Ticket>)>,
    allocs: HashMap<(u32, u32), Alloc>,
    quarantine: Vec<Quarantine>,
    quiescing: Vec<Quiesce>,
    unsent: VecDeque<BdevIo>,
    stopped: bool,
}

impl Service {
    pub(super) fn new(core: Arc<StoreCore>, resume: Resume) -> Result<Service, String> {
        let torn = resume.torn;
        let mut svc = Self::open(core, resume)?;
        if torn {
            tracing::warn!(
                "lvol store {}: the journal ends in a torn write; writing a checkpoint first",
                lock(&svc.core.name)
            );
            svc.start_checkpoint();
        }
        Ok(svc)
    }

    fn open(core: Arc<StoreCore>, resume: Resume) -> Result<Service, String> {
        let base = core
            .base
            .open_channel()
            .map_err(|e| format!("cannot open {}: {e}", core.base.name()))?;
        let clean = lock(&core.state).clean_from;
        Ok(Service {
            core,
            base,
            ops: HashMap::new(),
            next_tag: 1,
            queue: VecDeque::new(),
            writing: None,
            fills_unflushed: false,
            next_seq: resume.seq,
            prev_crc: resume.prev,
            ckpt: None,
            reserved: HashSet::new(),
            clean_next: clean,
            clean_asked: false,
            awaiting_clean: Vec::new(),
            allocs: HashMap::new(),
            quarantine: Vec::new(),
            quiescing: Vec::new(),
            unsent: VecDeque::new(),
            stopped: false,
        })
    }

    pub fn poll(&mut self) -> PollStatus {
        if self.stopped {
            return PollStatus::Done;
        }
        let mut busy = false;
        while let Some(r) = self.core.requests.pop() {
            busy = true;
            self.handle(r);
        }
        let mut back = Vec::new();
        if self.base.in_flight() > 0 {
            self.base.poll(&mut |c| back.push(c));
        }
        busy |= !back.is_empty();
        for c in back {
            self.io_done(c);
        }
        while let Some(io) = self.unsent.pop_front() {
            if let Err(io) = self.base.submit(io) {
                self.unsent.push_front(io);
                break;
            }
        }
        self.release_quarantine();
        self.check_quiescing();
        self.start_journal();
        if busy || !self.ops.is_empty() || !self.quiescing.is_empty() || !self.quarantine.is_empty()
        {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::Alloc {
                blob,
                index,
                ticket,
            } => self.alloc(blob, index, ticket),
            Request::Free {
                lvol,
                blob,
                index,
                count,
                ticket,
            } => self.free(lvol, blob, index, count, ticket),
            Request::Control(f) => f(self),
        }
    }

    fn submit(&mut self, io_type: IoType, lba: u64, nblocks: u64, buf: Option<BufView>, m: Meta) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.ops.insert(tag, m);
        let bufs = buf.map(|b| smallvec::smallvec![b]).unwrap_or_default();
        let io = BdevIo::new(io_type, lba, nblocks, bufs, tag);
        if let Err(io) = self.base.submit(io) {
            self.unsent.push_back(io);
        }
    }

    /// Queues a transaction; `done` runs once it is on disk and applied (or failed).
    pub fn commit(&mut self, ops: Vec<Op>, done: Done) {
        if self.core.failed.load(Ordering::Acquire) {
            done(self, Err(self.failed_msg()));
            return;
        }
        self.queue.push_back((ops, done));
    }

    fn failed_msg(&self) -> String {
        format!(
            "store {}: a metadata write failed; it takes no more changes",
            lock(&self.core.name)
        )
    }

    /// Commits `ops` once [`Service::validate`] finds they apply; `done` gets the refusal
    /// otherwise.
    pub fn commit_checked(&mut self, ops: Vec<Op>, done: Done) {
        match self.validate(&ops) {
            Ok(()) => self.commit(ops, done),
            Err(e) => done(self, Err(e)),
        }
    }

    /// Checks a transaction against the state as it is now, without changing it.
    pub fn validate(&self, ops: &[Op]) -> Result<(), String> {
        let mut s = lock(&self.core.state).clone();
        s.apply_txn(ops)
    }

    // ---- journal ---------------------------------------------------------------------------

    fn start_journal(&mut self) {
        if self.writing.is_some() || self.ckpt.is_some() || self.queue.is_empty() {
            return;
        }
        let (uuid, jp, jn, first) = {
            let sb = lock(&self.core.sb);
            (sb.uuid, sb.journal_page, sb.journal_pages, sb.journal_seq)
        };
        let mut stream = Vec::new();
        let mut batch = Vec::new();
        while let Some((ops, _)) = self.queue.front() {
            let mut t = Vec::new();
            format::encode_txn(ops, &mut t);
            let pages = (stream.len() + t.len()).div_ceil(format::JOURNAL_PAYLOAD);
            if !batch.is_empty() && pages > MAX_BATCH_PAGES {
                break;
            }
            stream.extend_from_slice(&t);
            batch.push(self.queue.pop_front().expect("front exists"));
        }
        let n = stream.len().div_ceil(format::JOURNAL_PAYLOAD) as u64;
        if self.next_seq + n - first > jn {
            // The ring would overwrite pages the current checkpoint still needs.
            for b in batch.into_iter().rev() {
                self.queue.push_front(b);
            }
            if n > jn / 2 {
                let (_, done) = self.queue.pop_front().expect("just pushed");
                done(self, Err("transaction larger than the journal".into()));
                return;
            }
            self.start_checkpoint();
            return;
        }
        let mut pages = Vec::with_capacity(n as usize * PAGE);
        for chunk in stream.chunks(format::JOURNAL_PAYLOAD) {
            let page =
                format::journal_page(&uuid, self.next_seq, self.prev_crc.unwrap_or(0), chunk);
            self.prev_crc = Some(format::sealed_crc(&page));
            pages.extend_from_slice(&page);
            self.next_seq += 1;
        }
        // One write, or two when the batch wraps around the end of the ring.
        let start = (self.next_seq - n) % jn;
        let first_len = (jn - start).min(n) as usize * PAGE;
        let mut writes = Vec::new();
        let bs = self.core.block_size as u64;
        let page_lba = move |p: u64| p * PAGE as u64 / bs;
        for (at, bytes) in [(start, &pages[..first_len]), (0, &pages[first_len..])] {
            if bytes.is_empty() {
                continue;
            }
            let Ok(mut buf) = BufView::new(bytes.len()) else {
                self.fail("no memory for a journal write");
                return;
            };
            if let Some(b) = buf.bytes_mut() {
                b.copy_from_slice(bytes);
            }
            let lba = page_lba(jp + at);
            let nb = page_lba((bytes.len() / PAGE) as u64);
            writes.push((lba, nb, buf));
        }
        let mut b = Batch {
            txns: batch,
            writes,
            stage: Stage::PreFlush,
            left: 0,
            err: None,
        };
        if std::mem::take(&mut self.fills_unflushed) {
            b.left = 1;
            self.writing = Some(b);
            self.submit(IoType::Flush, 0, 0, None, Meta::Journal);
        } else {
            self.writing = Some(b);
            self.write_batch();
        }
    }

    fn write_batch(&mut self) {
        let Some(b) = self.writing.as_mut() else {
            return;
        };
        b.stage = Stage::Write;
        let writes = std::mem::take(&mut b.writes);
        b.left = writes.len() as u32;
        for (lba, nb, buf) in writes {
            self.submit(IoType::Write, lba, nb, Some(buf), Meta::Journal);
        }
    }

    fn journal_done(&mut self, status: IoStatus) {
        let Some(b) = self.writing.as_mut() else {
            return;
        };
        b.left -= 1;
        if !status.is_ok() {
            b.err = Some(status);
        }
        if b.left > 0 {
            return;
        }
        match (&b.stage, b.err) {
            (Stage::PreFlush, None) => return self.write_batch(),
            (Stage::Write, None) => {
                b.stage = Stage::PostFlush;
                b.left = 1;
                self.submit(IoType::Flush, 0, 0, None, Meta::Journal);
                return;
            }
            _ => {}
        }
        let b = self.writing.take().expect("checked");
        let (batch, err) = (b.txns, b.err);
        if let Some(s) = err {
            self.fail(&format!("journal write failed: {s:?}"));
            for (_, done) in batch {
                done(self, Err(format!("journal write failed: {s:?}")));
            }
            return;
        }
        for (ops, done) in batch {
            let r = lock(&self.core.state).apply_txn(&ops);
            if let Err(e) = &r {
                // Validated before it was queued: this is a bug, and the disk now holds a
                // transaction the next load refuses. Stop changing anything.
                tracing::error!(
                    "lvol store {}: journaled transaction does not apply: {e}",
                    lock(&self.core.name)
                );
                self.core.failed.store(true, Ordering::Release);
            }
            done(self, r);
        }
    }

    fn start_checkpoint(&mut self) {
        let mut sb = lock(&self.core.sb).clone();
        let bytes = lock(&self.core.state).to_checkpoint(self.next_seq).encode();
        sb.ckpt_len = bytes.len() as u64;
        sb.ckpt_crc = crc32c::crc32c(&bytes);
        let bytes = pad(bytes);
        if bytes.len() as u64 > sb.ckpt_pages * PAGE as u64 {
            self.fail("checkpoint larger than its area (too many lvols?)");
            return;
        }
        let area = 1 - sb.active;
        sb.active = area;
        sb.seq += 1;
        sb.journal_seq = self.next_seq;
        let Ok(mut buf) = BufView::new(bytes.len()) else {
            self.fail("no memory for a checkpoint");
            return;
        };
        if let Some(b) = buf.bytes_mut() {
            b.copy_from_slice(&bytes);
        }
        let bs = self.core.block_size as u64;
        let lba = sb.ckpt_page[area as usize] * PAGE as u64 / bs;
        let nb = bytes.len() as u64 / bs;
        self.submit(IoType::Write, lba, nb, Some(buf), Meta::Checkpoint);
        self.ckpt = Some((sb, 0));
    }

    fn checkpoint_written(&mut self, status: IoStatus) {
        if !status.is_ok() {
            self.fail(&format!("checkpoint write failed: {status:?}"));
            return;
        }
        self.submit(IoType::Flush, 0, 0, None, Meta::CheckpointFlush);
    }

    fn checkpoint_flushed(&mut self, status: IoStatus) {
        let Some((sb, _)) = self.ckpt.clone() else {
            return;
        };
        if !status.is_ok() {
            self.fail(&format!("flush after the checkpoint failed: {status:?}"));
            return;
        }
        let page = sb.encode();
        let slot = sb.seq % format::SUPER_SLOTS;
        let Ok(mut buf) = BufView::new(PAGE) else {
            self.fail("no memory for a superblock");
            return;
        };
        if let Some(b) = buf.bytes_mut() {
            b.copy_from_slice(&page);
        }
        let bs = self.core.block_size as u64;
        self.submit(
            IoType::Write,
            slot * PAGE as u64 / bs,
            PAGE as u64 / bs,
            Some(buf),
            Meta::Superblock,
        );
    }

    fn superblock_written(&mut self, status: IoStatus) {
        if !status.is_ok() {
            self.fail(&format!("superblock write failed: {status:?}"));
            return;
        }
        self.submit(IoType::Flush, 0, 0, None, Meta::SuperblockFlush);
    }

    fn superblock_flushed(&mut self, status: IoStatus) {
        let Some((sb, _)) = self.ckpt.take() else {
            return;
        };
        if !status.is_ok() {
            self.fail(&format!("flush after the superblock failed: {status:?}"));
            return;
        }
        // The journal starts afresh after the checkpoint: the first page chains to nothing.
        self.prev_crc = None;
        *lock(&self.core.sb) = sb;
    }

    fn fail(&mut self, why: &str) {
        tracing::error!("lvol store {}: {why}", lock(&self.core.name));
        self.core.failed.store(true, Ordering::Release);
        let queued: Vec<_> = self.queue.drain(..).collect();
        for (_, done) in queued {
            done(self, Err(why.to_string()));
        }
        for (_, a) in std::mem::take(&mut self.allocs) {
            for t in a.tickets {
                t.set(Ticket::FAILED);
            }
        }
        for (_, _, t) in std::mem::take(&mut self.awaiting_clean) {
            t.set(Ticket::FAILED);
        }
    }

    // ---- clusters --------------------------------------------------------------------------

    fn alloc(&mut self, blob: u32, index: u32, ticket: Arc<Ticket>) {
        if self.core.failed.load(Ordering::Acquire) {
            ticket.set(Ticket::FAILED);
            return;
        }
        if let Some(a) = self.allocs.get_mut(&(blob, index)) {
            a.tickets.push(ticket);
            return;
        }
        let view = {
            let s = lock(&self.core.state);
            let known = s
                .blobs
                .get(&blob)
                .filter(|b| (index as u64) < b.rec.clusters)
                .map(|b| b.get(index));
            match known {
                Some(UNALLOCATED) => self.core.view_of(&s, blob),
                Some(_) => {
                    // Allocated meanwhile (a request that crossed the publication).
                    ticket.set(Ticket::DONE);
                    return;
                }
                _ => None,
            }
        };
        let Some(view) = view else {
            ticket.set(Ticket::FAILED);
            return;
        };
        let src = view.parent_has(index as u64);
        let state_clean = {
            let s = lock(&self.core.state);
            while self.clean_next < s.clean_from
                && (s.is_used(self.clean_next) || self.reserved.contains(&self.clean_next))
            {
                self.clean_next += 1;
            }
            s.clean_from
        };
        let (cluster, clean) = if self.clean_next < state_clean {
            self.clean_next += 1;
            (self.clean_next - 1, true)
        } else if state_clean < self.core.total_clusters {
            self.awaiting_clean.push((blob, index, ticket));
            self.advance_clean_mark(state_clean);
            return;
        } else {
            let reserved = &self.reserved;
            let found = lock(&self.core.state).find_free(0, &|c| reserved.contains(&c));
            match found {
                Some(c) => (c, false),
                None => {
                    ticket.set(Ticket::NO_SPACE);
                    return;
                }
            }
        };
        self.reserved.insert(cluster);
        self.allocs.insert(
            (blob, index),
            Alloc {
                cluster,
                tickets: vec![ticket],
            },
        );
        let key = (blob, index);
        let cb = self.core.cluster_blocks();
        match src {
            Some(p) => {
                let Ok(buf) = BufView::new(self.core.cluster_size as usize) else {
                    self.alloc_failed(key, Ticket::FAILED);
                    return;
                };
                let lba = self.core.cluster_lba(p);
                self.submit(
                    IoType::Read,
                    lba,
                    cb,
                    Some(buf),
                    Meta::Fill { key, read: true },
                );
            }
            None if !clean => {
                let lba = self.core.cluster_lba(cluster);
                self.submit(
                    IoType::WriteZeroes,
                    lba,
                    cb,
                    None,
                    Meta::Fill { key, read: false },
                );
            }
            None => self.journal_alloc(key),
        }
    }

    fn advance_clean_mark(&mut self, from: u32) {
        if self.clean_asked {
            return;
        }
        self.clean_asked = true;
        let to = from
            .saturating_add(CLEAN_STEP)
            .min(self.core.total_clusters);
        self.commit(
            vec![Op::CleanFrom { cluster: to }],
            Box::new(move |svc, r| {
                svc.clean_asked = false;
                let waiting = std::mem::take(&mut svc.awaiting_clean);
                match r {
                    Ok(()) => {
                        // [from, to) are ours to hand out as zeroes.
                        svc.clean_next = from;
                        for (b, i, t) in waiting {
                            svc.alloc(b, i, t);
                        }
                    }
                    Err(_) => waiting
                        .into_iter()
                        .for_each(|(_, _, t)| t.set(Ticket::FAILED)),
                }
            }),
        );
    }

    fn fill_done(&mut self, key: (u32, u32), read: bool, c: IoCompletion) {
        if !c.status.is_ok() {
            tracing::error!(
                "lvol store {}: filling a cluster for blob {} index {} failed: {:?}",
                lock(&self.core.name),
                key.0,
                key.1,
                c.status
            );
            self.alloc_failed(key, Ticket::FAILED);
            return;
        }
        if !read {
            self.fills_unflushed = true;
        }
        if read {
            let Some(a) = self.allocs.get(&key) else {
                return;
            };
            let buf = c.bufs.into_iter().next();
            let lba = self.core.cluster_lba(a.cluster);
            let cb = self.core.cluster_blocks();
            self.submit(IoType::Write, lba, cb, buf, Meta::Fill { key, read: false });
            return;
        }
        self.journal_alloc(key);
    }

    fn journal_alloc(&mut self, key: (u32, u32)) {
        let Some(a) = self.allocs.get(&key) else {
            return;
        };
        let op = Op::Alloc {
            blob: key.0,
            index: key.1,
            cluster: a.cluster,
            count: 1,
        };
        self.commit(
            vec![op],
            Box::new(move |svc, r| {
                let Some(a) = svc.allocs.remove(&key) else {
                    return;
                };
                svc.reserved.remove(&a.cluster);
                let v = match r {
                    Ok(()) => {
                        if let Some(v) = lock(&svc.core.views).get(&key.0) {
                            if let Some(m) = v.map.get(key.1 as usize) {
                                m.store(a.cluster, Ordering::Release);
                            }
                        }
                        Ticket::DONE
                    }
                    Err(_) => Ticket::FAILED,
                };
                a.tickets.iter().for_each(|t| t.set(v));
            }),
        );
    }

    fn alloc_failed(&mut self, key: (u32, u32), why: u8) {
        if let Some(a) = self.allocs.remove(&key) {
            self.reserved.remove(&a.cluster);
            a.tickets.iter().for_each(|t| t.set(why));
        }
    }

    fn free(
        &mut self,
        lvol: Arc<LvolCore>,
        blob: u32,
        index: u32,
        count: u32,
        ticket: Arc<Ticket>,
    ) {
        let clusters: Vec<u32> = {
            let s = lock(&self.core.state);
            s.blobs
                .get(&blob)
                .map(|b| {
                    let end = index.saturating_add(count);
                    b.map.range(index..end).map(|(_, &c)| c).collect()
                })
                .unwrap_or_default()
        };
        if clusters.is_empty() {
            ticket.set(Ticket::DONE);
            return;
        }
        self.commit(
            vec![Op::Free { blob, index, count }],
            Box::new(move |svc, r| {
                if r.is_err() {
                    ticket.set(Ticket::FAILED);
                    return;
                }
                if let Some(v) = lock(&svc.core.views).get(&blob) {
                    for i in index..index + count {
                        if let Some(m) = v.map.get(i as usize) {
                            m.store(UNALLOCATED, Ordering::Release);
                        }
                    }
                }
                // Writes that looked the clusters up before this may still be landing.
                svc.reserved.extend(clusters.iter().copied());
                let epoch = lvol.flip_epoch();
                svc.quarantine.push(Quarantine {
                    lvol,
                    epoch,
                    clusters,
                });
                ticket.set(Ticket::DONE);
            }),
        );
    }

    fn release_quarantine(&mut self) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quarantine)
            .into_iter()
            .partition(|q| q.lvol.drained(q.epoch));
        self.quarantine = keep;
        for q in done {
            for c in q.clusters {
                self.reserved.remove(&c);
            }
        }
    }

    /// Freezes `lvol`'s I/O, waits for what is in flight, then runs `then` (which unfreezes).
    pub fn quiesce(&mut self, lvol: Arc<LvolCore>, then: Box<dyn FnOnce(&mut Service) + Send>) {
        lvol.freeze(true);
        let epoch = lvol.flip_epoch();
        self.quiescing.push(Quiesce { lvol, epoch, then });
    }

    fn check_quiescing(&mut self) {
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quiescing)
            .into_iter()
            .partition(|q| q.lvol.drained(q.epoch));
        self.quiescing = keep;
        for q in ready {
            (q.then)(self);
        }
    }

    fn io_done(&mut self, c: IoCompletion) {
        let Some(m) = self.ops.remove(&c.tag) else {
            return;
        };
        match m {
            Meta::Journal => self.journal_done(c.status),
            Meta::Checkpoint => self.checkpoint_written(c.status),
            Meta::Superblock => self.superblock_written(c.status),
            Meta::CheckpointFlush => self.checkpoint_flushed(c.status),
            Meta::SuperblockFlush => self.superblock_flushed(c.status),
            Meta::Fill { key, read } => self.fill_done(key, read, c),
        }
    }

    /// Stops the poller once nothing is in flight (store deleted or unloaded).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    pub fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.queue.is_empty() && self.writing.is_none()
    }
}
