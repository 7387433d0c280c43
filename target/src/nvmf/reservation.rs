//! NVMe reservations of one namespace: registrants, the reservation held, the access each
//! host gets, and persistence to SPDK's `ptpl_file`.
//!
//! A registrant is a host, named by the Host Identifier of its Connect, so every controller of
//! that host shares its registration. The reservation commands take a mutex; they are rare.
//! The I/O path reads one atomic (`access_gen`) per command and recomputes a queue's cached
//! rights only when it moved.
//!
//! Every change is made on a copy and committed only once it is persisted (when persistence
//! is on), so a failed write leaves the old state in force and the host gets an error.

use nvme_spec::resv::{
    cptpl, racqa, rrega, rrela, AcquireData, RegisterData, RegisteredCtrlrExt, ResvAcquire,
    ResvRegister, ResvRelease, ResvReport, ResvStatusHeader, ResvType,
};
use nvme_spec::{FromBytes, IntoBytes, Status};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use uuid::Uuid;

/// A 128-bit Host Identifier.
pub type HostId = [u8; 16];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// Hosts and their keys, in registration order.
    registrants: Vec<(HostId, u64)>,
    rtype: Option<ResvType>,
    /// The holder of a single-holder type; for the All Registrants types every registrant
    /// holds and this is `None`.
    holder: Option<HostId>,
    /// The report's generation counter.
    generation: u32,
    ptpl: bool,
    /// Preempt-and-abort count so far, and each preempted host's count at its last one.
    aborts: u64,
    aborted: HashMap<HostId, u64>,
}

impl State {
    fn key_of(&self, host: &HostId) -> Option<u64> {
        self.registrants
            .iter()
            .find(|(h, _)| h == host)
            .map(|&(_, k)| k)
    }

    fn is_holder(&self, host: &HostId) -> bool {
        match self.rtype {
            None => false,
            Some(t) if t.all_registrants() => self.key_of(host).is_some(),
            Some(_) => self.holder.as_ref() == Some(host),
        }
    }

    /// (may read, may write).
    fn access(&self, host: &HostId) -> (bool, bool) {
        match self.rtype {
            None => (true, true),
            Some(_) if self.is_holder(host) => (true, true),
            Some(t) => t.non_holder_access(self.key_of(host).is_some()),
        }
    }

    fn release(&mut self) {
        self.rtype = None;
        self.holder = None;
    }

    /// Unregisters `host`; a reservation it alone held goes with it.
    fn unregister(&mut self, host: &HostId) {
        self.registrants.retain(|(h, _)| h != host);
        let released = match self.rtype {
            Some(t) if t.all_registrants() => self.registrants.is_empty(),
            Some(_) => self.holder.as_ref() == Some(host),
            None => false,
        };
        if released {
            self.release();
        }
    }

    /// Unregisters every host but `keep` whose key is `key`; returns them.
    fn unregister_by_key(&mut self, key: u64, keep: &HostId) -> Vec<HostId> {
        let gone: Vec<HostId> = self
            .registrants
            .iter()
            .filter(|(h, k)| *k == key && h != keep)
            .map(|&(h, _)| h)
            .collect();
        for h in &gone {
            self.unregister(h);
        }
        gone
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

/// What the last check of a queue found (see [`Reservations::access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

/// The reservation state of one namespace.
pub struct Reservations {
    st: Mutex<State>,
    /// Moves on every committed change; queues recompute cached rights when it does.
    access_gen: AtomicU64,
    /// Preempt-and-abort count; a command notes it on arrival (see [`Self::aborted_since`]).
    abort_gen: AtomicU64,
    ptpl_file: Option<PathBuf>,
    bdev_uuid: Uuid,
}

/// Why a ptpl_file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("ptpl_file {path}: {why}")]
pub struct PtplError {
    pub path: String,
    pub why: String,
}

/// SPDK's ptpl_file layout, so a file moves between SPDK and plexd.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PtplJson {
    #[serde(default)]
    ptpl: bool,
    #[serde(default)]
    rtype: u32,
    #[serde(default)]
    crkey: u64,
    bdev_uuid: String,
    #[serde(default)]
    holder_uuid: String,
    registrants: Vec<PtplRegistrant>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PtplRegistrant {
    rkey: u64,
    host_uuid: String,
}

impl Reservations {
    /// No registrants, no reservation, no persistence.
    pub fn new(bdev_uuid: Uuid) -> Reservations {
        Reservations {
            st: Mutex::new(State::default()),
            access_gen: AtomicU64::new(0),
            abort_gen: AtomicU64::new(0),
            ptpl_file: None,
            bdev_uuid,
        }
    }

    /// Persisted to `path`, starting from what it holds. A missing or empty file is a fresh
    /// start (SPDK empties it when persistence is turned off); anything unreadable is refused
    /// rather than dropped.
    pub fn with_ptpl_file(bdev_uuid: Uuid, path: &Path) -> Result<Reservations, PtplError> {
        let err = |why: String| PtplError {
            path: path.display().to_string(),
            why,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        let st = if text.trim().is_empty() {
            State::default()
        } else {
            let j: PtplJson = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            state_from_json(&j, bdev_uuid).map_err(err)?
        };
        Ok(Reservations {
            st: Mutex::new(st),
            access_gen: AtomicU64::new(0),
            abort_gen: AtomicU64::new(0),
            ptpl_file: Some(path.to_path_buf()),
            bdev_uuid,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ptpl_file(&self) -> Option<&Path> {
        self.ptpl_file.as_deref()
    }

    /// Whether reservations can persist through power loss (RESCAP bit 0).
    pub fn ptpl_capable(&self) -> bool {
        self.ptpl_file.is_some()
    }

    /// The PTPL state (Get Features Reservation Persistence).
    pub fn ptpl(&self) -> bool {
        self.lock().ptpl
    }

    /// Changes the PTPL state (Set Features Reservation Persistence).
    pub fn set_ptpl(&self, on: bool) -> Status {
        if on && !self.ptpl_capable() {
            return Status::INVALID_FIELD.with_dnr();
        }
        self.update(|st| {
            st.ptpl = on;
            Ok(())
        })
    }

    /// Changes access rules: read once per command by I/O queues.
    pub fn access_gen(&self) -> u64 {
        self.access_gen.load(Ordering::Acquire)
    }

    /// What `host` may do now.
    pub fn access(&self, host: &HostId) -> Access {
        let (read, write) = self.lock().access(host);
        Access { read, write }
    }

    /// Preempt-and-abort count, noted by each command when it arrives.
    pub fn abort_gen(&self) -> u64 {
        self.abort_gen.load(Ordering::Acquire)
    }

    /// Whether a preempt-and-abort removed `host` after a command of it noted `seen`.
    pub fn aborted_since(&self, host: &HostId, seen: u64) -> bool {
        if self.abort_gen() == seen {
            return false;
        }
        self.lock().aborted.get(host).is_some_and(|&at| at > seen)
    }

    /// Applies `f` to a copy; commits it (persisting first when asked) if it succeeded.
    fn update(&self, f: impl FnOnce(&mut State) -> Result<(), Status>) -> Status {
        let mut g = self.lock();
        let mut next = g.clone();
        if let Err(s) = f(&mut next) {
            return s.with_dnr();
        }
        if next == *g {
            return Status::SUCCESS;
        }
        if let Some(path) = &self.ptpl_file {
            let persisted_changed = next.ptpl != g.ptpl
                || next.ptpl
                    && (next.registrants != g.registrants
                        || next.rtype != g.rtype
                        || next.holder != g.holder);
            if persisted_changed {
                if let Err(e) = write_atomically(path, &self.to_json(&next)) {
                    tracing::error!(
                        "nvmf: cannot persist reservations to {}: {e}; change refused",
                        path.display()
                    );
                    return Status::INTERNAL;
                }
            }
        }
        let aborts = next.aborts;
        *g = next;
        self.abort_gen.store(aborts, Ordering::Release);
        self.access_gen.fetch_add(1, Ordering::AcqRel);
        Status::SUCCESS
    }

    fn to_json(&self, st: &State) -> String {
        let holder = match (st.rtype, st.holder) {
            (Some(_), Some(h)) => Uuid::from_bytes(h).to_string(),
            _ => String::new(),
        };
        let crkey = match (st.rtype, st.holder) {
            (Some(_), Some(h)) => st.key_of(&h).unwrap_or(0),
            // All Registrants: SPDK records the first registrant's key.
            (Some(_), None) => st.registrants.first().map_or(0, |r| r.1),
            _ => 0,
        };
        let j = if st.ptpl {
            PtplJson {
                ptpl: true,
                rtype: st.rtype.map_or(0, |t| t as u32),
                crkey,
                bdev_uuid: self.bdev_uuid.to_string(),
                holder_uuid: holder,
                registrants: st
                    .registrants
                    .iter()
                    .map(|&(h, k)| PtplRegistrant {
                        rkey: k,
                        host_uuid: Uuid::from_bytes(h).to_string(),
                    })
                    .collect(),
            }
        } else {
            // Not persisting: nothing survives a restart.
            PtplJson {
                ptpl: false,
                rtype: 0,
                crkey: 0,
                bdev_uuid: self.bdev_uuid.to_string(),
                holder_uuid: String::new(),
                registrants: Vec::new(),
            }
        };
        let mut s = serde_json::to_string_pretty(&j).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Reservation Register from `host`.
    pub fn register(&self, host: &HostId, cmd: &ResvRegister, data: &[u8]) -> Status {
        let Ok((d, _)) = RegisterData::read_from_prefix(data) else {
            return Status::INVALID_FIELD.with_dnr();
        };
        let (crkey, nrkey) = (d.crkey.get(), d.nrkey.get());
        let capable = self.ptpl_capable();
        self.update(|st| {
            match cmd.cptpl {
                cptpl::NO_CHANGE => {}
                cptpl::CLEAR => st.ptpl = false,
                cptpl::PERSIST if capable => st.ptpl = true,
                _ => return Err(Status::INVALID_FIELD),
            }
            let mine = st.key_of(host);
            match cmd.rrega {
                rrega::REGISTER => match mine {
                    // Registering again with the same key is no change and no error.
                    Some(k) if k == nrkey => {}
                    Some(_) => return Err(Status::RESERVATION_CONFLICT),
                    None if nrkey == 0 => return Err(Status::INVALID_FIELD),
                    None => {
                        st.registrants.push((*host, nrkey));
                        st.bump();
                    }
                },
                rrega::UNREGISTER => match mine {
                    Some(k) if cmd.iekey || k == crkey => {
                        st.unregister(host);
                        st.bump();
                    }
                    _ => return Err(Status::RESERVATION_CONFLICT),
                },
                rrega::REPLACE => {
                    if nrkey == 0 {
                        return Err(Status::INVALID_FIELD);
                    }
                    match mine {
                        Some(k) if cmd.iekey || k == crkey => {
                            if k != nrkey {
                                if let Some(r) = st.registrants.iter_mut().find(|r| &r.0 == host) {
                                    r.1 = nrkey;
                                }
                                st.bump();
                            }
                        }
                        None if cmd.iekey => {
                            st.registrants.push((*host, nrkey));
                            st.bump();
                        }
                        _ => return Err(Status::RESERVATION_CONFLICT),
                    }
                }
                _ => return Err(Status::INVALID_FIELD),
            }
            Ok(())
        })
    }

    /// Reservation Acquire from `host`: acquire, preempt, or preempt and abort.
    pub fn acquire(&self, host: &HostId, cmd: &ResvAcquire, data: &[u8]) -> Status {
        let Ok((d, _)) = AcquireData::read_from_prefix(data) else {
            return Status::INVALID_FIELD.with_dnr();
        };
        let (crkey, prkey) = (d.crkey.get(), d.prkey.get());
        // IEKEY has no meaning for Acquire since NVMe 1.3 (RESCAP bit 7 says so).
        let Some(want) = ResvType::from_u8(cmd.rtype).filter(|_| !cmd.iekey) else {
            return Status::INVALID_FIELD.with_dnr();
        };
        self.update(|st| {
            if st.key_of(host) != Some(crkey) {
                return Err(Status::RESERVATION_CONFLICT);
            }
            match cmd.racqa {
                racqa::ACQUIRE => match st.rtype {
                    None => {
                        st.rtype = Some(want);
                        st.holder = (!want.all_registrants()).then_some(*host);
                        Ok(())
                    }
                    // Acquiring what one already holds is no change.
                    Some(t) if t == want && st.is_holder(host) => Ok(()),
                    Some(_) => Err(Status::RESERVATION_CONFLICT),
                },
                racqa::PREEMPT | racqa::PREEMPT_AND_ABORT => {
                    let gone = preempt(st, host, prkey, want)?;
                    st.bump();
                    if cmd.racqa == racqa::PREEMPT_AND_ABORT && !gone.is_empty() {
                        st.aborts += 1;
                        for h in gone {
                            st.aborted.insert(h, st.aborts);
                        }
                    }
                    Ok(())
                }
                _ => Err(Status::INVALID_FIELD),
            }
        })
    }

    /// Reservation Release from `host`: release, or clear.
    pub fn release(&self, host: &HostId, cmd: &ResvRelease, data: &[u8]) -> Status {
        if data.len() < ResvRelease::DATA_LEN || cmd.iekey {
            return Status::INVALID_FIELD.with_dnr();
        }
        let crkey = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        self.update(|st| {
            if st.key_of(host) != Some(crkey) {
                return Err(Status::RESERVATION_CONFLICT);
            }
            match cmd.rrela {
                rrela::RELEASE => {
                    // Releasing what one does not hold changes nothing and is no error.
                    let Some(t) = st.rtype.filter(|_| st.is_holder(host)) else {
                        return Ok(());
                    };
                    if t as u8 != cmd.rtype {
                        return Err(Status::INVALID_FIELD);
                    }
                    st.release();
                    Ok(())
                }
                rrela::CLEAR => {
                    st.registrants.clear();
                    st.release();
                    st.bump();
                    Ok(())
                }
                _ => Err(Status::INVALID_FIELD),
            }
        })
    }

    /// Reservation Report into `out` (the host's buffer, cut to what it asked for).
    pub fn report(&self, cmd: &ResvReport, out: &mut [u8]) -> Status {
        // Our host identifiers are 128-bit: only the extended structure can carry them.
        if !cmd.eds {
            return Status::HOST_ID_INCONSISTENT_FORMAT.with_dnr();
        }
        if out.is_empty() {
            return Status::INVALID_FIELD.with_dnr();
        }
        let st = self.lock().clone();
        let mut page = Vec::with_capacity(64 * (1 + st.registrants.len()));
        let mut h = ResvStatusHeader::default();
        h.gen.set(st.generation);
        h.rtype = st.rtype.map_or(0, |t| t as u8);
        h.regctl
            .set(st.registrants.len().min(usize::from(u16::MAX)) as u16);
        h.ptpls = u8::from(st.ptpl);
        page.extend_from_slice(h.as_bytes());
        for &(host, key) in &st.registrants {
            let mut r = RegisteredCtrlrExt::default();
            // Dynamic controller model: the entry stands for every controller of the host.
            r.cntlid.set(0xFFFF);
            r.rcsts = u8::from(st.is_holder(&host));
            r.rkey.set(key);
            r.hostid = host;
            page.extend_from_slice(r.as_bytes());
        }
        let n = out.len().min(page.len()).min(cmd.len as usize);
        out.fill(0);
        out[..n].copy_from_slice(&page[..n]);
        Status::SUCCESS
    }
}

/// The preempt rules. Returns the hosts whose registration it removed.
fn preempt(
    st: &mut State,
    host: &HostId,
    prkey: u64,
    want: ResvType,
) -> Result<Vec<HostId>, Status> {
    let take = |st: &mut State| {
        st.rtype = Some(want);
        st.holder = (!want.all_registrants()).then_some(*host);
    };
    match st.rtype {
        // No reservation: preempt only removes registrations.
        None => {
            if prkey == 0 {
                return Err(Status::INVALID_FIELD);
            }
            let gone = st.unregister_by_key(prkey, host);
            if gone.is_empty() {
                return Err(Status::RESERVATION_CONFLICT);
            }
            Ok(gone)
        }
        Some(t) if t.all_registrants() => {
            let gone = if prkey == 0 {
                // Everyone else goes; the issuer takes the reservation with the new type.
                let others: Vec<HostId> = st
                    .registrants
                    .iter()
                    .map(|r| r.0)
                    .filter(|h| h != host)
                    .collect();
                st.registrants.retain(|r| &r.0 == host);
                take(st);
                others
            } else {
                let gone = st.unregister_by_key(prkey, host);
                if gone.is_empty() {
                    return Err(Status::RESERVATION_CONFLICT);
                }
                gone
            };
            Ok(gone)
        }
        Some(_) => {
            let holder_key = st.holder.and_then(|h| st.key_of(&h));
            if holder_key == Some(prkey) {
                // Taking over the reservation (or changing one's own type): registrations
                // with the preempted key go, the issuer's own stays.
                let gone = st.unregister_by_key(prkey, host);
                take(st);
                Ok(gone)
            } else if prkey == 0 {
                Err(Status::INVALID_FIELD)
            } else {
                let gone = st.unregister_by_key(prkey, host);
                if gone.is_empty() {
                    return Err(Status::RESERVATION_CONFLICT);
                }
                Ok(gone)
            }
        }
    }
}

fn state_from_json(j: &PtplJson, bdev_uuid: Uuid) -> Result<State, String> {
    let file_uuid = Uuid::parse_str(&j.bdev_uuid)
        .map_err(|_| format!("bdev_uuid {:?} is not a UUID", j.bdev_uuid))?;
    if file_uuid != bdev_uuid {
        return Err(format!(
            "written for bdev {file_uuid}, but this namespace's bdev is {bdev_uuid}"
        ));
    }
    let mut st = State::default();
    // SPDK's rule: without PTPL nothing is restored.
    if !j.ptpl {
        return Ok(st);
    }
    st.ptpl = true;
    for r in &j.registrants {
        let h = *Uuid::parse_str(&r.host_uuid)
            .map_err(|_| format!("host_uuid {:?} is not a UUID", r.host_uuid))?
            .as_bytes();
        if st.key_of(&h).is_some() {
            return Err(format!("host {} is registered twice", r.host_uuid));
        }
        if r.rkey == 0 {
            return Err(format!("host {} has the key 0", r.host_uuid));
        }
        st.registrants.push((h, r.rkey));
    }
    if j.rtype != 0 {
        let t = u8::try_from(j.rtype)
            .ok()
            .and_then(ResvType::from_u8)
            .ok_or_else(|| format!("rtype {} is not a reservation type", j.rtype))?;
        if st.registrants.is_empty() {
            return Err("a reservation is held but nobody is registered".into());
        }
        if !t.all_registrants() {
            let h = *Uuid::parse_str(&j.holder_uuid)
                .map_err(|_| format!("holder_uuid {:?} is not a UUID", j.holder_uuid))?
                .as_bytes();
            if st.key_of(&h) != Some(j.crkey) {
                return Err(format!(
                    "holder {} is not registered with crkey {:#x}",
                    j.holder_uuid, j.crkey
                ));
            }
            st.holder = Some(h);
        }
        st.rtype = Some(t);
    }
    Ok(st)
}

/// Replaces `path` with `text` so a crash leaves either the old file or the new one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself must reach the disk too.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
#[path = "reservation_tests.rs"]
mod tests;
