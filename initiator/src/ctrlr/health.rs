//! A controller at run time: its admin queue polled (keep-alive, async events, aborts), its
//! health checked, and its failure handled: reset, reconnect, or failed for good.

use super::*;

impl Controller {
    /// Drives keep-alive, asynchronous events, aborts requested by qpairs, and the
    /// reset/reconnect state machine. Returns true if it did anything.
    pub fn poll(&mut self) -> bool {
        if self.detached {
            return false;
        }
        let now = Instant::now();
        match self.state() {
            CtrlrState::Failed => false,
            CtrlrState::Resetting | CtrlrState::Reconnecting => {
                self.update_down_timers(now);
                if now < self.next_attempt || self.state() == CtrlrState::Failed {
                    return false;
                }
                self.try_reconnect(now);
                true
            }
            CtrlrState::Connected => {
                let mut busy = false;
                let deferred = &mut self.deferred;
                let r = self
                    .admin
                    .poll(usize::MAX, &mut |d: Done<Vec<u8>>| deferred.push(d));
                if let Err(e) = r {
                    self.start_reset(&format!("admin connection: {e}"));
                    return true;
                }
                for d in std::mem::take(&mut self.deferred) {
                    busy = true;
                    self.handle_async(d);
                }
                if self.shared.reset_req.swap(false, Ordering::AcqRel) {
                    self.start_reset("requested by an I/O queue");
                    return true;
                }
                if now.duration_since(self.last_health) >= HEALTH_CHECK {
                    self.last_health = now;
                    if self.check_health() {
                        return true;
                    }
                }
                for setup in self.admin.take_queue_setups() {
                    busy = true;
                    let qid = setup.qid;
                    if let Err(e) = self.run_queue_setup(setup.deletes, setup.creates) {
                        warn!(qid, "I/O queue not created again after the reset: {e}");
                        self.start_reset("an I/O queue could not be created again");
                        return true;
                    }
                    self.admin.queue_set_up(qid);
                }
                while let Some((qid, cid)) = self.shared.take_abort() {
                    busy = true;
                    if self
                        .admin
                        .submit(Command::abort(qid, cid), Dir::None, None, TAG_ABORT)
                        .is_err()
                    {
                        self.start_reset("admin queue full while aborting");
                        return true;
                    }
                }
                if !self.kato.is_zero() {
                    if let Some(sent) = self.ka_sent {
                        if now.duration_since(sent) > self.kato {
                            self.start_reset("keep-alive not answered within KATO");
                            return true;
                        }
                    } else if now.duration_since(self.last_ka) >= self.kato / 2
                        && self
                            .admin
                            .submit(Command::keep_alive(), Dir::None, None, TAG_KA)
                            .is_ok()
                    {
                        self.ka_sent = Some(now);
                        busy = true;
                    }
                }
                if let Err(e) = self.admin.flush() {
                    self.start_reset(&format!("admin connection: {e}"));
                }
                busy
            }
        }
    }

    fn handle_async(&mut self, d: Done<Vec<u8>>) {
        match d.tag {
            TAG_KA => {
                self.ka_sent = None;
                self.last_ka = Instant::now();
                if !d.status.is_success() {
                    warn!("Keep Alive failed: {}", d.status);
                }
            }
            TAG_AER => {
                self.aer_outstanding = false;
                if !d.status.is_success() {
                    // Aborted at reset, or the controller has no AER slots: do not re-arm.
                    debug!("AER completed with {}", d.status);
                    return;
                }
                let ty = (d.dw0 & 0x7) as u8;
                let info = ((d.dw0 >> 8) & 0xff) as u8;
                let lid = ((d.dw0 >> 16) & 0xff) as u8;
                debug!(ty, info, lid, "asynchronous event");
                if ty == 2 && info == 0 {
                    // Namespace attribute changed: read (and so clear) the Changed Namespace
                    // List, then rescan.
                    let _ = self.admin_cmd(
                        Command::get_log_page(0xffff_ffff, 0x04, 0, false, 4096, 0),
                        Dir::ToHost,
                        Some(vec![0u8; 4096]),
                    );
                    self.rescan();
                } else {
                    if lid != 0 {
                        // Reading the log page re-enables this event type.
                        let _ = self.admin_cmd(
                            Command::get_log_page(0xffff_ffff, lid, 0, false, 512, 0),
                            Dir::ToHost,
                            Some(vec![0u8; 512]),
                        );
                    }
                    self.events.push_back(CtrlrEvent::Aen {
                        ty,
                        info,
                        log_page: lid,
                    });
                }
                self.submit_aer();
            }
            TAG_ABORT if !d.status.is_success() => {
                warn!("Abort failed ({}): resetting", d.status);
                self.shared.reset_req.store(true, Ordering::Release);
            }
            _ => {}
        }
    }

    pub(super) fn submit_aer(&mut self) {
        if !self.aer_outstanding
            && self
                .admin
                .submit(Command::async_event_request(), Dir::None, None, TAG_AER)
                .is_ok()
        {
            self.aer_outstanding = true;
        }
    }

    /// Re-reads the namespace list and reports differences.
    pub fn rescan(&mut self) {
        match self.scan_namespaces() {
            Ok(new) => self.apply_namespaces(new),
            Err(e) => warn!("namespace rescan failed: {e}"),
        }
    }

    pub(super) fn apply_namespaces(&mut self, new: Vec<Namespace>) {
        let old = &self.namespaces;
        let added: Vec<u32> = new
            .iter()
            .filter(|n| !old.iter().any(|o| o.nsid == n.nsid))
            .map(|n| n.nsid)
            .collect();
        let removed: Vec<u32> = old
            .iter()
            .filter(|o| !new.iter().any(|n| n.nsid == o.nsid))
            .map(|o| o.nsid)
            .collect();
        let resized: Vec<u32> = new
            .iter()
            .filter(|n| old.iter().any(|o| o.nsid == n.nsid && o != *n))
            .map(|n| n.nsid)
            .collect();
        self.namespaces = new;
        if !(added.is_empty() && removed.is_empty() && resized.is_empty()) {
            info!(?added, ?removed, ?resized, "namespaces changed");
            self.events.push_back(CtrlrEvent::NamespacesChanged {
                added,
                removed,
                resized,
            });
        }
    }

    // ------------------------------------------------------------------ failure handling

    fn set_state(&mut self, s: CtrlrState) {
        if self.shared.state() != s {
            self.shared.set_state(s);
            self.events.push_back(CtrlrEvent::State(s));
        }
    }

    /// Tears down the association; qpairs drop their connections and wait.
    fn start_reset(&mut self, why: &str) {
        warn!(trid = %self.trid, "controller reset: {why}");
        self.admin.disconnect();
        let mut sink = |_d: Done<Vec<u8>>| {};
        self.admin.fail_all(Status::ABORTED_SQ_DELETION, &mut sink);
        self.aer_outstanding = false;
        self.ka_sent = None;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.down_since.get_or_insert_with(Instant::now);
        self.next_attempt = Instant::now();
        self.set_state(CtrlrState::Resetting);
    }

    /// For a controller whose registers we map (no keep-alive tells us it is gone): reads
    /// CSTS. All ones means the device is gone (surprise removal): the controller fails at
    /// once and its I/O with it. CSTS.CFS (a fatal controller error), or RDY clear on a
    /// controller we enabled (reset behind our back, or its BAR no longer decoded), starts a
    /// reset. Returns whether any of these happened.
    fn check_health(&mut self) -> bool {
        let Some(csts) = self.admin.registers().map(|r| Csts(r.read32(reg::CSTS))) else {
            return false;
        };
        if csts.0 == u32::MAX {
            warn!(trid = %self.trid, "registers read all ones: the device was removed; controller failed");
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            self.fail();
            return true;
        }
        if csts.cfs() {
            self.start_reset("CSTS.CFS: the controller reported a fatal status");
            return true;
        }
        if !csts.rdy() {
            self.start_reset("CSTS.RDY cleared: the controller stopped without being told to");
            return true;
        }
        false
    }

    fn update_down_timers(&mut self, now: Instant) {
        let Some(since) = self.down_since else { return };
        let down = now.duration_since(since);
        if let Some(t) = self.opts.fast_io_fail_timeout {
            if down >= t && !self.shared.fail_io.swap(true, Ordering::AcqRel) {
                warn!(trid = %self.trid, "fast_io_fail_timeout passed: failing I/O");
            }
        }
        if let Some(t) = self.opts.ctrlr_loss_timeout {
            // With ctrlr_loss_timeout 0 only the immediate reset attempt is made.
            if down >= t && self.state() == CtrlrState::Reconnecting {
                warn!(trid = %self.trid, "ctrlr_loss_timeout passed: controller failed");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.shared.fail_io.store(true, Ordering::Release);
        self.admin.disconnect();
        self.set_state(CtrlrState::Failed);
    }

    fn try_reconnect(&mut self, now: Instant) {
        match self.bring_up() {
            Ok(()) => {
                info!(trid = %self.trid, "controller reconnected");
                self.down_since = None;
                self.shared.fail_io.store(false, Ordering::Release);
                self.shared.reset_req.store(false, Ordering::Release);
                self.set_state(CtrlrState::Connected);
            }
            Err(e) => {
                warn!(trid = %self.trid, "reconnect failed: {e}");
                self.admin.disconnect();
                self.next_attempt = now + self.opts.reconnect_delay;
                self.set_state(CtrlrState::Reconnecting);
                self.update_down_timers(Instant::now());
            }
        }
    }

    /// Forces a reset now (as `bdev_nvme_reset_controller` does).
    pub fn reset(&mut self) {
        if self.state() != CtrlrState::Failed {
            self.start_reset("requested by the owner");
        }
    }

    /// Normal shutdown (CC.SHN), then disconnect. I/O queue pairs fail their I/O afterwards.
    pub fn detach(mut self) -> Result<()> {
        self.shutdown()
    }

    pub(super) fn shutdown(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        self.shared.fail_io.store(true, Ordering::Release);
        let res = if self.state() == CtrlrState::Connected && !self.trid.is_discovery() {
            (|| {
                let cur = Cc(self.prop_get(reg::CC, false)? as u32);
                self.prop_set(reg::CC, u64::from(cur.with_shn(shutdown::SHN_NORMAL).0))?;
                self.wait_csts(
                    |s| s.shst() == shutdown::SHST_COMPLETE,
                    Duration::from_secs(5),
                    "CSTS.SHST shutdown complete",
                )
                .map(|_| ())
            })()
        } else {
            Ok(())
        };
        // A PCIe controller is also disabled, shut down cleanly or not: then it has no queue
        // left to fetch from or complete into once the process's memory is unmapped.
        let res = match self.admin.registers().map(|dev| dev.disable()) {
            Some(Err(e)) if res.is_ok() => Err(e),
            _ => res,
        };
        self.admin.disconnect();
        self.shared.set_state(CtrlrState::Failed);
        res
    }
}
