//! Building a mirror from its plexes: read each plex's superblock, decide (a pure function, so
//! every refusal is unit-tested), write the first superblocks, start the service.
//!
//! The decision:
//! - Plexes with no superblock at all (neither slot has the magic) are blank.
//! - A plex whose superblock is damaged, or that belongs to another mirror (another UUID, or
//!   another name), is refused with a message, and nothing is written anywhere.
//! - No superblock on any plex: a new mirror, every plex in sync (nothing was written yet).
//! - Otherwise the newest generation among the plexes is the truth, and its plex table says
//!   who is in sync. A plex is a source only if that table says in sync *and* its own
//!   superblock has that generation. No source offered: refused, naming what is missing.
//!   Plexes that disagree are logged and noted in `bdev_mirror_get_mirrors`.
//! - After an unclean shutdown, one source stays serving and the other in-sync plexes are
//!   resynced in the regions the bitmap marks.
//!
//! Here: reading the superblocks, writing the first ones, fencing and starting the service;
//! `plan.rs` is the decision.

use super::blockio::{self, BlockIo};
use super::plex::{Behind, Condition, FaultReason, Plex};
use super::service::Service;
use super::superblock::{self, Layout, PlexState, SbError, Slot, Superblock};
use super::{Core, MirrorBdev, Request};
use crate::app::App;
use crate::bdev::{BdevEntry, BdevEvent, IoStatus};
use crate::reactor::fn_poller;
use crate::rpc::RpcError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

mod plan;

pub use plan::*;

fn io_err(what: &str, s: IoStatus) -> RpcError {
    RpcError::errno(libc::EIO, format!("{what}: {s:?}"))
}

/// Reads what each offered plex holds at the start: its two header slots.
async fn read_superblocks(app: &App, offers: &[Offer]) -> Result<Vec<(String, Found)>, RpcError> {
    let home = app.reactors.handles()[0].clone();
    let mut out = Vec::new();
    for o in offers {
        let Some(e) = &o.entry else {
            out.push((
                o.location.clone(),
                Found::Missing {
                    node: o.node.clone(),
                },
            ));
            continue;
        };
        let bs = e.info().block_size;
        let ra = superblock::header_slot_range(bs, superblock::Slot::A)
            .map_err(|err| RpcError::invalid_params(format!("plex {}: {err}", o.location)))?;
        let rb = superblock::header_slot_range(bs, superblock::Slot::B).expect("as A");
        let r = blockio::run(
            &home,
            vec![
                BlockIo::read(e, ra.start, ra.end - ra.start),
                BlockIo::read(e, rb.start, rb.end - rb.start),
            ],
        )
        .await;
        let mut r = r.into_iter();
        let a = r
            .next()
            .expect("two")
            .map_err(|s| io_err(&format!("reading plex {}", o.location), s))?;
        let b = r
            .next()
            .expect("two")
            .map_err(|s| io_err(&format!("reading plex {}", o.location), s))?;
        let found = match superblock::pick_header(&a, &b, None) {
            Ok(p) => {
                if let Some(e) = &p.other_problem {
                    tracing::info!(
                        "mirror plex {}: one header slot unusable ({e}); the other is used",
                        o.location
                    );
                }
                Found::Ours(Box::new(p.superblock))
            }
            Err(SbError::NoValidHeader { a, b })
                if matches!(*a, SbError::BadMagic { .. })
                    && matches!(*b, SbError::BadMagic { .. }) =>
            {
                Found::Blank
            }
            Err(err) => {
                return Err(RpcError::invalid_params(format!(
                "plex {}: superblock unusable ({err}); refusing to assemble (remove it from the \
                     list, or wipe it if it holds nothing of value)",
                o.location
            )))
            }
        };
        out.push((o.location.clone(), found));
    }
    Ok(out)
}

/// Creates or assembles mirror `name` and registers it as a bdev.
pub async fn create(
    app: &Arc<App>,
    name: &str,
    offers: Vec<Offer>,
    region_size: u64,
    opts: AssembleOpts,
) -> Result<Arc<Core>, RpcError> {
    crate::bdev::validate_name(name)?;
    if app.mirror.get(name).is_some() || app.bdevs.get(name).is_ok() {
        return Err(RpcError::errno(
            libc::EEXIST,
            format!("bdev {name} already exists"),
        ));
    }
    if offers.is_empty() || offers.len() > superblock::MAX_PLEXES {
        return Err(RpcError::invalid_params(format!(
            "a mirror has 1 to {} plexes",
            superblock::MAX_PLEXES
        )));
    }
    let present: Vec<&Arc<BdevEntry>> = offers.iter().filter_map(|o| o.entry.as_ref()).collect();
    let Some(first) = present.first() else {
        return Err(RpcError::errno(
            libc::ENODEV,
            "none of the plexes' bdevs exists".to_string(),
        ));
    };
    let bs = first.info().block_size;
    if let Some(o) = present.iter().find(|e| e.info().block_size != bs) {
        return Err(RpcError::invalid_params(format!(
            "plex {} has {}-byte blocks, {} has {bs}: plexes must match",
            o.name(),
            o.info().block_size,
            first.name()
        )));
    }
    let owner = format!("mirror {name}");
    let mut claimed: Vec<Arc<BdevEntry>> = Vec::new();
    for e in &present {
        if let Err(err) = e.claim(&owner) {
            for c in &claimed {
                c.release();
            }
            return Err(err.into());
        }
        claimed.push((*e).clone());
    }
    let release = || {
        for c in &claimed {
            c.release();
        }
    };
    match build(app, name, &offers, region_size, bs, &opts).await {
        Ok(core) => Ok(core),
        Err(e) => {
            release();
            Err(e)
        }
    }
}

async fn build(
    app: &Arc<App>,
    name: &str,
    offers: &[Offer],
    region_size: u64,
    bs: u32,
    opts: &AssembleOpts,
) -> Result<Arc<Core>, RpcError> {
    let found = read_superblocks(app, offers).await?;
    let plan = plan(name, opts, &found).map_err(RpcError::invalid_params)?;
    // The size comes from the plexes that hold the mirror's data: a stale plex that missed a
    // growth is smaller, and is left out below rather than failing the assembly.
    let smallest = offers
        .iter()
        .enumerate()
        .filter(|(i, _)| plan.sources.contains(i))
        .filter_map(|(_, o)| o.entry.as_ref())
        .map(|e| e.info().num_blocks())
        .min()
        .expect("some source present");
    let copied = match &opts.copy_of {
        Some(src) => Some(
            plan_copy(src, opts, &found)
                .map_err(RpcError::invalid_params)?
                .1,
        ),
        None => None,
    };
    let layout = if let Some(sb) = copied {
        Layout::from_superblock(sb, smallest)
            .map_err(|e| RpcError::invalid_params(format!("a copy is too small: {e}")))?
    } else if plan.new {
        Layout::new(bs, smallest, region_size)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?
    } else {
        let src = match &found[plan.sources[0]].1 {
            Found::Ours(sb) => sb,
            _ => unreachable!("sources carry superblocks"),
        };
        Layout::from_superblock(src, smallest).map_err(|e| {
            // Name the plex: one that missed a resize must grow before it is offered again.
            let small = offers.iter().find(|o| {
                o.entry
                    .as_ref()
                    .is_some_and(|e| e.info().num_blocks() == smallest)
            });
            let which = small.map_or("a plex", |o| o.location.as_str());
            RpcError::invalid_params(format!("{which} is too small for mirror {name}: {e}"))
        })?
    };
    for n in &plan.notes {
        tracing::info!("mirror {name}: {n}");
    }
    fence_remote_plexes(app, name, plan.uuid, offers).await?;
    let home = app.reactors.handles()[0].clone();
    // The bitmap: the union of the sources' (a damaged chunk counts as all dirty).
    let intent = super::intent::IntentLog::new(layout.regions(), layout.max_regions());
    if !plan.new {
        let br = layout.bitmap_range();
        let reads = plan
            .sources
            .iter()
            .filter_map(|&i| offers[i].entry.as_ref())
            .map(|e| BlockIo::read(e, br.start, br.end - br.start))
            .collect();
        for r in blockio::run(&home, reads).await {
            let bytes = r.map_err(|s| io_err("reading the bitmap", s))?;
            let (bitmap, problems) = superblock::decode_bitmap(&layout, plan.uuid, &bytes);
            for p in problems {
                tracing::warn!(
                    "mirror {name}: bitmap chunk {} unusable ({}): its regions are resynced",
                    p.index,
                    p.error
                );
            }
            for r in bitmap.iter_set() {
                intent.dirty.set(r);
            }
        }
    }
    let mut notes = plan.notes.clone();
    let need = layout.data_offset_blocks() + layout.data_blocks();
    let mut left_out = Vec::new();
    for (i, o) in offers.iter().enumerate() {
        if let Some(e) = o.entry.as_ref().filter(|e| e.info().num_blocks() < need) {
            let n = format!(
                "plex {} has {} blocks and the mirror needs {need} (it missed a growth): left \
                 out until it grows",
                o.location,
                e.info().num_blocks()
            );
            tracing::warn!("mirror {name}: {n}");
            notes.push(n);
            e.release();
            left_out.push(i);
        }
    }
    let plexes: Vec<Arc<Plex>> = plan
        .plexes
        .iter()
        .enumerate()
        .map(|(i, pp)| {
            let (location, node, entry) = match offers.get(i) {
                Some(o) if left_out.contains(&i) => (o.location.clone(), o.node.clone(), None),
                Some(o) => (o.location.clone(), o.node.clone(), o.entry.clone()),
                None => {
                    let (l, n) = plan.absent[i - offers.len()].clone();
                    (l, n, None)
                }
            };
            Arc::new(Plex::new(
                pp.uuid,
                location,
                node,
                entry,
                pp.condition.clone(),
                pp.in_sync_generation,
            ))
        })
        .collect();
    let core = Arc::new(Core {
        name: name.to_string(),
        uuid: plan.uuid,
        layout: RwLock::new(layout),
        data_blocks: AtomicU64::new(layout.data_blocks()),
        data_offset_blocks: layout.data_offset_blocks(),
        plexes: RwLock::new(plexes.clone()),
        plexes_version: AtomicU64::new(1),
        intent,
        // Every assembly is a membership event: the generation moves on.
        generation: AtomicU64::new(plan.generation + u64::from(!plan.new)),
        requests: Default::default(),
        home: home.clone(),
        fault_tickets: AtomicU64::new(0),
        faults_recorded: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        fenced: AtomicBool::new(false),
        resync_rate: AtomicU64::new(app.mirror.default_resync_rate()),
        clear_interval_ms: AtomicU64::new(super::DEFAULT_CLEAR_INTERVAL_MS),
        bitmap_writes_pending: AtomicU64::new(0),
        scheduled: AtomicU64::new(plan.plexes.len() as u64),
        assembly_notes: Mutex::new(notes),
        subscriptions: Mutex::new(Vec::new()),
        quiesced: AtomicBool::new(false),
        quiesce_lease: AtomicU64::new(0),
        writers: Mutex::new(Vec::new()),
    });
    if plan.new {
        // Zeroed bitmaps first, then headers: a crash in between leaves no header, a blank plex.
        let mut writes = Vec::new();
        for e in offers.iter().filter_map(|o| o.entry.as_ref()) {
            if copied.is_some() {
                // Both header slots go: the copied mirror's header, at a higher sequence
                // number, must never be read back as this plex's.
                let slots = layout.slot_range(Slot::B).end;
                let blank = vec![0u8; (slots * u64::from(bs)) as usize];
                writes.push(BlockIo::write(e, 0, &blank).map_err(|s| io_err("header", s))?);
            }
            let chunks = blockio::empty_chunks(e, plan.uuid, &layout, 0..layout.chunk_count());
            writes.extend(chunks.map_err(|s| io_err("bitmap", s))?);
        }
        for r in blockio::run(&home, writes).await {
            r.map_err(|s| io_err("writing the first bitmap", s))?;
        }
    }
    // Start the service, and have it write the first headers before the bdev takes I/O.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let svc_core = core.clone();
    let seq = plan.seq;
    home.send(move |ctx| {
        let mut svc = Service::new(svc_core.clone(), seq);
        svc.rewrite_dirty_chunks();
        svc.write_headers(tx);
        let name = format!("mirror {}", svc_core.name);
        ctx.add_poller(fn_poller(name, move |_| svc.poll()));
    });
    if !rx.await.unwrap_or(false) {
        core.request(Request::Control(Box::new(|s: &mut Service| s.stop())));
        return Err(RpcError::errno(
            libc::EIO,
            format!("mirror {name}: no plex took the first superblock"),
        ));
    }
    watch_plexes(&core);
    let bdev = Arc::new(MirrorBdev::new(core.clone()));
    if let Err(e) = app.bdevs.register(bdev) {
        core.request(Request::Control(Box::new(|s: &mut Service| s.stop())));
        return Err(e.into());
    }
    app.mirror.insert(core.clone());
    tracing::info!(
        "mirror {name} ({}) {}: {} blocks of {bs}, {} plexes, generation {}",
        core.uuid,
        if plan.new { "created" } else { "assembled" },
        core.data_blocks(),
        core.plexes().len(),
        core.generation.load(Ordering::Acquire)
    );
    Ok(core)
}

/// Takes the reservation of every remote plex before any superblock is written: from here on
/// a previous owner can no longer write them.
async fn fence_remote_plexes(
    app: &App,
    name: &str,
    mirror: Uuid,
    offers: &[Offer],
) -> Result<(), RpcError> {
    for o in offers {
        let Some((spec, nsid)) = o
            .entry
            .as_ref()
            .and_then(|e| super::fence::remote_of(app, e))
        else {
            continue;
        };
        let key = super::fence::key_for(mirror, &spec.hostid);
        let loc = o.location.clone();
        let r = tokio::task::spawn_blocking(move || super::fence::take(&spec, nsid, key, true))
            .await
            .map_err(|e| RpcError::internal(format!("fencing {loc}: {e}")))?;
        match r {
            Ok(super::fence::Fenced::Preempted { previous_key, .. }) => tracing::warn!(
                "mirror {name}: plex {} was held by another owner (key {previous_key:#x}): preempted; \
                 that owner can no longer write it",
                o.location
            ),
            Ok(f) => tracing::info!("mirror {name}: plex {} reserved ({f:?})", o.location),
            Err(err) => {
                return Err(RpcError::errno(
                    libc::EIO,
                    format!(
                        "mirror {name}: cannot take the reservation of remote plex {} ({err}); \
                         refusing to write it without fencing",
                        o.location
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Subscribes to each plex bdev's events: a removed plex, or one shrunk below the mirror, is
/// faulted at once rather than discovered by a failed I/O.
pub fn watch_plexes(core: &Arc<Core>) {
    let mut subs = super::lock(&core.subscriptions);
    subs.clear();
    for (i, p) in core.plexes().iter().enumerate() {
        let Some(e) = p.bdev() else { continue };
        let weak = Arc::downgrade(core);
        subs.push(e.subscribe(move |_, ev| {
            let Some(core) = weak.upgrade() else { return };
            let gone = match ev {
                BdevEvent::Removed => true,
                // The mirror may have grown since the subscription: compare with it now.
                BdevEvent::Resized { new_blocks, .. } => new_blocks < core.plex_blocks_needed(),
            };
            if gone {
                core.fault(i, FaultReason::Removed);
            }
        }));
    }
}

#[cfg(test)]
mod tests;
