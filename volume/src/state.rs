//! The volumes' records, kept in a JSON file next to the nodes file, so later commands (and
//! another machine's plexctl with the same files) know where each volume lives.
//!
//! Written whole each time through a temporary file, fsync, rename and a directory fsync: a
//! crash leaves the old file or the new one, never half of one. Commands take an exclusive
//! `flock` on `STATE.lock` for their whole run, so two never interleave their changes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// One plex of a volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlexRecord {
    /// The plex's node.
    pub node: String,
    /// Its bdev on that node (`NAME.p<i>`).
    pub bdev: String,
    /// The file behind it (uring backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Where its export keeps its reservations when there is no file to put them beside
    /// (lvol backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ptpl_file: Option<PathBuf>,
    /// The bdev name the owner's mirror knows it by: `bdev` on the owner itself, the
    /// namespace of the attached controller (`NAME.p<i>n1`) elsewhere. A missing plex is
    /// offered to `bdev_mirror_create` under this name, which its superblock table records.
    pub location: String,
}

impl PlexRecord {
    /// The reservation file of the plex's export (SPDK's `ptpl_file`), if it persists them.
    pub fn ptpl(&self) -> Option<PathBuf> {
        self.ptpl_file
            .clone()
            .or_else(|| self.file.as_ref().map(|f| f.with_extension("ptpl")))
    }

    /// The store an lvol plex is in (`lvs` of `lvs/NAME.p<i>`).
    pub fn lvs(&self) -> &str {
        self.bdev.rsplit_once('/').map_or("", |(l, _)| l)
    }

    /// The lvol's name in its store (`NAME.p<i>` of `lvs/NAME.p<i>`), for an lvol plex.
    pub fn lvol_name(&self) -> &str {
        self.bdev.rsplit_once('/').map_or(&self.bdev, |(_, n)| n)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// What was asked for.
    pub size: u64,
    /// Each plex's size.
    pub plex_size: u64,
    pub region_size: u64,
    /// What the mirror offers (at least `size`).
    #[serde(default)]
    pub mirror_size: u64,
    pub owner: String,
    /// Earlier owners: teardown visits them too, they may hold leftovers.
    #[serde(default)]
    pub former_owners: Vec<String>,
    /// The volume's export, on the owner.
    pub nqn: String,
    pub plexes: Vec<PlexRecord>,
    /// The mirror's generation when last seen; a new owner refuses plexes older than it.
    pub generation: u64,
    /// A delete that could not reach every node left this set.
    #[serde(default)]
    pub deleting: bool,
    /// Point-in-time copies of the volume (`plexctl volume snapshot`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// The snapshot this volume was cloned from, as (volume, snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<(String, String)>,
}

/// A snapshot of a volume: one read-only lvol per plex that was in sync when it was taken,
/// each on its plex's node, all at the same point of the volume's writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// The volume's sizes when the snapshot was taken.
    pub size: u64,
    pub plex_size: u64,
    pub region_size: u64,
    /// (node, snapshot lvol as `LVS/NAME`).
    pub plexes: Vec<(String, String)>,
}

impl VolumeRecord {
    /// Every node that may hold something of this volume.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.owner.clone())
            .chain(self.plexes.iter().map(|p| p.node.clone()))
            .chain(self.former_owners.iter().cloned())
            .collect();
        let mut seen = std::collections::HashSet::new();
        v.retain(|n| seen.insert(n.clone()));
        v
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeRecord>,
}

/// The state file, locked for as long as this lives.
pub struct StateFile {
    path: PathBuf,
    _lock: File,
    pub state: State,
}

impl StateFile {
    /// Takes the lock (waiting for another command to finish) and reads the file; a missing
    /// file is an empty state.
    pub fn open(path: &Path) -> Result<StateFile, String> {
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("state lock {}: {e}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "state lock {}: {}",
                lock_path.display(),
                std::io::Error::last_os_error()
            ));
        }
        let state = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("state file {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("state file {}: {e}", path.display())),
        };
        Ok(StateFile {
            path: path.to_path_buf(),
            _lock: lock,
            state,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the state: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self) -> Result<(), String> {
        let err = |e: std::io::Error| format!("writing state file {}: {e}", self.path.display());
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            size: 1 << 30,
            plex_size: (1 << 30) + (1 << 20),
            region_size: 1 << 20,
            mirror_size: 1 << 30,
            owner: "n1".into(),
            former_owners: vec!["n0".into()],
            nqn: format!("nqn.2024-01.io.plexstor:vol-{name}"),
            plexes: vec![
                PlexRecord {
                    node: "n1".into(),
                    bdev: format!("{name}.p0"),
                    file: Some(format!("/d/{name}.p0.img").into()),
                    ptpl_file: None,
                    location: format!("{name}.p0"),
                },
                // An lvol plex: no file, its reservations in the data dir.
                PlexRecord {
                    node: "n2".into(),
                    bdev: format!("lvs/{name}.p1"),
                    file: None,
                    ptpl_file: Some(format!("/d/{name}.p1.ptpl").into()),
                    location: format!("{name}.p1n1"),
                },
            ],
            generation: 3,
            deleting: false,
            snapshots: Vec::new(),
            origin: None,
        }
    }

    #[test]
    fn a_plex_knows_its_reservation_file_and_lvol_name() {
        let r = record("v");
        let (file, lvol) = (&r.plexes[0], &r.plexes[1]);
        assert_eq!(file.ptpl(), Some(PathBuf::from("/d/v.p0.ptpl")));
        assert_eq!(lvol.ptpl(), Some(PathBuf::from("/d/v.p1.ptpl")));
        assert_eq!((file.lvol_name(), lvol.lvol_name()), ("v.p0", "v.p1"));
    }

    #[test]
    fn saves_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.state.json");
        {
            let mut s = StateFile::open(&path).unwrap();
            assert!(s.state.volumes.is_empty());
            s.state.volumes.insert("v".into(), record("v"));
            s.save().unwrap();
        }
        let s = StateFile::open(&path).unwrap();
        assert_eq!(s.state.volumes["v"], record("v"));
        assert_eq!(s.state.volumes["v"].nodes(), ["n1", "n2", "n0"]);
        // Nothing left behind but the file and its lock.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["nodes.state.json", "nodes.state.lock"]);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, "{\"volumes\": {").unwrap();
        let e = StateFile::open(&path).err().unwrap();
        assert!(e.contains("state file"), "{e}");
    }
}
