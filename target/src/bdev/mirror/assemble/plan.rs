//! The decision, a pure function of what each plex holds, so that every refusal is
//! unit-tested: which plexes serve, which are resynced, and what is refused and why.

use super::*;

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
