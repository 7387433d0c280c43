//! Volumes mirrored across plexd nodes: where their plexes go, how each node is told to build
//! its part over JSON-RPC, how a volume moves to another node when its owner dies, and how it
//! is taken down. `plexctl volume` is a thin command line over this crate; the CSI driver
//! will call it too.
//!
//! A volume `NAME` of N plexes (1–3) on nodes n₀…n_{N-1}, n₀ the owner:
//! - plex i is bdev `NAME.p<i>` on node nᵢ (a file through `bdev_uring_create`, or RAM), or
//!   the thin lvol `LVS/NAME.p<i>` on the node's volume store;
//! - each plex off the owner is exported by its node as `…:vol-NAME-p<i>`, to the owner's
//!   host NQN only, and attached on the owner as controller `NAME.p<i>` (bdev `NAME.p<i>n1`);
//! - the owner runs `bdev_mirror_create NAME` over the plexes, and exports the mirror as
//!   `nqn.2024-01.io.plexstor:vol-NAME` for any host.
//!
//! Fencing a dead owner: its host NQN comes off every plex export it could reach
//! (`nvmf_subsystem_remove_host`, which also drops its live connections), and the new owner's
//! `bdev_mirror_create` takes a Write Exclusive reservation on every remote plex, preempting
//! and aborting the old owner's, so an old owner that reaches a plex again gets Reservation
//! Conflict and stops acknowledging writes. An old owner restarting from its saved config
//! cannot serve its own plex alone either: without `allow_degraded` (which only `attach`
//! passes) the mirror refuses to assemble while a plex its superblock calls in sync is missing.

pub mod cli;
pub mod nodes;
mod resize;
pub mod rpc;
pub mod size;
mod snapshot;
pub mod state;
pub mod table;

use nodes::{Backend, Node, Nodes};
use rpc::{Client, RpcError};
use serde_json::{json, Value};
use state::{PlexRecord, StateFile, VolumeRecord};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where volume NQNs live.
pub const NQN_PREFIX: &str = "nqn.2024-01.io.plexstor";
/// How long a teardown step may find its object busy (a claim being let go) before it is
/// reported as failed.
const BUSY_DEADLINE: Duration = Duration::from_secs(30);
/// How long `rejoin` waits for the mirror to take a plex back (fencing and reading its
/// superblock over the network).
const REJOIN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// A node failed a step.
    #[error("node {node}: {source}")]
    Node { node: String, source: RpcError },
    /// The state or nodes file.
    #[error("{0}")]
    Files(String),
    /// The operation cannot be done as things are (and says why).
    #[error("{0}")]
    Refused(String),
}

fn node_err(node: &str) -> impl Fn(RpcError) -> Error + '_ {
    move |source| Error::Node {
        node: node.to_string(),
        source,
    }
}

pub fn volume_nqn(name: &str) -> String {
    format!("{NQN_PREFIX}:vol-{name}")
}

pub fn plex_nqn(name: &str, i: usize) -> String {
    format!("{NQN_PREFIX}:vol-{name}-p{i}")
}

/// A plex's bdev on its own node; also the name of its controller on the owner.
pub fn plex_bdev(name: &str, i: usize) -> String {
    format!("{name}.p{i}")
}

/// A remote plex's bdev on the owner: namespace 1 of controller `NAME.p<i>`.
pub fn remote_plex_bdev(name: &str, i: usize) -> String {
    format!("{name}.p{i}n1")
}

/// Volume names go into bdev names, NQNs, file names and the mirror's 64-byte name field.
pub fn check_volume_name(n: &str) -> Result<(), Error> {
    let ok = (1..=48).contains(&n.len())
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "volume name {n:?} must be 1-48 letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// `volume create`'s request.
#[derive(Clone, Debug)]
pub struct CreateOpts {
    pub name: String,
    pub size: u64,
    pub mirror_count: usize,
    /// Chosen nodes, the owner first; else the least used are picked.
    pub nodes: Option<Vec<String>>,
    pub region_size: Option<u64>,
}

/// Picks `count` nodes for a new volume: those holding the fewest plexes, ties in the nodes
/// file's order.
pub fn pick_least_used(
    candidates: &[&str],
    volumes: &[&VolumeRecord],
    count: usize,
) -> Result<Vec<String>, Error> {
    if candidates.len() < count {
        return Err(Error::Refused(format!(
            "{count} plexes need {count} nodes, only {} available ({})",
            candidates.len(),
            candidates.join(", ")
        )));
    }
    let used = |n: &str| {
        volumes
            .iter()
            .flat_map(|v| &v.plexes)
            .filter(|p| p.node == n)
            .count()
    };
    let mut by_use: Vec<(usize, usize, &str)> = candidates
        .iter()
        .enumerate()
        .map(|(i, n)| (used(n), i, *n))
        .collect();
    by_use.sort();
    Ok(by_use
        .into_iter()
        .take(count)
        .map(|(_, _, n)| n.to_string())
        .collect())
}

/// What `describe` found.
#[derive(Debug, Clone)]
pub struct Description {
    pub record: VolumeRecord,
    /// The owner's `bdev_mirror_get_mirrors` entry.
    pub mirror: Value,
}

/// One line of `volume list`.
#[derive(Debug, Clone)]
pub struct ListRow {
    pub name: String,
    pub size: u64,
    pub owner: String,
    pub plexes: Vec<String>,
    /// The mirror's state on the owner (online, degraded, failed), or why it is not known.
    pub state: String,
}

/// What a command that visits several nodes did, and what it had to skip.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub warnings: Vec<String>,
}

/// The cluster as the nodes file describes it.
pub struct Cluster {
    pub nodes: Nodes,
    /// Bounds each RPC's read and write.
    pub timeout: Duration,
    /// Told each step as it happens (plexctl prints them).
    pub progress: Box<dyn FnMut(&str)>,
}

impl Cluster {
    pub fn open(nodes_file: &Path) -> Result<Cluster, Error> {
        Ok(Cluster {
            nodes: Nodes::load(nodes_file).map_err(Error::Files)?,
            timeout: Duration::from_secs(60),
            progress: Box::new(|_| {}),
        })
    }

    fn say(&mut self, msg: &str) {
        (self.progress)(msg);
    }

    fn warn(&mut self, report: &mut Report, msg: String) {
        (self.progress)(&format!("warning: {msg}"));
        report.warnings.push(msg);
    }

    fn state(&self) -> Result<StateFile, Error> {
        StateFile::open(&self.nodes.state_path()).map_err(Error::Files)
    }

    fn node(&self, name: &str) -> Result<Node, Error> {
        self.nodes.get(name).cloned().map_err(Error::Invalid)
    }

    /// A connection to `node`'s plexd.
    pub fn client(&self, node: &str) -> Result<Client, Error> {
        let n = self.node(node)?;
        Client::connect(&n.rpc_socket, self.timeout).map_err(node_err(node))
    }

    fn record(st: &StateFile, name: &str) -> Result<VolumeRecord, Error> {
        st.state
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no volume {name} in {}", st.path().display())))
    }

    // ---- create -------------------------------------------------------------------------

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
    fn preflight(&mut self, rec: &VolumeRecord) -> Result<(), Error> {
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
    fn build(
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
    fn export_plex(&mut self, rec: &VolumeRecord, i: usize, host: &str) -> Result<(), Error> {
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
    fn attach_plex(&mut self, rec: &VolumeRecord, i: usize, owner: &Node) -> Result<(), Error> {
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
    fn assemble(
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

    fn export_volume(&mut self, rec: &VolumeRecord, owner: &Node) -> Result<(), Error> {
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

    // ---- describe and list ----------------------------------------------------------------

    /// The volume as its owner's mirror reports it; the generation seen is recorded.
    pub fn describe(&mut self, name: &str) -> Result<Description, Error> {
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        let mut c = self.client(&rec.owner)?;
        let mirror = mirror_of(&mut c, name).map_err(node_err(&rec.owner))?;
        if let Some(g) = mirror["generation"]
            .as_u64()
            .filter(|&g| g > rec.generation)
        {
            rec.generation = g;
            st.state.volumes.insert(name.to_string(), rec.clone());
            st.save().map_err(Error::Files)?;
        }
        Ok(Description {
            record: rec,
            mirror,
        })
    }

    pub fn list(&mut self) -> Result<Vec<ListRow>, Error> {
        let st = self.state()?;
        let mut rows = Vec::new();
        for rec in st.state.volumes.values() {
            let state = if rec.deleting {
                "deleting".to_string()
            } else {
                match self.client(&rec.owner) {
                    Err(_) => "owner unreachable".to_string(),
                    Ok(mut c) => match mirror_of(&mut c, &rec.name) {
                        Ok(m) => m["state"].as_str().unwrap_or("?").to_string(),
                        Err(e) if e.is_gone() => "no mirror on owner".into(),
                        Err(e) => format!("error: {e}"),
                    },
                }
            };
            rows.push(ListRow {
                name: rec.name.clone(),
                size: rec.size,
                owner: rec.owner.clone(),
                plexes: rec.plexes.iter().map(|p| p.node.clone()).collect(),
                state,
            });
        }
        Ok(rows)
    }

    // ---- attach (failover) ----------------------------------------------------------------

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

    // ---- delete ---------------------------------------------------------------------------

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
    fn teardown(&mut self, rec: &VolumeRecord, report: &mut Report) -> Vec<String> {
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
    fn teardown_owner_part(&mut self, rec: &VolumeRecord, node: &str) -> Result<(), Error> {
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

struct Names {
    bdevs: Vec<String>,
    subsystems: Vec<String>,
}

fn first_value(v: &Value) -> String {
    v.as_object()
        .and_then(|o| o.values().next())
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_string()
}

/// Calls `method`, again while the answer is "busy": a mirror being deleted lets go of its
/// plexes' claims shortly after `bdev_mirror_delete` returns.
fn call_busy(c: &mut Client, method: &str, params: &Value) -> Result<Value, RpcError> {
    let t0 = Instant::now();
    loop {
        match c.call(method, params.clone()) {
            Err(e) if e.code() == Some(-(libc::EBUSY as i64)) && t0.elapsed() < BUSY_DEADLINE => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Runs a delete step: Ok(true) if it removed something, Ok(false) if it was already gone.
fn gone_or_done(c: &mut Client, method: &str, params: &Value) -> Result<bool, RpcError> {
    match call_busy(c, method, params) {
        Ok(_) => Ok(true),
        Err(e) if e.is_gone() => Ok(false),
        Err(e) => Err(e),
    }
}

fn ensure_transport(c: &mut Client) -> Result<(), RpcError> {
    let t = c.call("nvmf_get_transports", Value::Null)?;
    if t.as_array().is_some_and(|a| !a.is_empty()) {
        return Ok(());
    }
    match c.call("nvmf_create_transport", json!({"trtype": "TCP"})) {
        Err(e) if !e.is_exists() => Err(e),
        _ => Ok(()),
    }
}

fn adrfam(addr: &str) -> &'static str {
    if addr.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn listen_address(n: &Node) -> Value {
    json!({"trtype": "TCP", "adrfam": adrfam(&n.storage_addr), "traddr": n.storage_addr,
           "trsvcid": n.port.to_string()})
}

fn mirror_of(c: &mut Client, name: &str) -> Result<Value, RpcError> {
    let v = c.call("bdev_mirror_get_mirrors", json!({"name": name}))?;
    v.get(0).cloned().ok_or_else(|| RpcError::Protocol {
        method: "bdev_mirror_get_mirrors".into(),
        what: format!("no entry for {name}: {v}"),
    })
}

/// The nodes file plexctl uses when none is given.
pub fn default_nodes_file() -> PathBuf {
    PathBuf::from("/etc/plexstor/nodes.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, nodes: &[&str]) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            size: 1,
            plex_size: 1,
            region_size: 1 << 20,
            mirror_size: 1,
            owner: nodes[0].into(),
            former_owners: vec![],
            nqn: volume_nqn(name),
            plexes: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| PlexRecord {
                    node: n.to_string(),
                    bdev: plex_bdev(name, i),
                    file: None,
                    ptpl_file: None,
                    location: plex_bdev(name, i),
                })
                .collect(),
            generation: 1,
            deleting: false,
            snapshots: Vec::new(),
            origin: None,
        }
    }

    #[test]
    fn least_used_nodes_first_ties_in_file_order() {
        let a = vol("a", &["n1", "n2"]);
        let b = vol("b", &["n1"]);
        let nodes = ["n1", "n2", "n3", "n4"];
        assert_eq!(pick_least_used(&nodes, &[], 2).unwrap(), ["n1", "n2"]);
        assert_eq!(
            pick_least_used(&nodes, &[&a, &b], 3).unwrap(),
            ["n3", "n4", "n2"]
        );
        let e = pick_least_used(&nodes[..1], &[], 2).unwrap_err();
        assert!(e.to_string().contains("only 1 available"), "{e}");
    }

    #[test]
    fn names() {
        assert_eq!(volume_nqn("v1"), "nqn.2024-01.io.plexstor:vol-v1");
        assert_eq!(plex_nqn("v1", 2), "nqn.2024-01.io.plexstor:vol-v1-p2");
        assert_eq!(remote_plex_bdev("v1", 1), "v1.p1n1");
        assert!(check_volume_name("pvc-0a1b").is_ok());
        for bad in ["", "-x", "a b", "a.b", "x/y", &"a".repeat(49)] {
            let e = check_volume_name(bad).unwrap_err();
            assert!(e.to_string().contains("must be 1-48"), "{bad:?}: {e}");
        }
    }
}
