//! Giving an lvol clusters of its own: the clusters of a thick lvol at creation, and the copies
//! `bdev_lvol_inflate` and `bdev_lvol_decouple_parent` make of what a clone reads through its
//! parents, so that it no longer depends on them.
//!
//! Every cluster is handed out by the service exactly as a first write would get it (zeroed,
//! or filled from the parent, then journalled), so a crash mid-way leaves a clone with some
//! clusters of its own and its parent still set: consistent, and the command can be rerun.
//! Only once every needed cluster is on disk does one transaction drop the parent.

use super::format::{Op, THIN};
use super::rpc::quiesced;
use super::state::{Blob, State, UNALLOCATED};
use super::store::{Request, StoreCore, Ticket};
use super::{lock, LvolCore};
use crate::rpc::RpcError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an lvol is detached from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    /// Every cluster its own, thick, no parent (`bdev_lvol_inflate`).
    Inflate,
    /// Its own copy of what its parent holds; the parent's parent becomes its parent
    /// (`bdev_lvol_decouple_parent`).
    DecoupleParent,
}

impl Detach {
    fn verb(self) -> &'static str {
        match self {
            Detach::Inflate => "inflate",
            Detach::DecoupleParent => "decouple",
        }
    }
}

/// The parent a decouple copies from.
fn parent_of(b: &Blob) -> Result<u32, String> {
    b.parent()
        .ok_or_else(|| format!("{} has no parent", b.rec.name))
}

/// The indexes of blob `id` that still need a cluster of their own before `how` can finish.
pub fn indexes_to_fill(st: &State, id: u32, how: Detach) -> Result<Vec<u32>, String> {
    let b = st.blob(id)?;
    let own = |i: &u32| b.get(*i) == UNALLOCATED;
    Ok(match how {
        Detach::Inflate => (0..b.rec.clusters as u32).filter(own).collect(),
        Detach::DecoupleParent => {
            let end = b.rec.clusters as u32;
            st.blob(parent_of(b)?)?
                .map
                .range(..end)
                .map(|(&i, _)| i)
                .filter(own)
                .collect()
        }
    })
}

/// The transaction that ends `how`, once nothing is left to fill; `None` if something is
/// (a write's unmap took a cluster back meanwhile).
fn finishing_ops(st: &State, id: u32, how: Detach) -> Result<Option<Vec<Op>>, String> {
    if !indexes_to_fill(st, id, how)?.is_empty() {
        return Ok(None);
    }
    let b = st.blob(id)?;
    Ok(Some(match how {
        Detach::Inflate => vec![
            Op::SetParent {
                blob: id,
                parent: 0,
            },
            Op::SetFlags {
                blob: id,
                flags: b.rec.flags & !THIN,
            },
        ],
        Detach::DecoupleParent => vec![Op::SetParent {
            blob: id,
            parent: st.blob(parent_of(b)?)?.rec.parent,
        }],
    }))
}

/// Most bytes of cluster copies in flight at once (each copy holds a cluster-sized buffer).
const COPY_BYTES_IN_FLIGHT: u64 = 32 << 20;

/// Gives each of `indexes` of blob `id` a cluster, a few at a time; returns once all are on
/// disk. `what` names the work in progress logs.
pub async fn allocate(
    s: &StoreCore,
    id: u32,
    indexes: impl ExactSizeIterator<Item = u32>,
    what: &str,
) -> Result<(), RpcError> {
    let window = (COPY_BYTES_IN_FLIGHT / s.cluster_size).clamp(1, 64) as usize;
    let started = Instant::now();
    let mut last_report = started;
    let mut pending: Vec<Arc<Ticket>> = Vec::with_capacity(window);
    let total = indexes.len();
    let mut next = indexes;
    let mut done = 0usize;
    loop {
        while pending.len() < window {
            let Some(index) = next.next() else { break };
            let ticket = Ticket::new();
            s.request(Request::Alloc {
                blob: id,
                index,
                ticket: ticket.clone(),
            });
            pending.push(ticket);
        }
        if pending.is_empty() {
            break;
        }
        let mut failed = None;
        pending.retain(|t| match t.get() {
            Ticket::PENDING => true,
            Ticket::DONE => {
                done += 1;
                false
            }
            other => {
                failed.get_or_insert(other);
                false
            }
        });
        match failed {
            Some(Ticket::NO_SPACE) => {
                return Err(RpcError::errno(
                    libc::ENOSPC,
                    format!("{what}: the store ran out of clusters after {done} of {total}"),
                ))
            }
            Some(_) => {
                return Err(RpcError::errno(
                    libc::EIO,
                    format!("{what}: allocating a cluster failed (see plexd's log)"),
                ))
            }
            None => {}
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                "lvol store {}: {what}: {done} of {total} clusters in {:.0?}",
                lock(&s.name),
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Runs `how` on `lvol` (blob `id`): fills what it needs, then drops the parent with the I/O
/// quiesced and gives the data path the new view.
pub async fn detach(
    s: &Arc<StoreCore>,
    lvol: Arc<LvolCore>,
    id: u32,
    name: &str,
    how: Detach,
) -> Result<(), RpcError> {
    let started = Instant::now();
    // Unmaps may take clusters back while we fill; a few rounds catch up with them.
    for _round in 0..8 {
        let indexes = indexes_to_fill(&lock(&s.state), id, how)
            .map_err(|e| RpcError::errno(libc::EINVAL, e))?;
        if !indexes.is_empty() {
            tracing::info!(
                "lvol store {}: {} {name}: {} clusters to copy or zero",
                lock(&s.name),
                how.verb(),
                indexes.len()
            );
        }
        allocate(
            s,
            id,
            indexes.into_iter(),
            &format!("{} {name}", how.verb()),
        )
        .await?;
        let lv = lvol.clone();
        let finished = quiesced(s, lvol.clone(), move |svc, done| {
            let ops = match finishing_ops(&lock(&svc.core.state), id, how) {
                Ok(Some(ops)) => ops,
                Ok(None) => return done(Ok(false)),
                Err(e) => return done(Err(e)),
            };
            svc.commit_checked(
                ops,
                Box::new(move |svc, r| {
                    if r.is_ok() {
                        svc.core.republish(&lv, id);
                    }
                    done(r.map(|_| true))
                }),
            );
        })
        .await?;
        if finished {
            tracing::info!(
                "lvol store {}: {} {name}: done in {:.1?}",
                lock(&s.name),
                how.verb(),
                started.elapsed()
            );
            return Ok(());
        }
    }
    Err(RpcError::errno(
        libc::EAGAIN,
        format!(
            "{} {name}: unmaps kept freeing clusters as they were filled; try again",
            how.verb()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::lvol::format::{BlobRecord, READ_ONLY, SNAPSHOT};
    use crate::bdev::lvol::state::tests::{alloc, rec};
    use uuid::Uuid;

    fn blob(id: u32, parent: u32, flags: u32, clusters: u64) -> Op {
        Op::CreateBlob(BlobRecord {
            flags,
            parent,
            ..rec(id, &format!("b{id}"), clusters)
        })
    }

    /// A chain: snapshot 1 (indexes 0, 1) ← snapshot 2 (index 2) ← clone 3 (index 3),
    /// each 6 clusters long.
    fn chain() -> State {
        let mut st = State::new(Uuid::new_v4(), "s".into(), 64, 64);
        let ro = SNAPSHOT | READ_ONLY;
        for op in [
            blob(1, 0, ro, 6),
            alloc(1, 0, 10),
            alloc(1, 1, 11),
            blob(2, 1, ro | THIN, 6),
            alloc(2, 2, 12),
            blob(3, 2, THIN, 6),
            alloc(3, 3, 13),
        ] {
            st.apply(&op).unwrap();
        }
        st
    }

    #[test]
    fn inflate_fills_every_index_without_a_cluster() {
        let st = chain();
        assert_eq!(
            indexes_to_fill(&st, 3, Detach::Inflate).unwrap(),
            vec![0, 1, 2, 4, 5]
        );
        assert_eq!(finishing_ops(&st, 3, Detach::Inflate).unwrap(), None);
    }

    #[test]
    fn decouple_fills_only_what_the_parent_itself_holds() {
        let st = chain();
        assert_eq!(
            indexes_to_fill(&st, 3, Detach::DecoupleParent).unwrap(),
            vec![2]
        );
        // Snapshot 1 has no parent to decouple from.
        let e = indexes_to_fill(&st, 1, Detach::DecoupleParent).unwrap_err();
        assert!(e.contains("no parent"), "{e}");
    }

    #[test]
    fn decouple_ends_on_the_grandparent_and_inflate_on_none() {
        let mut st = chain();
        st.apply(&alloc(3, 2, 20)).unwrap();
        let ops = finishing_ops(&st, 3, Detach::DecoupleParent)
            .unwrap()
            .unwrap();
        assert_eq!(ops, vec![Op::SetParent { blob: 3, parent: 1 }]);
        st.apply_txn(&ops).unwrap();
        // Indexes 0 and 1 still come from snapshot 1; now inflate needs them and 4, 5.
        assert_eq!(
            indexes_to_fill(&st, 3, Detach::Inflate).unwrap(),
            vec![0, 1, 4, 5]
        );
        for (i, c) in [(0, 21), (1, 22), (4, 23), (5, 24)] {
            st.apply(&alloc(3, i, c)).unwrap();
        }
        let ops = finishing_ops(&st, 3, Detach::Inflate).unwrap().unwrap();
        st.apply_txn(&ops).unwrap();
        let b = st.blob(3).unwrap();
        assert_eq!((b.parent(), b.is_thin(), b.allocated()), (None, false, 6));
        assert!(st.check().is_empty(), "{:?}", st.check());
    }

    #[test]
    fn a_clone_grown_past_its_parent_only_copies_the_parent_s_length() {
        let mut st = chain();
        st.apply(&Op::Resize {
            blob: 3,
            clusters: 9,
        })
        .unwrap();
        assert_eq!(
            indexes_to_fill(&st, 3, Detach::DecoupleParent).unwrap(),
            vec![2]
        );
        assert_eq!(
            indexes_to_fill(&st, 3, Detach::Inflate).unwrap(),
            vec![0, 1, 2, 4, 5, 6, 7, 8]
        );
    }
}
