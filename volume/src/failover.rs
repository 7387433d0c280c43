//! Moving a volume to another node (`attach`, the failover case) and bringing back the plexes
//! its mirror lost (`rejoin`).

use super::*;

impl Cluster {
    /// Moves volume `name` to `new_owner`, which must hold one of its plexes. Nodes that do
    /// not answer are skipped with a warning: that is the failover case.
    pub fn attach(&mut self, name: &str, new_owner: &str) -> Result<Report, Error> {
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        let owner = self.node(new_owner)?;
        if rec.deleting {
            return Err(Error::Refused(format!(
                "volume {name} is being deleted; finish with volume delete"
            )));
        }
        let Some(own) = rec.plexes.iter().position(|p| p.node == new_owner) else {
            return Err(Error::Refused(format!(
                "node {new_owner} holds no plex of {name} (plexes on {}); the new owner must hold one",
                rec.plexes.iter().map(|p| p.node.as_str()).collect::<Vec<_>>().join(", ")
            )));
        };
        if rec.owner == new_owner {
            return Err(Error::Refused(format!(
                "volume {name} is already owned by {new_owner}"
            )));
        }
        let mut new_client = self.client(new_owner)?;
        let old = self.node(&rec.owner)?;
        let mut report = Report::default();
        self.say(&format!(
            "moving volume {name} from {} to {new_owner}",
            old.name
        ));

        // 1. The old owner, if it answers, lets go: no export, no mirror, no controllers.
        match self.client(&old.name) {
            Ok(_) => {
                self.say(&format!(
                    "{}: old owner answers; taking the volume down there",
                    old.name
                ));
                let left = self.teardown_owner_part(&rec, &old.name);
                if let Err(e) = left {
                    return Err(Error::Refused(format!(
                        "old owner {} answers but could not let go of {name}: {e}; not moving it",
                        old.name
                    )));
                }
            }
            Err(e) => self.warn(
                &mut report,
                format!("old owner {e}; fencing it off the plexes instead"),
            ),
        }
        // 2. Fence: the old owner's host leaves every plex export. The new owner's own plex
        //    stops being exported at all (its namespace would hold the claim the mirror needs).
        for i in 0..rec.plexes.len() {
            let p = rec.plexes[i].clone();
            if p.node == old.name {
                continue;
            }
            let nqn = plex_nqn(name, i);
            let mut c = match self.client(&p.node) {
                Ok(c) => c,
                Err(e) => {
                    self.warn(&mut report, format!("{e}; cannot fence {nqn} there"));
                    continue;
                }
            };
            let r = if i == own {
                c.call("nvmf_delete_subsystem", json!({"nqn": nqn}))
            } else {
                c.call(
                    "nvmf_subsystem_remove_host",
                    json!({"nqn": nqn, "host": old.host_nqn}),
                )
            };
            match r {
                Ok(_) if i == own => self.say(&format!(
                    "{}: stopped exporting {nqn} (the new mirror takes the plex)",
                    p.node
                )),
                Ok(_) => self.say(&format!("{}: {} fenced off {nqn}", p.node, old.name)),
                Err(e) if e.is_gone() => {}
                Err(e) => return Err(node_err(&p.node)(e)),
            }
        }
        // 3. Every other plex that answers is exported to the new owner and attached there.
        for i in 0..rec.plexes.len() {
            let p = rec.plexes[i].clone();
            if i == own {
                rec.plexes[i].location = p.bdev.clone();
                continue;
            }
            // On the new owner this plex is remote whether or not its node answers now: the
            // mirror must know it by the bdev its controller will make (`NAME.p<i>n1`), so
            // that the examine step takes it back when that controller is attached later.
            rec.plexes[i].location = remote_plex_bdev(name, i);
            if let Err(e) = self.client(&p.node) {
                self.warn(
                    &mut report,
                    format!("{e}; plex {} stays out until it returns", p.bdev),
                );
                continue;
            }
            let ok = self.export_plex(&rec, i, &owner.host_nqn).and_then(|_| {
                // A controller left from an earlier ownership of this node goes first.
                let _ = new_client.call(
                    "bdev_nvme_detach_controller",
                    json!({"name": plex_bdev(name, i)}),
                );
                self.attach_plex(&rec, i, &owner)
            });
            if let Err(e) = ok {
                self.warn(&mut report, format!("{e}; plex {} stays out", p.bdev));
            }
        }
        // 4. The mirror, refusing plexes older than what was last seen, and its export.
        let min_gen = rec.generation;
        self.assemble(&mut rec, &owner, min_gen, None)?;
        self.export_volume(&rec, &owner)?;
        if !rec.former_owners.contains(&old.name) {
            rec.former_owners.push(old.name.clone());
        }
        rec.former_owners.retain(|n| n != new_owner);
        rec.owner = new_owner.to_string();
        st.state.volumes.insert(name.to_string(), rec);
        st.save().map_err(Error::Files)?;
        self.say(&format!("volume {name} is now owned by {new_owner}"));
        Ok(report)
    }

    // ---- rejoin ---------------------------------------------------------------------------

    /// Brings back the plexes of `name` that its mirror misses (state Down) and whose nodes
    /// answer again: each plex file is opened again, exported to the owner alone and attached
    /// there, where the mirror's examine step takes the plex back, fences it and resyncs what
    /// it missed. A former owner that answers again is first cleared of the volume, so its
    /// stale mirror and export cannot be used.
    pub fn rejoin(&mut self, name: &str) -> Result<Report, Error> {
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        if rec.deleting {
            return Err(Error::Refused(format!(
                "volume {name} is being deleted; finish with volume delete"
            )));
        }
        let owner = self.node(&rec.owner)?;
        let mut oc = self.client(&owner.name).map_err(|e| {
            Error::Refused(format!(
                "{e}; the owner must run the mirror (move the volume with volume attach)"
            ))
        })?;
        let mut report = Report::default();
        for n in rec.former_owners.clone() {
            if self.client(&n).is_err() {
                continue;
            }
            match self.teardown_owner_part(&rec, &n) {
                Ok(()) => {
                    self.say(&format!("{n}: former owner answers; cleared of {name}"));
                    rec.former_owners.retain(|x| x != &n);
                }
                Err(e) => self.warn(&mut report, format!("{n}: former owner not cleared: {e}")),
            }
        }
        let mirror = mirror_of(&mut oc, name).map_err(node_err(&owner.name))?;
        let down: Vec<usize> = (0..rec.plexes.len())
            .filter(|&i| {
                mirror["plexes"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["bdev"] == rec.plexes[i].location && p["state"] == "Down")
                })
            })
            .collect();
        if down.is_empty() {
            self.say(&format!("every plex of {name} is up on {}", owner.name));
        }
        for i in down {
            let p = rec.plexes[i].clone();
            if let Err(e) = self.client(&p.node) {
                self.warn(&mut report, format!("{e}; plex {} stays out", p.bdev));
                continue;
            }
            let back = self.reopen_plex_bdev(&p).and_then(|_| {
                // It may have missed a resize: the mirror refuses a plex smaller than itself.
                if self.nodes.backend == Backend::Lvol {
                    self.grow_plex(&p, rec.plex_size)?;
                }
                self.export_plex(&rec, i, &owner.host_nqn)?;
                // A controller left from before (reconnecting to the lost export) goes first.
                let _ = oc.call(
                    "bdev_nvme_detach_controller",
                    json!({"name": plex_bdev(name, i)}),
                );
                self.attach_plex(&rec, i, &owner)
            });
            match back {
                Ok(()) => match self.wait_plex_up(&mut oc, name, &p.location) {
                    Some(c) => self.say(&format!("{}: plex {} is back ({c})", owner.name, p.bdev)),
                    None => self.warn(
                        &mut report,
                        format!(
                            "{}: the mirror did not take plex {} back; see its log",
                            owner.name, p.bdev
                        ),
                    ),
                },
                Err(e) => self.warn(&mut report, format!("{e}; plex {} stays out", p.bdev)),
            }
        }
        st.state.volumes.insert(name.to_string(), rec);
        st.save().map_err(Error::Files)?;
        Ok(report)
    }

    /// Makes plex `p`'s bdev exist on its node again, from its file: after a restart plexd
    /// knows nothing of it. A plex kept in RAM is gone with the process it lived in.
    fn reopen_plex_bdev(&mut self, p: &PlexRecord) -> Result<(), Error> {
        let mut c = self.client(&p.node)?;
        let e = node_err(&p.node);
        match c.call("bdev_get_bdevs", json!({"name": p.bdev})) {
            Ok(_) => return Ok(()),
            Err(err) if err.is_gone() => {}
            Err(err) => return Err(e(err)),
        }
        if self.nodes.backend == Backend::Lvol {
            // Its store brings it back when the store's bdev appears (examine).
            return Err(Error::Refused(format!(
                "{}: plex lvol {} is not there: is the node's volume store loaded \
                 (bdev_lvol_get_lvstores)?",
                p.node, p.bdev
            )));
        }
        let Some(f) = &p.file else {
            return Err(Error::Refused(format!(
                "{}: plex {} lived in RAM and was lost with its plexd",
                p.node, p.bdev
            )));
        };
        if !f.exists() {
            return Err(Error::Refused(format!(
                "{}: plex file {} is gone",
                p.node,
                f.display()
            )));
        }
        c.call(
            "bdev_uring_create",
            json!({"name": p.bdev, "filename": f, "block_size": size::BLOCK_SIZE}),
        )
        .map_err(e)?;
        self.say(&format!(
            "{}: plex {} opened again from {}",
            p.node,
            p.bdev,
            f.display()
        ));
        Ok(())
    }

    /// Waits (a bounded time) for the owner's mirror to see the plex at `location` Up; its
    /// condition then, or None.
    fn wait_plex_up(&mut self, oc: &mut Client, name: &str, location: &str) -> Option<String> {
        let t0 = Instant::now();
        while t0.elapsed() < REJOIN_DEADLINE {
            let m = mirror_of(oc, name).ok()?;
            let p = m["plexes"]
                .as_array()?
                .iter()
                .find(|p| p["bdev"] == location)?
                .clone();
            if p["state"] == "Up" && p["condition"] != "Faulted" {
                return Some(p["condition"].as_str().unwrap_or("?").to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}
