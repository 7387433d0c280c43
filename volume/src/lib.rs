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
mod create;
mod delete;
mod failover;
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
