//! Bringing a controller up: enable and wait for ready, Identify, the features and queues it
//! gets, and the namespace scan; the admin-command and property helpers they use.

use super::*;

impl Controller {
    pub(super) fn bring_up(&mut self) -> Result<()> {
        self.admin.disconnect();
        self.aer_outstanding = false;
        self.ka_sent = None;
        let cntlid = self.admin.connect(0xffff)?;
        self.info.cntlid = cntlid;
        let digests = self.admin.digests();
        self.info.hdgst = digests.hdgst;
        self.info.ddgst = digests.ddgst;
        self.info.digests = digests;

        self.cap = self.prop_get(reg::CAP, true)?;
        let vs = self.prop_get(reg::VS, false)? as u32;
        self.info.version = format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff);
        let cap = Cap(self.cap);
        if cap.max_queue_entries() < 2 {
            // MQES 0 is invalid: no queue could hold a command and leave a slot empty.
            return Err(Error::Protocol(
                "CAP.MQES is 0: no queue can be made".into(),
            ));
        }
        self.info.max_queue_entries = cap.max_queue_entries();
        let to = Duration::from_millis(u64::from(cap.timeout_ms().max(500)));

        // A fresh association starts disabled; if not, disable first (CC.EN 1 -> 0).
        let cur = Cc(self.prop_get(reg::CC, false)? as u32);
        if cur.en() {
            self.prop_set(reg::CC, u64::from(cur.with_en(false).0))?;
            self.wait_csts(|s| !s.rdy(), to, "CSTS.RDY = 0")?;
        }
        self.prop_set(reg::CC, u64::from(Cc::enable_default().0))?;
        self.wait_csts(|s| s.rdy(), to, "CSTS.RDY = 1 (CAP.TO)")?;

        let data = self.admin_cmd(
            Command::identify(cns::CONTROLLER, 0, 0, 0),
            Dir::ToHost,
            Some(vec![0u8; 4096]),
        )?;
        let id = IdentifyController::read_from_prefix(&data.1.unwrap_or_default())
            .map(|(id, _)| id)
            .map_err(|_| Error::Protocol("short Identify Controller data".into()))?;
        self.absorb_identify(&id);
        let sgls = if self.opts.pcie_sgl { id.sgls.get() } else { 0 };
        self.admin.use_sgls(sgls);
        self.info.sgls = sgls & nvme_spec::identify::sgls::SUPPORT_MASK != 0;
        self.info.shadow_doorbells = false;
        let shadow_offered = id.oacs.get() & oacs::DOORBELL_BUFFER_CONFIG != 0;

        let discovery = self.trid.is_discovery() || id.cntrltype == 3;
        if !discovery {
            // Ask for namespace attribute notices first, so that no change after the scan
            // below goes unnoticed; a target that refuses still works.
            if let Err(e) =
                self.admin_cmd(Command::set_features(0x0B, 1 << 8, false), Dir::None, None)
            {
                debug!("Set Features Async Event Configuration: {e}");
            }
            // Scanned before Number of Queues, which may depend on how many there are.
            let nss = self.scan_namespaces()?;
            let want = match self.opts.io_queues_per_namespace {
                0 => self.opts.num_io_queues.max(1),
                per_ns => (nss.len().max(1) * usize::from(per_ns)).clamp(1, 1024) as u16,
            };
            let v = u32::from(want - 1) | (u32::from(want - 1) << 16);
            let (dw0, _) =
                self.admin_cmd(Command::set_features(0x07, v, false), Dir::None, None)?;
            let granted = ((dw0 & 0xffff) + 1)
                .min((dw0 >> 16) + 1)
                .min(u32::from(want)) as u16;
            self.info.io_queues = granted;
            // Before any I/O queue exists, and once it is known how many there can be.
            if shadow_offered {
                self.config_shadow_doorbells(granted);
            }
            // Diffed against what we knew, so a reconnect reports namespaces that came, went
            // or changed size while the controller was away.
            self.apply_namespaces(nss);
            self.submit_aer();
        }
        self.last_ka = Instant::now();
        self.shared
            .cntlid
            .store(u32::from(cntlid), Ordering::Release);
        info!(
            trid = %self.trid,
            cntlid,
            model = %self.info.model,
            namespaces = self.namespaces.len(),
            io_queues = self.info.io_queues,
            "controller ready"
        );
        Ok(())
    }

    /// Hands the controller our shadow doorbell pages (before any I/O queue exists on this
    /// enable); without them, or if it refuses, queues write the registers alone. Not where
    /// the pages cannot hold the words of queues 1..=`max_qid` at the controller's doorbell
    /// stride: the controller would read, and write EventIdx, past them.
    fn config_shadow_doorbells(&mut self, max_qid: u16) {
        let Some((doorbells, event_idx)) = self.admin.shadow_doorbell_pages(max_qid) else {
            return;
        };
        let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
        cmd.set_prps(doorbells, event_idx);
        match self.admin_cmd(cmd, Dir::None, None) {
            Ok(_) => {
                self.admin.use_shadow_doorbells();
                self.info.shadow_doorbells = true;
            }
            Err(e) => debug!("Doorbell Buffer Config: {e}; doorbell registers only"),
        }
    }

    fn absorb_identify(&mut self, id: &IdentifyController) {
        let mpsmin = Cap(self.cap).min_page_size();
        let mdts = id.max_transfer_bytes(mpsmin).unwrap_or(MAX_XFER_CAP);
        // What one command may carry: the controller's MDTS, within what this transport's
        // queues take (PCIe: 2 MiB of PRPs; RDMA: a slot's registered region).
        self.info.max_transfer = (mdts.min(MAX_XFER_CAP) as u32).min(self.admin.transfer_limit());
        let ioccsz = u64::from(id.ioccsz.get()) * 16;
        self.info.in_capsule_data = ioccsz.saturating_sub(64).min(1 << 20) as u32;
        self.info.kas_ms = u32::from(id.kas.get()) * 100;
        self.info.serial = id.serial().unwrap_or("?").to_string();
        self.info.model = id.model().unwrap_or("?").to_string();
        self.info.firmware = id.firmware_rev().unwrap_or("?").to_string();
        self.info.subnqn = id.subnqn_str().unwrap_or("?").to_string();
        if id.sgls.get() & 0x3 == 0 && self.admin.registers().is_none() {
            warn!("controller reports no SGL support; NVMe over Fabrics requires it");
        }
    }

    /// A controller register: read from memory where the transport maps them (PCIe), else
    /// with Fabrics Property Get.
    pub(super) fn prop_get(&mut self, offset: u32, eight: bool) -> Result<u64> {
        if let Some(r) = self.admin.registers() {
            return Ok(if eight {
                r.bar.read64(offset as usize)
            } else {
                u64::from(r.read32(offset))
            });
        }
        let size = if eight {
            PropertySize::Eight
        } else {
            PropertySize::Four
        };
        let cmd = PropertyGet { size, offset }.to_command(0);
        let (lo, hi, _) = self.admin_cmd_full(cmd, Dir::None, None)?;
        Ok(if eight {
            u64::from(lo) | (u64::from(hi) << 32)
        } else {
            u64::from(lo)
        })
    }

    pub(super) fn prop_set(&mut self, offset: u32, value: u64) -> Result<()> {
        if let Some(r) = self.admin.registers() {
            r.write32(offset, value as u32);
            return Ok(());
        }
        let cmd = PropertySet {
            size: PropertySize::Four,
            offset,
            value,
        }
        .to_command(0);
        self.admin_cmd(cmd, Dir::None, None).map(|_| ())
    }

    pub(super) fn wait_csts(
        &mut self,
        ok: impl Fn(Csts) -> bool,
        to: Duration,
        what: &'static str,
    ) -> Result<Csts> {
        let deadline = Instant::now() + to;
        loop {
            let s = Csts(self.prop_get(reg::CSTS, false)? as u32);
            if s.cfs() {
                return Err(Error::Protocol("controller fatal status (CSTS.CFS)".into()));
            }
            if ok(s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(what));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one admin command to completion (control path). Fails on non-success status.
    pub(super) fn admin_cmd(
        &mut self,
        cmd: Command,
        dir: Dir,
        buf: Option<Vec<u8>>,
    ) -> Result<(u32, Option<Vec<u8>>)> {
        let (dw0, _, b) = self.admin_cmd_full(cmd, dir, buf)?;
        Ok((dw0, b))
    }

    fn admin_cmd_full(
        &mut self,
        cmd: Command,
        dir: Dir,
        buf: Option<Vec<u8>>,
    ) -> Result<(u32, u32, Option<Vec<u8>>)> {
        let name = cmd.opcode_name(true);
        let name = if cmd.is_fabrics() {
            "Fabrics command"
        } else {
            name
        };
        if self.admin.submit(cmd, dir, buf, TAG_SYNC).is_err() {
            return Err(Error::Unsupported("admin queue full".into()));
        }
        let deadline = Instant::now() + self.opts.admin_timeout;
        loop {
            let mut mine = None;
            let deferred = &mut self.deferred;
            self.admin.poll(usize::MAX, &mut |d: Done<Vec<u8>>| {
                if d.tag == TAG_SYNC {
                    mine = Some(d);
                } else {
                    deferred.push(d);
                }
            })?;
            if let Some(d) = mine {
                if !d.status.is_success() {
                    return Err(Error::Nvme {
                        cmd: name,
                        status: d.status,
                    });
                }
                // Property Get returns 8-byte values in DW0 (low) and DW1 (high).
                return Ok((d.dw0, d.dw1, d.buf));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.admin.disconnect();
                return Err(Error::Timeout(name));
            }
            self.admin
                .wait_readable(left.min(Duration::from_millis(50)));
        }
    }

    /// Identify the active namespace list and each namespace.
    pub(super) fn scan_namespaces(&mut self) -> Result<Vec<Namespace>> {
        let mut out = Vec::new();
        let mut after = 0u32;
        loop {
            let (_, b) = self.admin_cmd(
                Command::identify(cns::ACTIVE_NS_LIST, after, 0, 0),
                Dir::ToHost,
                Some(vec![0u8; 4096]),
            )?;
            let b = b.unwrap_or_default();
            let ids: Vec<u32> = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .take_while(|&id| id != 0)
                .collect();
            for &nsid in &ids {
                if nsid <= after {
                    return Err(Error::Protocol(
                        "active namespace list not ascending".into(),
                    ));
                }
                let (_, d) = self.admin_cmd(
                    Command::identify(cns::NAMESPACE, nsid, 0, 0),
                    Dir::ToHost,
                    Some(vec![0u8; 4096]),
                )?;
                let d = d.unwrap_or_default();
                let Ok((ns, _)) = IdentifyNamespace::read_from_prefix(&d) else {
                    return Err(Error::Protocol("short Identify Namespace data".into()));
                };
                let blocks = ns.nsze.get();
                match ns.block_size() {
                    Some(bs) if blocks > 0 && (512..=1 << 16).contains(&bs) => {
                        out.push(Namespace {
                            nsid,
                            blocks,
                            block_size: bs,
                        })
                    }
                    _ => debug!(nsid, blocks, "skipping namespace with no usable LBA format"),
                }
            }
            match ids.last() {
                Some(&last) if ids.len() == 1024 => after = last,
                _ => break,
            }
        }
        Ok(out)
    }
}
