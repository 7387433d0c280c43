//! `plexctl volume delete`: the volume taken down on every node that answers.

use super::*;

impl Cluster {
    /// Takes the volume down on every node that answers. Nodes that do not keep the record
    /// (marked deleting) so a later delete finishes; `force` drops it anyway.
    pub fn delete(&mut self, name: &str, force: bool) -> Result<Report, Error> {
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        // A clone's plexes read through this volume's snapshots.
        if let Some(c) = st
            .state
            .volumes
            .values()
            .find(|v| v.origin.as_ref().is_some_and(|(o, _)| o == name))
        {
            return Err(Error::Refused(format!(
                "volume {} is a clone of {name}'s snapshot {}: delete it first",
                c.name,
                c.origin.as_ref().map_or("", |(_, s)| s.as_str())
            )));
        }
        let mut report = Report::default();
        self.say(&format!("deleting volume {name}"));
        let left = self.teardown(&rec, &mut report);
        if left.is_empty() || force {
            if !left.is_empty() {
                self.warn(
                    &mut report,
                    format!(
                        "forgetting {name}; parts of it may be left on {}",
                        left.join(", ")
                    ),
                );
            }
            st.state.volumes.remove(name);
            st.save().map_err(Error::Files)?;
            self.say(&format!("volume {name} deleted"));
            Ok(report)
        } else {
            rec.deleting = true;
            st.state.volumes.insert(name.to_string(), rec);
            st.save().map_err(Error::Files)?;
            Err(Error::Refused(format!(
                "volume {name}: {} could not be cleaned; run delete again once they answer \
                 (or with --force to forget them)",
                left.join(", ")
            )))
        }
    }

    /// Takes down everything of `rec` on every node, in reverse order of creation. Returns
    /// the nodes where something may be left.
    pub(crate) fn teardown(&mut self, rec: &VolumeRecord, report: &mut Report) -> Vec<String> {
        let mut left = Vec::new();
        // Owners first: their mirrors claim what the plex nodes export.
        let mut order = rec.nodes();
        order.sort_by_key(|n| !(n == &rec.owner || rec.former_owners.contains(n)));
        for n in order {
            if let Err(e) = self.client(&n) {
                self.warn(report, format!("{e}; skipped"));
                left.push(n);
                continue;
            }
            let r = self
                .teardown_owner_part(rec, &n)
                .and_then(|_| self.teardown_plex_part(rec, &n));
            if let Err(e) = r {
                self.warn(report, e.to_string());
                left.push(n);
            }
        }
        left
    }

    /// On `node`: the volume's export, its mirror and the controllers to other nodes' plexes.
    pub(crate) fn teardown_owner_part(
        &mut self,
        rec: &VolumeRecord,
        node: &str,
    ) -> Result<(), Error> {
        let mut c = self.client(node)?;
        let mut steps = vec![
            ("nvmf_delete_subsystem", json!({"nqn": rec.nqn})),
            ("bdev_mirror_delete", json!({"name": rec.name})),
        ];
        for (i, p) in rec.plexes.iter().enumerate() {
            if p.node != node {
                steps.push((
                    "bdev_nvme_detach_controller",
                    json!({"name": plex_bdev(&rec.name, i)}),
                ));
            }
        }
        for (m, params) in steps {
            if gone_or_done(&mut c, m, &params).map_err(node_err(node))? {
                self.say(&format!("{node}: {m} {}", first_value(&params)));
            }
        }
        Ok(())
    }

    /// On `node`: its plexes' exports, bdevs and files.
    fn teardown_plex_part(&mut self, rec: &VolumeRecord, node: &str) -> Result<(), Error> {
        let mut c = self.client(node)?;
        let delete = match self.nodes.backend {
            Backend::Uring => "bdev_uring_delete",
            Backend::Lvol => "bdev_lvol_delete",
            Backend::Malloc => "bdev_malloc_delete",
        };
        for (i, p) in rec.plexes.iter().enumerate() {
            if p.node != node {
                continue;
            }
            for (m, params) in [
                (
                    "nvmf_delete_subsystem",
                    json!({"nqn": plex_nqn(&rec.name, i)}),
                ),
                (delete, json!({"name": p.bdev})),
            ] {
                if gone_or_done(&mut c, m, &params).map_err(node_err(node))? {
                    self.say(&format!("{node}: {m} {}", first_value(&params)));
                }
            }
            // The plex file and its namespace's reservation file.
            for f in p.file.iter().cloned().chain(p.ptpl()) {
                match std::fs::remove_file(&f) {
                    Ok(()) => self.say(&format!("{node}: removed {}", f.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::Files(format!("{}: {e}", f.display()))),
                }
            }
        }
        // Snapshots after the plexes: a plex's lvol reads through its newest snapshot.
        for snap in rec.snapshots.iter().rev() {
            for (n, lvol) in snap.plexes.iter().filter(|(n, _)| n == node) {
                let params = json!({"name": lvol});
                if gone_or_done(&mut c, "bdev_lvol_delete", &params).map_err(node_err(n))? {
                    self.say(&format!("{node}: deleted snapshot {lvol}"));
                }
            }
        }
        Ok(())
    }
}
