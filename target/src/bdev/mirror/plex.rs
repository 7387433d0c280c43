//! One plex (a leg of a mirror): its bdev, how I/O may use it, and its condition with the
//! reason it is in it.

use super::superblock::PlexState;
use crate::bdev::{BdevEntry, IoStatus, IoType};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use uuid::Uuid;

/// How the data path may use a plex, read on every I/O (one relaxed load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// In sync: reads may come from it, writes must reach it.
    Serving = 0,
    /// Being resynced: writes reach it (so what is copied stays current), reads never do.
    WriteOnly = 1,
    /// Out of service: no I/O.
    Idle = 2,
}

/// Why a plex was taken out of service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// An I/O to it failed.
    IoFailed { io_type: IoType, status: IoStatus },
    /// Its bdev went away (deleted, or its controller was lost).
    Removed,
    /// Its metadata could not be written.
    MetadataWrite { status: IoStatus },
    /// Its superblock could not be used.
    BadSuperblock(String),
    /// The operator removed it.
    Removing,
}

impl FaultReason {
    /// The code kept in the superblock (the format leaves its meaning to the mirror).
    pub fn code(&self) -> u32 {
        match self {
            FaultReason::IoFailed { .. } => 1,
            FaultReason::Removed => 2,
            FaultReason::MetadataWrite { .. } => 3,
            FaultReason::BadSuperblock(_) => 4,
            FaultReason::Removing => 5,
        }
    }

    pub fn from_code(code: u32) -> String {
        match code {
            1 => "an I/O failed",
            2 => "its bdev was removed",
            3 => "a metadata write failed",
            4 => "its superblock was unusable",
            5 => "removed by the operator",
            _ => "unknown",
        }
        .to_string()
    }
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultReason::IoFailed { io_type, status } => {
                write!(f, "{io_type:?} failed: {status:?}")
            }
            FaultReason::Removed => write!(f, "its bdev was removed"),
            FaultReason::MetadataWrite { status } => {
                write!(f, "metadata write failed: {status:?}")
            }
            FaultReason::BadSuperblock(e) => write!(f, "superblock unusable: {e}"),
            FaultReason::Removing => write!(f, "being removed"),
        }
    }
}

/// Why a plex is behind the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behind {
    /// Added to the mirror: holds none of its data yet, needs every region.
    New,
    /// Was out of service and came back: needs the regions written meanwhile.
    Returned,
    /// The mirror was not shut down cleanly: regions written at the time may differ.
    UncleanShutdown,
    /// Was being resynced when plexd stopped: resumes at this region.
    Interrupted { next_region: u64 },
    /// Its superblock was older than the mirror's (a missed membership change).
    StaleGeneration { had: u64, newest: u64 },
}

/// Where a resync stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    pub full: bool,
    pub regions_total: u64,
    pub regions_done: u64,
    /// The next region to copy (regions below are done), for resuming.
    pub next_region: u64,
    pub bytes_copied: u64,
    /// Copy rate over the last measurement, bytes per second.
    pub rate_bps: u64,
    /// How long the copy took, once finished.
    pub duration_ms: u64,
}

/// A plex's condition, with the reason for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// In sync and serving.
    InUse,
    /// Behind the others and not yet being copied to.
    OutOfSync { since: SystemTime, why: Behind },
    /// Being copied to.
    Resyncing {
        since: SystemTime,
        why: Behind,
        progress: ResyncProgress,
    },
    /// Out of service after an error.
    Faulted { since: SystemTime, why: FaultReason },
}

impl Condition {
    pub fn name(&self) -> &'static str {
        match self {
            Condition::InUse => "InUse",
            Condition::OutOfSync { .. } => "OutOfSync",
            Condition::Resyncing { .. } => "Resyncing",
            Condition::Faulted { .. } => "Faulted",
        }
    }

    /// Since when the plex has missed writes, if it has.
    pub fn out_of_sync_since(&self) -> Option<SystemTime> {
        match self {
            Condition::InUse => None,
            Condition::OutOfSync { since, .. }
            | Condition::Resyncing { since, .. }
            | Condition::Faulted { since, .. } => Some(*since),
        }
    }

    /// The state the superblock keeps for this condition.
    pub fn on_disk(&self) -> PlexState {
        let since_unix_secs = self
            .out_of_sync_since()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        match self {
            Condition::InUse => PlexState::InSync,
            Condition::OutOfSync {
                why: Behind::New, ..
            } => PlexState::New,
            Condition::Resyncing {
                progress,
                why: Behind::New,
                ..
            } if progress.next_region == 0 => PlexState::New,
            Condition::Resyncing { progress, .. } => PlexState::Resyncing {
                next_region: progress.next_region,
            },
            Condition::OutOfSync { .. } => PlexState::OutOfSync { since_unix_secs },
            Condition::Faulted { why, .. } => PlexState::Faulted { reason: why.code() },
        }
    }
}

/// A plex of a mirror.
pub struct Plex {
    pub uuid: Uuid,
    /// The bdev name it was found under (the superblock's location).
    pub location: String,
    /// The node serving it, as the operator named it (may be empty).
    pub node: String,
    /// Its bdev while it has one (`None` while it is missing: Down).
    bdev: Mutex<Option<Arc<BdevEntry>>>,
    role: AtomicU8,
    condition: Mutex<Condition>,
    /// The generation at which it was last known in sync.
    pub in_sync_generation: std::sync::atomic::AtomicU64,
    /// How the last finished resync went.
    pub last_resync: Mutex<Option<ResyncProgress>>,
    /// Bumped whenever `bdev` changes, so channels notice with one load, no lock.
    bdev_changes: std::sync::atomic::AtomicU64,
}

impl Plex {
    pub fn new(
        uuid: Uuid,
        location: String,
        node: String,
        bdev: Option<Arc<BdevEntry>>,
        condition: Condition,
        in_sync_generation: u64,
    ) -> Plex {
        let role = match condition {
            Condition::InUse => Role::Serving,
            _ => Role::Idle,
        };
        Plex {
            uuid,
            location,
            node,
            bdev: Mutex::new(bdev),
            role: AtomicU8::new(role as u8),
            condition: Mutex::new(condition),
            in_sync_generation: in_sync_generation.into(),
            last_resync: Mutex::new(None),
            bdev_changes: Default::default(),
        }
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            0 => Role::Serving,
            1 => Role::WriteOnly,
            _ => Role::Idle,
        }
    }

    pub fn set_role(&self, r: Role) {
        self.role.store(r as u8, Ordering::Release)
    }

    pub fn condition(&self) -> Condition {
        super::lock(&self.condition).clone()
    }

    pub fn set_condition(&self, c: Condition) {
        *super::lock(&self.condition) = c;
    }

    /// Updates the progress of a running resync (no-op in any other condition).
    pub fn update_progress(&self, f: impl FnOnce(&mut ResyncProgress)) {
        if let Condition::Resyncing { progress, .. } = &mut *super::lock(&self.condition) {
            f(progress);
        }
    }

    pub fn bdev(&self) -> Option<Arc<BdevEntry>> {
        super::lock(&self.bdev).clone()
    }

    pub fn set_bdev(&self, b: Option<Arc<BdevEntry>>) {
        *super::lock(&self.bdev) = b;
        self.bdev_changes.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times the bdev changed: a channel whose leg saw another count reopens it.
    pub fn bdev_changes(&self) -> u64 {
        self.bdev_changes.load(Ordering::Acquire)
    }

    /// Taken out by the operator (`bdev_mirror_remove_plex`): a tombstone, kept only so that
    /// plex indices stay the same.
    pub fn is_removed(&self) -> bool {
        matches!(
            self.condition(),
            Condition::Faulted {
                why: FaultReason::Removing,
                ..
            }
        )
    }

    /// Up while its bdev is there.
    pub fn is_up(&self) -> bool {
        self.bdev().is_some_and(|b| !b.is_removed())
    }

    /// A plex on this node (not reached over the network): reads prefer it.
    pub fn is_local(&self) -> bool {
        self.bdev().is_some_and(|b| b.bdev().module() != "nvme")
    }
}
