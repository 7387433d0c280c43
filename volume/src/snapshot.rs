//! `plexctl volume snapshot` and `clone`: a point-in-time copy of a mirrored volume, and a new
//! mirrored volume made from one.
//!
//! A snapshot quiesces the owner's mirror (writes wait; a lease ends the wait by itself if
//! this command dies), snapshots the lvol of every plex in sync on its node, and resumes.
//! The plexes in sync hold the same data while writes wait, so each snapshot is the same
//! point of the volume. A clone makes a thin lvol clone of each snapshot on its node and
//! assembles them as a copy (`bdev_mirror_create` with `copy_of`): a new mirror identity over
//! the copied data, every plex in sync, nothing to resync.

use crate::nodes::Backend;
use crate::state::{PlexRecord, SnapshotRecord, VolumeRecord};
use crate::{
    check_volume_name, mirror_of, node_err, plex_bdev, remote_plex_bdev, size, volume_nqn, Cluster,
    Error,
};
use serde_json::json;

/// How long the mirror may hold writes while its plexes are snapshotted.
const QUIESCE_LEASE_MS: u64 = 10_000;

impl Cluster {
    /// Takes snapshot `snap` of volume `name` while it stays in use.
    pub fn snapshot(&mut self, name: &str, snap: &str) -> Result<SnapshotRecord, Error> {
        check_volume_name(snap)?;
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        self.needs_lvols("snapshots")?;
        if rec.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Invalid(format!(
                "volume {name} has a snapshot {snap}"
            )));
        }
        let mut oc = self.client(&rec.owner)?;
        let q = oc
            .call(
                "bdev_mirror_quiesce",
                json!({"name": name, "timeout_ms": QUIESCE_LEASE_MS}),
            )
            .map_err(node_err(&rec.owner))?;
        let held_since = std::time::Instant::now();
        self.say(&format!("{}: volume {name} quiesced", rec.owner));
        let in_sync: Vec<&PlexRecord> = rec
            .plexes
            .iter()
            .filter(|p| {
                q["plexes_in_sync"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["bdev"] == p.location))
            })
            .collect();
        let mut made = Vec::new();
        let mut failed = None;
        for p in &in_sync {
            let lvol = format!("{}@{snap}", p.lvol_name());
            let r = self.client(&p.node).and_then(|mut c| {
                c.call(
                    "bdev_lvol_snapshot",
                    json!({"lvol_name": p.bdev, "snapshot_name": lvol}),
                )
                .map_err(node_err(&p.node))
            });
            match r {
                Ok(_) => made.push((p.node.clone(), format!("{}/{lvol}", p.lvs()))),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let held = oc
            .call("bdev_mirror_resume", json!({"name": name}))
            .map_err(node_err(&rec.owner));
        self.say(&format!(
            "{}: volume {name} resumed: writes were held for {:.1} ms (quiesce answered to resume)",
            rec.owner,
            held_since.elapsed().as_secs_f64() * 1e3
        ));
        let failed = match (failed, held) {
            (Some(e), _) | (None, Err(e)) => Some(e),
            (None, Ok(v)) if v != json!(true) => Some(Error::Refused(format!(
                "the {QUIESCE_LEASE_MS} ms quiesce ran out before every plex was snapshotted"
            ))),
            _ => None,
        };
        if let Some(e) = failed {
            for (node, lvol) in &made {
                if let Ok(mut c) = self.client(node) {
                    let _ = c.call("bdev_lvol_delete", json!({"name": lvol}));
                }
            }
            return Err(Error::Refused(format!(
                "snapshot {snap} of {name} not taken ({e}); nothing was kept"
            )));
        }
        if made.len() < rec.plexes.len() {
            self.say(&format!(
                "only {} of {} plexes were in sync: the snapshot has {}",
                made.len(),
                rec.plexes.len(),
                made.len()
            ));
        }
        let s = SnapshotRecord {
            name: snap.to_string(),
            size: rec.size,
            plex_size: rec.plex_size,
            region_size: rec.region_size,
            plexes: made,
        };
        self.say(&format!(
            "snapshot {snap} of {name} taken on {}",
            s.plexes
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        rec.snapshots.push(s.clone());
        st.state.volumes.insert(name.to_string(), rec);
        st.save().map_err(crate::Error::Files)?;
        Ok(s)
    }

    /// Makes volume `new` from snapshot `snap` of volume `name`: a plex on each node the
    /// snapshot has one, owned by the source's owner when that is one of them.
    pub fn clone_volume(
        &mut self,
        name: &str,
        snap: &str,
        new: &str,
    ) -> Result<VolumeRecord, Error> {
        check_volume_name(new)?;
        self.needs_lvols("clones")?;
        let mut st = self.state()?;
        let src = Self::record(&st, name)?;
        let s = src
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("volume {name} has no snapshot {snap}")))?;
        if st.state.volumes.contains_key(new) {
            return Err(Error::Invalid(format!("volume {new} exists")));
        }
        let owner = s
            .plexes
            .iter()
            .map(|(n, _)| n.clone())
            .find(|n| *n == src.owner)
            .or_else(|| s.plexes.first().map(|(n, _)| n.clone()))
            .ok_or_else(|| Error::Refused(format!("snapshot {snap} has no plex")))?;
        let mut rec = VolumeRecord {
            name: new.to_string(),
            size: s.size,
            plex_size: s.plex_size,
            region_size: s.region_size,
            mirror_size: 0,
            owner: owner.clone(),
            former_owners: Vec::new(),
            nqn: volume_nqn(new),
            plexes: Vec::new(),
            generation: 0,
            deleting: false,
            snapshots: Vec::new(),
            origin: Some((name.to_string(), snap.to_string())),
        };
        for (i, (n, snap_lvol)) in s.plexes.iter().enumerate() {
            let node = self.node(n)?;
            let lvs = snap_lvol.rsplit_once('/').map_or("", |(l, _)| l);
            let bdev = format!("{lvs}/{}", plex_bdev(new, i));
            rec.plexes.push(PlexRecord {
                node: n.clone(),
                location: if *n == owner {
                    bdev.clone()
                } else {
                    remote_plex_bdev(new, i)
                },
                bdev,
                file: None,
                ptpl_file: node
                    .data_dir
                    .as_ref()
                    .map(|d| d.join(format!("{}.ptpl", plex_bdev(new, i)))),
            });
        }
        self.preflight(&rec)?;
        self.say(&format!(
            "cloning snapshot {snap} of {name} into volume {new} ({}) on {}",
            size::human(rec.size),
            rec.plexes
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if let Err(e) = self.build(&mut rec, Some(&s)) {
            self.say(&format!(
                "cloning {new} failed ({e}); undoing what was made"
            ));
            let mut r = crate::Report::default();
            let left = self.teardown(&rec, &mut r);
            if !left.is_empty() {
                self.say(&format!(
                    "could not undo on {}: remove the leftovers by hand",
                    left.join(", ")
                ));
            }
            return Err(e);
        }
        let mut oc = self.client(&owner)?;
        let m = mirror_of(&mut oc, new).map_err(node_err(&owner))?;
        self.say(&format!(
            "volume {new} ready: {} ({} plexes, {})",
            rec.nqn,
            rec.plexes.len(),
            m["state"].as_str().unwrap_or("?")
        ));
        st.state.volumes.insert(new.to_string(), rec.clone());
        st.save().map_err(Error::Files)?;
        Ok(rec)
    }

    /// A thin clone of snapshot lvol `snap_lvol` as plex `p`'s lvol.
    pub(crate) fn clone_plex_lvol(&mut self, snap_lvol: &str, p: &PlexRecord) -> Result<(), Error> {
        let mut c = self.client(&p.node)?;
        if let Some(dir) = p.ptpl().as_deref().and_then(std::path::Path::parent) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Files(format!("{}: {e}", dir.display())))?;
        }
        c.call(
            "bdev_lvol_clone",
            json!({"snapshot_name": snap_lvol, "clone_name": p.lvol_name()}),
        )
        .map_err(node_err(&p.node))?;
        self.say(&format!(
            "{}: plex lvol {} cloned from {snap_lvol}",
            p.node, p.bdev
        ));
        Ok(())
    }

    pub(crate) fn needs_lvols(&self, what: &str) -> Result<(), Error> {
        if self.nodes.backend != Backend::Lvol {
            return Err(Error::Refused(format!(
                "{what} need plexes on volume stores (backend \"lvol\"); these are {}",
                self.nodes.backend.name()
            )));
        }
        Ok(())
    }
}
