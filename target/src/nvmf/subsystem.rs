//! NVMe subsystems: identity, namespaces, allowed hosts, listeners and live controllers.

use super::controller::Controller;
use super::reservation::Reservations;
use super::{NvmfError, DEFAULT_SERIAL, MODEL_NUMBER};
use crate::bdev::BdevEntry;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubType {
    Discovery,
    Nvme,
}

/// A transport address as SPDK's `listen_address` names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenAddr {
    pub trtype: String,
    #[serde(default = "default_adrfam")]
    pub adrfam: String,
    pub traddr: String,
    pub trsvcid: String,
}

fn default_adrfam() -> String {
    "IPv4".into()
}

impl ListenAddr {
    /// Normalises names so `tcp`/`TCP` and `ipv4`/`IPv4` compare equal.
    pub fn normalized(mut self) -> Result<Self, NvmfError> {
        self.trtype = match self.trtype.to_ascii_lowercase().as_str() {
            "tcp" => "TCP".into(),
            "rdma" => "RDMA".into(),
            _ => {
                return Err(NvmfError::InvalidParam(format!(
                    "trtype {:?} is not supported (TCP or RDMA)",
                    self.trtype
                )))
            }
        };
        self.adrfam = match self.adrfam.to_ascii_lowercase().as_str() {
            "ipv4" => "IPv4".into(),
            "ipv6" => "IPv6".into(),
            other => {
                return Err(NvmfError::InvalidParam(format!(
                    "adrfam {other:?} is not supported (IPv4 or IPv6)"
                )))
            }
        };
        self.trsvcid.parse::<u16>().map_err(|_| {
            NvmfError::InvalidParam(format!("trsvcid {:?} is not a port", self.trsvcid))
        })?;
        self.traddr.parse::<std::net::IpAddr>().map_err(|_| {
            NvmfError::InvalidParam(format!("traddr {:?} is not an IP address", self.traddr))
        })?;
        Ok(self)
    }

    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        let ip: std::net::IpAddr = self.traddr.parse().ok()?;
        Some(std::net::SocketAddr::new(ip, self.trsvcid.parse().ok()?))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.trtype, self.traddr, self.trsvcid)
    }
}

/// A namespace: an NSID bound to a bdev, with identifiers that stay the same across restarts
/// of the same configuration.
pub struct Namespace {
    pub nsid: u32,
    pub bdev: Arc<BdevEntry>,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// Registrants and the reservation held, shared by every controller.
    pub resv: Reservations,
    /// The size controllers were last told about, to notice a resize.
    seen_blocks: AtomicU64,
}

impl Namespace {
    /// Identifiers not given explicitly derive from the bdev's UUID, so the same bdev gives
    /// the same namespace identity every time.
    pub fn new(
        nsid: u32,
        bdev: Arc<BdevEntry>,
        uuid: Option<Uuid>,
        nguid: Option<[u8; 16]>,
        eui64: Option<[u8; 8]>,
        resv: Reservations,
    ) -> Namespace {
        let base = bdev.info().uuid;
        let uuid = uuid.unwrap_or(base);
        let b = *uuid.as_bytes();
        let nguid = nguid.unwrap_or(b);
        let eui64 = eui64.unwrap_or_else(|| {
            let mut e = [0u8; 8];
            for i in 0..8 {
                e[i] = b[i] ^ b[i + 8];
            }
            e
        });
        let seen_blocks = AtomicU64::new(bdev.info().num_blocks());
        Namespace {
            nsid,
            bdev,
            uuid,
            nguid,
            eui64,
            resv,
            seen_blocks,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.bdev.info().block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.bdev.info().num_blocks()
    }
}

pub struct SubsysInner {
    pub namespaces: BTreeMap<u32, Arc<Namespace>>,
    pub hosts: Vec<String>,
    pub allow_any_host: bool,
    pub listeners: Vec<ListenAddr>,
    pub controllers: Vec<Arc<Controller>>,
    next_cntlid: u16,
    deleted: bool,
}

pub struct Subsystem {
    pub nqn: String,
    pub subtype: SubType,
    pub serial: String,
    pub model: String,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    inner: Mutex<SubsysInner>,
    /// Bumped on every namespace change; I/O queues compare it once per poll.
    ns_gen: AtomicU64,
}

impl Subsystem {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        nqn: String,
        serial: Option<String>,
        model: Option<String>,
        allow_any_host: bool,
        max_namespaces: u32,
        min_cntlid: u16,
        max_cntlid: u16,
    ) -> Result<Subsystem, NvmfError> {
        nvme_spec::fabrics::validate_nqn(&nqn)
            .map_err(|e| NvmfError::InvalidParam(format!("NQN {nqn:?}: {e}")))?;
        let serial = serial.unwrap_or_else(|| DEFAULT_SERIAL.into());
        let model = model.unwrap_or_else(|| MODEL_NUMBER.into());
        if serial.len() > 20 || !serial.bytes().all(|c| (0x20..0x7f).contains(&c)) {
            return Err(NvmfError::InvalidParam(format!(
                "serial_number {serial:?} must be at most 20 printable ASCII characters"
            )));
        }
        if model.len() > 40 || !model.bytes().all(|c| (0x20..0x7f).contains(&c)) {
            return Err(NvmfError::InvalidParam(format!(
                "model_number {model:?} must be at most 40 printable ASCII characters"
            )));
        }
        if min_cntlid == 0 || min_cntlid > max_cntlid || max_cntlid > 0xFFEF {
            return Err(NvmfError::InvalidParam(format!(
                "cntlid range {min_cntlid}..={max_cntlid} must lie within 1..=65519"
            )));
        }
        if max_namespaces == 0 || max_namespaces > 1024 {
            return Err(NvmfError::InvalidParam(format!(
                "max_namespaces {max_namespaces} must be 1..=1024"
            )));
        }
        Ok(Self::build(
            nqn,
            SubType::Nvme,
            serial,
            model,
            allow_any_host,
            max_namespaces,
            min_cntlid,
            max_cntlid,
        ))
    }

    pub fn new_discovery() -> Subsystem {
        Self::build(
            nvme_spec::fabrics::DISCOVERY_NQN.into(),
            SubType::Discovery,
            DEFAULT_SERIAL.into(),
            MODEL_NUMBER.into(),
            true,
            0,
            1,
            0xFFEF,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        nqn: String,
        subtype: SubType,
        serial: String,
        model: String,
        allow_any_host: bool,
        max_namespaces: u32,
        min_cntlid: u16,
        max_cntlid: u16,
    ) -> Subsystem {
        Subsystem {
            nqn,
            subtype,
            serial,
            model,
            max_namespaces,
            min_cntlid,
            max_cntlid,
            inner: Mutex::new(SubsysInner {
                namespaces: BTreeMap::new(),
                hosts: Vec::new(),
                allow_any_host,
                listeners: Vec::new(),
                controllers: Vec::new(),
                next_cntlid: min_cntlid,
                deleted: false,
            }),
            ns_gen: AtomicU64::new(0),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SubsysInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ns_generation(&self) -> u64 {
        self.ns_gen.load(Ordering::Acquire)
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.lock().namespaces.values().cloned().collect()
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.lock().namespaces.get(&nsid).cloned()
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let g = self.lock();
        g.allow_any_host || g.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn listeners(&self) -> Vec<ListenAddr> {
        self.lock().listeners.clone()
    }

    /// Whether a connection that arrived on `addr` may reach this subsystem.
    pub fn listens_on(&self, addr: &ListenAddr) -> bool {
        self.subtype == SubType::Discovery || self.lock().listeners.contains(addr)
    }

    pub(super) fn add_listener(&self, addr: ListenAddr) {
        self.lock().listeners.push(addr);
    }

    pub(super) fn remove_listener(&self, addr: &ListenAddr) -> bool {
        let mut g = self.lock();
        let before = g.listeners.len();
        g.listeners.retain(|l| l != addr);
        before != g.listeners.len()
    }

    pub fn add_host(&self, host: &str) -> Result<(), NvmfError> {
        nvme_spec::fabrics::validate_nqn(host)
            .map_err(|e| NvmfError::InvalidParam(format!("host NQN {host:?}: {e}")))?;
        let mut g = self.lock();
        if g.hosts.iter().any(|h| h == host) {
            return Err(NvmfError::HostExists(host.into()));
        }
        g.hosts.push(host.into());
        Ok(())
    }

    /// Removes a host; its controllers are disconnected, as SPDK does.
    pub fn remove_host(&self, host: &str) -> Result<(), NvmfError> {
        let ctrls = {
            let mut g = self.lock();
            let before = g.hosts.len();
            g.hosts.retain(|h| h != host);
            if before == g.hosts.len() {
                return Err(NvmfError::NoHost(host.into()));
            }
            if g.allow_any_host {
                Vec::new()
            } else {
                g.controllers
                    .iter()
                    .filter(|c| c.hostnqn == host)
                    .cloned()
                    .collect()
            }
        };
        for c in ctrls {
            c.fail("host removed from the subsystem");
        }
        Ok(())
    }

    pub fn set_allow_any_host(&self, v: bool) {
        self.lock().allow_any_host = v;
    }

    /// Adds a namespace; `nsid` 0 picks the lowest free one. Claims the bdev. With a
    /// `ptpl_file`, reservations persist there and what it holds comes back.
    pub fn add_namespace(
        &self,
        bdev: Arc<BdevEntry>,
        nsid: u32,
        uuid: Option<Uuid>,
        nguid: Option<[u8; 16]>,
        eui64: Option<[u8; 8]>,
        ptpl_file: Option<&std::path::Path>,
    ) -> Result<u32, NvmfError> {
        // Read before taking any lock or claim: a bad file leaves nothing half done.
        let bdev_uuid = bdev.info().uuid;
        let resv = match ptpl_file {
            Some(p) => Reservations::with_ptpl_file(bdev_uuid, p)?,
            None => Reservations::new(bdev_uuid),
        };
        let mut g = self.lock();
        let nsid = if nsid == 0 {
            (1..=self.max_namespaces)
                .find(|n| !g.namespaces.contains_key(n))
                .ok_or_else(|| NvmfError::NoNsidFree(self.nqn.clone()))?
        } else {
            nsid
        };
        if nsid > self.max_namespaces {
            return Err(NvmfError::InvalidParam(format!(
                "nsid {nsid} is above max_namespaces {}",
                self.max_namespaces
            )));
        }
        if g.namespaces.contains_key(&nsid) {
            return Err(NvmfError::NsidExists {
                nqn: self.nqn.clone(),
                nsid,
            });
        }
        let ns = Namespace::new(nsid, bdev.clone(), uuid, nguid, eui64, resv);
        if g.namespaces.values().any(|n| n.uuid == ns.uuid) {
            return Err(NvmfError::InvalidParam(format!(
                "uuid {} is already used by another namespace of {}",
                ns.uuid, self.nqn
            )));
        }
        bdev.claim(&format!("NVMe-oF subsystem {}", self.nqn))?;
        g.namespaces.insert(nsid, Arc::new(ns));
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        let ctrls = g.controllers.clone();
        drop(g);
        for c in ctrls {
            c.namespace_changed(nsid);
        }
        Ok(nsid)
    }

    pub fn remove_namespace(&self, nsid: u32) -> Result<(), NvmfError> {
        let mut g = self.lock();
        let ns = g
            .namespaces
            .remove(&nsid)
            .ok_or_else(|| NvmfError::NoNamespace {
                nqn: self.nqn.clone(),
                nsid,
            })?;
        ns.bdev.release();
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        let ctrls = g.controllers.clone();
        drop(g);
        for c in ctrls {
            c.namespace_changed(nsid);
        }
        Ok(())
    }

    /// Tells controllers about namespaces whose bdev changed size since the last look.
    /// Called from admin queues' timers: bdevs do not announce resizes.
    pub fn check_resized(&self) {
        let g = self.lock();
        let mut changed = smallvec::SmallVec::<[u32; 4]>::new();
        for ns in g.namespaces.values() {
            let now = ns.num_blocks();
            if ns.seen_blocks.swap(now, Ordering::AcqRel) != now {
                changed.push(ns.nsid);
            }
        }
        if changed.is_empty() {
            return;
        }
        let ctrls = g.controllers.clone();
        drop(g);
        for nsid in changed {
            tracing::info!("nvmf: {} namespace {nsid} resized", self.nqn);
            for c in &ctrls {
                c.namespace_changed(nsid);
            }
        }
    }

    /// Picks a free controller ID and registers `make(cntlid)`.
    pub fn add_controller(
        &self,
        make: impl FnOnce(u16) -> Arc<Controller>,
    ) -> Option<Arc<Controller>> {
        let mut g = self.lock();
        if g.deleted {
            return None;
        }
        let span = u32::from(self.max_cntlid - self.min_cntlid) + 1;
        for _ in 0..span {
            let id = g.next_cntlid;
            g.next_cntlid = if id >= self.max_cntlid {
                self.min_cntlid
            } else {
                id + 1
            };
            if g.controllers.iter().all(|c| c.cntlid != id) {
                let c = make(id);
                g.controllers.push(c.clone());
                return Some(c);
            }
        }
        None
    }

    pub fn find_controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.lock()
            .controllers
            .iter()
            .find(|c| c.cntlid == cntlid)
            .cloned()
    }

    pub fn remove_controller(&self, cntlid: u16) {
        self.lock().controllers.retain(|c| c.cntlid != cntlid);
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.lock().controllers.clone()
    }

    /// Queues a discovery-log-changed event on discovery controllers that asked for it.
    pub fn notify_discovery_change(&self) {
        if self.subtype != SubType::Discovery {
            return;
        }
        for c in self.controllers() {
            c.discovery_changed();
        }
    }

    /// Deletion: fail controllers, release bdevs.
    pub(super) fn shut_down(&self) {
        let (ctrls, nss) = {
            let mut g = self.lock();
            g.deleted = true;
            let nss: Vec<_> = std::mem::take(&mut g.namespaces).into_values().collect();
            (std::mem::take(&mut g.controllers), nss)
        };
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        for c in ctrls {
            c.fail("subsystem deleted");
        }
        for ns in nss {
            ns.bdev.release();
        }
    }

    /// `nvmf_get_subsystems` entry, in SPDK's shape.
    pub fn to_json(&self) -> Value {
        let g = self.lock();
        let listen: Vec<Value> = g
            .listeners
            .iter()
            .map(|l| serde_json::to_value(l).unwrap_or(Value::Null))
            .collect();
        let hosts: Vec<Value> = g.hosts.iter().map(|h| json!({ "nqn": h })).collect();
        let mut v = json!({
            "nqn": self.nqn,
            "subtype": self.subtype.name(),
            "listen_addresses": listen,
            "allow_any_host": g.allow_any_host,
            "hosts": hosts,
        });
        if self.subtype == SubType::Nvme {
            let nss: Vec<Value> = g
                .namespaces
                .values()
                .map(|n| {
                    json!({
                        "nsid": n.nsid,
                        "bdev_name": n.bdev.name(),
                        "name": n.bdev.name(),
                        "nguid": hex_upper(&n.nguid),
                        "eui64": hex_upper(&n.eui64),
                        "uuid": n.uuid.to_string(),
                    })
                })
                .collect();
            let o = v.as_object_mut().expect("object");
            o.insert("serial_number".into(), json!(self.serial));
            o.insert("model_number".into(), json!(self.model));
            o.insert("max_namespaces".into(), json!(self.max_namespaces));
            o.insert("min_cntlid".into(), json!(self.min_cntlid));
            o.insert("max_cntlid".into(), json!(self.max_cntlid));
            o.insert("namespaces".into(), json!(nss));
        }
        v
    }

    /// The RPC calls that recreate this subsystem.
    pub fn save_config(&self) -> Vec<Value> {
        let g = self.lock();
        let mut out = vec![json!({"method": "nvmf_create_subsystem", "params": {
            "nqn": self.nqn,
            "allow_any_host": g.allow_any_host,
            "serial_number": self.serial,
            "model_number": self.model,
            "max_namespaces": self.max_namespaces,
            "min_cntlid": self.min_cntlid,
            "max_cntlid": self.max_cntlid,
            "ana_reporting": false,
        }})];
        for h in &g.hosts {
            out.push(json!({"method": "nvmf_subsystem_add_host",
                            "params": {"nqn": self.nqn, "host": h}}));
        }
        for n in g.namespaces.values() {
            let mut ns = json!({
                "nsid": n.nsid,
                "bdev_name": n.bdev.name(),
                "uuid": n.uuid.to_string(),
                "nguid": hex_upper(&n.nguid),
                "eui64": hex_upper(&n.eui64),
            });
            if let Some(p) = n.resv.ptpl_file() {
                ns["ptpl_file"] = json!(p.display().to_string());
            }
            out.push(json!({"method": "nvmf_subsystem_add_ns", "params": {
                "nqn": self.nqn,
                "namespace": ns,
            }}));
        }
        for l in &g.listeners {
            out.push(json!({"method": "nvmf_subsystem_add_listener",
                            "params": {"nqn": self.nqn, "listen_address": l}}));
        }
        out
    }
}

pub fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Parses hex (optionally with dashes, as SPDK accepts for NGUID/EUI64) into exactly N bytes.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if digits.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for i in 0..N {
        let hi = (digits[2 * i] as char).to_digit(16)?;
        let lo = (digits[2 * i + 1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b: [u8; 8] = parse_hex("0123456789abcdef").unwrap();
        assert_eq!(hex_upper(&b), "0123456789ABCDEF");
        assert!(parse_hex::<8>("0123").is_none());
        assert!(parse_hex::<8>("zz23456789abcdef").is_none());
        let b: [u8; 16] = parse_hex("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(b[15], 0xff);
    }

    #[test]
    fn listen_addresses_normalise() {
        let a = ListenAddr {
            trtype: "tcp".into(),
            adrfam: "ipv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
        }
        .normalized()
        .unwrap();
        assert_eq!(a.trtype, "TCP");
        assert_eq!(a.adrfam, "IPv4");
        let mut rdma = a.clone();
        rdma.trtype = "rdma".into();
        assert_eq!(rdma.normalized().unwrap().trtype, "RDMA");
        let mut bad = a.clone();
        bad.trtype = "FC".into();
        assert!(bad.normalized().is_err());
        let mut bad = a.clone();
        bad.trsvcid = "port".into();
        assert!(bad.normalized().is_err());
    }

    #[test]
    fn subsystem_checks_its_identity() {
        assert!(Subsystem::new(
            "nqn.2016-06.io.spdk:cnode1".into(),
            None,
            None,
            true,
            32,
            1,
            0xFFEF
        )
        .is_ok());
        assert!(Subsystem::new("bogus".into(), None, None, true, 32, 1, 0xFFEF).is_err());
        assert!(Subsystem::new(
            "nqn.2016-06.io.spdk:cnode1".into(),
            Some("x".repeat(21)),
            None,
            true,
            32,
            1,
            0xFFEF
        )
        .is_err());
    }
}
