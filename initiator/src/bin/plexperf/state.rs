//! `--verify-state FILE`: what --verify knows of every unit, kept across runs, so that a run
//! against another target holding the same data (a mirror's new owner after a failover)
//! checks every write an earlier run had acknowledged.
//!
//! The file is JSON: a version, the I/O size, and per job (namespace index, unit range) the
//! acknowledged and the uncertain generation of each unit. It is replaced whole (temporary
//! file, then rename), so a crash leaves the old record or the new one.

use crate::worker::UnitsState;
use serde::{Deserialize, Serialize};
use std::path::Path;

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    io_size: u32,
    jobs: Vec<JobUnits>,
}

#[derive(Serialize, Deserialize)]
struct JobUnits {
    ns_index: usize,
    units_lo: u64,
    units_hi: u64,
    acked: Vec<u64>,
    maybe: Vec<u64>,
}

/// The record an earlier run left, or an empty one when `path` does not exist yet.
pub struct Prior {
    io_size: u32,
    jobs: Vec<JobUnits>,
}

impl Prior {
    pub fn load(path: &Path, io_size: u32) -> Result<Prior, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Prior {
                    io_size,
                    jobs: Vec::new(),
                })
            }
            Err(e) => return Err(format!("verify state {}: {e}", path.display())),
        };
        let f: File = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "verify state {}: not a plexperf record: {e}",
                path.display()
            )
        })?;
        if f.version != VERSION {
            return Err(format!(
                "verify state {}: version {}, this plexperf reads {VERSION}",
                path.display(),
                f.version
            ));
        }
        if f.io_size != io_size {
            return Err(format!(
                "verify state {}: written with -o {}, not -o {io_size}",
                path.display(),
                f.io_size
            ));
        }
        for j in &f.jobs {
            let n = j.units_hi.saturating_sub(j.units_lo) as usize;
            if j.acked.len() != n || j.maybe.len() != n {
                return Err(format!(
                    "verify state {}: namespace {} units {}..{} hold {} entries",
                    path.display(),
                    j.ns_index,
                    j.units_lo,
                    j.units_hi,
                    j.acked.len()
                ));
            }
        }
        Ok(Prior {
            io_size,
            jobs: f.jobs,
        })
    }

    /// What the record holds for one job's range: None if it holds nothing at all (a first
    /// run), an error if it holds other ranges (another -P, --size or namespace list).
    pub fn take(
        &mut self,
        ns_index: usize,
        lo: u64,
        hi: u64,
    ) -> Result<Option<UnitsState>, String> {
        if self.jobs.is_empty() {
            return Ok(None);
        }
        let Some(at) = self
            .jobs
            .iter()
            .position(|j| (j.ns_index, j.units_lo, j.units_hi) == (ns_index, lo, hi))
        else {
            return Err(format!(
                "the verify state holds no record of namespace {ns_index} units {lo}..{hi}: \
                 run with the -P, --size and -r list that wrote it"
            ));
        };
        let j = self.jobs.swap_remove(at);
        Ok(Some(UnitsState {
            acked: j.acked,
            maybe: j.maybe,
        }))
    }

    /// Writes the record of this run's jobs: `(ns_index, lo, hi, units)`.
    pub fn save(
        &self,
        path: &Path,
        jobs: impl Iterator<Item = (usize, u64, u64, UnitsState)>,
    ) -> Result<(), String> {
        let f = File {
            version: VERSION,
            io_size: self.io_size,
            jobs: jobs
                .map(|(ns_index, units_lo, units_hi, u)| JobUnits {
                    ns_index,
                    units_lo,
                    units_hi,
                    acked: u.acked,
                    maybe: u.maybe,
                })
                .collect(),
        };
        let text = serde_json::to_vec(&f).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| format!("verify state {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("plexperf-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.json");
        let _ = std::fs::remove_file(&path);
        let mut p = Prior::load(&path, 4096).unwrap();
        assert_eq!(p.take(0, 0, 4).unwrap(), None);
        let u = UnitsState {
            acked: vec![1, 0, 7, 9],
            maybe: vec![0, 3, 0, 0],
        };
        p.save(&path, [(0, 0, 4, u.clone())].into_iter()).unwrap();
        let mut q = Prior::load(&path, 4096).unwrap();
        let e = q.take(0, 4, 8).unwrap_err();
        assert!(e.contains("units 4..8"), "{e}");
        assert_eq!(q.take(0, 0, 4).unwrap(), Some(u));
        let e = Prior::load(&path, 8192).err().unwrap();
        assert!(e.contains("-o 4096"), "{e}");
        std::fs::write(&path, b"{\"version\": 1, \"io_size\": 4096, \"jobs\": [{\"ns_index\": 0, \"units_lo\": 0, \"units_hi\": 2, \"acked\": [1], \"maybe\": [0, 0]}]}").unwrap();
        let e = Prior::load(&path, 4096).err().unwrap();
        assert!(e.contains("hold 1 entries"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        let e = Prior::load(&path, 4096).err().unwrap();
        assert!(e.contains("not a plexperf record"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
