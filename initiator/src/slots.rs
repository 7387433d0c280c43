//! A queue's command slots: what every transport (TCP, RDMA, PCIe) keeps alike for each
//! command it has taken, and the free list that hands out command identifiers.
//!
//! A slot's index is the command's CID. Slot `depth` is a fabrics queue's own (Fabrics
//! Connect, marked `internal`; PCIe never uses it): it is never on the free list and never
//! counts as outstanding, and the timeout scan does not see it. Each transport keeps what only it needs per command in the
//! slot's `t`, and says what of it a finished command must not leave behind ([`SlotPart`]).

use std::ops::{Index, IndexMut};

use nvme_spec::{Command, Status};

use crate::transport::{give_up, Dir, Done};

/// A transport's own part of a slot.
pub(crate) trait SlotPart: Default {
    /// The command is finished, however it ended (its response, an abort, a failed path):
    /// forget what would otherwise be taken for the next command in this slot.
    fn finished(&mut self);
}

/// One command slot: the common part, and the transport's own (`t`).
pub(crate) struct Slot<B, T> {
    pub active: bool,
    /// The queue's own command (Fabrics Connect), not the user's.
    pub internal: bool,
    pub sqe: Command,
    pub dir: Dir,
    pub buf: Option<B>,
    /// The transfer length in bytes (the buffer's).
    pub len: u32,
    pub tag: u64,
    /// When it started, in [`crate::ticks`].
    pub started: u64,
    /// Abort was requested for this command (timeout handling).
    pub abort_posted: bool,
    /// Its capsule went out on the current connection.
    pub capsule_sent: bool,
    /// Connections lost while it was out on them (the transports' `MAX_LOST_SENDS`).
    pub lost_sends: u8,
    pub t: T,
}

/// The slots of one queue of `depth` user commands, plus the queue's own.
pub(crate) struct Slots<B, T> {
    slots: Box<[Slot<B, T>]>,
    free: Vec<u16>,
    depth: u16,
    outstanding: usize,
    /// Commands given up at a reconnection, for the next poll to deliver.
    given_up: Vec<Done<B>>,
}

impl<B, T: SlotPart> Slots<B, T> {
    pub fn new(depth: u16) -> Self {
        Slots {
            slots: (0..=depth)
                .map(|_| Slot {
                    active: false,
                    internal: false,
                    sqe: Command::default(),
                    dir: Dir::None,
                    buf: None,
                    len: 0,
                    tag: 0,
                    started: 0,
                    abort_posted: false,
                    capsule_sent: false,
                    lost_sends: 0,
                    t: T::default(),
                })
                .collect(),
            free: (0..depth).rev().collect(),
            depth,
            outstanding: 0,
            given_up: Vec::new(),
        }
    }
}

impl<B, T: SlotPart> Slots<B, T> {
    /// User commands the queue takes at once.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// The CID of the queue's own command.
    pub fn internal_cid(&self) -> u16 {
        self.depth
    }

    /// User commands taken and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// A free CID for a user command, if any.
    pub fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Gives back a CID from [`Slots::take`] whose command was refused before it started.
    pub fn put_back(&mut self, cid: u16) {
        self.free.push(cid);
    }

    /// Makes slot `cid` active with a new command, its CID set, and returns it for the
    /// transport to set its own part. `cid` comes from [`Slots::take`], or is
    /// [`Slots::internal_cid`] with `internal`.
    pub fn start(
        &mut self,
        cid: u16,
        mut sqe: Command,
        dir: Dir,
        buf: Option<B>,
        tag: u64,
        internal: bool,
    ) -> &mut Slot<B, T>
    where
        B: std::ops::Deref<Target = [u8]>,
    {
        let len = buf.as_ref().map_or(0, |b| b.len()) as u32;
        sqe.set_cid(cid);
        if !internal {
            self.outstanding += 1;
        }
        let s = &mut self.slots[cid as usize];
        s.active = true;
        s.internal = internal;
        s.sqe = sqe;
        s.dir = dir;
        s.buf = buf;
        s.len = len;
        s.tag = tag;
        s.started = crate::ticks::now();
        s.abort_posted = false;
        s.capsule_sent = false;
        s.lost_sends = 0;
        s
    }

    /// Ends slot `cid`'s command and returns its completion, with its buffer: a user
    /// command's CID goes back on the free list, and the transport's part forgets the command.
    /// Read data the transport must copy out it copies first.
    pub fn finish(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) -> Done<B> {
        let s = &mut self.slots[cid as usize];
        s.active = false;
        s.capsule_sent = false;
        s.t.finished();
        if !s.internal {
            self.outstanding -= 1;
            self.free.push(cid);
        }
        Done {
            tag: s.tag,
            status,
            dw0,
            dw1,
            buf: s.buf.take(),
        }
    }

    /// Completes every active user command, and those given up before, with `status`.
    pub fn fail_all(&mut self, status: Status, on_done: &mut impl FnMut(Done<B>)) {
        self.deliver_given_up(on_done);
        for cid in 0..self.depth {
            if self.slots[cid as usize].active {
                on_done(self.finish(cid, status, 0, 0));
            }
        }
    }

    /// A connection is up again: gives up on the active user commands lost too often (their
    /// Host Pathing Error completions go out at the next poll) and returns the CIDs of the
    /// rest, to be sent again.
    pub fn resend_after_reconnect(&mut self, qid: u16) -> Vec<u16> {
        let mut resend = Vec::new();
        for cid in 0..self.depth {
            let s = &self.slots[cid as usize];
            if !s.active {
                continue;
            }
            if give_up(qid, s.lost_sends, s.tag, s.sqe.opcode) {
                let d = self.finish(cid, Status::HOST_PATHING_ERROR, 0, 0);
                self.given_up.push(d);
            } else {
                resend.push(cid);
            }
        }
        resend
    }

    /// Whether `cid` names an active command (a CID from the wire is checked with this).
    pub fn is_active(&self, cid: u16) -> bool {
        self.slots.get(cid as usize).is_some_and(|s| s.active)
    }

    /// Whether the controller may answer `cid` (a CID from the wire): an active command whose
    /// capsule went out on the current connection. Commands waiting for a connection have not
    /// been sent on it; an answer to one is the controller's mistake, and taken, one that came
    /// while the queue connects would finish the command where no one receives it.
    pub fn answerable(&self, cid: u16) -> bool {
        self.slots
            .get(cid as usize)
            .is_some_and(|s| s.active && s.capsule_sent)
    }

    /// Tag and start time of every active user command (timeout scans).
    pub fn for_each_active(&mut self, mut f: impl FnMut(u16, &mut u64, &mut bool, u64)) {
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if s.active && !s.internal {
                f(cid as u16, &mut s.started, &mut s.abort_posted, s.tag);
            }
        }
    }

    /// A connection was lost: every active command that had gone out on it counts the loss,
    /// none has gone out on the next one yet, and the queue's own command (Connect) is over.
    pub fn connection_lost(&mut self) {
        for s in self.slots.iter_mut() {
            if s.active && s.capsule_sent {
                s.lost_sends = s.lost_sends.saturating_add(1);
            }
            s.capsule_sent = false;
        }
        self.slots[self.depth as usize].active = false;
    }

    pub fn has_given_up(&self) -> bool {
        !self.given_up.is_empty()
    }

    /// Delivers the commands given up so far; returns how many.
    pub fn deliver_given_up(&mut self, on_done: &mut impl FnMut(Done<B>)) -> usize {
        let n = self.given_up.len();
        for d in std::mem::take(&mut self.given_up) {
            on_done(d);
        }
        n
    }

    /// Every slot, the queue's own included.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot<B, T>> {
        self.slots.iter_mut()
    }

    /// The slot of `cid`, if there is one (a CID from the wire).
    pub fn get_mut(&mut self, cid: usize) -> Option<&mut Slot<B, T>> {
        self.slots.get_mut(cid)
    }

    /// Slots, the queue's own included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

impl<B, T> Index<usize> for Slots<B, T> {
    type Output = Slot<B, T>;

    fn index(&self, cid: usize) -> &Slot<B, T> {
        &self.slots[cid]
    }
}

impl<B, T> IndexMut<usize> for Slots<B, T> {
    fn index_mut(&mut self, cid: usize) -> &mut Slot<B, T> {
        &mut self.slots[cid]
    }
}
