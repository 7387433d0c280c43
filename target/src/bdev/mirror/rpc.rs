//! `bdev_mirror_create`, `bdev_mirror_delete`, `bdev_mirror_add_plex`,
//! `bdev_mirror_remove_plex`, `bdev_mirror_resize`, `bdev_mirror_quiesce`,
//! `bdev_mirror_resume`, `bdev_mirror_get_mirrors`, `bdev_mirror_set_options`.
//! SPDK has no such methods (its raid1 has no superblock of this kind); names follow SPDK's
//! `bdev_<module>_<verb>` habit.

use super::assemble::{self, Offer};
use super::plex::{Behind, Condition, Plex, Role};
use super::service::Service;
use super::{Core, Request};
use crate::app::App;
use crate::rpc::{Methods, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlexParam {
    bdev: String,
    #[serde(default)]
    node: String,
}

/// A plex given as a bare bdev name, or as `{"bdev": …, "node": …}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PlexArg {
    Name(String),
    Full(PlexParam),
}

impl PlexArg {
    fn into_param(self) -> PlexParam {
        match self {
            PlexArg::Name(bdev) => PlexParam {
                bdev,
                node: String::new(),
            },
            PlexArg::Full(p) => p,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    plexes: Vec<PlexArg>,
    uuid: Option<Uuid>,
    region_size: Option<u64>,
    /// The generation the caller last saw this mirror at (a control plane keeps it): plexes
    /// all older than that are stale, and assembling from them is refused.
    #[serde(default)]
    min_generation: u64,
    /// Assemble even when a plex in sync is missing (see `AssembleOpts::allow_degraded`).
    #[serde(default)]
    allow_degraded: bool,
    /// The plexes are copies of this mirror's (see `AssembleOpts::copy_of`).
    copy_of: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMirrors {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddPlex {
    name: String,
    bdev: String,
    #[serde(default)]
    node: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovePlex {
    name: String,
    /// The plex's bdev name or UUID.
    plex: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    /// The new size; a mirror only grows.
    size_in_mib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Quiesce {
    name: String,
    /// The lease: writes resume by themselves after this long, so a control plane that dies
    /// mid-snapshot never leaves a volume frozen.
    #[serde(default = "default_quiesce_ms")]
    timeout_ms: u64,
}

fn default_quiesce_ms() -> u64 {
    10_000
}

/// The longest lease a quiesce may ask for.
const MAX_QUIESCE_MS: u64 = 60_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    /// A mirror to set; without it, the defaults for mirrors created later.
    name: Option<String>,
    resync_rate_mb_per_sec: Option<u64>,
    region_size: Option<u64>,
    /// How often idle regions leave the bitmap (a mirror only).
    bitmap_clear_interval_ms: Option<u64>,
}

fn mirror(app: &App, name: &str) -> Result<Arc<Core>, RpcError> {
    app.mirror
        .get(name)
        .ok_or_else(|| RpcError::errno(libc::ENODEV, format!("no mirror named {name}")))
}

/// Runs `f` on the mirror's service and awaits its answer.
async fn on_service<R: Send + 'static>(
    core: &Core,
    f: impl FnOnce(&mut Service, tokio::sync::oneshot::Sender<R>) + Send + 'static,
) -> Result<R, RpcError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    core.request(Request::Control(Box::new(move |s: &mut Service| f(s, tx))));
    rx.await.map_err(|_| {
        RpcError::errno(
            libc::EIO,
            format!("mirror {}: its service stopped", core.name),
        )
    })
}

pub fn register(m: &mut Methods) {
    m.add(
        "bdev_mirror_create",
        |app: Arc<App>, p: Create| async move {
            let region = p
                .region_size
                .unwrap_or_else(|| app.mirror.default_region_size());
            let offers = p
                .plexes
                .into_iter()
                .map(PlexArg::into_param)
                .map(|pp| Offer {
                    entry: app.bdevs.get(&pp.bdev).ok(),
                    location: pp.bdev,
                    node: pp.node,
                })
                .collect();
            let opts = assemble::AssembleOpts {
                uuid: p.uuid,
                min_generation: p.min_generation,
                allow_degraded: p.allow_degraded,
                copy_of: p.copy_of,
            };
            let core = assemble::create(&app, &p.name, offers, region, opts).await?;
            Ok::<_, RpcError>(json!(core.name))
        },
    );
    m.add(
        "bdev_mirror_delete",
        |app: Arc<App>, p: ByName| async move {
            let core = mirror(&app, &p.name)?;
            app.bdevs.unregister(&p.name, "mirror")?;
            app.mirror.remove(&p.name);
            // Superblocks marked clean, then the plexes are let go.
            let _ = on_service(&core, |s, tx| s.stop_clean(tx)).await;
            // Answered once the plexes' claims are released: the caller may use them at once.
            let _ = on_service(&core, |s, tx| {
                s.stop();
                let _ = tx.send(());
            })
            .await;
            tracing::info!("deleted mirror {}", p.name);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_mirror_add_plex",
        |app: Arc<App>, p: AddPlex| async move {
            let core = mirror(&app, &p.name)?;
            let live = core.plexes().iter().filter(|x| !x.is_removed()).count();
            if live >= super::superblock::MAX_PLEXES {
                return Err(RpcError::invalid_params(format!(
                    "mirror {} already has {live} plexes, the most it can have",
                    p.name
                )));
            }
            let e = app.bdevs.get(&p.bdev)?;
            let need = core.plex_blocks_needed();
            if e.info().block_size != core.layout().block_size() || e.info().num_blocks() < need {
                return Err(RpcError::invalid_params(format!(
                    "{} must have {}-byte blocks and at least {need} of them",
                    p.bdev,
                    core.layout().block_size()
                )));
            }
            e.claim(&format!("mirror {}", p.name))?;
            let plex = Plex::new(
                Uuid::new_v4(),
                p.bdev.clone(),
                p.node,
                Some(e),
                Condition::OutOfSync {
                    since: SystemTime::now(),
                    why: Behind::New,
                },
                0,
            );
            on_service(&core, move |s, tx| {
                s.add_plex(plex);
                s.write_headers(tx);
            })
            .await?;
            super::assemble::watch_plexes(&core);
            core.scheduled.fetch_add(1, Ordering::AcqRel);
            tracing::info!(
                "mirror {}: plex {} added; a full resync follows",
                p.name,
                p.bdev
            );
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_mirror_remove_plex",
        |app: Arc<App>, p: RemovePlex| async move {
            let core = mirror(&app, &p.name)?;
            let plexes = core.plexes();
            let i = plexes
                .iter()
                .position(|x| {
                    !x.is_removed() && (x.location == p.plex || x.uuid.to_string() == p.plex)
                })
                .ok_or_else(|| {
                    RpcError::errno(
                        libc::ENODEV,
                        format!("mirror {} has no plex {}", p.name, p.plex),
                    )
                })?;
            let others_serving = plexes
                .iter()
                .enumerate()
                .any(|(j, x)| j != i && x.role() == Role::Serving);
            if !others_serving {
                return Err(RpcError::errno(
                    libc::EBUSY,
                    format!("plex {} is the last one in sync; add another first", p.plex),
                ));
            }
            let r = on_service(&core, move |s, tx| s.remove_plex(i, tx)).await?;
            r.map_err(|e| RpcError::errno(libc::EIO, e))?;
            core.scheduled.fetch_sub(1, Ordering::AcqRel);
            tracing::info!("mirror {}: plex {} removed", p.name, p.plex);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_mirror_resize",
        |app: Arc<App>, p: Resize| async move {
            let core = mirror(&app, &p.name)?;
            grow(&app, &core, p.size_in_mib).await?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_mirror_quiesce",
        |app: Arc<App>, p: Quiesce| async move {
            let core = mirror(&app, &p.name)?;
            quiesce(&core, p.timeout_ms).await
        },
    );
    m.add(
        "bdev_mirror_resume",
        |app: Arc<App>, p: ByName| async move {
            let core = mirror(&app, &p.name)?;
            core.quiesce_lease.fetch_add(1, Ordering::SeqCst);
            // False: the lease had run out, and writes went on before this call.
            let held = core.quiesced.swap(false, Ordering::SeqCst);
            core.home.send(|_| {});
            Ok::<_, RpcError>(json!(held))
        },
    );
    m.add(
        "bdev_mirror_get_mirrors",
        |app: Arc<App>, p: GetMirrors| async move {
            let all = match p.name {
                Some(n) => vec![mirror(&app, &n)?],
                None => app.mirror.all(),
            };
            Ok::<_, RpcError>(Value::Array(all.iter().map(|c| describe(c)).collect()))
        },
    );
    m.add(
        "bdev_mirror_set_options",
        |app: Arc<App>, p: SetOptions| async move {
            let rate = p.resync_rate_mb_per_sec.map(|r| r.saturating_mul(1 << 20));
            match p.name {
                Some(n) => {
                    if p.region_size.is_some() {
                        return Err(RpcError::invalid_params(
                            "a mirror's region size is fixed at creation",
                        ));
                    }
                    let core = mirror(&app, &n)?;
                    if let Some(r) = rate {
                        core.resync_rate.store(r, Ordering::Relaxed);
                    }
                    if let Some(ms) = p.bitmap_clear_interval_ms {
                        if ms == 0 {
                            return Err(RpcError::invalid_params(
                                "bitmap_clear_interval_ms must be at least 1",
                            ));
                        }
                        core.clear_interval_ms.store(ms, Ordering::Relaxed);
                    }
                }
                None => {
                    if p.bitmap_clear_interval_ms.is_some() {
                        return Err(RpcError::invalid_params(
                            "bitmap_clear_interval_ms is set per mirror (give its name)",
                        ));
                    }
                    if let Some(r) = rate {
                        app.mirror.default_resync_rate.store(r, Ordering::Relaxed);
                    }
                    if let Some(rs) = p.region_size {
                        let l = super::superblock::Layout::new(4096, 1 << 30, rs);
                        l.map_err(|e| RpcError::invalid_params(e.to_string()))?;
                        app.mirror.default_region_size.store(rs, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, RpcError>(true)
        },
    );
}

/// Grows the mirror to `mib` once every plex in sync has grown: bitmap chunks that come into
/// use are zeroed, the superblocks record the size, and then the bdev takes it (an exported
/// namespace raises its attribute-changed event). Plexes out of the mirror must grow before
/// they return: a plex smaller than the mirror is refused at assembly.
async fn grow(app: &App, core: &Arc<Core>, mib: u64) -> Result<(), RpcError> {
    let old = core.layout();
    let bs = u64::from(old.block_size());
    let blocks = mib
        .checked_mul(1 << 20)
        .map(|b| b / bs)
        .ok_or_else(|| RpcError::invalid_params(format!("size_in_mib {mib} is too large")))?;
    if blocks == old.data_blocks() {
        return Ok(());
    }
    if blocks < old.data_blocks() {
        return Err(RpcError::invalid_params(format!(
            "mirror {} has {} MiB; a mirror cannot shrink",
            core.name,
            (old.data_blocks() * bs) >> 20
        )));
    }
    if blocks > old.max_data_blocks() {
        return Err(RpcError::invalid_params(format!(
            "mirror {}'s bitmap, sized at creation, covers at most {} MiB; a larger volume needs \
             a new mirror (or a larger region_size at creation)",
            core.name,
            (old.max_data_blocks() * bs) >> 20
        )));
    }
    let serving: Vec<_> = core
        .plexes()
        .into_iter()
        .filter(|p| p.role() == Role::Serving)
        .filter_map(|p| p.bdev().map(|e| (p, e)))
        .collect();
    let need = old.data_offset_blocks() + blocks;
    if let Some((p, e)) = serving.iter().find(|(_, e)| e.info().num_blocks() < need) {
        return Err(RpcError::errno(
            libc::EAGAIN,
            format!(
                "plex {} has {} blocks and needs {need}: grow it first (a remote plex's new \
                 size arrives with its namespace-changed event)",
                p.location,
                e.info().num_blocks()
            ),
        ));
    }
    let smallest = serving.iter().map(|(_, e)| e.info().num_blocks()).min();
    let new = old
        .resized(smallest.unwrap_or(need), blocks)
        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let mut zeroes = Vec::new();
    for (_, e) in &serving {
        let chunks = old.chunk_count()..new.chunk_count();
        zeroes.extend(
            super::blockio::empty_chunks(e, core.uuid, &new, chunks)
                .map_err(|s| RpcError::errno(libc::ENOMEM, format!("{s:?}")))?,
        );
    }
    for r in super::blockio::run(&core.home, zeroes).await {
        r.map_err(|s| RpcError::errno(libc::EIO, format!("zeroing new bitmap chunks: {s:?}")))?;
    }
    on_service(core, move |s, tx| s.grow(new, tx))
        .await?
        .map_err(|e| RpcError::errno(libc::EBUSY, format!("mirror {}: {e}", core.name)))?;
    app.bdevs.get(&core.name)?.resize(blocks);
    Ok(())
}

/// Holds new writes and waits for those in flight: then every plex in sync holds the same
/// data and keeps it until `bdev_mirror_resume` or the lease's end. Answers which plexes are
/// in sync (the ones whose snapshots make a consistent copy).
async fn quiesce(core: &Arc<Core>, timeout_ms: u64) -> Result<Value, RpcError> {
    if !(1..=MAX_QUIESCE_MS).contains(&timeout_ms) {
        return Err(RpcError::invalid_params(format!(
            "timeout_ms must be 1 to {MAX_QUIESCE_MS}"
        )));
    }
    if core.quiesced.swap(true, Ordering::SeqCst) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("mirror {} is already quiesced", core.name),
        ));
    }
    let lease = core.quiesce_lease.fetch_add(1, Ordering::SeqCst) + 1;
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let t0 = std::time::Instant::now();
    while core.writes_in_flight() > 0 {
        if t0.elapsed() >= timeout {
            if core.quiesce_lease.load(Ordering::SeqCst) == lease {
                core.quiesced.store(false, Ordering::SeqCst);
                core.home.send(|_| {});
            }
            return Err(RpcError::errno(
                libc::ETIMEDOUT,
                format!(
                    "mirror {}: writes in flight did not finish within {timeout_ms} ms",
                    core.name
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let weak = Arc::downgrade(core);
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let Some(core) = weak.upgrade() else { return };
        if core.quiesce_lease.load(Ordering::SeqCst) == lease
            && core.quiesced.swap(false, Ordering::SeqCst)
        {
            tracing::warn!(
                "mirror {}: quiesce lease of {timeout_ms} ms ran out; writes resume",
                core.name
            );
            core.home.send(|_| {});
        }
    });
    let serving: Vec<Value> = core
        .plexes()
        .iter()
        .filter(|p| p.role() == Role::Serving)
        .map(|p| json!({"bdev": p.location, "node": p.node}))
        .collect();
    Ok(json!({"plexes_in_sync": serving, "lease_ms": timeout_ms}))
}

/// A mirror as `bdev_mirror_get_mirrors` shows it.
pub fn describe(core: &Core) -> Value {
    let now = SystemTime::now();
    let region = core.layout().region_size();
    let plexes: Vec<Value> = core
        .plexes()
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_removed())
        .map(|(i, p)| {
            let c = p.condition();
            let age = c
                .out_of_sync_since()
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs());
            let reason = match &c {
                Condition::InUse => Value::Null,
                Condition::OutOfSync { why, .. } | Condition::Resyncing { why, .. } => {
                    json!(format!("{why:?}"))
                }
                Condition::Faulted { why, .. } => json!(why.to_string()),
            };
            let resync = match &c {
                Condition::Resyncing { progress, .. } => {
                    let left =
                        progress.regions_total - progress.regions_done.min(progress.regions_total);
                    let pct = if progress.regions_total == 0 {
                        100.0
                    } else {
                        progress.regions_done as f64 * 100.0 / progress.regions_total as f64
                    };
                    let eta = (progress.rate_bps > 0).then(|| left * region / progress.rate_bps);
                    json!({
                        "full": progress.full,
                        "regions_total": progress.regions_total,
                        "regions_done": progress.regions_done,
                        "next_region": progress.next_region,
                        "bytes_copied": progress.bytes_copied,
                        "percent": (pct * 10.0).round() / 10.0,
                        "rate_bytes_per_sec": progress.rate_bps,
                        "eta_sec": eta,
                    })
                }
                _ => Value::Null,
            };
            json!({
                "name": format!("{}.p{i}", core.name),
                "uuid": p.uuid,
                "bdev": p.location,
                "node": p.node,
                "state": if p.is_up() { "Up" } else { "Down" },
                "condition": c.name(),
                "reason": reason,
                "role": format!("{:?}", p.role()),
                "local": p.is_local(),
                "out_of_sync_age_sec": age,
                "in_sync_generation": p.in_sync_generation.load(Ordering::Acquire),
                "resync": resync,
                "last_resync": super::lock(&p.last_resync).as_ref().map(|r| json!({
                    "full": r.full,
                    "regions": r.regions_done,
                    "bytes_copied": r.bytes_copied,
                        "duration_ms": r.duration_ms,
                })),
            })
        })
        .collect();
    let actual = plexes.iter().filter(|p| p["condition"] == "InUse").count();
    let state = if core.failed.load(Ordering::Acquire) {
        "failed"
    } else if actual < plexes.len() {
        "degraded"
    } else {
        "online"
    };
    json!({
        "name": core.name,
        "uuid": core.uuid,
        "state": state,
        "quiesced": core.quiesced.load(Ordering::SeqCst),
        "generation": core.generation.load(Ordering::Acquire),
        "block_size": core.layout().block_size(),
        "num_blocks": core.data_blocks(),
        // Where data starts on each plex, and how far the bitmap lets the mirror grow.
        "data_offset_blocks": core.layout().data_offset_blocks(),
        "max_num_blocks": core.layout().max_data_blocks(),
        "region_size": region,
        "regions": core.intent.regions(),
        "dirty_regions": core.intent.dirty.count(),
        "bitmap_writes_pending": core.bitmap_writes_pending.load(Ordering::SeqCst),
        "resync_rate_bytes_per_sec": core.resync_rate.load(Ordering::Relaxed),
        "bitmap_clear_interval_ms": core.clear_interval_ms.load(Ordering::Relaxed),
        "scheduled_plexes": core.scheduled.load(Ordering::Acquire),
        "actual_plexes": actual,
        "plexes": plexes,
        "assembly_notes": *super::lock(&core.assembly_notes),
    })
}
