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

/// What the caller of `bdev_mirror_create` says beyond the plexes.
#[derive(Clone, Debug, Default)]
pub struct AssembleOpts {
    /// The mirror's UUID, if the caller knows it: plexes of another are refused.
    pub uuid: Option<Uuid>,
    /// The generation the caller last saw: plexes all older are stale, refused.
    pub min_generation: u64,
    /// Assemble even when a plex the newest superblock calls in sync is missing. Off by
    /// default, as md will not start a degraded array unasked: a node restarting from its
    /// saved configuration, cut off from its other plexes, could otherwise serve its own
    /// plex after another node took the volume over. A control plane that fenced the
    /// others (`plexctl volume attach`) sets it.
    pub allow_degraded: bool,
    /// The plexes are copies of mirror `copy_of` taken while it was quiesced (clones of its
    /// plexes' snapshots): they become a new mirror with its own identity, every plex in
    /// sync, keeping the copied geometry (data stays where it is).
    pub copy_of: Option<String>,
}

/// A plex as offered to create: its bdev (if present) and node.
pub struct Offer {
    pub location: String,
    pub node: String,
    pub entry: Option<Arc<BdevEntry>>,
}

/// What one plex's superblock said.
#[derive(Debug)]
pub enum Found {
    Blank,
    /// No bdev at the offered location; `node` is the node the caller says holds the plex.
    Missing {
        node: String,
    },
    Ours(Box<Superblock>),
}

/// The plan for one plex.
#[derive(Debug, PartialEq)]
pub struct PlexPlan {
    pub uuid: Uuid,
    pub condition: Condition,
    pub in_sync_generation: u64,
}

#[derive(Debug)]
pub struct Plan {
    pub new: bool,
    pub uuid: Uuid,
    pub generation: u64,
    pub seq: u64,
    pub clean: bool,
    /// Offers' plans, in offer order; then plexes the table names that were not offered.
    pub plexes: Vec<PlexPlan>,
    /// Table entries not offered: location, node.
    pub absent: Vec<(String, String)>,
    /// Offers whose bitmaps make up the mirror's (the sources).
    pub sources: Vec<usize>,
    pub notes: Vec<String>,
}

impl Plan {
    /// A new mirror of `plexes` plexes, all in sync at generation 1, each a new identity.
    fn fresh(uuid: Option<Uuid>, plexes: usize, note: String) -> Plan {
        Plan {
            new: true,
            uuid: uuid.unwrap_or_else(Uuid::new_v4),
            generation: 1,
            seq: 1,
            clean: false,
            plexes: (0..plexes)
                .map(|_| PlexPlan {
                    uuid: Uuid::new_v4(),
                    condition: Condition::InUse,
                    in_sync_generation: 1,
                })
                .collect(),
            absent: Vec::new(),
            sources: (0..plexes).collect(),
            notes: vec![note],
        }
    }
}

/// The plan for a new mirror made of copies of mirror `src`'s plexes, and the superblock whose
/// geometry it keeps. Every copy must be of the same mirror, the same geometry, and of a plex
/// that was in sync: only those hold the same data at the quiesce point.
pub fn plan_copy<'a>(
    src: &str,
    opts: &AssembleOpts,
    found: &'a [(String, Found)],
) -> Result<(Plan, &'a Superblock), String> {
    let mut first: Option<&Superblock> = None;
    for (loc, f) in found {
        let Found::Ours(sb) = f else {
            return Err(format!(
                "plex {loc} holds no superblock of mirror {src}: not a copy of it"
            ));
        };
        if sb.mirror_name != src {
            return Err(format!(
                "plex {loc} is a plex of mirror {:?}, not a copy of {src:?}",
                sb.mirror_name
            ));
        }
        let own = sb.plexes.iter().find(|r| r.uuid == sb.this_plex);
        if !own.is_some_and(|r| r.state == PlexState::InSync) {
            return Err(format!(
                "plex {loc} is a copy of a plex that was not in sync in mirror {src}"
            ));
        }
        let geometry = |s: &Superblock| {
            (
                s.mirror_uuid,
                s.block_size,
                s.region_size,
                s.mirror_blocks,
                s.data_offset_blocks,
                s.bitmap_chunks,
            )
        };
        match first {
            None => first = Some(sb),
            Some(f) if geometry(f) != geometry(sb) => {
                return Err(format!(
                "plex {loc} and {} are copies of different mirrors, or taken at different sizes",
                found[0].0
            ))
            }
            Some(_) => {}
        }
    }
    let sb = first.ok_or("a copy needs at least one plex")?;
    let note = format!(
        "copy of mirror {src} ({}) at generation {}: a new mirror, every plex in sync",
        sb.mirror_uuid, sb.generation
    );
    Ok((Plan::fresh(opts.uuid, found.len(), note), sb))
}

/// Decides how to assemble `name` from `found` (one per offer, with its location).
pub fn plan(name: &str, opts: &AssembleOpts, found: &[(String, Found)]) -> Result<Plan, String> {
    if let Some(src) = &opts.copy_of {
        return plan_copy(src, opts, found).map(|(plan, _)| plan);
    }
    let (want_uuid, min_generation) = (opts.uuid, opts.min_generation);
    let ours: Vec<(usize, &Superblock)> = found
        .iter()
        .enumerate()
        .filter_map(|(i, (_, f))| match f {
            Found::Ours(sb) => Some((i, sb.as_ref())),
            _ => None,
        })
        .collect();
    // Each plex against what was asked for, then against each other.
    for (i, sb) in &ours {
        let loc = &found[*i].0;
        if sb.mirror_name != name {
            return Err(format!(
                "plex {loc} belongs to mirror {:?} ({}), not {name:?}; refusing to touch it",
                sb.mirror_name, sb.mirror_uuid
            ));
        }
        if let Some(u) = want_uuid.filter(|u| *u != sb.mirror_uuid) {
            return Err(format!(
                "plex {loc} belongs to mirror {} , not {u}; refusing to touch it",
                sb.mirror_uuid
            ));
        }
    }
    for (i, sb) in &ours {
        let loc = &found[*i].0;
        if let Some((j, other)) = ours.iter().find(|(_, o)| o.mirror_uuid != sb.mirror_uuid) {
            return Err(format!(
                "plexes {loc} and {} belong to different mirrors ({} and {})",
                found[*j].0, sb.mirror_uuid, other.mirror_uuid
            ));
        }
    }
    if ours.is_empty() {
        if found
            .iter()
            .any(|(_, f)| matches!(f, Found::Missing { .. }))
        {
            return Err("a new mirror needs every plex present".into());
        }
        return Ok(Plan::fresh(
            want_uuid,
            found.len(),
            "new mirror: no plex had a superblock".into(),
        ));
    }
    let (_, newest) = ours
        .iter()
        .max_by_key(|(_, sb)| (sb.generation, sb.seq))
        .expect("not empty");
    let gen = newest.generation;
    if gen < min_generation {
        return Err(format!(
            "the newest plex offered is at generation {gen}, but mirror {name} was at {min_generation}: \
             every plex offered is stale; refusing to assemble"
        ));
    }
    let table = &newest.plexes;
    let mut notes = Vec::new();
    for (i, sb) in &ours {
        if sb.generation != gen {
            notes.push(format!(
                "plex {} is at generation {}, the newest is {gen}: it is stale",
                found[*i].0, sb.generation
            ));
        }
    }
    let now = SystemTime::now();
    let mut plexes = Vec::new();
    let mut sources = Vec::new();
    let mut offered = Vec::new();
    for (i, (loc, f)) in found.iter().enumerate() {
        let p = match f {
            Found::Ours(sb) => {
                let Some(rec) = table.iter().find(|r| r.uuid == sb.this_plex) else {
                    return Err(format!(
                        "plex {loc} was removed from mirror {name} (generation {gen} does not list it); \
                         refusing to use it"
                    ));
                };
                offered.push(rec.uuid);
                if rec.state == PlexState::InSync && sb.generation == gen {
                    sources.push(i);
                    PlexPlan {
                        uuid: rec.uuid,
                        condition: Condition::InUse,
                        in_sync_generation: gen,
                    }
                } else {
                    let why = match rec.state {
                        PlexState::New => Behind::New,
                        PlexState::Resyncing { next_region } => Behind::Interrupted { next_region },
                        _ if sb.generation < gen => Behind::StaleGeneration {
                            had: sb.generation,
                            newest: gen,
                        },
                        _ => Behind::Returned,
                    };
                    PlexPlan {
                        uuid: rec.uuid,
                        condition: Condition::OutOfSync {
                            since: since_of(rec.state, now),
                            why,
                        },
                        in_sync_generation: rec.in_sync_generation,
                    }
                }
            }
            Found::Blank => PlexPlan {
                uuid: Uuid::new_v4(),
                condition: Condition::OutOfSync {
                    since: now,
                    why: Behind::New,
                },
                in_sync_generation: 0,
            },
            Found::Missing { node } => {
                // Known by its location; else by its node, when a single plex of the table is
                // there and no offer takes it under its own name: a new owner reaches a plex
                // another way (its NVMe controller's namespace) than the owner that wrote the
                // table did (its local bdev), and must still know it when it returns.
                let by_node = || {
                    let mut there = table.iter().filter(|r| {
                        !node.is_empty()
                            && r.node == *node
                            && !found.iter().any(|(l, _)| *l == r.location)
                            && !ours.iter().any(|(_, sb)| sb.this_plex == r.uuid)
                    });
                    match (there.next(), there.next()) {
                        (Some(r), None) => Some(r),
                        _ => None,
                    }
                };
                let Some(rec) = table.iter().find(|r| r.location == *loc).or_else(by_node) else {
                    return Err(format!(
                        "no bdev {loc}, and mirror {name} has no plex there"
                    ));
                };
                offered.push(rec.uuid);
                notes.push(format!(
                    "plex {loc} is missing: it will be resynced when it returns"
                ));
                PlexPlan {
                    uuid: rec.uuid,
                    condition: Condition::Faulted {
                        since: since_of(rec.state, now),
                        why: FaultReason::Removed,
                    },
                    in_sync_generation: rec.in_sync_generation,
                }
            }
        };
        plexes.push(p);
    }
    if sources.is_empty() {
        let in_sync: Vec<String> = table
            .iter()
            .filter(|r| r.state == PlexState::InSync)
            .map(|r| r.location.clone())
            .collect();
        return Err(format!(
            "no plex offered holds generation {gen} in sync (the newest superblock names {in_sync:?} \
             in sync); refusing to assemble from stale plexes"
        ));
    }
    let mut absent = Vec::new();
    for rec in table.iter().filter(|r| !offered.contains(&r.uuid)) {
        notes.push(format!(
            "plex {} ({}) was not offered: it stays out of sync",
            rec.location, rec.uuid
        ));
        absent.push((rec.location.clone(), rec.node.clone()));
        plexes.push(PlexPlan {
            uuid: rec.uuid,
            condition: Condition::Faulted {
                since: since_of(rec.state, now),
                why: FaultReason::Removed,
            },
            in_sync_generation: rec.in_sync_generation,
        });
    }
    if !opts.allow_degraded {
        let offered_ok: Vec<Uuid> = plexes
            .iter()
            .zip(
                found
                    .iter()
                    .map(|(_, f)| !matches!(f, Found::Missing { .. }))
                    .chain(std::iter::repeat(false)),
            )
            .filter(|(_, present)| *present)
            .map(|(p, _)| p.uuid)
            .collect();
        let missing: Vec<&str> = table
            .iter()
            .filter(|r| r.state == PlexState::InSync && !offered_ok.contains(&r.uuid))
            .map(|r| r.location.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "plexes in sync at generation {gen} are missing: {missing:?}; assembling without \
                 them could serve stale data if another node took the volume over. Bring them \
                 back, or pass allow_degraded once the others are known fenced"
            ));
        }
    }
    if !newest.clean && sources.len() > 1 {
        notes.push(
            "unclean shutdown: regions marked in the bitmap are resynced from one source".into(),
        );
        for &i in &sources[1..] {
            plexes[i].condition = Condition::OutOfSync {
                since: now,
                why: Behind::UncleanShutdown,
            };
        }
    }
    if plexes.len() > superblock::MAX_PLEXES {
        return Err(format!(
            "a mirror has at most {} plexes",
            superblock::MAX_PLEXES
        ));
    }
    Ok(Plan {
        new: false,
        uuid: newest.mirror_uuid,
        generation: gen,
        seq: newest.seq,
        clean: newest.clean,
        plexes,
        absent,
        sources,
        notes,
    })
}

fn since_of(state: PlexState, now: SystemTime) -> SystemTime {
    match state {
        PlexState::OutOfSync { since_unix_secs } if since_unix_secs > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(since_unix_secs)
        }
        _ => now,
    }
}

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
mod tests {
    use super::*;
    use crate::bdev::mirror::superblock::PlexRecord;

    fn sb(
        name: &str,
        uuid: Uuid,
        this: Uuid,
        gen: u64,
        table: &[(Uuid, PlexState)],
        clean: bool,
    ) -> Found {
        let layout = Layout::new(512, 1 << 20, 1 << 20).unwrap();
        let plexes = table
            .iter()
            .enumerate()
            .map(|(i, (u, s))| PlexRecord {
                uuid: *u,
                node: String::new(),
                location: format!("p{i}"),
                state: *s,
                in_sync_generation: 1,
            })
            .collect();
        let mut s = Superblock::new(uuid, name, this, &layout, plexes).unwrap();
        s.generation = gen;
        for r in &mut s.plexes {
            r.in_sync_generation = gen;
        }
        s.clean = clean;
        Found::Ours(Box::new(s))
    }

    #[test]
    fn copies_of_in_sync_plexes_become_a_new_mirror_and_anything_else_is_refused() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let table = [(a, PlexState::InSync), (b, PlexState::InSync)];
        let copy = |this| sb("vol1", m, this, 9, &table, false);
        let opts = AssembleOpts {
            copy_of: Some("vol1".into()),
            ..Default::default()
        };
        let found = vec![("c0".to_string(), copy(a)), ("c1".to_string(), copy(b))];
        let plan = plan("vol2", &opts, &found).unwrap();
        assert!(
            plan.new && plan.uuid != m && plan.generation == 1,
            "{plan:?}"
        );
        assert!(plan
            .plexes
            .iter()
            .all(|p| p.condition == Condition::InUse && p.uuid != a && p.uuid != b));

        let refused = |found: Vec<(String, Found)>, why: &str| {
            let e = super::plan("vol2", &opts, &found).unwrap_err();
            assert!(e.contains(why), "{e}");
        };
        refused(
            vec![("c0".into(), copy(a)), ("c1".into(), Found::Blank)],
            "holds no superblock",
        );
        refused(
            vec![("c0".into(), sb("other", m, a, 9, &table, false))],
            "not a copy of \"vol1\"",
        );
        let behind = [(a, PlexState::InSync), (b, PlexState::New)];
        refused(
            vec![("c1".into(), sb("vol1", m, b, 9, &behind, false))],
            "was not in sync",
        );
        refused(
            vec![
                ("c0".into(), copy(a)),
                ("c1".into(), sb("vol1", Uuid::new_v4(), b, 9, &table, false)),
            ],
            "copies of different mirrors",
        );
    }

    fn lenient() -> AssembleOpts {
        AssembleOpts {
            allow_degraded: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_missing_plex_offered_under_another_name_is_known_by_its_node() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
        // The table as n2 (the old owner) wrote it: its own plex p0 local, n3's p1.
        let mut on_b = sb("m", m, b, 3, &t, false);
        if let Found::Ours(s) = &mut on_b {
            s.plexes[0].node = "n2".into();
            s.plexes[1].node = "n3".into();
        }
        // n3 assembles with n2 down: n2's plex is offered as the namespace it will come back as.
        let missing = |node: &str| Found::Missing { node: node.into() };
        let found = [("p0n1".into(), missing("n2")), ("p1".into(), on_b)];
        let p = plan("m", &lenient(), &found).unwrap();
        assert_eq!(p.plexes[0].uuid, a, "{p:?}");
        assert!(p.absent.is_empty(), "{p:?}");
        assert!(
            matches!(p.plexes[0].condition, Condition::Faulted { .. }),
            "{p:?}"
        );
        // Unknown node, or a location no plex has: refused as before.
        let Found::Ours(s) = &found[1].1 else {
            unreachable!()
        };
        for (loc, node) in [("p0n1", "n9"), ("p0n1", "")] {
            let f = [
                (loc.to_string(), missing(node)),
                ("p1".into(), Found::Ours(s.clone())),
            ];
            let e = plan("m", &lenient(), &f).unwrap_err();
            assert!(e.contains("has no plex there"), "{e}");
        }
    }

    #[test]
    fn a_missing_in_sync_plex_stops_assembly_unless_allowed() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
        let found = [
            ("p0".into(), sb("m", m, a, 3, &t, true)),
            (
                "p1".into(),
                Found::Missing {
                    node: String::new(),
                },
            ),
        ];
        let e = plan("m", &AssembleOpts::default(), &found).unwrap_err();
        assert!(e.contains("missing") && e.contains("p1"), "{e}");
        let only = [("p0".into(), sb("m", m, a, 3, &t, true))];
        assert!(
            plan("m", &AssembleOpts::default(), &only).is_err(),
            "not offered is missing too"
        );
        assert!(plan("m", &lenient(), &found).is_ok());
        // A plex already out of sync in the table is not needed.
        let t = [
            (a, PlexState::InSync),
            (b, PlexState::OutOfSync { since_unix_secs: 1 }),
        ];
        let found = [
            ("p0".into(), sb("m", m, a, 3, &t, true)),
            (
                "p1".into(),
                Found::Missing {
                    node: String::new(),
                },
            ),
        ];
        assert!(plan("m", &AssembleOpts::default(), &found).is_ok());
    }

    #[test]
    fn blank_plexes_make_a_new_mirror_all_in_sync() {
        let p = plan(
            "m",
            &AssembleOpts::default(),
            &[("a".into(), Found::Blank), ("b".into(), Found::Blank)],
        )
        .unwrap();
        assert!(p.new && p.plexes.iter().all(|x| x.condition == Condition::InUse));
    }

    #[test]
    fn the_newest_generation_wins_and_a_stale_plex_is_resynced() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let found = [
            (
                "p0".into(),
                sb(
                    "m",
                    m,
                    a,
                    7,
                    &[
                        (a, PlexState::InSync),
                        (b, PlexState::OutOfSync { since_unix_secs: 5 }),
                    ],
                    true,
                ),
            ),
            (
                "p1".into(),
                sb(
                    "m",
                    m,
                    b,
                    5,
                    &[(a, PlexState::InSync), (b, PlexState::InSync)],
                    true,
                ),
            ),
        ];
        let p = plan("m", &lenient(), &found).unwrap();
        assert_eq!((p.generation, p.sources.clone()), (7, vec![0]));
        assert!(matches!(
            p.plexes[1].condition,
            Condition::OutOfSync {
                why: Behind::StaleGeneration { had: 5, newest: 7 },
                ..
            }
        ));
        assert!(p.notes.iter().any(|n| n.contains("stale")), "{:?}", p.notes);
    }

    #[test]
    fn a_stale_plex_alone_is_refused() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // b's own superblock still says both in sync, but at generation 5; a moved to 7
        // without b (b missed writes). Offered alone, b must not be used.
        let found = [(
            "p1".into(),
            sb(
                "m",
                m,
                b,
                5,
                &[(a, PlexState::InSync), (b, PlexState::InSync)],
                true,
            ),
        )];
        // Alone, b is the newest it can see: that is allowed (it cannot know of generation 7).
        assert!(plan("m", &lenient(), &found).is_ok());
        let found = [
            (
                "p1".into(),
                sb(
                    "m",
                    m,
                    b,
                    5,
                    &[(a, PlexState::InSync), (b, PlexState::InSync)],
                    true,
                ),
            ),
            (
                "p0".into(),
                Found::Missing {
                    node: String::new(),
                },
            ),
        ];
        assert!(
            plan("m", &lenient(), &found).is_ok(),
            "p0 missing, b is the newest seen"
        );
        let found = [(
            "p1".into(),
            sb(
                "m",
                m,
                b,
                7,
                &[
                    (a, PlexState::InSync),
                    (b, PlexState::OutOfSync { since_unix_secs: 1 }),
                ],
                true,
            ),
        )];
        let e = plan("m", &lenient(), &found).unwrap_err();
        assert!(e.contains("stale"), "{e}");
        // Alone but older than the generation the caller knows of: refused.
        let found = [(
            "p1".into(),
            sb(
                "m",
                m,
                b,
                5,
                &[(a, PlexState::InSync), (b, PlexState::InSync)],
                true,
            ),
        )];
        let e = plan(
            "m",
            &AssembleOpts {
                min_generation: 6,
                ..lenient()
            },
            &found,
        )
        .unwrap_err();
        assert!(e.contains("stale"), "{e}");
    }

    #[test]
    fn foreign_and_renamed_plexes_are_refused() {
        let (m1, m2, a, b) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let found = [
            (
                "p0".into(),
                sb("m", m1, a, 1, &[(a, PlexState::InSync)], true),
            ),
            (
                "p1".into(),
                sb("m", m2, b, 1, &[(b, PlexState::InSync)], true),
            ),
        ];
        assert!(plan("m", &lenient(), &found)
            .unwrap_err()
            .contains("different mirrors"));
        let found = [(
            "p0".into(),
            sb("other", m1, a, 1, &[(a, PlexState::InSync)], true),
        )];
        assert!(plan("m", &lenient(), &found)
            .unwrap_err()
            .contains("belongs to mirror \"other\""));
        let found = [(
            "p0".into(),
            sb("m", m1, a, 1, &[(a, PlexState::InSync)], true),
        )];
        assert!(plan(
            "m",
            &AssembleOpts {
                uuid: Some(m2),
                ..lenient()
            },
            &found
        )
        .is_err());
    }

    #[test]
    fn after_an_unclean_shutdown_one_source_serves_and_the_others_resync() {
        let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
        let found = [
            ("p0".into(), sb("m", m, a, 3, &t, false)),
            ("p1".into(), sb("m", m, b, 3, &t, false)),
        ];
        let p = plan("m", &lenient(), &found).unwrap();
        assert_eq!(p.plexes[0].condition, Condition::InUse);
        assert!(matches!(
            p.plexes[1].condition,
            Condition::OutOfSync {
                why: Behind::UncleanShutdown,
                ..
            }
        ));
        let found = [
            ("p0".into(), sb("m", m, a, 3, &t, true)),
            ("p1".into(), sb("m", m, b, 3, &t, true)),
        ];
        assert!(plan("m", &lenient(), &found)
            .unwrap()
            .plexes
            .iter()
            .all(|x| x.condition == Condition::InUse));
    }

    #[test]
    fn a_blank_plex_beside_a_mirror_gets_a_full_copy() {
        let (m, a) = (Uuid::new_v4(), Uuid::new_v4());
        let found = [
            (
                "p0".into(),
                sb("m", m, a, 2, &[(a, PlexState::InSync)], true),
            ),
            ("p1".into(), Found::Blank),
        ];
        let p = plan("m", &lenient(), &found).unwrap();
        assert!(matches!(
            p.plexes[1].condition,
            Condition::OutOfSync {
                why: Behind::New,
                ..
            }
        ));
    }
}
