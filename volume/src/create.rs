//! `plexctl volume create`: choose the nodes, build every plex, export and attach the remote
//! ones, assemble the mirror on the owner and export it.

use super::*;

impl Cluster {
    pub fn create(&mut self, o: &CreateOpts) -> Result<VolumeRecord, Error> {
        check_volume_name(&o.name)?;
        if !(1..=3).contains(&o.mirror_count) {
            return Err(Error::Invalid(format!(
                "mirror count {} must be 1, 2 or 3",
                o.mirror_count
            )));
        }
        let region = o.region_size.unwrap_or(size::DEFAULT_REGION);
        let plex_size = size::plex_bytes_for(o.size, region).map_err(Error::Invalid)?;
        let mut st = self.state()?;
        if st.state.volumes.contains_key(&o.name) {
            return Err(Error::Invalid(format!("volume {} exists", o.name)));
        }
        let mut report = Report::default();
        let chosen = match &o.nodes {
            Some(list) => {
                if list.len() != o.mirror_count {
                    return Err(Error::Invalid(format!(
                        "{} nodes given for {} plexes",
                        list.len(),
                        o.mirror_count
                    )));
                }
                for (i, n) in list.iter().enumerate() {
                    self.node(n)?;
                    if list[..i].contains(n) {
                        return Err(Error::Invalid(format!("node {n} is given twice")));
                    }
                }
                list.clone()
            }
            None => {
                // Only nodes that answer are candidates.
                let names: Vec<String> = self.nodes.nodes.iter().map(|n| n.name.clone()).collect();
                let mut up = Vec::new();
                for n in &names {
                    match self.client(n) {
                        Ok(_) => up.push(n.as_str()),
                        Err(e) => self.warn(&mut report, format!("{e}; not placing plexes there")),
                    }
                }
                let vols: Vec<&VolumeRecord> = st.state.volumes.values().collect();
                pick_least_used(&up, &vols, o.mirror_count)?
            }
        };
        let owner = chosen[0].clone();
        let backend = self.nodes.backend;
        let mut rec = VolumeRecord {
            name: o.name.clone(),
            size: o.size,
            plex_size,
            region_size: region,
            mirror_size: 0,
            owner: owner.clone(),
            former_owners: Vec::new(),
            nqn: volume_nqn(&o.name),
            plexes: Vec::new(),
            generation: 0,
            deleting: false,
            snapshots: Vec::new(),
            origin: None,
        };
        for (i, n) in chosen.iter().enumerate() {
            let node = self.node(n)?;
            let in_data_dir = |ext: &str| {
                node.data_dir
                    .as_ref()
                    .expect("checked when the nodes file was read")
                    .join(format!("{}.{ext}", plex_bdev(&o.name, i)))
            };
            let (bdev, file, ptpl_file) = match backend {
                Backend::Uring => (plex_bdev(&o.name, i), Some(in_data_dir("img")), None),
                Backend::Lvol => (
                    format!("{}/{}", node.lvs_name, plex_bdev(&o.name, i)),
                    None,
                    Some(in_data_dir("ptpl")),
                ),
                Backend::Malloc => (plex_bdev(&o.name, i), None, None),
            };
            rec.plexes.push(PlexRecord {
                node: n.clone(),
                bdev: bdev.clone(),
                file,
                ptpl_file,
                location: if *n == owner {
                    bdev
                } else {
                    remote_plex_bdev(&o.name, i)
                },
            });
        }
        self.preflight(&rec)?;
        self.say(&format!(
            "creating volume {} ({}, plexes of {}) on {}",
            o.name,
            size::human(o.size),
            size::human(plex_size),
            chosen.join(", ")
        ));
        match self.build(&mut rec, None) {
            Ok(()) => {
                st.state.volumes.insert(rec.name.clone(), rec.clone());
                st.save().map_err(Error::Files)?;
                self.say(&format!(
                    "volume {} ready: {} at {}:{} ({} plexes, mirror {})",
                    rec.name,
                    rec.nqn,
                    self.node(&owner)?.storage_addr,
                    self.node(&owner)?.port,
                    rec.plexes.len(),
                    size::human(rec.mirror_size)
                ));
                Ok(rec)
            }
            Err(e) => {
                self.say(&format!(
                    "creating {} failed ({e}); undoing what was made",
                    o.name
                ));
                let mut r = Report::default();
                let left = self.teardown(&rec, &mut r);
                if !left.is_empty() {
                    self.say(&format!(
                        "could not undo on {}: remove the leftovers by hand",
                        left.join(", ")
                    ));
                }
                Err(e)
            }
        }
    }

    /// Refuses before anything is made: every node answers, and none already has a bdev,
    /// subsystem or file of the names this volume will use (a leftover, or someone else's,
    /// that an undo would then delete).
    pub(crate) fn preflight(&mut self, rec: &VolumeRecord) -> Result<(), Error> {
        let names = self.names_of(rec);
        for n in rec.nodes() {
            let mut c = self.client(&n)?;
            let bdevs = c
                .call("bdev_get_bdevs", Value::Null)
                .map_err(node_err(&n))?;
            let subs = c
                .call("nvmf_get_subsystems", Value::Null)
                .map_err(node_err(&n))?;
            let has = |list: &Value, key: &str, name: &str| {
                list.as_array()
                    .is_some_and(|l| l.iter().any(|x| x[key] == name))
            };
            for b in names.bdevs.iter().chain(std::iter::once(&rec.name)) {
                if has(&bdevs, "name", b) {
                    return Err(Error::Refused(format!("node {n} already has a bdev {b}")));
                }
            }
            for s in &names.subsystems {
                if has(&subs, "nqn", s) {
                    return Err(Error::Refused(format!(
                        "node {n} already has a subsystem {s}"
                    )));
                }
            }
        }
        for p in &rec.plexes {
            if let Some(f) = &p.file {
                if f.exists() {
                    return Err(Error::Refused(format!(
                        "plex file {} exists; refusing to overwrite it",
                        f.display()
                    )));
                }
            }
        }
        Ok(())
    }

    fn names_of(&self, rec: &VolumeRecord) -> Names {
        let n = rec.plexes.len();
        Names {
            bdevs: (0..n)
                .flat_map(|i| [plex_bdev(&rec.name, i), remote_plex_bdev(&rec.name, i)])
                .collect(),
            subsystems: std::iter::once(rec.nqn.clone())
                .chain((0..n).map(|i| plex_nqn(&rec.name, i)))
                .collect(),
        }
    }

    /// Makes every part of a new volume, in order; the caller undoes all on failure.
    /// With `from`, the plexes are clones of that snapshot's lvols, assembled as a copy.
    pub(crate) fn build(
        &mut self,
        rec: &mut VolumeRecord,
        from: Option<&state::SnapshotRecord>,
    ) -> Result<(), Error> {
        let owner = self.node(&rec.owner)?;
        for i in 0..rec.plexes.len() {
            let p = rec.plexes[i].clone();
            match from {
                Some(snap) => self.clone_plex_lvol(&snap.plexes[i].1, &p)?,
                None => self.make_plex_bdev(rec, &p)?,
            }
            if p.node != owner.name {
                self.export_plex(rec, i, &owner.host_nqn)?;
                self.attach_plex(rec, i, &owner)?;
            }
        }
        let copy_of = rec.origin.as_ref().map(|(v, _)| v.clone());
        self.assemble(rec, &owner, 0, copy_of.as_deref())?;
        if rec.mirror_size < rec.size {
            return Err(Error::Refused(format!(
                "the mirror came out at {} bytes, less than the {} asked for (plexes too small)",
                rec.mirror_size, rec.size
            )));
        }
        self.export_volume(rec, &owner)
    }

    fn make_plex_bdev(&mut self, rec: &VolumeRecord, p: &PlexRecord) -> Result<(), Error> {
        let blocks = rec.plex_size / size::BLOCK_SIZE;
        let mut c = self.client(&p.node)?;
        // The directories of what the plex keeps in files: its image, its reservations.
        for f in p.file.iter().cloned().chain(p.ptpl()) {
            if let Some(dir) = f.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::Files(format!("{}: {e}", dir.display())))?;
            }
        }
        let (method, params, lvol) = match (self.nodes.backend, &p.file) {
            // Thin: the plex takes clusters as the mirror writes (a resync writes only what
            // differs).
            (Backend::Lvol, _) => (
                "bdev_lvol_create",
                json!({"lvs_name": self.node(&p.node)?.lvs_name, "lvol_name": p.lvol_name(),
                       "size_in_mib": rec.plex_size.div_ceil(1 << 20), "thin_provision": true}),
                true,
            ),
            (_, Some(f)) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(f)
                    .map_err(|e| Error::Files(format!("plex file {}: {e}", f.display())))?;
                file.set_len(rec.plex_size)
                    .map_err(|e| Error::Files(format!("plex file {}: {e}", f.display())))?;
                (
                    "bdev_uring_create",
                    json!({"name": p.bdev, "filename": f, "block_size": size::BLOCK_SIZE}),
                    false,
                )
            }
            (_, None) => (
                "bdev_malloc_create",
                json!({"name": p.bdev, "num_blocks": blocks, "block_size": size::BLOCK_SIZE}),
                false,
            ),
        };
        c.call(method, params).map_err(node_err(&p.node))?;
        let (kind, thin) = if lvol {
            ("lvol", ", thin")
        } else {
            ("bdev", "")
        };
        self.say(&format!(
            "{}: plex {kind} {} ({}{thin})",
            p.node,
            p.bdev,
            size::human(rec.plex_size)
        ));
        Ok(())
    }

    /// Exports plex `i` from its node to `host` only; an existing export gets `host` added.
    pub(crate) fn export_plex(
        &mut self,
        rec: &VolumeRecord,
        i: usize,
        host: &str,
    ) -> Result<(), Error> {
        let p = &rec.plexes[i];
        let node = self.node(&p.node)?;
        let nqn = plex_nqn(&rec.name, i);
        let mut c = self.client(&node.name)?;
        let e = node_err(&node.name);
        ensure_transport(&mut c).map_err(&e)?;
        match c.call(
            "nvmf_create_subsystem",
            json!({"nqn": nqn, "allow_any_host": false}),
        ) {
            Ok(_) => {
                // A file plex keeps its namespace's reservations beside it (SPDK's
                // ptpl_file), so the owner's fence outlives a restart of this node.
                let mut ns = json!({"bdev_name": p.bdev});
                if let Some(f) = p.ptpl() {
                    ns["ptpl_file"] = json!(f);
                }
                call_busy(
                    &mut c,
                    "nvmf_subsystem_add_ns",
                    &json!({"nqn": nqn, "namespace": ns}),
                )
                .map_err(&e)?;
                c.call(
                    "nvmf_subsystem_add_listener",
                    json!({"nqn": nqn, "listen_address": listen_address(&node)}),
                )
                .map_err(&e)?;
            }
            Err(err) if err.is_exists() => {}
            Err(err) => return Err(e(err)),
        }
        match c.call("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": host})) {
            Ok(_) => {}
            Err(err) if err.is_exists() => {}
            Err(err) => return Err(e(err)),
        }
        self.say(&format!(
            "{}: plex {} exported as {nqn} to {host}",
            node.name, p.bdev
        ));
        Ok(())
    }

    /// Attaches plex `i`'s export on `owner` as controller `NAME.p<i>`.
    pub(crate) fn attach_plex(
        &mut self,
        rec: &VolumeRecord,
        i: usize,
        owner: &Node,
    ) -> Result<(), Error> {
        let p = &rec.plexes[i];
        let node = self.node(&p.node)?;
        let mut c = self.client(&owner.name)?;
        // Reconnect forever (a plex node that reboots comes back), but fail I/O after a
        // second so the mirror faults the plex instead of stalling the volume.
        c.call(
            "bdev_nvme_attach_controller",
            json!({
                "name": plex_bdev(&rec.name, i),
                "trtype": "tcp",
                "adrfam": adrfam(&node.storage_addr),
                "traddr": node.storage_addr,
                "trsvcid": node.port.to_string(),
                "subnqn": plex_nqn(&rec.name, i),
                "hostnqn": owner.host_nqn,
                "ctrlr_loss_timeout_sec": -1,
                "reconnect_delay_sec": 1,
                "fast_io_fail_timeout_sec": 1,
            }),
        )
        .map_err(node_err(&owner.name))?;
        self.say(&format!(
            "{}: attached plex {} from {} as {}",
            owner.name,
            p.bdev,
            p.node,
            remote_plex_bdev(&rec.name, i)
        ));
        Ok(())
    }

    /// `bdev_mirror_create` on `owner` over the plexes' recorded locations; records the
    /// mirror's size and generation.
    /// `copy_of`: the plexes are copies of that volume's (clones of its snapshot).
    pub(crate) fn assemble(
        &mut self,
        rec: &mut VolumeRecord,
        owner: &Node,
        min_gen: u64,
        copy_of: Option<&str>,
    ) -> Result<(), Error> {
        let plexes: Vec<Value> = rec
            .plexes
            .iter()
            .map(|p| json!({"bdev": p.location, "node": p.node}))
            .collect();
        let mut c = self.client(&owner.name)?;
        let e = node_err(&owner.name);
        let mut params = json!({"name": rec.name, "plexes": plexes, "region_size": rec.region_size,
                                "min_generation": min_gen, "allow_degraded": true});
        if let Some(src) = copy_of {
            params["copy_of"] = json!(src);
        }
        call_busy(&mut c, "bdev_mirror_create", &params).map_err(&e)?;
        let m = mirror_of(&mut c, &rec.name).map_err(&e)?;
        rec.generation = m["generation"].as_u64().unwrap_or(rec.generation);
        rec.mirror_size =
            m["num_blocks"].as_u64().unwrap_or(0) * m["block_size"].as_u64().unwrap_or(0);
        self.say(&format!(
            "{}: mirror {} assembled at generation {} ({} state)",
            owner.name,
            rec.name,
            rec.generation,
            m["state"].as_str().unwrap_or("?")
        ));
        Ok(())
    }

    pub(crate) fn export_volume(&mut self, rec: &VolumeRecord, owner: &Node) -> Result<(), Error> {
        let mut c = self.client(&owner.name)?;
        let e = node_err(&owner.name);
        ensure_transport(&mut c).map_err(&e)?;
        c.call(
            "nvmf_create_subsystem",
            json!({"nqn": rec.nqn, "allow_any_host": true}),
        )
        .map_err(&e)?;
        c.call(
            "nvmf_subsystem_add_ns",
            json!({"nqn": rec.nqn, "namespace": {"bdev_name": rec.name}}),
        )
        .map_err(&e)?;
        c.call(
            "nvmf_subsystem_add_listener",
            json!({"nqn": rec.nqn, "listen_address": listen_address(owner)}),
        )
        .map_err(&e)?;
        self.say(&format!(
            "{}: volume exported as {} on {}:{}",
            owner.name, rec.nqn, owner.storage_addr, owner.port
        ));
        Ok(())
    }
}
