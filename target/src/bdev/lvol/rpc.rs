//! SPDK's `bdev_lvol_*` methods, with SPDK's names, parameters and results, so `spdk-rpc`
//! drives them unchanged.

use super::format::{BlobRecord, Op, READ_ONLY, THIN};
use super::inflate::{self, Detach};
use super::store::{self, Service, StoreCore, DEFAULT_CLUSTER_SIZE};
use super::{lock, Busy, LvolCore};
use crate::app::App;
use crate::rpc::{Methods, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLvstore {
    bdev_name: String,
    lvs_name: String,
    cluster_sz: Option<u64>,
    clear_method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSel {
    uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LvolsSel {
    lvs_uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    old_name: String,
    new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLvol {
    lvol_name: String,
    size_in_mib: u64,
    #[serde(default)]
    thin_provision: bool,
    uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    size_in_mib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    lvol_name: String,
    snapshot_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clone {
    snapshot_name: String,
    clone_name: String,
}

fn enodev(msg: String) -> RpcError {
    RpcError::errno(libc::ENODEV, msg)
}

fn store_of(app: &App, name: Option<&str>, uuid: Option<&str>) -> Result<Arc<StoreCore>, RpcError> {
    if name.is_none() && uuid.is_none() {
        return Err(RpcError::invalid_params("give lvs_name or uuid"));
    }
    app.lvol.find(name, uuid).ok_or_else(|| {
        enodev(format!(
            "no lvol store {}",
            name.or(uuid).unwrap_or_default()
        ))
    })
}

/// An lvol by bdev name, UUID or `store/name` alias: its store, blob id and core.
fn lvol_of(app: &App, name: &str) -> Result<(Arc<StoreCore>, u32, Arc<LvolCore>), RpcError> {
    let e = app.bdevs.get(name)?;
    let uuid = e.info().uuid;
    for s in app.lvol.all() {
        let found = lock(&s.lvols)
            .iter()
            .find(|(_, l)| l.uuid == uuid)
            .map(|(id, l)| (*id, l.clone()));
        if let Some((id, l)) = found {
            return Ok((s, id, l));
        }
    }
    Err(enodev(format!("{name} is not an lvol")))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_name(name: &str) -> Result<(), RpcError> {
    if name.is_empty()
        || name.len() > 63
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(RpcError::invalid_params(format!(
            "name {name:?}: 1 to 63 characters, no '/'"
        )));
    }
    Ok(())
}

/// A new lvol, snapshot or clone needs room in the checkpoint, which is sized for
/// [`store::MAX_BLOBS`].
fn room_for_one_more(s: &StoreCore) -> Result<(), RpcError> {
    let n = lock(&s.state).blobs.len() as u64;
    if n >= store::MAX_BLOBS {
        return Err(RpcError::errno(
            libc::ENOSPC,
            format!("the store holds {n} lvols and snapshots, the most it can"),
        ));
    }
    Ok(())
}

/// Validates `ops`, journals them, and answers once they are on disk.
async fn commit(store: &StoreCore, ops: Vec<Op>) -> Result<(), RpcError> {
    let r = store
        .on_service(move |svc: &mut Service, tx| {
            svc.commit_checked(ops, Box::new(move |_, r| drop(tx.send(r))));
        })
        .await
        .map_err(RpcError::internal)?;
    r.map_err(|e| RpcError::errno(libc::EINVAL, e))
}

/// Freezes `lvol`'s I/O, waits for what is in flight, runs `f` on the service (which may
/// journal), and thaws the lvol once `f`'s transaction is done.
pub(super) async fn quiesced<R: Send + 'static>(
    store: &StoreCore,
    lvol: Arc<LvolCore>,
    f: impl FnOnce(&mut Service, Box<dyn FnOnce(Result<R, String>) + Send>) + Send + 'static,
) -> Result<R, RpcError> {
    let r = store
        .on_service(move |svc: &mut Service, tx| {
            let l = lvol.clone();
            svc.quiesce(
                lvol,
                Box::new(move |svc| {
                    f(
                        svc,
                        Box::new(move |r| {
                            l.freeze(false);
                            let _ = tx.send(r);
                        }),
                    )
                }),
            )
        })
        .await
        .map_err(RpcError::internal)?;
    r.map_err(|e| RpcError::errno(libc::EINVAL, e))
}

/// Claims `lvol`'s control slot for `what`, or answers EBUSY naming what holds it.
fn begin(l: &Arc<LvolCore>, name: &str, what: &'static str) -> Result<Busy, RpcError> {
    l.begin(what)
        .map_err(|e| RpcError::errno(libc::EBUSY, format!("{name}: {e}")))
}

fn clusters_for(store: &StoreCore, mib: u64) -> Result<u64, RpcError> {
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| RpcError::invalid_params("size too large"))?;
    Ok(bytes.div_ceil(store.cluster_size))
}

fn describe_store(s: &StoreCore) -> Value {
    let st = lock(&s.state);
    json!({
        "uuid": s.uuid,
        "name": st.name,
        "base_bdev": s.base.name(),
        "total_data_clusters": st.total_clusters,
        "free_clusters": st.free_clusters(),
        "block_size": s.block_size,
        "cluster_size": s.cluster_size,
    })
}

fn describe_lvols(s: &StoreCore) -> Vec<Value> {
    let st = lock(&s.state);
    let store_name = st.name.clone();
    st.blobs
        .values()
        .map(|b| {
            let parent = b.parent().and_then(|p| st.blobs.get(&p));
            let clones: Vec<&str> = st
                .children(b.rec.id)
                .iter()
                .map(|c| c.rec.name.as_str())
                .collect();
            let mut v = json!({
                "alias": format!("{store_name}/{}", b.rec.name),
                "uuid": b.rec.uuid,
                "name": b.rec.name,
                "is_thin_provisioned": b.is_thin(),
                "is_snapshot": b.is_snapshot(),
                "is_clone": parent.is_some(),
                "is_esnap_clone": false,
                "is_degraded": false,
                "is_read_only": b.is_read_only(),
                "lvs": {"name": store_name, "uuid": s.uuid},
                "num_allocated_clusters": b.allocated(),
                "num_clusters": b.rec.clusters,
                "provisioned_size": b.rec.clusters * s.cluster_size,
                "allocated_size": b.allocated() * s.cluster_size,
                "creation_time": b.rec.created,
            });
            if let Some(p) = parent {
                v["base_snapshot"] = json!(p.rec.name);
            }
            if b.is_snapshot() {
                v["clones"] = json!(clones);
            }
            v
        })
        .collect()
}

pub fn register(m: &mut Methods) {
    m.add(
        "bdev_lvol_create_lvstore",
        |app: Arc<App>, p: CreateLvstore| async move {
            check_name(&p.lvs_name)?;
            if app.lvol.find(Some(&p.lvs_name), None).is_some() {
                return Err(RpcError::errno(
                    libc::EEXIST,
                    format!("lvol store {} exists", p.lvs_name),
                ));
            }
            let clear = match p.clear_method.as_deref() {
                None | Some("unmap") | Some("write_zeroes") => true,
                Some("none") => false,
                Some(m) => {
                    return Err(RpcError::invalid_params(format!(
                        "clear_method {m}: none, unmap or write_zeroes"
                    )))
                }
            };
            let base = app.bdevs.get(&p.bdev_name)?;
            let cs = p.cluster_sz.unwrap_or(DEFAULT_CLUSTER_SIZE);
            let s = store::create(&app, &base, &p.lvs_name, cs, clear)
                .await
                .map_err(|e| RpcError::errno(libc::EINVAL, e))?;
            tracing::info!(
                "lvol store {} ({}) created on {}: {} clusters of {cs}",
                p.lvs_name,
                s.uuid,
                p.bdev_name,
                s.total_clusters
            );
            Ok::<_, RpcError>(json!(s.uuid))
        },
    );
    m.add(
        "bdev_lvol_get_lvstores",
        |app: Arc<App>, p: StoreSel| async move {
            let stores = if p.lvs_name.is_some() || p.uuid.is_some() {
                vec![store_of(&app, p.lvs_name.as_deref(), p.uuid.as_deref())?]
            } else {
                app.lvol.all()
            };
            Ok::<_, RpcError>(json!(stores
                .iter()
                .map(|s| describe_store(s))
                .collect::<Vec<_>>()))
        },
    );
    m.add(
        "bdev_lvol_get_lvols",
        |app: Arc<App>, p: LvolsSel| async move {
            let stores = if p.lvs_name.is_some() || p.lvs_uuid.is_some() {
                vec![store_of(
                    &app,
                    p.lvs_name.as_deref(),
                    p.lvs_uuid.as_deref(),
                )?]
            } else {
                app.lvol.all()
            };
            let all: Vec<Value> = stores.iter().flat_map(|s| describe_lvols(s)).collect();
            Ok::<_, RpcError>(json!(all))
        },
    );
    m.add(
        "bdev_lvol_rename_lvstore",
        |app: Arc<App>, p: Rename| async move {
            check_name(&p.new_name)?;
            let s = store_of(&app, Some(&p.old_name), None)?;
            if app.lvol.find(Some(&p.new_name), None).is_some() {
                return Err(RpcError::errno(
                    libc::EEXIST,
                    format!("lvol store {} exists", p.new_name),
                ));
            }
            commit(
                &s,
                vec![Op::RenameStore {
                    name: p.new_name.clone(),
                }],
            )
            .await?;
            *lock(&s.name) = p.new_name.clone();
            // Every lvol's alias follows: old/name becomes new/name.
            let lvols: Vec<(u32, Arc<LvolCore>)> = lock(&s.lvols)
                .iter()
                .map(|(i, l)| (*i, l.clone()))
                .collect();
            for (id, l) in lvols {
                let name = lock(&s.state).blob(id).map(|b| b.rec.name.clone());
                if let (Ok(e), Ok(name)) = (app.bdevs.get(&l.uuid.to_string()), name) {
                    let (old, new) = (
                        format!("{}/{name}", p.old_name),
                        format!("{}/{name}", p.new_name),
                    );
                    if let Err(err) = app.bdevs.rename_alias(&e, &old, &new) {
                        tracing::warn!("lvol {}: alias {old} not renamed: {err}", l.uuid);
                    }
                }
            }
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_lvol_delete_lvstore",
        |app: Arc<App>, p: StoreSel| async move {
            let s = store_of(&app, p.lvs_name.as_deref(), p.uuid.as_deref())?;
            // Every lvol goes with it, as in SPDK; none may be in use.
            let lvols: Vec<Arc<LvolCore>> = lock(&s.lvols).values().cloned().collect();
            for l in &lvols {
                if let Ok(e) = app.bdevs.get(&l.uuid.to_string()) {
                    if let Some(owner) = e.claimed_by() {
                        return Err(RpcError::errno(
                            libc::EBUSY,
                            format!("lvol {} is in use by {owner}", e.name()),
                        ));
                    }
                }
            }
            for l in &lvols {
                let _ = app.bdevs.unregister(&l.uuid.to_string(), "lvol");
            }
            lock(&s.lvols).clear();
            app.lvol.remove(s.uuid);
            // The superblocks go: the base holds no store from here on.
            let bs = s.block_size as u64;
            let wipe = vec![crate::bdev::mirror::blockio::BlockIo::write(
                &s.base,
                0,
                &[0u8; 2 * super::format::PAGE],
            )
            .map_err(|st| RpcError::internal(format!("{st:?}")))?];
            let _ = bs;
            for r in crate::bdev::mirror::blockio::run(&s.home, wipe).await {
                r.map_err(|st| {
                    RpcError::errno(libc::EIO, format!("wiping the superblocks: {st:?}"))
                })?;
            }
            let _ = s
                .on_service(|svc: &mut Service, tx| {
                    svc.stop();
                    let _ = tx.send(());
                })
                .await;
            s.base.release();
            tracing::info!("lvol store {} ({}) deleted", lock(&s.name), s.uuid);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_lvol_create",
        |app: Arc<App>, p: CreateLvol| async move {
            check_name(&p.lvol_name)?;
            let s = store_of(&app, p.lvs_name.as_deref(), p.uuid.as_deref())?;
            room_for_one_more(&s)?;
            let clusters = clusters_for(&s, p.size_in_mib)?;
            if clusters == 0 {
                return Err(RpcError::invalid_params("size_in_mib must be at least 1"));
            }
            let uuid = Uuid::new_v4();
            let name = p.lvol_name.clone();
            let thin = p.thin_provision;
            let id = s
                .on_service(move |svc: &mut Service, tx| {
                    let st = lock(&svc.core.state);
                    let id = st.next_blob;
                    let ops = vec![Op::CreateBlob(BlobRecord {
                        id,
                        flags: if thin { THIN } else { 0 },
                        parent: 0,
                        uuid,
                        name,
                        clusters,
                        created: now_secs(),
                    })];
                    if !thin && (st.free_clusters() as u64) < clusters {
                        let _ = tx.send(Err(format!(
                            "{clusters} clusters wanted, {} free",
                            st.free_clusters()
                        )));
                        return;
                    }
                    drop(st);
                    svc.commit_checked(ops, Box::new(move |_, r| drop(tx.send(r.map(|_| id)))));
                })
                .await
                .map_err(RpcError::internal)?
                .map_err(|e| RpcError::errno(libc::ENOSPC, e))?;
            if !thin {
                // Thick: every cluster now, each handed out (and zeroed where needed) as a
                // first write would.
                let what = format!("create {}", p.lvol_name);
                inflate::allocate(&s, id, 0..clusters as u32, &what).await?;
            }
            store::register_lvol(&app, &s, id, uuid, &p.lvol_name, clusters, false)
                .map_err(RpcError::internal)?;
            Ok::<_, RpcError>(json!(uuid))
        },
    );
    m.add(
        "bdev_lvol_delete",
        |app: Arc<App>, p: ByName| async move {
            let (s, id, l) = lvol_of(&app, &p.name)?;
            let _busy = begin(&l, &p.name, "a delete")?;
            {
                let st = lock(&s.state);
                let kids: Vec<String> = st.children(id).iter().map(|c| c.rec.name.clone()).collect();
                if !kids.is_empty() {
                    return Err(RpcError::errno(
                        libc::EBUSY,
                        format!(
                            "{} has clones that depend on it: {}; delete, inflate or decouple them first",
                            p.name,
                            kids.join(", ")
                        ),
                    ));
                }
            }
            app.bdevs.unregister(&l.uuid.to_string(), "lvol")?;
            lock(&s.lvols).remove(&id);
            quiesced(&s, l, move |svc, done| {
                let ops = vec![Op::DeleteBlob { id }];
                svc.commit_checked(ops, Box::new(move |svc, r| {
                    if r.is_ok() {
                        lock(&svc.core.views).remove(&id);
                    }
                    done(r)
                }));
            })
            .await?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add("bdev_lvol_resize", |app: Arc<App>, p: Resize| async move {
        let (s, id, l) = lvol_of(&app, &p.name)?;
        let _busy = begin(&l, &p.name, "a resize")?;
        let clusters = clusters_for(&s, p.size_in_mib)?;
        if clusters == 0 {
            return Err(RpcError::invalid_params("size_in_mib must be at least 1"));
        }
        let entry = app.bdevs.get(&p.name)?;
        let lv = l.clone();
        quiesced(&s, l, move |svc, done| {
            let ops = vec![Op::Resize { blob: id, clusters }];
            svc.commit_checked(
                ops,
                Box::new(move |svc, r| {
                    if r.is_ok() {
                        // A new view of the new length; the parents' stay shared.
                        svc.core.republish(&lv, id);
                    }
                    done(r)
                }),
            );
        })
        .await?;
        entry.resize(s.lvol_blocks(clusters));
        Ok::<_, RpcError>(true)
    });
    m.add(
        "bdev_lvol_snapshot",
        |app: Arc<App>, p: Snapshot| async move {
            check_name(&p.snapshot_name)?;
            let (s, id, l) = lvol_of(&app, &p.lvol_name)?;
            let _busy = begin(&l, &p.lvol_name, "a snapshot")?;
            room_for_one_more(&s)?;
            let snap_uuid = Uuid::new_v4();
            let name = p.snapshot_name.clone();
            let lv = l.clone();
            let new_id = quiesced(&s, l, move |svc, done| {
                let new_id = lock(&svc.core.state).next_blob;
                let ops = vec![Op::Snapshot {
                    origin: id,
                    new_id,
                    uuid: snap_uuid,
                    name,
                    created: now_secs(),
                }];
                svc.commit_checked(
                    ops,
                    Box::new(move |svc, r| {
                        if r.is_ok() {
                            // The lvol now writes to its new, empty blob over the snapshot's.
                            let old = lv.view();
                            let st = lock(&svc.core.state);
                            if let Some(b) = st.blobs.get(&new_id) {
                                let v = super::BlobView::new(new_id, &b.dense(), Some(old));
                                lock(&svc.core.views).insert(new_id, v.clone());
                                lv.set_view(v);
                            }
                            let mut lvols = lock(&svc.core.lvols);
                            if let Some(x) = lvols.remove(&id) {
                                lvols.insert(new_id, x);
                            }
                        }
                        done(r.map(|_| new_id))
                    }),
                );
            })
            .await?;
            let clusters = lock(&s.state).blob(id).map(|b| b.rec.clusters).unwrap_or(0);
            let _ = new_id;
            store::register_lvol(&app, &s, id, snap_uuid, &p.snapshot_name, clusters, true)
                .map_err(RpcError::internal)?;
            Ok::<_, RpcError>(json!(snap_uuid))
        },
    );
    m.add("bdev_lvol_clone", |app: Arc<App>, p: Clone| async move {
        check_name(&p.clone_name)?;
        let (s, snap, _) = lvol_of(&app, &p.snapshot_name)?;
        room_for_one_more(&s)?;
        let (clusters, ro) = {
            let st = lock(&s.state);
            let b = st.blob(snap).map_err(RpcError::internal)?;
            (b.rec.clusters, b.is_read_only())
        };
        if !ro {
            return Err(RpcError::invalid_params(format!(
                "{} is not a snapshot or read-only lvol: only those can be cloned",
                p.snapshot_name
            )));
        }
        let uuid = Uuid::new_v4();
        let name = p.clone_name.clone();
        let id = s
            .on_service(move |svc: &mut Service, tx| {
                let id = lock(&svc.core.state).next_blob;
                let ops = vec![Op::CreateBlob(BlobRecord {
                    id,
                    flags: THIN,
                    parent: snap,
                    uuid,
                    name,
                    clusters,
                    created: now_secs(),
                })];
                svc.commit_checked(ops, Box::new(move |_, r| drop(tx.send(r.map(|_| id)))));
            })
            .await
            .map_err(RpcError::internal)?
            .map_err(|e| RpcError::errno(libc::EINVAL, e))?;
        store::register_lvol(&app, &s, id, uuid, &p.clone_name, clusters, false)
            .map_err(RpcError::internal)?;
        Ok::<_, RpcError>(json!(uuid))
    });
    m.add(
        "bdev_lvol_set_read_only",
        |app: Arc<App>, p: ByName| async move {
            let (s, id, l) = lvol_of(&app, &p.name)?;
            let _busy = begin(&l, &p.name, "set_read_only")?;
            let flags = lock(&s.state)
                .blob(id)
                .map(|b| b.rec.flags)
                .map_err(RpcError::internal)?;
            let lv = l.clone();
            quiesced(&s, l, move |svc, done| {
                let ops = vec![Op::SetFlags {
                    blob: id,
                    flags: flags | READ_ONLY,
                }];
                svc.commit(
                    ops,
                    Box::new(move |_, r| {
                        if r.is_ok() {
                            lv.read_only
                                .store(true, std::sync::atomic::Ordering::Release);
                        }
                        done(r)
                    }),
                );
            })
            .await?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add("bdev_lvol_rename", |app: Arc<App>, p: Rename| async move {
        check_name(&p.new_name)?;
        let (s, id, l) = lvol_of(&app, &p.old_name)?;
        let _busy = begin(&l, &p.old_name, "a rename")?;
        let entry = app.bdevs.get(&l.uuid.to_string())?;
        let store = lock(&s.name).clone();
        let old = format!(
            "{store}/{}",
            lock(&s.state)
                .blob(id)
                .map_err(RpcError::internal)?
                .rec
                .name
        );
        let new = format!("{store}/{}", p.new_name);
        if app.bdevs.get(&new).is_ok() {
            return Err(RpcError::errno(libc::EEXIST, format!("{new} exists")));
        }
        commit(
            &s,
            vec![Op::Rename {
                blob: id,
                name: p.new_name.clone(),
            }],
        )
        .await?;
        app.bdevs.rename_alias(&entry, &old, &new)?;
        Ok::<_, RpcError>(true)
    });
    for (method, how) in [
        ("bdev_lvol_inflate", Detach::Inflate),
        ("bdev_lvol_decouple_parent", Detach::DecoupleParent),
    ] {
        m.add(method, move |app: Arc<App>, p: ByName| async move {
            let (s, id, l) = lvol_of(&app, &p.name)?;
            let _busy = begin(&l, &p.name, method)?;
            inflate::detach(&s, l, id, &p.name, how).await?;
            Ok::<_, RpcError>(true)
        });
    }
    m.add(
        "bdev_lvol_check_lvstore",
        |app: Arc<App>, p: StoreSel| async move {
            let s = store_of(&app, p.lvs_name.as_deref(), p.uuid.as_deref())?;
            Ok::<_, RpcError>(check_live(&s).await)
        },
    );
}

/// Reads the store's metadata back from its base, checks it, and compares it with the state
/// in memory (a few times: a journal write may land between the two looks).
async fn check_live(s: &StoreCore) -> Value {
    let mut problems = lock(&s.state).check();
    let mut matches = false;
    for _ in 0..50 {
        match store::read_store(&s.home, &s.base).await {
            Ok(Some((_, disk, _))) => {
                problems.extend(disk.check().into_iter().map(|p| format!("on disk: {p}")));
                if disk == *lock(&s.state) {
                    matches = true;
                    break;
                }
            }
            Ok(None) => {
                problems.push("no store metadata on the base".into());
                break;
            }
            Err(e) => {
                problems.push(format!("on disk: {e}"));
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    problems.dedup();
    if !matches && problems.is_empty() {
        problems.push("the metadata on disk differs from the store in memory".into());
    }
    let st = lock(&s.state);
    json!({
        "name": st.name,
        "uuid": s.uuid,
        "total_data_clusters": st.total_clusters,
        "free_clusters": st.free_clusters(),
        "lvols": st.blobs.len(),
        "problems": problems,
    })
}
