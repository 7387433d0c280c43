//! Every bdev of this plexd by name and alias, the examine step modules hook into, and the
//! checks a new bdev's name and geometry must pass.

use super::*;

/// Every bdev of this plexd, by name.
#[derive(Default)]
pub struct BdevRegistry {
    inner: Mutex<RegistryInner>,
}

/// Every lookup is indexed, so registering, finding and deleting a bdev costs the same with
/// 20,000 bdevs as with 2 (a scan per registration made creating them quadratic).
#[derive(Default)]
struct RegistryInner {
    by_name: BTreeMap<String, Arc<BdevEntry>>,
    /// Each alias, to the name of its bdev.
    aliases: HashMap<String, String>,
    /// Each UUID, to the name of its bdev.
    uuids: HashMap<Uuid, String>,
    /// Names by creation sequence, so save_config recreates base bdevs before stacked ones,
    /// and each name's sequence number, to find it there.
    order: BTreeMap<u64, String>,
    seq_of: HashMap<String, u64>,
    next_seq: u64,
    /// Modules' examine steps, run on each new bdev.
    examiners: Vec<Arc<Examiner>>,
}

/// A module's examine step ([`BdevRegistry::add_examiner`]).
pub type Examiner = dyn Fn(&Arc<BdevEntry>) + Send + Sync;

impl RegistryInner {
    /// The name of the bdev that `name` names: itself, an alias, or a UUID as SPDK prints it.
    fn resolve(&self, name: &str) -> Option<&Arc<BdevEntry>> {
        if let Some(e) = self.by_name.get(name) {
            return Some(e);
        }
        let real = self.aliases.get(name).or_else(|| {
            Uuid::parse_str(name)
                .ok()
                .filter(|u| u.to_string() == name)
                .and_then(|u| self.uuids.get(&u))
        })?;
        self.by_name.get(real)
    }

    fn name_taken(&self, name: &str) -> bool {
        self.by_name.contains_key(name) || self.aliases.contains_key(name)
    }
}

impl BdevRegistry {
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<Arc<BdevEntry>, BdevError> {
        let info = bdev.info();
        validate_name(&info.name)?;
        if info.block_size == 0 || !info.block_size.is_multiple_of(512) && info.block_size != 1 {
            return Err(BdevError::InvalidParam(format!(
                "block size {} is not a multiple of 512",
                info.block_size
            )));
        }
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if r.name_taken(&info.name) || info.aliases.iter().any(|a| r.name_taken(a)) {
            return Err(BdevError::Exists(info.name.clone()));
        }
        if r.uuids.contains_key(&info.uuid) {
            return Err(BdevError::InvalidParam(format!(
                "uuid {} is already used by another bdev",
                info.uuid
            )));
        }
        let aliases = info.aliases.clone();
        let entry = Arc::new(BdevEntry::new(bdev, aliases));
        let name = entry.name().to_string();
        for a in &entry.info().aliases {
            r.aliases.insert(a.clone(), name.clone());
        }
        r.uuids.insert(entry.info().uuid, name.clone());
        let seq = r.next_seq;
        r.next_seq += 1;
        r.order.insert(seq, name.clone());
        r.seq_of.insert(name.clone(), seq);
        r.by_name.insert(name, entry.clone());
        let examiners = r.examiners.clone();
        drop(r);
        for ex in examiners {
            ex(&entry);
        }
        Ok(entry)
    }

    /// Adds a module's examine step: `f` sees every bdev registered from now on, right after
    /// its registration, and may claim it (a mirror finding its superblock). It runs on the
    /// registering thread and must not block; I/O it needs is started, not awaited.
    pub fn add_examiner(&self, f: impl Fn(&Arc<BdevEntry>) + Send + Sync + 'static) {
        lock(&self.inner).examiners.push(Arc::new(f));
    }

    /// Finds a bdev by name, alias or UUID.
    pub fn get(&self, name: &str) -> Result<Arc<BdevEntry>, BdevError> {
        let r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        r.resolve(name)
            .cloned()
            .ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// Removes an unclaimed bdev of `module`. Open channels fail further I/O with `Aborted`.
    pub fn unregister(&self, name: &str, module: &str) -> Result<Arc<BdevEntry>, BdevError> {
        let entry = self.get(name)?;
        if entry.bdev.module() != module {
            return Err(BdevError::NotFound(format!(
                "{name} (it is a {} bdev)",
                entry.bdev.module()
            )));
        }
        if let Some(owner) = entry.claimed_by() {
            return Err(BdevError::Claimed {
                name: name.to_string(),
                owner,
            });
        }
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let real = entry.name().to_string();
        r.by_name.remove(&real);
        for a in entry.aliases() {
            r.aliases.remove(&a);
        }
        r.uuids.remove(&entry.info().uuid);
        if let Some(seq) = r.seq_of.remove(&real) {
            r.order.remove(&seq);
        }
        drop(r);
        entry.mark_removed();
        Ok(entry)
    }

    /// Replaces alias `old` of `entry` with `new` (an lvol renamed).
    pub fn rename_alias(&self, entry: &BdevEntry, old: &str, new: &str) -> Result<(), BdevError> {
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if r.name_taken(new) {
            return Err(BdevError::Exists(new.to_string()));
        }
        r.aliases.remove(old);
        r.aliases.insert(new.to_string(), entry.name().to_string());
        drop(r);
        let mut a = lock(&entry.aliases);
        a.retain(|x| x != old);
        a.push(new.to_string());
        Ok(())
    }

    /// All bdevs in creation order.
    pub fn list(&self) -> Vec<Arc<BdevEntry>> {
        let r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        r.order
            .values()
            .filter_map(|n| r.by_name.get(n).cloned())
            .collect()
    }

    /// A name not yet used, `{prefix}{n}` with the smallest n (SPDK's Malloc0, Malloc1, …).
    pub fn next_free_name(&self, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| self.get(n).is_err())
            .expect("an unused name exists")
    }
}

/// Checks a RAM or null device's geometry: a block size of 512 B to 64 KiB in 512-byte steps,
/// and at least one block.
pub fn check_geometry(num_blocks: u64, block_size: u32) -> Result<(), BdevError> {
    if block_size < 512 || !block_size.is_multiple_of(512) || block_size > 65536 {
        return Err(BdevError::InvalidParam(format!(
            "block_size {block_size} must be a multiple of 512 up to 65536"
        )));
    }
    if num_blocks == 0 {
        return Err(BdevError::InvalidParam(
            "num_blocks must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Bdev names end up in NQNs, paths and tables: keep them printable and short.
pub fn validate_name(name: &str) -> Result<(), BdevError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:+@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BdevError::InvalidParam(format!(
            "bdev name {name:?} must be 1-255 characters of letters, digits and _-.:+@"
        )))
    }
}
