//! The nodes file: which plexd nodes make up the cluster and how to reach them.
//!
//! JSON (plexd's own configuration is JSON, and the state file next to it is too):
//!
//! ```json
//! {
//!   "backend": "uring",
//!   "data_dir": "/var/lib/plexstor/plexes",
//!   "nodes": [
//!     {"name": "n1", "rpc_socket": "/run/plexstor/n1.sock", "storage_addr": "192.0.2.11"},
//!     {"name": "n2", "rpc_socket": "/run/plexstor/n2.sock", "storage_addr": "192.0.2.12",
//!      "port": 4421, "data_dir": "/srv/plexes", "host_nqn": "nqn.2014-08.org.example:n2"}
//!   ]
//! }
//! ```
//!
//! - `backend`: `uring` (default: a file per plex under the node's `data_dir`, served by
//!   `bdev_uring_create`), `lvol` (a thin lvol per plex on the node's volume store, named by
//!   `lvs_name`, default `lvs`, which the node must have: `bdev_lvol_create_lvstore` on its
//!   disk; the plex exports' reservation files go in `data_dir`) or `malloc` (RAM, for tests:
//!   gone when plexd stops).
//! - `port`: the NVMe/TCP port every export of the node listens on (default 4420).
//! - `host_nqn`: the NQN the node connects to other nodes as; plex exports admit only their
//!   owner's. Default `nqn.2024-01.io.plexstor:node:NAME`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 4420;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Uring,
    Lvol,
    Malloc,
}

impl Backend {
    /// Its name in the nodes file.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Lvol => "lvol",
            Backend::Malloc => "malloc",
        }
    }
}

/// The volume store the `lvol` backend uses on a node that names none.
pub const DEFAULT_LVS: &str = "lvs";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    rpc_socket: PathBuf,
    storage_addr: String,
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    host_nqn: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    backend: Backend,
    data_dir: Option<PathBuf>,
    lvs_name: Option<String>,
    nodes: Vec<NodeEntry>,
}

/// One node, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub rpc_socket: PathBuf,
    pub storage_addr: String,
    pub port: u16,
    pub data_dir: Option<PathBuf>,
    pub host_nqn: String,
    /// The node's volume store (the `lvol` backend).
    pub lvs_name: String,
}

#[derive(Clone, Debug)]
pub struct Nodes {
    pub path: PathBuf,
    pub backend: Backend,
    pub nodes: Vec<Node>,
}

/// What a node name may be: it goes into NQNs and the mirror's superblock (32 bytes there).
pub fn check_node_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 32
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {n:?} must be 1-32 letters, digits, '-', '_' or '.'"
        ))
    }
}

impl Nodes {
    pub fn load(path: &Path) -> Result<Nodes, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("nodes file {}: {e}", path.display()))?;
        Nodes::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Nodes, String> {
        let at = |e: String| format!("nodes file {}: {e}", path.display());
        let f: FileShape = serde_json::from_str(text).map_err(|e| at(e.to_string()))?;
        if f.nodes.is_empty() {
            return Err(at("lists no nodes".into()));
        }
        let mut nodes: Vec<Node> = Vec::new();
        for e in f.nodes {
            check_node_name(&e.name).map_err(at)?;
            if nodes.iter().any(|n| n.name == e.name) {
                return Err(at(format!("node {} is listed twice", e.name)));
            }
            if e.storage_addr.is_empty() || e.storage_addr.contains(char::is_whitespace) {
                return Err(at(format!(
                    "node {}: storage_addr {:?} is not an address",
                    e.name, e.storage_addr
                )));
            }
            if e.port == Some(0) {
                return Err(at(format!("node {}: port 0", e.name)));
            }
            if let Some(h) = &e.host_nqn {
                if !h.starts_with("nqn.") || h.len() > 223 || h.contains(char::is_whitespace) {
                    return Err(at(format!("node {}: host_nqn {h:?} is not an NQN", e.name)));
                }
            }
            let data_dir = e.data_dir.or_else(|| f.data_dir.clone());
            if f.backend != Backend::Malloc && data_dir.is_none() {
                return Err(at(format!(
                    "node {}: the {} backend needs a data_dir (for the node or the file)",
                    e.name,
                    f.backend.name()
                )));
            }
            let lvs_name = e
                .lvs_name
                .or_else(|| f.lvs_name.clone())
                .unwrap_or_else(|| DEFAULT_LVS.into());
            if lvs_name.is_empty() || lvs_name.contains('/') || lvs_name.len() > 63 {
                return Err(at(format!(
                    "node {}: lvs_name {lvs_name:?} must be 1-63 bytes without '/'",
                    e.name
                )));
            }
            nodes.push(Node {
                host_nqn: e
                    .host_nqn
                    .unwrap_or_else(|| format!("nqn.2024-01.io.plexstor:node:{}", e.name)),
                name: e.name,
                rpc_socket: e.rpc_socket,
                storage_addr: e.storage_addr,
                port: e.port.unwrap_or(DEFAULT_PORT),
                data_dir,
                lvs_name,
            });
        }
        Ok(Nodes {
            path: path.to_path_buf(),
            backend: f.backend,
            nodes,
        })
    }

    pub fn get(&self, name: &str) -> Result<&Node, String> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            format!(
                "no node {name:?} in {} (known: {})",
                self.path.display(),
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The state file that goes with this nodes file: `NAME.state.json` beside it.
    pub fn state_path(&self) -> PathBuf {
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "nodes".into());
        self.path.with_file_name(format!("{stem}.state.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Nodes, String> {
        Nodes::parse(Path::new("/etc/plexstor/nodes.json"), text)
    }

    #[test]
    fn defaults_fill_in() {
        let n = parse(
            r#"{"data_dir": "/d", "nodes": [
                {"name": "n1", "rpc_socket": "/s1", "storage_addr": "192.0.2.1"},
                {"name": "n2", "rpc_socket": "/s2", "storage_addr": "192.0.2.2", "port": 4500,
                 "data_dir": "/e", "host_nqn": "nqn.2014-08.org.example:n2"}]}"#,
        )
        .unwrap();
        assert_eq!(n.backend, Backend::Uring);
        assert_eq!(n.nodes[0].port, 4420);
        assert_eq!(n.nodes[0].data_dir.as_deref(), Some(Path::new("/d")));
        assert_eq!(n.nodes[0].host_nqn, "nqn.2024-01.io.plexstor:node:n1");
        assert_eq!(n.nodes[1].port, 4500);
        assert_eq!(n.nodes[1].data_dir.as_deref(), Some(Path::new("/e")));
        assert_eq!(n.nodes[1].host_nqn, "nqn.2014-08.org.example:n2");
        assert_eq!(
            n.state_path(),
            PathBuf::from("/etc/plexstor/nodes.state.json")
        );
        assert!(n.get("n3").unwrap_err().contains("known: n1, n2"));
    }

    #[test]
    fn lvol_names_its_store_per_node_or_for_all() {
        let n = parse(
            r#"{"backend": "lvol", "data_dir": "/d", "lvs_name": "fast", "nodes": [
                {"name": "a", "rpc_socket": "/s", "storage_addr": "127.0.0.1"},
                {"name": "b", "rpc_socket": "/t", "storage_addr": "127.0.0.2", "lvs_name": "b0"}]}"#,
        )
        .unwrap();
        assert_eq!(n.backend, Backend::Lvol);
        assert_eq!(
            (n.nodes[0].lvs_name.as_str(), n.nodes[1].lvs_name.as_str()),
            ("fast", "b0")
        );
        let e = parse(
            r#"{"backend": "lvol", "nodes": [{"name": "a", "rpc_socket": "/s", "storage_addr": "x"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("lvol backend needs a data_dir"), "{e}");
        let e = parse(
            r#"{"backend": "lvol", "data_dir": "/d", "lvs_name": "a/b", "nodes": [{"name": "a", "rpc_socket": "/s", "storage_addr": "x"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("without '/'"), "{e}");
    }

    #[test]
    fn malloc_needs_no_data_dir() {
        let n = parse(
            r#"{"backend": "malloc", "nodes": [
                {"name": "a", "rpc_socket": "/s", "storage_addr": "127.0.0.1"}]}"#,
        )
        .unwrap();
        assert_eq!(n.backend, Backend::Malloc);
    }

    #[test]
    fn mistakes_are_named() {
        let node = r#"{"name": "n1", "rpc_socket": "/s", "storage_addr": "127.0.0.1"}"#;
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "EOF"),
            (r#"{"nodes": []}"#.into(), "lists no nodes"),
            (
                format!(r#"{{"data_dir": "/d", "nodes": [{node}, {node}]}}"#),
                "listed twice",
            ),
            (format!(r#"{{"nodes": [{node}]}}"#), "needs a data_dir"),
            (
                r#"{"backend": "malloc", "nodes": [{"name": "n 1", "rpc_socket": "/s", "storage_addr": "x"}]}"#.into(),
                "must be 1-32",
            ),
            (
                r#"{"backend": "malloc", "nodes": [{"name": "n", "rpc_socket": "/s", "storage_addr": "x", "prot": 1}]}"#.into(),
                "unknown field `prot`",
            ),
            (r#"{"backend": "disk", "nodes": []}"#.into(), "unknown variant `disk`"),
            (
                r#"{"backend": "malloc", "nodes": [{"name": "n", "rpc_socket": "/s", "storage_addr": "x", "host_nqn": "n2"}]}"#.into(),
                "not an NQN",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.starts_with("nodes file /etc/plexstor/nodes.json"), "{e}");
        }
    }
}
