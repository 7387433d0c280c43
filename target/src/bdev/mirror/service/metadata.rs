//! Writing the mirror's metadata: header rounds to the superblocks of the plexes taking
//! writes, and bitmap chunks as writes dirty their regions and clearing cleans them.

use super::*;

impl Service {
    /// The plex table as the superblocks keep it (tombstones of removed plexes left out).
    fn records(&self) -> Vec<PlexRecord> {
        self.core
            .plexes()
            .iter()
            .filter(|p| !p.is_removed())
            .map(|p| PlexRecord {
                uuid: p.uuid,
                node: p.node.clone(),
                location: p.location.clone(),
                state: p.condition().on_disk(),
                in_sync_generation: p.in_sync_generation.load(Ordering::Acquire),
            })
            .collect()
    }

    /// The header for plex `this` at the current generation.
    pub fn header_for(&self, this: &Plex, seq: u64, clean: bool) -> Option<Vec<u8>> {
        let core = &self.core;
        // `new` starts at generation 1; the table goes in once the generation is set.
        let records = self.records();
        let at_one: Vec<PlexRecord> = records
            .iter()
            .map(|r| PlexRecord {
                in_sync_generation: r.in_sync_generation.min(1),
                ..r.clone()
            })
            .collect();
        // A round that grows the mirror records the new size; the data path keeps the old one
        // until the round is on disk.
        let layout = match &self.header.growth_in_flight {
            Some(g) => g.layout,
            None => core.layout(),
        };
        let mut sb = Superblock::new(core.uuid, &core.name, this.uuid, &layout, at_one)
            .map_err(|e| tracing::error!("mirror {}: cannot build a superblock: {e}", core.name))
            .ok()?;
        sb.plexes = records;
        sb.seq = seq;
        sb.generation = core.generation.load(Ordering::Acquire);
        sb.clean = clean;
        let mut bytes = sb
            .encode()
            .map_err(|e| tracing::error!("mirror {}: cannot encode its superblock: {e}", core.name))
            .ok()?;
        let slot_bytes =
            (core.layout().slot_blocks() * u64::from(core.layout().block_size())) as usize;
        bytes.resize(slot_bytes, 0);
        Some(bytes)
    }

    pub(super) fn start_header(&mut self) {
        if self.header.busy || !self.header.wanted {
            return;
        }
        self.header.wanted = false;
        self.header.growth_in_flight = self.header.growth.take();
        let clean = self.header.clean;
        for p in self.core.plexes() {
            if p.role() == Role::Serving {
                p.in_sync_generation.store(
                    self.core.generation.load(Ordering::Acquire),
                    Ordering::Release,
                );
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let slot = Slot::for_seq(seq);
        let range = self.core.layout().slot_range(slot);
        let mut pending = 0;
        for (i, p) in self.core.plexes().iter().enumerate() {
            if p.role() == Role::Idle {
                continue;
            }
            let Some(bytes) = self.header_for(p, seq, clean) else {
                continue;
            };
            let Some(buf) = dma_copy(&bytes) else {
                continue;
            };
            let io = BdevIo::write(
                range.start,
                range.end - range.start,
                smallvec::smallvec![buf],
                0,
            );
            if self.submit(i, io, Op::Header { plex: i }) {
                pending += 1;
            }
        }
        self.header.waiters = std::mem::take(&mut self.header.next_waiters);
        self.header.busy = true;
        self.header.pending = pending;
        self.header.serving_ok = 0;
        self.header.ticket_in_flight = self.header.ticket_wanted;
        if pending == 0 {
            self.header_round_done();
        }
    }

    pub(super) fn header_round_done(&mut self) {
        self.header.busy = false;
        let core = &self.core;
        if self.header.serving_ok == 0 && !core.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "mirror {}: no plex took the superblock; the mirror has failed",
                core.name
            );
        }
        core.faults_recorded
            .fetch_max(self.header.ticket_in_flight, Ordering::AcqRel);
        let ok = self.header.serving_ok > 0;
        if let Some(g) = self.header.growth_in_flight.take() {
            self.grown(g, ok);
        }
        for tx in self.header.waiters.drain(..) {
            let _ = tx.send(ok);
        }
        if self.header.clean && !self.header.wanted {
            if let Some(tx) = self.header.on_clean.take() {
                let _ = tx.send(());
            }
        }
    }

    // ---- bitmap ----------------------------------------------------------------------------

    pub(super) fn start_chunks(&mut self) {
        let wanted: Vec<u32> = self
            .chunks_wanted
            .iter()
            .copied()
            .filter(|c| !self.chunks_busy.contains_key(c))
            .collect();
        for c in wanted {
            self.chunks_wanted.remove(&c);
            let layout = self.core.layout();
            let regions = layout.regions_in_chunk(c);
            let words = (regions.start / 64) as usize..(regions.end.div_ceil(64)) as usize;
            let snap = self.core.intent.dirty.snapshot(words);
            let Ok(bytes) = superblock::encode_chunk(self.core.uuid, c, &snap, layout.block_size())
            else {
                continue;
            };
            let mut pending = 0;
            for (i, p) in self.core.plexes().iter().enumerate() {
                if p.role() == Role::Idle {
                    continue;
                }
                let Some(buf) = dma_copy(&bytes) else {
                    continue;
                };
                let io = BdevIo::write(layout.chunk_block(c), 1, smallvec::smallvec![buf], 0);
                if self.submit(i, io, Op::Chunk { chunk: c, plex: i }) {
                    pending += 1;
                }
            }
            let cw = ChunkWrite {
                words: snap,
                first_region: regions.start,
                pending,
            };
            if pending == 0 {
                self.chunk_on_disk(&cw);
            } else {
                self.chunks_busy.insert(c, cw);
            }
        }
    }

    pub(super) fn chunk_on_disk(&self, cw: &ChunkWrite) {
        let intent = &self.core.intent;
        for (wi, w) in cw.words.iter().enumerate() {
            let mut v = *w;
            while v != 0 {
                let r = cw.first_region + wi as u64 * 64 + v.trailing_zeros() as u64;
                v &= v - 1;
                if r < intent.regions() {
                    intent.on_disk.set(r);
                }
            }
        }
    }

    /// Clears regions that are the same everywhere and have no write in flight.
    pub(super) fn clear_idle_regions(&mut self) {
        let plexes = self.core.plexes();
        let all_in_sync = plexes
            .iter()
            .filter(|p| !p.is_removed())
            .all(|p| p.role() == Role::Serving);
        if !all_in_sync || self.resync.is_some() || self.core.failed.load(Ordering::Acquire) {
            return;
        }
        let intent = &self.core.intent;
        let dirty: Vec<u64> = intent.dirty.iter_set().collect();
        // Counted before any bit goes (see `Core::bitmap_writes_pending`); made exact at the
        // end of the pass.
        self.core.bitmap_writes_pending.store(
            self.bitmap_chunks_unwritten() + dirty.len() as u64,
            Ordering::SeqCst,
        );
        for r in dirty {
            let c = self.core.layout().chunk_of(r);
            if self.chunks_busy.contains_key(&c) || self.chunks_wanted.contains(&c) {
                continue;
            }
            if intent.try_clear(r) {
                self.chunks_wanted.insert(c);
            }
        }
    }
}
