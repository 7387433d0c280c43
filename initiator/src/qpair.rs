//! I/O queue pairs: what a reactor poller or a benchmark thread owns and polls.
//!
//! The hot path: `read`/`write` put the command in a preallocated slot and queue its capsule;
//! `poll` sends everything queued in one `writev`, reads what arrived, and calls the owner's
//! closure once per finished command with the tag and the buffer. No allocation, no lock:
//! the only shared state is a few atomics of the controller, read once per poll.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::resv::{ResvAcquire, ResvRegister, ResvRelease, ResvReport};
use nvme_spec::{Command, Status};
use tracing::{debug, info, warn};

use crate::buf::IoBuf;
use crate::ctrlr::{CtrlrState, Shared};
use crate::error::{IoError, SubmitError, SubmitErrorKind};
use crate::transport::{ConnectProgress, Dir, Done, Queue};

/// Data direction of a raw command given to [`IoQpair::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Controller to host (the buffer is filled).
    Read,
    /// Host to controller (the buffer is sent).
    Write,
}

/// A finished I/O.
#[derive(Debug)]
pub struct IoCompletion<B> {
    /// The caller's tag from submission.
    pub tag: u64,
    /// Success, or why not.
    pub result: Result<(), IoError>,
    /// Completion dword 0 (command specific).
    pub dw0: u32,
    /// The caller's buffer, back in the caller's hands.
    pub buf: Option<B>,
}

/// How often in-flight commands are checked against the I/O timeout.
const TIMEOUT_SCAN: Duration = Duration::from_millis(100);

/// An I/O queue pair of a controller. `Send`: create it anywhere, move it to the thread that
/// polls it. Owners must call [`IoQpair::poll`] regularly; nothing moves otherwise.
pub struct IoQpair<B: IoBuf> {
    q: Queue<B>,
    shared: Arc<Shared>,
    /// Controller association (epoch) this queue is connected to.
    epoch: u64,
    /// The association a connection attempt in progress is for.
    attempt_epoch: u64,
    /// No new connection attempt before this (reconnect_delay after a failed one).
    next_try: Instant,
    /// When the last timeout scan ran, in [`crate::ticks`].
    last_scan: u64,
    max_xfer: u32,
}

impl<B: IoBuf> IoQpair<B> {
    pub(crate) fn new(q: Queue<B>, shared: Arc<Shared>, epoch: u64, max_xfer: u32) -> Self {
        IoQpair {
            q,
            shared,
            epoch,
            attempt_epoch: epoch,
            next_try: Instant::now(),
            last_scan: crate::ticks::now(),
            max_xfer,
        }
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.q.qid()
    }

    /// Most commands that can be outstanding at once.
    pub fn depth(&self) -> u16 {
        self.q.depth()
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.q.outstanding()
    }

    /// Whether the transport connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.q.is_connected()
    }

    /// NVMe/TCP digests this queue asked for and the controller granted (last connection).
    pub fn digests(&self) -> crate::ctrlr::Digests {
        self.q.digests()
    }

    /// Largest transfer in bytes (from MDTS).
    pub fn max_transfer(&self) -> u32 {
        self.max_xfer
    }

    /// Reads `nblocks` blocks at `slba` of namespace `nsid` into `buf` (its length must be
    /// `nblocks` times the block size). The command goes out on the next [`IoQpair::poll`].
    #[inline]
    pub fn read(
        &mut self,
        nsid: u32,
        slba: u64,
        nblocks: u32,
        buf: B,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        self.submit(
            Command::read_blocks(nsid, slba, nblocks),
            DataDir::Read,
            Some(buf),
            tag,
        )
    }

    /// Writes `buf` (`nblocks` blocks) at `slba` of namespace `nsid`.
    #[inline]
    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        nblocks: u32,
        buf: B,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        self.submit(
            Command::write_blocks(nsid, slba, nblocks, false),
            DataDir::Write,
            Some(buf),
            tag,
        )
    }

    /// NVM Flush of namespace `nsid`.
    pub fn flush(&mut self, nsid: u32, tag: u64) -> Result<(), SubmitError<B>> {
        self.submit(Command::flush(nsid), DataDir::None, None, tag)
    }

    /// Write Zeroes (`deallocate` lets the target unmap).
    pub fn write_zeroes(
        &mut self,
        nsid: u32,
        slba: u64,
        nblocks: u32,
        deallocate: bool,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        self.submit(
            Command::write_zeroes(nsid, slba, nblocks, deallocate),
            DataDir::None,
            None,
            tag,
        )
    }

    /// Reservation Register on namespace `r.nsid`: `crkey` and `nrkey` are written into the
    /// first 16 bytes of `buf` (at least that long), which comes back in the completion. A
    /// refusal by key is `IoError::Nvme` with Reservation Conflict
    /// ([`IoError::is_reservation_conflict`]).
    pub fn resv_register(
        &mut self,
        r: ResvRegister,
        crkey: u64,
        nrkey: u64,
        buf: B,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        let buf = put_keys(buf, &[crkey, nrkey])?;
        self.submit(r.to_command(), DataDir::Write, Some(buf), tag)
    }

    /// Reservation Acquire (acquire, preempt, preempt and abort) with `crkey` and `prkey` in
    /// the first 16 bytes of `buf`.
    pub fn resv_acquire(
        &mut self,
        a: ResvAcquire,
        crkey: u64,
        prkey: u64,
        buf: B,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        let buf = put_keys(buf, &[crkey, prkey])?;
        self.submit(a.to_command(), DataDir::Write, Some(buf), tag)
    }

    /// Reservation Release (release, clear) with `crkey` in the first 8 bytes of `buf`.
    pub fn resv_release(
        &mut self,
        r: ResvRelease,
        crkey: u64,
        buf: B,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        let buf = put_keys(buf, &[crkey])?;
        self.submit(r.to_command(), DataDir::Write, Some(buf), tag)
    }

    /// Reservation Report of namespace `nsid` into `buf` (a multiple of 4 bytes), with the
    /// extended data structure (128-bit host IDs, what NVMe over Fabrics uses); read it with
    /// `nvme_spec::resv::ResvStatus::parse_extended`.
    pub fn resv_report(&mut self, nsid: u32, buf: B, tag: u64) -> Result<(), SubmitError<B>> {
        let len = buf.len() as u64;
        if len < 4 || !len.is_multiple_of(4) {
            return Err(SubmitError {
                kind: SubmitErrorKind::BadLength,
                buf: Some(buf),
            });
        }
        let cmd = ResvReport {
            nsid,
            len,
            eds: true,
        }
        .to_command();
        self.submit(cmd, DataDir::Read, Some(buf), tag)
    }

    /// Any I/O command; the transport fills in CID and the data pointer.
    pub fn submit(
        &mut self,
        cmd: Command,
        dir: DataDir,
        buf: Option<B>,
        tag: u64,
    ) -> Result<(), SubmitError<B>> {
        let mut buf = buf;
        let len = buf.as_ref().map_or(0, |b| b.len());
        if dir == DataDir::Read && buf.as_mut().is_some_and(|b| b.bytes_mut().is_none()) {
            return Err(SubmitError {
                kind: SubmitErrorKind::ReadOnlyBuffer,
                buf,
            });
        }
        if len > self.max_xfer as usize || (dir != DataDir::None && len == 0) {
            return Err(SubmitError {
                kind: SubmitErrorKind::BadLength,
                buf,
            });
        }
        if self.shared.fail_io.load(Ordering::Relaxed) {
            return Err(SubmitError {
                kind: SubmitErrorKind::PathFailed,
                buf,
            });
        }
        if len > 0 && self.q.requires_iova() && buf.as_ref().is_some_and(|b| b.iova().is_none()) {
            return Err(SubmitError {
                kind: SubmitErrorKind::NotDmaMemory,
                buf,
            });
        }
        let dir = match dir {
            DataDir::None => Dir::None,
            DataDir::Read => Dir::ToHost,
            DataDir::Write => Dir::ToCtrl,
        };
        match self.q.submit(cmd, dir, buf, tag) {
            Ok(_) => Ok(()),
            Err(buf) => Err(SubmitError {
                kind: SubmitErrorKind::QueueFull,
                buf,
            }),
        }
    }

    /// Sends queued commands, receives completions and hands each to `on_done`; also drives
    /// reconnection after a controller reset (a step per poll, never waiting on the network)
    /// and the I/O timeout. Returns the number of completions delivered. With nothing
    /// outstanding and connected, it makes no system call.
    pub fn poll(&mut self, on_done: impl FnMut(IoCompletion<B>)) -> usize {
        self.poll_max(0, on_done)
    }

    /// [`IoQpair::poll`], delivering at most `max` completions from the device or the wire
    /// (0: no limit), as SPDK's `spdk_nvme_qpair_process_completions` does: the rest wait
    /// for the next poll, so that the owner can submit new commands before it handles them.
    /// Commands failed at once (a failed path, a reset) are all delivered regardless.
    pub fn poll_max(&mut self, max: usize, mut on_done: impl FnMut(IoCompletion<B>)) -> usize {
        let max = if max == 0 { usize::MAX } else { max };
        let sh = &*self.shared;
        let epoch = sh.epoch.load(Ordering::Acquire);
        let mut n = 0;
        if epoch != self.epoch && self.q.is_connected() {
            // The controller was reset: this association is gone. Commands stay in their slots.
            debug!(
                qid = self.q.qid(),
                "controller reset: dropping the old connection"
            );
            self.q.disconnect();
        }
        if !self.q.is_connected() {
            if sh.fail_io.load(Ordering::Relaxed) {
                // A failed path does not keep connecting; the next attempt starts afresh.
                if self.q.is_connecting() {
                    self.q.disconnect();
                }
                self.q
                    .fail_all(Status::HOST_PATHING_ERROR, &mut |d: Done<B>| {
                        n += 1;
                        on_done(IoCompletion {
                            tag: d.tag,
                            result: Err(IoError::PathFailed),
                            dw0: 0,
                            buf: d.buf,
                        })
                    });
                return n;
            }
            if epoch != self.epoch && sh.state() == CtrlrState::Connected && !self.q.is_connecting()
            {
                // The controller is back from a reset, so nothing of the old association can
                // still move data. A command that timed out and was aborted in vain (what
                // caused the reset) fails now: sent again it would time out again, and the
                // controller would be reset for it forever.
                let qid = self.q.qid();
                self.q
                    .fail_aborted(Status::ABORTED_BY_HOST, &mut |d: Done<B>| {
                        n += 1;
                        warn!(
                            qid,
                            tag = d.tag,
                            "I/O failed: it timed out and the reset ended it"
                        );
                        on_done(IoCompletion {
                            tag: d.tag,
                            result: Err(IoError::TimedOut),
                            dw0: 0,
                            buf: d.buf,
                        })
                    });
            }
            if !self.advance_reconnect(epoch) {
                return n;
            }
        }
        if !self.q.busy() {
            return 0;
        }
        let sh = &*self.shared;
        let res = self.q.poll(max, &mut |d: Done<B>| {
            n += 1;
            on_done(IoCompletion {
                tag: d.tag,
                result: to_result(d.status),
                dw0: d.dw0,
                buf: d.buf,
            })
        });
        if let Err(e) = res {
            warn!(
                qid = self.q.qid(),
                "I/O queue connection failed: {e}; requesting controller reset"
            );
            sh.reset_req.store(true, Ordering::Release);
        }
        if let Some(t) = sh.io_timeout {
            if self.q.outstanding() > 0 {
                let now = crate::ticks::now();
                if crate::ticks::to_duration(now.saturating_sub(self.last_scan)) >= TIMEOUT_SCAN {
                    self.last_scan = now;
                    self.check_timeouts(now, t);
                }
            }
        }
        n
    }

    /// Drives the rejoin of controller association `epoch` after a reset, a step per poll: the
    /// transport's connect never blocks, so neither does the owner's reactor. Returns whether
    /// the queue is connected now.
    fn advance_reconnect(&mut self, epoch: u64) -> bool {
        let sh = &*self.shared;
        if self.q.is_connecting() && self.attempt_epoch != epoch {
            // Reset again meanwhile: that attempt joins an association that is gone.
            debug!(
                qid = self.q.qid(),
                "controller reset during reconnect: starting over"
            );
            self.q.disconnect();
        }
        if !self.q.is_connecting() {
            if sh.state() != CtrlrState::Connected
                || epoch == self.epoch
                || Instant::now() < self.next_try
            {
                return false;
            }
            let cntlid = sh.cntlid.load(Ordering::Acquire) as u16;
            if let Err(e) = self.q.start_connect(cntlid) {
                warn!(qid = self.q.qid(), "I/O queue reconnect failed: {e}");
                self.next_try = Instant::now() + sh.reconnect_delay;
                return false;
            }
            self.attempt_epoch = epoch;
        }
        match self.q.poll_connect() {
            Ok(ConnectProgress::InProgress) => false,
            Ok(ConnectProgress::Connected { cntlid }) => {
                info!(
                    qid = self.q.qid(),
                    cntlid,
                    resent = self.q.outstanding(),
                    "I/O queue reconnected"
                );
                self.epoch = self.attempt_epoch;
                true
            }
            Err(e) => {
                warn!(qid = self.q.qid(), "I/O queue reconnect failed: {e}");
                self.next_try = Instant::now() + sh.reconnect_delay;
                false
            }
        }
    }

    /// SPDK's timeout action "abort": an expired command gets an Abort; if it is still there one
    /// more timeout later, the controller is reset.
    fn check_timeouts(&mut self, now: u64, t: Duration) {
        if !self.q.is_connected() {
            return;
        }
        let qid = self.q.qid();
        let sh = &*self.shared;
        let mut reset = false;
        self.q.for_each_active(|cid, started, abort_posted, tag| {
            if crate::ticks::to_duration(now.saturating_sub(*started)) < t {
                return;
            }
            if !*abort_posted && sh.post_abort(qid, cid) {
                warn!(qid, cid, tag, "I/O timed out after {t:?}: aborting");
                *abort_posted = true;
                *started = now;
            } else {
                warn!(
                    qid,
                    cid, tag, "I/O still outstanding after abort: resetting controller"
                );
                reset = true;
            }
        });
        if reset {
            sh.reset_req.store(true, Ordering::Release);
        }
    }

    /// Fails every outstanding command as a path failure (used when the owner tears down).
    pub fn abort_all(&mut self, mut on_done: impl FnMut(IoCompletion<B>)) {
        self.q
            .fail_all(Status::HOST_PATHING_ERROR, &mut |d: Done<B>| {
                on_done(IoCompletion {
                    tag: d.tag,
                    result: Err(IoError::PathFailed),
                    dw0: 0,
                    buf: d.buf,
                })
            });
    }
}

impl<B: IoBuf> Drop for IoQpair<B> {
    fn drop(&mut self) {
        self.q.disconnect();
        self.shared.release_qid(self.q.qid());
    }
}

/// Writes little-endian keys at the start of `buf`, which must hold them and be writable.
fn put_keys<B: IoBuf>(mut buf: B, keys: &[u64]) -> Result<B, SubmitError<B>> {
    let kind = match buf.bytes_mut() {
        Some(b) if b.len() >= keys.len() * 8 => {
            for (i, k) in keys.iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&k.to_le_bytes());
            }
            return Ok(buf);
        }
        Some(_) => SubmitErrorKind::BadLength,
        None => SubmitErrorKind::ReadOnlyBuffer,
    };
    Err(SubmitError {
        kind,
        buf: Some(buf),
    })
}

#[inline]
fn to_result(s: Status) -> Result<(), IoError> {
    if s.is_success() {
        Ok(())
    } else if s.same_code(Status::ABORT_REQUESTED) {
        Err(IoError::TimedOut)
    } else if s.same_code(Status::HOST_PATHING_ERROR) {
        // Given up by the transport (connections lost under it): executed or not, unknown.
        Err(IoError::PathFailed)
    } else {
        Err(IoError::Nvme(s))
    }
}

#[cfg(test)]
#[path = "qpair_reconnect_tests.rs"]
mod reconnect_tests;

#[cfg(test)]
mod resv_tests {
    use super::*;

    #[test]
    fn keys_go_first_little_endian_and_a_short_buffer_comes_back() {
        let b = put_keys(vec![0xFFu8; 20], &[0x0102, 0x0A0B]).unwrap();
        assert_eq!(&b[..9], &[2, 1, 0, 0, 0, 0, 0, 0, 0x0B]);
        assert_eq!(&b[16..], &[0xFF; 4], "bytes past the keys untouched");
        let e = put_keys(vec![7u8; 8], &[1, 2]).unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::BadLength);
        assert_eq!(e.buf.unwrap(), vec![7u8; 8]);
    }

    #[test]
    fn a_reservation_conflict_is_told_apart() {
        let c = IoError::Nvme(Status::RESERVATION_CONFLICT.with_dnr());
        assert!(c.is_reservation_conflict());
        assert!(!IoError::Nvme(Status::INVALID_FIELD).is_reservation_conflict());
        assert!(!IoError::PathFailed.is_reservation_conflict());
    }
}
