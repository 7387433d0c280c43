//! The store's metadata as a value: blobs, their cluster maps, which clusters are in use.
//! Loading is "checkpoint, then every whole journal transaction after it", through
//! [`State::apply`], which refuses any op that would break an invariant (a cluster owned twice,
//! a parent that does not exist, an index past the end) rather than load a store half-way.
//! [`State::check`] is the checker `plexctl lvstore check` and the crash test run.

use super::format::{BlobRecord, Checkpoint, Extent, Op, READ_ONLY, SNAPSHOT, THIN};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Map entry of an index with no cluster of its own (in the data path's dense maps).
pub const UNALLOCATED: u32 = u32::MAX;
/// The most clusters one blob may span (64 TiB at 4 MiB clusters): its dense map in the data
/// path is 4 bytes per cluster.
pub const MAX_BLOB_CLUSTERS: u64 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub rec: BlobRecord,
    /// Index → cluster, for the indexes that have one: memory follows what was written, not
    /// the size a thin blob claims (a damaged size cannot make a load allocate much).
    pub map: BTreeMap<u32, u32>,
}

impl Blob {
    pub fn allocated(&self) -> u64 {
        self.map.len() as u64
    }

    /// The cluster of index `i`, or [`UNALLOCATED`].
    pub fn get(&self, i: u32) -> u32 {
        self.map.get(&i).copied().unwrap_or(UNALLOCATED)
    }

    /// The map as the data path holds it: one entry per index.
    pub fn dense(&self) -> Vec<u32> {
        let mut v = vec![UNALLOCATED; self.rec.clusters as usize];
        for (&i, &c) in &self.map {
            if let Some(e) = v.get_mut(i as usize) {
                *e = c;
            }
        }
        v
    }
    pub fn is_snapshot(&self) -> bool {
        self.rec.flags & SNAPSHOT != 0
    }
    pub fn is_read_only(&self) -> bool {
        self.rec.flags & READ_ONLY != 0
    }
    pub fn is_thin(&self) -> bool {
        self.rec.flags & THIN != 0
    }
    pub fn parent(&self) -> Option<u32> {
        (self.rec.parent != 0).then_some(self.rec.parent)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub uuid: Uuid,
    pub name: String,
    pub total_clusters: u32,
    /// Clusters from here on hold zeroes and were never handed out.
    pub clean_from: u32,
    pub next_blob: u32,
    pub blobs: BTreeMap<u32, Blob>,
    /// Which clusters are in use: one bit each.
    used: Vec<u64>,
    used_count: u32,
}

fn bad<T>(msg: String) -> Result<T, String> {
    Err(msg)
}

impl State {
    pub fn new(uuid: Uuid, name: String, total_clusters: u32, clean_from: u32) -> State {
        State {
            uuid,
            name,
            total_clusters,
            clean_from,
            next_blob: 1,
            blobs: BTreeMap::new(),
            used: vec![0; (total_clusters as usize).div_ceil(64)],
            used_count: 0,
        }
    }

    pub fn is_used(&self, c: u32) -> bool {
        self.used[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    fn set_used(&mut self, c: u32, on: bool) {
        let w = &mut self.used[(c / 64) as usize];
        let bit = 1u64 << (c % 64);
        if on && *w & bit == 0 {
            self.used_count += 1;
        } else if !on && *w & bit != 0 {
            self.used_count -= 1;
        }
        if on {
            *w |= bit
        } else {
            *w &= !bit
        }
    }

    pub fn free_clusters(&self) -> u32 {
        self.total_clusters - self.used_count
    }

    /// The lowest free cluster at or after `from`, not in `skip`.
    pub fn find_free(&self, from: u32, skip: &dyn Fn(u32) -> bool) -> Option<u32> {
        let mut c = from;
        while c < self.total_clusters {
            let w = self.used[(c / 64) as usize];
            if w == u64::MAX && c.is_multiple_of(64) {
                c += 64;
                continue;
            }
            if w & (1 << (c % 64)) == 0 && !skip(c) {
                return Some(c);
            }
            c += 1;
        }
        None
    }

    pub fn blob(&self, id: u32) -> Result<&Blob, String> {
        self.blobs
            .get(&id)
            .ok_or_else(|| format!("blob {id} does not exist"))
    }

    fn blob_mut(&mut self, id: u32) -> Result<&mut Blob, String> {
        self.blobs
            .get_mut(&id)
            .ok_or_else(|| format!("blob {id} does not exist"))
    }

    pub fn by_name(&self, name: &str) -> Option<&Blob> {
        self.blobs.values().find(|b| b.rec.name == name)
    }

    /// Blobs whose parent is `id`.
    pub fn children(&self, id: u32) -> Vec<&Blob> {
        self.blobs.values().filter(|b| b.rec.parent == id).collect()
    }

    fn check_cluster_range(&self, cluster: u32, count: u32) -> Result<(), String> {
        if cluster as u64 + count as u64 > self.total_clusters as u64 {
            return bad(format!(
                "clusters {cluster}+{count} pass the end ({})",
                self.total_clusters
            ));
        }
        Ok(())
    }

    fn check_name_free(&self, name: &str, except: u32) -> Result<(), String> {
        match self.by_name(name) {
            Some(b) if b.rec.id != except => bad(format!("name {name} is taken")),
            _ => Ok(()),
        }
    }

    fn release(&mut self, clusters: Vec<u32>) {
        for c in clusters.into_iter().filter(|&c| c != UNALLOCATED) {
            self.set_used(c, false);
        }
    }

    /// Applies one op, or says why it cannot be (and changes nothing).
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::CreateBlob(rec) => {
                if self.blobs.contains_key(&rec.id) {
                    return bad(format!("blob {} exists already", rec.id));
                }
                if rec.parent != 0 {
                    self.blob(rec.parent)?;
                }
                self.check_name_free(&rec.name, 0)?;
                if rec.clusters > MAX_BLOB_CLUSTERS {
                    return bad(format!("blob {} of {} clusters", rec.id, rec.clusters));
                }
                self.blobs.insert(
                    rec.id,
                    Blob {
                        rec: rec.clone(),
                        map: BTreeMap::new(),
                    },
                );
                self.next_blob = self.next_blob.max(rec.id.saturating_add(1));
            }
            Op::DeleteBlob { id } => {
                if let Some(c) = self.children(*id).first() {
                    return bad(format!("blob {id} has a clone, blob {}", c.rec.id));
                }
                let b = self
                    .blobs
                    .remove(id)
                    .ok_or_else(|| format!("blob {id} does not exist"))?;
                self.release(b.map.into_values().collect());
            }
            &Op::Alloc {
                blob,
                index,
                cluster,
                count,
            } => {
                self.check_cluster_range(cluster, count)?;
                let b = self.blob(blob)?;
                if index as u64 + count as u64 > b.rec.clusters {
                    return bad(format!("blob {blob}: index {index}+{count} past its end"));
                }
                for i in 0..count {
                    if b.map.contains_key(&(index + i)) {
                        return bad(format!("blob {blob}: index {} has a cluster", index + i));
                    }
                    if self.is_used(cluster + i) {
                        return bad(format!("cluster {} is in use already", cluster + i));
                    }
                }
                for i in 0..count {
                    self.set_used(cluster + i, true);
                }
                let b = self.blob_mut(blob)?;
                for i in 0..count {
                    b.map.insert(index + i, cluster + i);
                }
            }
            &Op::Free { blob, index, count } => {
                let b = self.blob_mut(blob)?;
                let end = index.saturating_add(count);
                let gone: Vec<u32> = b.map.range(index..end).map(|(&i, _)| i).collect();
                let freed = gone.iter().filter_map(|i| b.map.remove(i)).collect();
                self.release(freed);
            }
            &Op::Resize { blob, clusters } => {
                if clusters > MAX_BLOB_CLUSTERS {
                    return bad(format!("blob {blob}: {clusters} clusters"));
                }
                let b = self.blob_mut(blob)?;
                let freed = b.map.split_off(&(clusters as u32));
                b.rec.clusters = clusters;
                self.release(freed.into_values().collect());
            }
            Op::Snapshot {
                origin,
                new_id,
                uuid,
                name,
                created,
            } => {
                if self.blobs.contains_key(new_id) || *new_id == 0 {
                    return bad(format!("blob {new_id} exists already"));
                }
                self.check_name_free(name, 0)?;
                let o = self.blob_mut(*origin)?;
                let live = BlobRecord {
                    id: *new_id,
                    flags: THIN | (o.rec.flags & READ_ONLY),
                    parent: *origin,
                    ..o.rec.clone()
                };
                let map = BTreeMap::new();
                o.rec.flags |= SNAPSHOT | READ_ONLY;
                o.rec.uuid = *uuid;
                o.rec.name = name.clone();
                o.rec.created = *created;
                self.blobs.insert(*new_id, Blob { rec: live, map });
                self.next_blob = self.next_blob.max(new_id.saturating_add(1));
            }
            &Op::SetParent { blob, parent } => {
                if parent != 0 {
                    self.blob(parent)?;
                    let mut p = parent;
                    while p != 0 {
                        if p == blob {
                            return bad(format!("blob {blob}: parent {parent} makes a cycle"));
                        }
                        p = self.blob(p)?.rec.parent;
                    }
                }
                self.blob_mut(blob)?.rec.parent = parent;
            }
            &Op::SetFlags { blob, flags } => self.blob_mut(blob)?.rec.flags = flags,
            Op::Rename { blob, name } => {
                self.check_name_free(name, *blob)?;
                self.blob_mut(*blob)?.rec.name = name.clone();
            }
            Op::RenameStore { name } => self.name = name.clone(),
            &Op::CleanFrom { cluster } => {
                if cluster > self.total_clusters {
                    return bad(format!("clean mark {cluster} past the end"));
                }
                self.clean_from = cluster;
            }
        }
        Ok(())
    }

    /// Applies a transaction whole, or not at all.
    pub fn apply_txn(&mut self, ops: &[Op]) -> Result<(), String> {
        if ops.len() == 1 {
            return self.apply(&ops[0]);
        }
        let mut next = self.clone();
        for op in ops {
            next.apply(op)?;
        }
        *self = next;
        Ok(())
    }

    pub fn to_checkpoint(&self, journal_seq: u64) -> Checkpoint {
        let blobs = self
            .blobs
            .values()
            .map(|b| {
                let mut extents: Vec<Extent> = Vec::new();
                for (&i, &c) in &b.map {
                    match extents.last_mut() {
                        Some(e) if e.index + e.count == i && e.cluster + e.count == c => {
                            e.count += 1
                        }
                        _ => extents.push(Extent {
                            index: i,
                            cluster: c,
                            count: 1,
                        }),
                    }
                }
                (b.rec.clone(), extents)
            })
            .collect();
        Checkpoint {
            uuid: self.uuid,
            name: self.name.clone(),
            journal_seq,
            clean_from: self.clean_from,
            next_blob: self.next_blob,
            blobs,
        }
    }

    /// Rebuilds the state a checkpoint describes, through the same checks as the journal.
    pub fn from_checkpoint(c: &Checkpoint, total_clusters: u32) -> Result<State, String> {
        if c.clean_from > total_clusters {
            return bad(format!("clean mark {} past the end", c.clean_from));
        }
        let mut s = State::new(c.uuid, c.name.clone(), total_clusters, c.clean_from);
        // Parents before children: create without parents, then link.
        for (rec, _) in &c.blobs {
            s.apply(&Op::CreateBlob(BlobRecord {
                parent: 0,
                ..rec.clone()
            }))?;
        }
        for (rec, extents) in &c.blobs {
            for e in extents {
                s.apply(&Op::Alloc {
                    blob: rec.id,
                    index: e.index,
                    cluster: e.cluster,
                    count: e.count,
                })?;
            }
            if rec.parent != 0 {
                s.apply(&Op::SetParent {
                    blob: rec.id,
                    parent: rec.parent,
                })?;
            }
        }
        s.next_blob = s.next_blob.max(c.next_blob);
        Ok(s)
    }

    /// Every invariant, checked from scratch: each problem found, in words.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // Each cluster's owner, as (blob, index); blob 0 is nobody.
        let mut owner: Vec<(u32, u32)> = vec![(0, 0); self.total_clusters as usize];
        for b in self.blobs.values() {
            if let Some((&last, _)) = b.map.last_key_value() {
                if last as u64 >= b.rec.clusters {
                    problems.push(format!(
                        "blob {} maps index {last}, past its {} clusters",
                        b.rec.id, b.rec.clusters
                    ));
                }
            }
            for (&i, &c) in &b.map {
                match owner.get_mut(c as usize) {
                    None => problems.push(format!(
                        "blob {} index {i}: cluster {c} past the end",
                        b.rec.id
                    )),
                    Some(&mut (ob, oi)) if ob != 0 => problems.push(format!(
                        "cluster {c} owned twice: blob {ob} index {oi} and blob {} index {i}",
                        b.rec.id
                    )),
                    Some(o) => *o = (b.rec.id, i),
                }
                if c >= self.clean_from {
                    problems.push(format!(
                        "cluster {c} (blob {} index {i}) is past the clean mark {}",
                        b.rec.id, self.clean_from
                    ));
                }
            }
            if let Some(p) = b.parent() {
                match self.blobs.get(&p) {
                    None => problems.push(format!("blob {} has a missing parent {p}", b.rec.id)),
                    Some(pb) if !pb.is_read_only() => problems.push(format!(
                        "blob {} has parent {p}, which is writable",
                        b.rec.id
                    )),
                    _ => {}
                }
                let mut seen = vec![b.rec.id];
                let mut q = Some(p);
                while let Some(x) = q {
                    if seen.contains(&x) {
                        problems.push(format!("blob {}: its parents make a cycle", b.rec.id));
                        break;
                    }
                    seen.push(x);
                    q = self.blobs.get(&x).and_then(|x| x.parent());
                }
            }
            if b.is_snapshot() && !b.is_read_only() {
                problems.push(format!("snapshot blob {} is writable", b.rec.id));
            }
            if self
                .blobs
                .values()
                .any(|o| o.rec.id != b.rec.id && o.rec.name == b.rec.name)
            {
                problems.push(format!("name {} is used twice", b.rec.name));
            }
        }
        for (c, &(ob, _)) in owner.iter().enumerate() {
            if (ob != 0) != self.is_used(c as u32) {
                problems.push(format!(
                    "cluster {c}: the free map says {}, the blobs say {}",
                    if self.is_used(c as u32) {
                        "used"
                    } else {
                        "free"
                    },
                    if ob != 0 { "used" } else { "free" },
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A thin blob with no parent (tests elsewhere in the module build on it).
    pub(crate) fn rec(id: u32, name: &str, clusters: u64) -> BlobRecord {
        BlobRecord {
            id,
            flags: THIN,
            parent: 0,
            uuid: Uuid::from_u128(id as u128),
            name: name.into(),
            clusters,
            created: 0,
        }
    }

    pub(crate) fn alloc(blob: u32, index: u32, cluster: u32) -> Op {
        Op::Alloc {
            blob,
            index,
            cluster,
            count: 1,
        }
    }

    #[test]
    fn ops_keep_every_cluster_owned_once_and_snapshots_move_nothing() {
        let mut s = State::new(Uuid::nil(), "lvs".into(), 16, 16);
        s.apply(&Op::CreateBlob(rec(1, "a", 4))).unwrap();
        s.apply(&alloc(1, 0, 3)).unwrap();
        assert!(s.apply(&alloc(1, 1, 3)).unwrap_err().contains("in use"));
        assert!(s
            .apply(&alloc(1, 0, 4))
            .unwrap_err()
            .contains("has a cluster"));
        assert!(s
            .apply(&alloc(1, 4, 5))
            .unwrap_err()
            .contains("past its end"));
        assert!(s
            .apply(&alloc(1, 1, 16))
            .unwrap_err()
            .contains("pass the end"));
        s.apply(&Op::Snapshot {
            origin: 1,
            new_id: 2,
            uuid: Uuid::from_u128(99),
            name: "snap".into(),
            created: 0,
        })
        .unwrap();
        // The origin's identity moved to the new, empty blob; the data stayed.
        let live = s.by_name("a").unwrap();
        assert_eq!((live.rec.id, live.rec.parent, live.allocated()), (2, 1, 0));
        assert_eq!(live.rec.uuid, Uuid::from_u128(1));
        let snap = s.by_name("snap").unwrap();
        assert!(snap.is_snapshot() && snap.is_read_only());
        assert_eq!(snap.get(0), 3);
        assert!(s
            .apply(&Op::DeleteBlob { id: 1 })
            .unwrap_err()
            .contains("clone"));
        assert_eq!(s.free_clusters(), 15);
        s.apply(&Op::DeleteBlob { id: 2 }).unwrap();
        s.apply(&Op::DeleteBlob { id: 1 }).unwrap();
        assert_eq!(s.free_clusters(), 16);
        assert!(s.check().is_empty(), "{:?}", s.check());
    }

    #[test]
    fn a_transaction_that_fails_half_way_changes_nothing() {
        let mut s = State::new(Uuid::nil(), "lvs".into(), 8, 8);
        let before = s.clone();
        let e = s
            .apply_txn(&[Op::CreateBlob(rec(1, "a", 2)), alloc(1, 0, 9)])
            .unwrap_err();
        assert!(e.contains("pass the end"));
        assert_eq!(s, before);
    }

    #[test]
    fn a_checkpoint_rebuilds_the_same_state() {
        let mut s = State::new(Uuid::from_u128(5), "lvs".into(), 64, 10);
        s.apply(&Op::CreateBlob(rec(1, "a", 8))).unwrap();
        for (i, c) in [(0, 2), (1, 3), (2, 4), (5, 9)] {
            s.apply(&alloc(1, i, c)).unwrap();
        }
        s.apply(&Op::Snapshot {
            origin: 1,
            new_id: 2,
            uuid: Uuid::from_u128(7),
            name: "s".into(),
            created: 0,
        })
        .unwrap();
        s.apply(&alloc(2, 0, 5)).unwrap();
        let c = s.to_checkpoint(42);
        assert_eq!(c.blobs[0].1.len(), 2, "runs become extents");
        let back = State::from_checkpoint(&c, 64).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_checker_names_what_is_wrong() {
        let mut s = State::new(Uuid::nil(), "lvs".into(), 8, 4);
        s.apply(&Op::CreateBlob(rec(1, "a", 2))).unwrap();
        s.apply(&Op::CreateBlob(rec(2, "b", 2))).unwrap();
        s.apply(&alloc(1, 0, 1)).unwrap();
        // Damage that apply() would refuse, made by hand.
        s.blobs.get_mut(&2).unwrap().map.insert(0, 1);
        s.blobs.get_mut(&2).unwrap().map.insert(1, 6);
        let p = s.check();
        assert!(
            p.iter().any(|p| p.contains("cluster 1 owned twice")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains("past the clean mark")), "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.contains("cluster 6: the free map says free")),
            "{p:?}"
        );
    }
}
