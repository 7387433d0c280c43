//! Resync: one plex at a time, region by region from a serving plex, each region locked
//! against writes while it is copied, rate-limited, its progress saved as it goes.

use super::*;

impl Service {
    fn pick_resync(&mut self) -> Option<Resync> {
        let plexes = self.core.plexes();
        let target = plexes
            .iter()
            .position(|p| matches!(p.condition(), Condition::OutOfSync { .. }) && p.is_up())?;
        if self.legs.get(target).is_none_or(Option::is_none) {
            return None;
        }
        let source = plexes
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                p.role() == Role::Serving && self.legs.get(*i).is_some_and(Option::is_some)
            })
            .min_by_key(|(_, p)| !p.is_local())
            .map(|(i, _)| i)?;
        let t = &plexes[target];
        let Condition::OutOfSync { since, why } = t.condition() else {
            return None;
        };
        let intent = &self.core.intent;
        // An interrupted copy resumes where it stood: all regions from there if the plex was
        // never in sync (a new plex's full copy), else the marked ones from there (the bits of
        // regions a plex missed stay set until every plex is in sync again).
        let never_in_sync = t.in_sync_generation.load(Ordering::Acquire) == 0;
        let (full, start) = match &why {
            Behind::New => (true, 0),
            Behind::Interrupted { next_region } => (never_in_sync, *next_region),
            _ => (false, 0),
        };
        // Writes reach the plex from now on, so what is copied stays current.
        t.set_role(Role::WriteOnly);
        let regions: Vec<u64> = if full {
            (start..intent.regions()).collect()
        } else {
            intent.dirty.iter_set().filter(|&r| r >= start).collect()
        };
        tracing::info!(
            "mirror {}: resync of plex {} ({}) from {} starts: {} of {} regions ({})",
            self.core.name,
            t.uuid,
            t.location,
            plexes[source].location,
            regions.len(),
            intent.regions(),
            if full {
                "full copy"
            } else {
                "regions written while it was out"
            }
        );
        t.set_condition(Condition::Resyncing {
            since,
            why,
            progress: ResyncProgress {
                full,
                regions_total: regions.len() as u64,
                next_region: regions.first().copied().unwrap_or(intent.regions()),
                ..Default::default()
            },
        });
        self.header.wanted = true;
        let now = now_ns();
        Some(Resync {
            target,
            source,
            regions,
            next: 0,
            finished: 0,
            active: Vec::new(),
            started_ns: now,
            bytes: 0,
            last_progress_ns: now,
        })
    }

    /// Advances resync by what can be done now; true if it did anything.
    pub(super) fn step_resync(&mut self) -> bool {
        if self.resync.is_none() {
            let now = now_ns();
            if self.core.failed.load(Ordering::Acquire) || now - self.last_pick_ns < PICK_EVERY_NS {
                return false;
            }
            self.last_pick_ns = now;
            self.resync = self.pick_resync();
            return self.resync.is_some();
        }
        let core = self.core.clone();
        let rs = self.resync.as_mut().expect("checked");
        if rs.next >= rs.regions.len() && rs.active.is_empty() {
            return self.finish_resync();
        }
        let rate = core.resync_rate.load(Ordering::Relaxed);
        let over_rate = rate > 0 && {
            let elapsed = now_ns().saturating_sub(rs.started_ns).max(1);
            rs.bytes as u128 * SEC as u128 > rate as u128 * elapsed as u128
        };
        if over_rate {
            crate::reactor::wake_by(now_ns() + SEC / 100);
        } else {
            while rs.active.len() < COPY_WINDOW && rs.next < rs.regions.len() {
                rs.active.push(Copy {
                    region: rs.regions[rs.next],
                    done: 0,
                    step: CopyStep::Locking,
                });
                rs.next += 1;
            }
        }
        let locked: Vec<u64> = rs
            .active
            .iter_mut()
            .filter(|c| c.step == CopyStep::Locking && core.intent.try_lock(c.region))
            .map(|c| c.region)
            .collect();
        let waiting = rs.active.iter().any(|c| c.step == CopyStep::Locking);
        for r in &locked {
            self.copy_next_piece(*r);
        }
        !locked.is_empty() || waiting
    }

    /// Reads the next piece of region `r` (locked) from the source.
    fn copy_next_piece(&mut self, r: u64) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let Some(c) = rs.active.iter_mut().find(|c| c.region == r) else {
            return;
        };
        let range = core.layout().region_range(r);
        let bs = u64::from(core.layout().block_size());
        let start = range.start + c.done;
        let n = (range.end - start).min(COPY_PIECE / bs).max(1);
        let Ok(buf) = BufView::new((n * bs) as usize) else {
            // No memory now: let the region go and try it again on a later pass.
            core.intent.unlock(r);
            c.step = CopyStep::Locking;
            return;
        };
        c.step = CopyStep::Reading;
        let io = BdevIo::read(core.plex_block(start), n, smallvec::smallvec![buf], 0);
        let source = rs.source;
        if !self.submit(source, io, Op::CopyRead { region: r }) {
            self.abort_resync("the source plex refused a read");
        }
    }

    pub(super) fn copy_done(&mut self, plex: usize, r: u64, c: IoCompletion) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let Some(copy) = rs.active.iter_mut().find(|x| x.region == r) else {
            return;
        };
        if !c.status.is_ok() {
            let why = FaultReason::IoFailed {
                io_type: c.io_type,
                status: c.status,
            };
            let t = core.fault(plex, why);
            self.header.ticket_wanted = self.header.ticket_wanted.max(t);
            self.abort_resync("a copy I/O failed");
            return;
        }
        let at = core.plex_block(core.layout().region_range(r).start + copy.done);
        match copy.step {
            CopyStep::Reading => {
                copy.step = CopyStep::Writing;
                let io = BdevIo::write(at, c.num_blocks, c.bufs, 0);
                let target = rs.target;
                if !self.submit(target, io, Op::CopyWrite { region: r }) {
                    self.abort_resync("the plex being resynced refused a write");
                }
            }
            CopyStep::Writing => {
                rs.bytes += c.num_blocks * u64::from(core.layout().block_size());
                copy.done += c.num_blocks;
                let range = core.layout().region_range(r);
                if range.start + copy.done < range.end {
                    self.copy_next_piece(r);
                    return;
                }
                core.intent.unlock(r);
                rs.active.retain(|x| x.region != r);
                rs.finished += 1;
                self.note_progress();
            }
            CopyStep::Locking => {}
        }
    }

    fn note_progress(&mut self) {
        let core = self.core.clone();
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let now = now_ns();
        // The average since the copy began: regions finish in bursts (four at a time, and a
        // rate limit lets them go in steps), so a short window swings by 10x.
        let elapsed = now.saturating_sub(rs.started_ns).max(1);
        let rate = (rs.bytes as u128 * SEC as u128 / elapsed as u128) as u64;
        let next = rs.resume_point(core.intent.regions());
        let (done, bytes) = (rs.finished as u64, rs.bytes);
        if let Some(t) = core.plex(rs.target) {
            t.update_progress(|p| {
                p.regions_done = done;
                p.next_region = next;
                p.bytes_copied = bytes;
                if rate > 0 {
                    p.rate_bps = rate;
                }
            });
        }
        if now - rs.last_progress_ns >= PROGRESS_EVERY_NS {
            rs.last_progress_ns = now;
            self.header.wanted = true;
        }
    }

    fn finish_resync(&mut self) -> bool {
        let rs = self.resync.take().expect("resync running");
        let core = self.core.clone();
        let Some(t) = core.plex(rs.target) else {
            return false;
        };
        let secs = (now_ns() - rs.started_ns) as f64 / SEC as f64;
        tracing::info!(
            "mirror {}: plex {} ({}) is in sync: {} regions, {} bytes copied in {secs:.1} s",
            core.name,
            t.uuid,
            t.location,
            rs.regions.len(),
            rs.bytes
        );
        if let Condition::Resyncing { mut progress, .. } = t.condition() {
            progress.regions_done = rs.regions.len() as u64;
            progress.bytes_copied = rs.bytes;
            progress.next_region = core.intent.regions();
            progress.duration_ms = (now_ns() - rs.started_ns) / 1_000_000;
            *lock(&t.last_resync) = Some(progress);
        }
        t.set_condition(Condition::InUse);
        t.set_role(Role::Serving);
        core.generation.fetch_add(1, Ordering::AcqRel);
        if !core.fenced.load(Ordering::Acquire) {
            core.failed.store(false, Ordering::Release);
        }
        self.header.wanted = true;
        true
    }

    pub(super) fn abort_resync(&mut self, why: &str) {
        let Some(rs) = self.resync.take() else { return };
        for c in &rs.active {
            self.core.intent.unlock(c.region);
        }
        let core = &self.core;
        if let Some(t) = core.plex(rs.target) {
            tracing::warn!(
                "mirror {}: resync of plex {} stopped: {why}",
                core.name,
                t.uuid
            );
            if let Condition::Resyncing {
                since,
                why,
                progress,
            } = t.condition()
            {
                // Not faulted itself (the source was): it waits for the next resync, resuming.
                let why = match why {
                    Behind::New if progress.next_region == 0 => Behind::New,
                    Behind::New | Behind::Interrupted { .. } => Behind::Interrupted {
                        next_region: progress.next_region,
                    },
                    other => other,
                };
                t.set_role(Role::Idle);
                t.set_condition(Condition::OutOfSync { since, why });
            }
        }
        self.header.wanted = true;
    }

    /// The bytes a running resync has copied and how far it is, for tests and the table.
    pub fn resync_bytes(&self) -> Option<u64> {
        self.resync.as_ref().map(|r| r.bytes)
    }
}
