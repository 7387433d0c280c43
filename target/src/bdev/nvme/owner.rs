//! The control-plane owner thread of one controller: bring-up, events, reconnect and the
//! loss timeout, teardown; and `NvmeModule::attach` / `detach`, which start and stop it.

use super::channel::{install_qpair, remove_qpair};
use super::*;
use crate::reactor::ReactorHandle;
use initiator::{Controller, CtrlrEvent};
use std::sync::Weak;
use std::time::Instant;

/// How often the owner thread polls its controller.
const CTRLR_POLL: Duration = Duration::from_millis(5);

impl NvmeModule {
    /// Connects, spreads qpairs over the reactors, registers one bdev per namespace and hands
    /// the controller to its owner thread. Returns the bdev names.
    pub async fn attach(app: &Arc<App>, spec: AttachSpec) -> Result<Vec<String>, NvmeError> {
        let m = &app.nvme;
        let name = spec.name.clone();
        validate_name(&name)?;
        let id = m.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let ctrlr = Arc::new(NvmeCtrlr {
            spec: spec.clone(),
            id,
            published: Mutex::new(Published {
                state: CtrlrState::Resetting,
                info: None,
                bdevs: Vec::new(),
            }),
            cmds: Mutex::new(None),
        });
        {
            // Reserve the name now: two concurrent attaches of one name must not both connect.
            let mut map = m.ctrlrs.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&name) {
                return Err(NvmeError::Exists(name));
            }
            map.insert(name.clone(), ctrlr.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let weak = Arc::downgrade(app);
        let c2 = ctrlr.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("bdev_nvme-{name}"))
            .spawn(move || owner_main(weak, c2, tx));
        let result = match spawned {
            Ok(_) => rx
                .await
                .unwrap_or_else(|_| Err(NvmeError::Internal("controller thread ended".into()))),
            Err(e) => Err(NvmeError::Internal(format!("cannot start a thread: {e}"))),
        };
        match result {
            Ok(names) => {
                m.order.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                Ok(names)
            }
            Err(e) => {
                m.forget(&name, id);
                Err(e)
            }
        }
    }

    /// Removes the controller's bdevs (refused while one is claimed), its qpairs, and shuts
    /// the controller down.
    pub async fn detach(app: &Arc<App>, name: &str) -> Result<(), NvmeError> {
        let c = app
            .nvme
            .get(name)
            .ok_or_else(|| NvmeError::NotFound(name.to_string()))?;
        let sender = c
            .sender()
            .ok_or_else(|| NvmeError::NotFound(format!("{name} (still attaching)")))?;
        // The owner may delete the controller itself meanwhile (ctrlr_loss_timeout_sec): then
        // it is simply not there any more.
        let gone = || NvmeError::NotFound(name.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        sender.send(Cmd::Detach(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())??;
        app.nvme.forget(name, c.id);
        Ok(())
    }
}

impl NvmeModule {
    /// Resets controller `name` (its I/O queues rejoin by themselves), as SPDK's
    /// `bdev_nvme_reset_controller` does.
    pub async fn reset(app: &Arc<App>, name: &str) -> Result<(), NvmeError> {
        let gone = || NvmeError::NotFound(name.to_string());
        let sender = app
            .nvme
            .get(name)
            .and_then(|c| c.sender())
            .ok_or_else(gone)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        sender.send(Cmd::Reset(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Shuts every controller down as plexd exits, after the reactors stopped, and waits up
    /// to `limit` for them. Without this the process would end with PCIe controllers still
    /// enabled and their queues pointing into memory that is about to be unmapped.
    pub fn shutdown_all(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let waits: Vec<(String, mpsc::Receiver<()>)> = self
            .list()
            .iter()
            .filter_map(|c| {
                let sender = c.sender()?;
                let (tx, rx) = mpsc::channel();
                sender.send(Cmd::Exit(tx)).ok()?;
                Some((c.spec.name.clone(), rx))
            })
            .collect();
        for (name, rx) in waits {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(left) {
                tracing::warn!("bdev_nvme {name}: not shut down within {limit:?}; exiting anyway");
            }
        }
    }
}

// ------------------------------------------------------------------------- owner thread

struct Owner {
    app: Weak<App>,
    c: Arc<NvmeCtrlr>,
    ctrlr: Controller,
    bdevs: BTreeMap<u32, (Arc<NvmeBdev>, Arc<BdevEntry>)>,
    /// Namespaces gone while their bdev was claimed: unregistered once released.
    zombies: Vec<Arc<BdevEntry>>,
    /// Reactors that got a qpair.
    reactors: Vec<ReactorHandle>,
    /// ctrlr_loss_timeout_sec passed and a claimed bdev holds up the deletion; said once.
    loss_held_logged: bool,
}

fn owner_main(
    app: Weak<App>,
    c: Arc<NvmeCtrlr>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<String>, NvmeError>>,
) {
    let (tx, rx) = mpsc::channel();
    let mut owner = match bring_up(app, c.clone()) {
        Ok(o) => o,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    *c.cmds.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    let names: Vec<String> = owner
        .bdevs
        .values()
        .map(|(b, _)| b.info.name.clone())
        .collect();
    owner.publish();
    if reply.send(Ok(names)).is_err() {
        // The RPC went away mid-attach; nobody knows the controller exists.
        owner.teardown();
        return;
    }
    loop {
        match rx.recv_timeout(CTRLR_POLL) {
            Ok(Cmd::Detach(done)) => match owner.claimed() {
                Some(e) => {
                    let _ = done.send(Err(e));
                }
                None => {
                    owner.teardown();
                    let _ = done.send(Ok(()));
                    return;
                }
            },
            Ok(Cmd::Reset(done)) => {
                let r = if owner.ctrlr.state() == CtrlrState::Failed {
                    Err(NvmeError::Failed(owner.c.spec.name.clone()))
                } else {
                    owner.ctrlr.reset();
                    Ok(())
                };
                let _ = done.send(r);
            }
            Ok(Cmd::Exit(done)) => {
                owner.exit();
                let _ = done.send(());
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                owner.teardown();
                return;
            }
        }
        if owner.app.strong_count() == 0 {
            // plexd is shutting down.
            owner.teardown();
            return;
        }
        owner.ctrlr.poll();
        let mut changed = false;
        while let Some(ev) = owner.ctrlr.next_event() {
            changed = true;
            owner.on_event(ev);
        }
        if !owner.zombies.is_empty() {
            owner.reap_zombies();
        }
        if owner.loss_timed_out() {
            changed |= owner.unregister_unclaimed();
            if owner.bdevs.is_empty() && owner.zombies.is_empty() {
                owner.delete_lost(&rx);
                return;
            }
        }
        if changed || owner.c.state() != owner.ctrlr.state() {
            owner.publish();
        }
    }
}

fn bring_up(app: Weak<App>, c: Arc<NvmeCtrlr>) -> Result<Owner, NvmeError> {
    let a = app
        .upgrade()
        .ok_or_else(|| NvmeError::Internal("plexd is shutting down".into()))?;
    let handles: Vec<ReactorHandle> = a.reactors.handles().iter().cloned().collect();
    let spec = &c.spec;
    let err = |source| NvmeError::Attach {
        name: spec.name.clone(),
        trid: spec.trid.controller_address(),
        source,
    };
    let ctrlr = Controller::connect(&spec.trid, &spec.opts(handles.len())).map_err(err)?;
    if ctrlr.namespaces().is_empty() && ctrlr.info().io_queues == 0 {
        return Err(err(initiator::Error::Unsupported(
            "a discovery controller has no namespaces to attach".into(),
        )));
    }
    let mut owner = Owner {
        app,
        c: c.clone(),
        bdevs: BTreeMap::new(),
        zombies: Vec::new(),
        reactors: Vec::new(),
        loss_held_logged: false,
        ctrlr,
    };
    for h in &handles {
        let qp = match owner.ctrlr.alloc_io_qpair::<BufView>(None) {
            Ok(q) => q,
            Err(e) if !owner.reactors.is_empty() => {
                tracing::warn!(
                    "bdev_nvme {}: {} of {} reactors got an I/O queue ({e}); the others cannot \
                     open its bdevs",
                    spec.name,
                    owner.reactors.len(),
                    handles.len()
                );
                break;
            }
            Err(e) => {
                owner.teardown();
                return Err(err(e));
            }
        };
        if let Err(e) = install_qpair(h, c.id, &spec.name, qp) {
            owner.teardown();
            return Err(NvmeError::Internal(e.to_string()));
        }
        owner.reactors.push(h.clone());
    }
    let nss: Vec<u32> = owner.ctrlr.namespaces().iter().map(|n| n.nsid).collect();
    for nsid in nss {
        if let Err(e) = owner.add_ns(nsid) {
            owner.teardown();
            return Err(e.into());
        }
    }
    tracing::info!(
        "bdev_nvme: attached {} ({}), bdevs {:?}",
        spec.name,
        spec.trid.controller_address(),
        owner
            .bdevs
            .values()
            .map(|(b, _)| &b.info.name)
            .collect::<Vec<_>>()
    );
    Ok(owner)
}

impl Owner {
    fn publish(&self) {
        let mut p = self.c.published.lock().unwrap_or_else(|e| e.into_inner());
        p.state = self.ctrlr.state();
        p.info = Some(self.ctrlr.info().clone());
        p.bdevs = self
            .bdevs
            .values()
            .map(|(b, _)| b.info.name.clone())
            .collect();
    }

    fn add_ns(&mut self, nsid: u32) -> Result<(), BdevError> {
        let Some(ns) = self.ctrlr.namespace(nsid).cloned() else {
            return Ok(());
        };
        let Some(app) = self.app.upgrade() else {
            return Ok(());
        };
        let spec = &self.c.spec;
        let name = format!("{}n{}", spec.name, nsid);
        // Stable across restarts and distinct per controller (two paths to one namespace
        // under two names must not collide in the registry).
        let uuid = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!(
                "plexstor bdev_nvme {} {} {}",
                spec.name, spec.trid.subnqn, nsid
            )
            .as_bytes(),
        );
        let mut info = BdevInfo::new(
            name,
            "NVMe disk",
            ns.block_size,
            ns.blocks,
            uuid,
            IoTypes::of(&[
                IoType::Read,
                IoType::Write,
                IoType::Flush,
                IoType::Unmap,
                IoType::WriteZeroes,
            ]),
        );
        info.write_cache = false;
        // PRPs and SGL data blocks address dwords: a PCIe controller takes no buffer that
        // starts between them (fabrics would, but one rule for all transports is simpler).
        info.required_alignment = 4;
        let bdev = Arc::new(NvmeBdev {
            info,
            ctrlr_id: self.c.id,
            ctrlr_name: spec.name.clone(),
            nsid,
            max_xfer: self.ctrlr.info().max_transfer,
            gone: Arc::new(AtomicBool::new(false)),
        });
        let entry = app.bdevs.register(bdev.clone())?;
        self.bdevs.insert(nsid, (bdev, entry));
        Ok(())
    }

    fn on_event(&mut self, ev: CtrlrEvent) {
        let name = self.c.spec.name.clone();
        match ev {
            CtrlrEvent::State(s) => {
                tracing::info!("bdev_nvme {name}: controller {s:?}");
            }
            CtrlrEvent::NamespacesChanged {
                added,
                removed,
                resized,
            } => {
                for nsid in removed {
                    if let Some((b, e)) = self.bdevs.remove(&nsid) {
                        b.gone.store(true, Ordering::Release);
                        tracing::info!("bdev_nvme {name}: namespace {nsid} removed");
                        self.zombies.push(e);
                    }
                }
                for nsid in added {
                    if self.bdevs.contains_key(&nsid) {
                        continue;
                    }
                    match self.add_ns(nsid) {
                        Ok(()) => tracing::info!("bdev_nvme {name}: namespace {nsid} added"),
                        Err(e) => tracing::warn!("bdev_nvme {name}: namespace {nsid}: {e}"),
                    }
                }
                for nsid in resized {
                    let (Some((b, _)), Some(ns)) =
                        (self.bdevs.get(&nsid), self.ctrlr.namespace(nsid))
                    else {
                        continue;
                    };
                    if ns.block_size != b.info.block_size {
                        // A new LBA format is a different disk to every consumer.
                        tracing::warn!(
                            "bdev_nvme {name}: namespace {nsid} block size changed \
                             {} -> {}: I/O to {} now fails",
                            b.info.block_size,
                            ns.block_size,
                            b.info.name
                        );
                        b.gone.store(true, Ordering::Release);
                        continue;
                    }
                    tracing::info!(
                        "bdev_nvme {name}: namespace {nsid} resized {} -> {} blocks",
                        b.info.num_blocks(),
                        ns.blocks
                    );
                    // Through the registry when the bdev is there, so its users hear of it.
                    match self
                        .app
                        .upgrade()
                        .and_then(|a| a.bdevs.get(&b.info.name).ok())
                    {
                        Some(e) => e.resize(ns.blocks),
                        None => b.info.set_num_blocks(ns.blocks),
                    }
                }
                self.reap_zombies();
            }
            CtrlrEvent::Aen { .. } => {}
        }
    }

    fn reap_zombies(&mut self) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        self.zombies.retain(|e| {
            let name = e.name().to_string();
            match app.bdevs.unregister(&name, "nvme") {
                Ok(_) | Err(BdevError::NotFound(_)) => false,
                Err(_) => true,
            }
        });
    }

    /// SPDK deletes a controller that did not come back within ctrlr_loss_timeout_sec (a
    /// positive one: 0 means "never reconnect" and -1 "forever", and both leave it failed).
    /// The initiator turns Failed only for that reason or on our own detach.
    fn loss_timed_out(&self) -> bool {
        self.c.spec.ctrlr_loss_timeout_sec > 0 && self.ctrlr.state() == CtrlrState::Failed
    }

    /// After the loss timeout: unregisters every bdev nothing claims. A claimed one keeps
    /// failing I/O and is retried on the next poll. Returns whether the bdev list changed.
    fn unregister_unclaimed(&mut self) -> bool {
        let Some(app) = self.app.upgrade() else {
            return false;
        };
        let before = self.bdevs.len();
        let mut held = None;
        self.bdevs.retain(|_, (b, e)| {
            let r = match e.claimed_by() {
                Some(owner) => Err(BdevError::Claimed {
                    name: e.name().to_string(),
                    owner,
                }),
                None => app.bdevs.unregister(e.name(), "nvme"),
            };
            match r {
                Ok(_) | Err(BdevError::NotFound(_)) => {
                    b.gone.store(true, Ordering::Release);
                    false
                }
                Err(err) => {
                    held.get_or_insert(err);
                    true
                }
            }
        });
        if let Some(err) = held.filter(|_| !self.loss_held_logged) {
            self.loss_held_logged = true;
            tracing::warn!(
                "bdev_nvme {}: ctrlr_loss_timeout_sec passed, but {err}: its I/O fails until it \
                 is released, then the controller is deleted",
                self.c.spec.name
            );
        }
        self.bdevs.len() != before
    }

    /// Deletes a controller whose loss timeout passed and whose bdevs are all unregistered:
    /// tears it down and takes it off the module's list, so its name is free again.
    fn delete_lost(self, cmds: &mpsc::Receiver<Cmd>) {
        let (name, id) = (self.c.spec.name.clone(), self.c.id);
        tracing::warn!(
            "bdev_nvme {name}: not reconnected within ctrlr_loss_timeout_sec ({} s): deleting \
             the controller",
            self.c.spec.ctrlr_loss_timeout_sec
        );
        let app = self.app.upgrade();
        self.teardown();
        if let Some(app) = app {
            app.nvme.forget(&name, id);
        }
        // A detach that raced with the deletion asked for what happened anyway.
        while let Ok(Cmd::Detach(done)) = cmds.try_recv() {
            let _ = done.send(Ok(()));
        }
    }

    /// The first bdev of this controller that something still uses.
    fn claimed(&self) -> Option<NvmeError> {
        let e = self
            .bdevs
            .values()
            .map(|(_, e)| e)
            .chain(self.zombies.iter())
            .find_map(|e| {
                e.claimed_by().map(|owner| BdevError::Claimed {
                    name: e.name().to_string(),
                    owner,
                })
            })?;
        Some(e.into())
    }

    /// As plexd exits with its reactors stopped (their qpairs went with their threads): fails
    /// the bdevs and shuts the controller down, leaving the registry alone.
    fn exit(self) {
        self.shut_down(false)
    }

    /// Unregisters the bdevs, takes the qpairs off the reactors (failing what is in flight)
    /// and shuts the controller down.
    fn teardown(self) {
        self.shut_down(true)
    }

    fn shut_down(mut self, reactors_running: bool) {
        let name = self.c.spec.name.clone();
        for (b, _) in self.bdevs.values() {
            b.gone.store(true, Ordering::Release);
        }
        // Without the app, or as plexd exits, the reactors are stopped: their qpairs went
        // with their threads, and a message to them would never be answered.
        let app = self.app.upgrade().filter(|_| reactors_running);
        if let Some(app) = &app {
            for (_, (_, e)) in std::mem::take(&mut self.bdevs) {
                self.zombies.push(e);
            }
            for e in std::mem::take(&mut self.zombies) {
                let _ = app.bdevs.unregister(e.name(), "nvme");
            }
            let id = self.c.id;
            for h in &self.reactors {
                let _ = h.call_blocking(move |ctx| remove_qpair(ctx, id));
            }
        }
        *self.c.cmds.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match self.ctrlr.detach() {
            Ok(()) => tracing::info!("bdev_nvme {name}: shut down"),
            Err(e) => tracing::warn!("bdev_nvme {name}: shutdown: {e}"),
        }
        if reactors_running {
            tracing::info!("bdev_nvme: detached {name}");
        }
    }
}
