//! Fencing: only one mirror instance may write a set of plexes. The owner holds a Write
//! Exclusive reservation on each remote plex's namespace, as the NVMe standard intends; a new
//! owner preempts (and aborts) the old one's, after which every write of the old owner to that
//! plex fails with Reservation Conflict, and its mirror stops acknowledging writes (see
//! `channel.rs`), so two owners can never both acknowledge.
//!
//! The commands go on a short-lived connection of their own with the same host NQN and host
//! ID as the `bdev_nvme` controller of the plex: a registrant is a host, so the reservation
//! covers that controller's queues, and nothing on the reactors waits for it.

use crate::bdev::nvme::AttachSpec;
use initiator::{Controller, CtrlrOpts, IoError, IoQpair};
use nvme_spec::resv::{cptpl, racqa, rrega, ResvAcquire, ResvRegister, ResvStatus, ResvType};
use nvme_spec::Status;
use std::time::{Duration, Instant};

/// How long one reservation command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The reservation key of this owner for this mirror: the same after a restart, different for
/// another owner node or another mirror.
pub fn key_for(mirror: uuid::Uuid, hostid: &[u8; 16]) -> u64 {
    let u = uuid::Uuid::new_v5(&mirror, hostid);
    u64::from_le_bytes(u.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// The controller and namespace behind `e`, if it is a remote plex (a `bdev_nvme` bdev).
pub fn remote_of(app: &crate::app::App, e: &crate::bdev::BdevEntry) -> Option<(AttachSpec, u32)> {
    if e.bdev().module() != "nvme" {
        return None;
    }
    let ds = e.bdev().driver_specific();
    let ctrlr = app.nvme.get(ds["ctrlr_name"].as_str()?)?;
    Some((
        ctrlr.spec.clone(),
        u32::try_from(ds["nsid"].as_u64()?).ok()?,
    ))
}

/// What fencing found and did on one plex.
#[derive(Debug, PartialEq, Eq)]
/// `persistent`: the namespace keeps the reservation across a restart of its node.
pub enum Fenced {
    /// Nobody held it: we took it.
    Acquired { persistent: bool },
    /// We held it already.
    AlreadyOurs { persistent: bool },
    /// Another host held it: preempted (its queued commands aborted).
    Preempted { previous_key: u64, persistent: bool },
}

/// Registers `key` (replacing a key of ours already there) with `cptpl`; the command's own
/// outcome inside, a failure to get an answer outside.
fn register(
    s: &mut Session,
    nsid: u32,
    key: u64,
    cptpl: u8,
) -> Result<Result<(), IoError>, String> {
    let reg = |iekey, action| ResvRegister {
        nsid,
        rrega: action,
        iekey,
        cptpl,
    };
    let r = s.run("Reservation Register", |qp, t| {
        qp.resv_register(reg(false, rrega::REGISTER), 0, key, vec![0; 16], t)
    })?;
    match r {
        Err(e) if e.is_reservation_conflict() => Ok(s
            .run("Reservation Register (replace)", |qp, t| {
                qp.resv_register(reg(true, rrega::REPLACE), 0, key, vec![0; 16], t)
            })?
            .map(|_| ())),
        other => Ok(other.map(|_| ())),
    }
}

struct Session {
    ctrlr: Controller,
    qp: IoQpair<Vec<u8>>,
    tag: u64,
}

impl Session {
    fn open(spec: &AttachSpec) -> Result<Session, String> {
        let opts = CtrlrOpts {
            hostnqn: spec.hostnqn.clone(),
            hostid: spec.hostid,
            num_io_queues: 1,
            io_timeout: Some(COMMAND_TIMEOUT),
            ..CtrlrOpts::default()
        };
        let mut ctrlr = Controller::connect(&spec.trid, &opts)
            .map_err(|e| format!("connecting to {}: {e}", spec.trid))?;
        let qp = ctrlr
            .alloc_io_qpair(Some(8))
            .map_err(|e| format!("I/O queue on {}: {e}", spec.trid))?;
        Ok(Session { ctrlr, qp, tag: 0 })
    }

    /// Runs one command submitted by `submit` to completion.
    fn run(
        &mut self,
        what: &str,
        submit: impl FnOnce(&mut IoQpair<Vec<u8>>, u64) -> Result<(), initiator::SubmitError<Vec<u8>>>,
    ) -> Result<Result<Vec<u8>, IoError>, String> {
        self.tag += 1;
        let tag = self.tag;
        submit(&mut self.qp, tag).map_err(|e| format!("{what}: not sent ({:?})", e.kind))?;
        let t0 = Instant::now();
        loop {
            let mut out = None;
            self.ctrlr.poll();
            self.qp.poll(|c| {
                if c.tag == tag {
                    out = Some(c.result.map(|_| c.buf.unwrap_or_default()));
                }
            });
            if let Some(r) = out {
                return Ok(r);
            }
            if t0.elapsed() > COMMAND_TIMEOUT {
                return Err(format!("{what}: no answer in {COMMAND_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Why fencing did not take a plex.
#[derive(Debug)]
pub enum FenceError {
    /// Another host holds it, and we were not to preempt: another owner took over.
    HeldByOther {
        key: u64,
    },
    Failed(String),
}

impl std::fmt::Display for FenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FenceError::HeldByOther { key } => write!(f, "another owner holds it (key {key:#x})"),
            FenceError::Failed(e) => f.write_str(e),
        }
    }
}

impl From<String> for FenceError {
    fn from(e: String) -> Self {
        FenceError::Failed(e)
    }
}

impl From<&str> for FenceError {
    fn from(e: &str) -> Self {
        FenceError::Failed(e.to_string())
    }
}

/// Takes the Write Exclusive reservation of namespace `nsid` behind `spec` with `key`,
/// preempting any other holder if `preempt` (an owner taking over), else refusing to (a plex
/// coming back to a running mirror: another holder means another owner took over).
/// Blocking: run it off the reactors.
pub fn take(spec: &AttachSpec, nsid: u32, key: u64, preempt: bool) -> Result<Fenced, FenceError> {
    let mut s = Session::open(spec)?;
    // Persist through power loss where the namespace keeps its reservations in a file, so a
    // restart of the plex's node does not drop the fence; plexd (like SPDK) refuses PTPL with
    // Invalid Field on a namespace without one, and then the reservation lives in memory only.
    let persistent = match register(&mut s, nsid, key, cptpl::PERSIST)? {
        Ok(()) => true,
        Err(e) if matches!(&e, IoError::Nvme(st) if st.same_code(Status::INVALID_FIELD)) => {
            tracing::warn!(
                "{}: namespace {nsid} cannot persist reservations (no ptpl_file there): a \
                 restart of that node drops this fence until the mirror is assembled again",
                spec.trid
            );
            register(&mut s, nsid, key, cptpl::NO_CHANGE)?
                .map_err(|e| format!("Reservation Register: {e}"))?;
            false
        }
        Err(e) => return Err(format!("Reservation Register: {e}").into()),
    };
    let report = s
        .run("Reservation Report", |qp, t| {
            qp.resv_report(nsid, vec![0; 4096], t)
        })?
        .map_err(|e| format!("Reservation Report: {e}"))?;
    let status = ResvStatus::parse_extended(&report).ok_or("Reservation Report: unreadable")?;
    let holder = status.registrants.iter().find(|r| r.2).map(|r| (r.0, r.1));
    let we = ResvType::WriteExclusive as u8;
    let acquire = |action, prkey| {
        move |qp: &mut IoQpair<Vec<u8>>, t| {
            let a = ResvAcquire {
                nsid,
                racqa: action,
                iekey: false,
                rtype: we,
            };
            qp.resv_acquire(a, key, prkey, vec![0; 16], t)
        }
    };
    let outcome = match holder {
        Some((hostid, _))
            if hostid == spec.hostid && status.rtype == Some(ResvType::WriteExclusive) =>
        {
            Fenced::AlreadyOurs { persistent }
        }
        Some((hostid, holder_key)) if hostid != spec.hostid && !preempt => {
            return Err(FenceError::HeldByOther { key: holder_key })
        }
        Some((hostid, holder_key)) if hostid != spec.hostid => {
            s.run(
                "Reservation Acquire (preempt and abort)",
                acquire(racqa::PREEMPT_AND_ABORT, holder_key),
            )?
            .map_err(|e| format!("Reservation Acquire (preempt and abort): {e}"))?;
            Fenced::Preempted {
                previous_key: holder_key,
                persistent,
            }
        }
        _ => {
            s.run("Reservation Acquire", acquire(racqa::ACQUIRE, 0))?
                .map_err(|e| format!("Reservation Acquire: {e}"))?;
            Fenced::Acquired { persistent }
        }
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_per_owner_and_mirror_and_never_zero() {
        let (m1, m2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (h1, h2) = ([1u8; 16], [2u8; 16]);
        assert_eq!(key_for(m1, &h1), key_for(m1, &h1));
        assert_ne!(key_for(m1, &h1), key_for(m1, &h2));
        assert_ne!(key_for(m1, &h1), key_for(m2, &h1));
        assert_ne!(key_for(m1, &h1), 0);
    }
}
