//! Making a new store on a bdev, and loading one from the bdev it lives on: superblocks,
//! checkpoint and journal replay, then the store's lvols.

use super::*;

fn io_err(what: &str, s: IoStatus) -> String {
    format!("{what}: {s:?}")
}

/// Makes a new store on `base`: zeroes the data area unless told not to, writes an empty
/// checkpoint, then the superblocks (the superblock last: a crash before it leaves no store).
pub async fn create(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    name: &str,
    cluster_size: u64,
    clear: bool,
) -> Result<Arc<StoreCore>, String> {
    let bs = base.info().block_size;
    if !matches!(bs, 512 | 4096) {
        return Err(format!(
            "{}: block size {bs}; a store needs 512 or 4096",
            base.name()
        ));
    }
    if cluster_size < 64 << 10
        || !cluster_size.is_multiple_of(PAGE as u64)
        || cluster_size > 1 << 30
    {
        return Err(format!(
            "cluster size {cluster_size}: must be a multiple of 4 KiB from 64 KiB to 1 GiB"
        ));
    }
    let size = base.info().size_bytes();
    // Each cluster may cost 12 bytes in a checkpoint (an extent of its own), each blob ~320.
    let clusters_max = size / cluster_size;
    let ckpt_pages = (4096 + MAX_BLOBS * 320 + clusters_max * 12).div_ceil(PAGE as u64);
    let meta_pages = format::SUPER_SLOTS + JOURNAL_PAGES + 2 * ckpt_pages;
    let data_offset = (meta_pages * PAGE as u64).div_ceil(cluster_size) * cluster_size;
    let total = size.saturating_sub(data_offset) / cluster_size;
    if total == 0 || total > 1 << 26 {
        return Err(format!(
            "{}: {size} bytes make {total} clusters of {cluster_size} after {data_offset} bytes \
             of metadata; a store has 1 to 2^26 (use larger clusters)",
            base.name()
        ));
    }
    let uuid = Uuid::new_v4();
    let journal_page = format::SUPER_SLOTS;
    let ckpt0 = journal_page + JOURNAL_PAGES;
    let mut sb = Superblock {
        seq: 1,
        uuid,
        cluster_size,
        block_size: bs,
        data_offset,
        total_clusters: total,
        journal_page,
        journal_pages: JOURNAL_PAGES,
        ckpt_page: [ckpt0, ckpt0 + ckpt_pages],
        ckpt_pages,
        active: 0,
        ckpt_len: 0,
        ckpt_crc: 0,
        journal_seq: 1,
    };
    // Without clearing, no cluster is known to hold zeroes.
    let clean_from = if clear { 0 } else { total as u32 };
    let state = State::new(uuid, name.to_string(), total as u32, clean_from);
    let ckpt = state.to_checkpoint(sb.journal_seq).encode();
    sb.ckpt_len = ckpt.len() as u64;
    sb.ckpt_crc = crc32c::crc32c(&ckpt);
    let ckpt = pad(ckpt);

    base.claim(&format!("lvol store {name}"))
        .map_err(|e| e.to_string())?;
    let home = app.reactors.handles()[0].clone();
    let res = async {
        let page_lba = |p: u64| p * PAGE as u64 / bs as u64;
        // Old superblocks go first, on their own: a crash from here on leaves nothing that
        // looks like a store until the new superblock is written, last.
        let wipe = vec![
            BlockIo::write(base, 0, &[0u8; 2 * PAGE]).map_err(|s| io_err("superblock", s))?,
            BlockIo::flush(base),
        ];
        for r in blockio::run(&home, wipe).await {
            r.map_err(|s| io_err("wiping old superblocks", s))?;
        }
        let mut first = Vec::new();
        if clear {
            let mut lba = data_offset / bs as u64;
            let end = sb.end_bytes() / bs as u64;
            let step = (1u64 << 30) / bs as u64;
            while lba < end {
                let n = step.min(end - lba);
                first.push(BlockIo {
                    bdev: base.clone(),
                    io_type: IoType::WriteZeroes,
                    offset_blocks: lba,
                    nblocks: n,
                    data: None,
                });
                lba += n;
            }
        }
        // The journal ring is zeroed too, so no page of an older store can be replayed.
        first.push(BlockIo {
            bdev: base.clone(),
            io_type: IoType::WriteZeroes,
            offset_blocks: page_lba(journal_page),
            nblocks: page_lba(JOURNAL_PAGES),
            data: None,
        });
        first.push(
            BlockIo::write(base, page_lba(sb.ckpt_page[0]), &ckpt)
                .map_err(|s| io_err("checkpoint", s))?,
        );
        for r in blockio::run(&home, first).await {
            r.map_err(|s| io_err("clearing the store", s))?;
        }
        for r in blockio::run(&home, vec![BlockIo::flush(base)]).await {
            r.map_err(|s| io_err("flushing", s))?;
        }
        let slots = vec![
            // Slot seq % 2: each new superblock goes to the slot the current one is not in.
            BlockIo::write(base, page_lba(sb.seq % format::SUPER_SLOTS), &sb.encode())
                .map_err(|s| io_err("superblock", s))?,
        ];
        for r in blockio::run(&home, slots).await {
            r.map_err(|s| io_err("superblock", s))?;
        }
        for r in blockio::run(&home, vec![BlockIo::flush(base)]).await {
            r.map_err(|s| io_err("flushing", s))?;
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = res {
        base.release();
        return Err(e);
    }
    Ok(start(app, base, sb, state, home).await)
}

/// What a base holds: `None` when it has no store; an error naming the damaged block when it
/// has one that cannot be loaded.
pub async fn read_store(
    home: &ReactorHandle,
    base: &Arc<BdevEntry>,
) -> Result<Option<(Superblock, State, Resume)>, String> {
    let bs = base.info().block_size as u64;
    if !matches!(bs, 512 | 4096) || base.info().size_bytes() < 2 * PAGE as u64 {
        return Ok(None);
    }
    let page_lba = |p: u64| p * PAGE as u64 / bs;
    let mut r = blockio::run(home, vec![BlockIo::read(base, 0, page_lba(2))]).await;
    let head = r
        .remove(0)
        .map_err(|s| io_err("reading the superblocks", s))?;
    let Some(sb) = image::pick_superblock(&head)? else {
        return Ok(None);
    };
    image::check_fits(&sb, bs, base.info().size_bytes(), base.name())?;
    let (ckpt_page, ckpt_pages) = image::checkpoint_pages(&sb);
    let reads = vec![
        BlockIo::read(base, page_lba(ckpt_page), page_lba(ckpt_pages)),
        BlockIo::read(base, page_lba(sb.journal_page), page_lba(sb.journal_pages)),
    ];
    let mut r = blockio::run(home, reads).await.into_iter();
    let ckpt = r
        .next()
        .unwrap_or(Err(IoStatus::Aborted))
        .map_err(|s| io_err("reading the checkpoint", s))?;
    let journal = r
        .next()
        .unwrap_or(Err(IoStatus::Aborted))
        .map_err(|s| io_err("reading the journal", s))?;
    let (state, resume) = image::replay(&sb, &ckpt, &journal)?;
    Ok(Some((sb, state, resume)))
}

/// Loads the store on `base` if it has one (the examine step).
pub async fn load(app: &Arc<App>, base: &Arc<BdevEntry>) -> Result<Option<Arc<StoreCore>>, String> {
    let home = app.reactors.handles()[0].clone();
    let Some((sb, state, resume)) = read_store(&home, base).await? else {
        return Ok(None);
    };
    if app.lvol.find(None, Some(&sb.uuid.to_string())).is_some() {
        return Err(format!(
            "store {} is loaded already (another copy?)",
            sb.uuid
        ));
    }
    base.claim(&format!("lvol store {}", state.name))
        .map_err(|e| e.to_string())?;
    let core = start_with_seq(app, base, sb, state, home, resume).await;
    Ok(Some(core))
}

async fn start(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    sb: Superblock,
    state: State,
    home: ReactorHandle,
) -> Arc<StoreCore> {
    let resume = Resume {
        seq: sb.journal_seq,
        prev: None,
        torn: false,
    };
    start_with_seq(app, base, sb, state, home, resume).await
}

async fn start_with_seq(
    app: &Arc<App>,
    base: &Arc<BdevEntry>,
    sb: Superblock,
    state: State,
    home: ReactorHandle,
    resume: Resume,
) -> Arc<StoreCore> {
    let core = Arc::new(StoreCore {
        uuid: sb.uuid,
        name: Mutex::new(state.name.clone()),
        base: base.clone(),
        block_size: sb.block_size,
        cluster_size: sb.cluster_size,
        data_offset: sb.data_offset,
        total_clusters: sb.total_clusters as u32,
        home: home.clone(),
        state: Mutex::new(state),
        views: Mutex::new(HashMap::new()),
        lvols: Mutex::new(HashMap::new()),
        sb: Mutex::new(sb),
        requests: SegQueue::new(),
        failed: AtomicBool::new(false),
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let svc_core = core.clone();
    home.send(move |ctx| {
        let svc = Service::new(svc_core.clone(), resume);
        let name = format!("lvol store {}", lock(&svc_core.name));
        let mut svc = match svc {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{name}: {e}");
                let _ = tx.send(());
                return;
            }
        };
        let _ = tx.send(());
        ctx.add_poller(fn_poller(name, move |_| svc.poll()));
    });
    let _ = rx.await;
    app.lvol.add(core.clone());
    // Every lvol and snapshot becomes a bdev again.
    let blobs: Vec<(u32, Uuid, String, u64, bool)> = {
        let s = lock(&core.state);
        s.blobs
            .values()
            .map(|b| {
                (
                    b.rec.id,
                    b.rec.uuid,
                    b.rec.name.clone(),
                    b.rec.clusters,
                    b.is_read_only(),
                )
            })
            .collect()
    };
    for (id, uuid, name, clusters, ro) in blobs {
        if let Err(e) = register_lvol(app, &core, id, uuid, &name, clusters, ro) {
            tracing::error!("lvol {name}: not registered: {e}");
        }
    }
    core
}

/// Makes blob `id` a bdev (named by its UUID, aliased `store/name`, as SPDK's).
pub fn register_lvol(
    app: &App,
    core: &Arc<StoreCore>,
    id: u32,
    uuid: Uuid,
    name: &str,
    clusters: u64,
    read_only: bool,
) -> Result<Arc<LvolCore>, String> {
    let view = {
        let s = lock(&core.state);
        core.view_of(&s, id)
            .ok_or_else(|| format!("blob {id} does not exist"))?
    };
    let lvol = LvolCore::new(core.clone(), uuid, view, read_only);
    let alias = format!("{}/{name}", lock(&core.name));
    let bdev = LvolBdev::new(lvol.clone(), core.lvol_blocks(clusters), alias);
    app.bdevs
        .register(Arc::new(bdev))
        .map_err(|e| e.to_string())?;
    lock(&core.lvols).insert(id, lvol.clone());
    Ok(lvol)
}
