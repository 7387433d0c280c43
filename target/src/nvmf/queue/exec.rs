//! Carrying out a command: fabrics and admin commands through the controller, I/O commands
//! through the namespace's bdev, and the bdevs' completions back into responses.

use super::*;

impl<T: Transport> NvmeQueue<T> {
    pub(super) fn exec(&mut self, si: u16) {
        let s = &mut self.slots[si as usize];
        s.state = SlotState::Exec;
        let cmd = s.cmd;
        if cmd.is_fabrics() {
            self.exec_fabrics(si, &cmd);
        } else if self.qid == 0 {
            self.exec_admin(si, &cmd);
        } else {
            self.exec_io(si);
        }
    }

    fn exec_fabrics(&mut self, si: u16, cmd: &Command) {
        match cmd.fctype() {
            fctype::CONNECT => {
                if self.ctrl.is_some() {
                    return self.complete(si, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
                }
                let (hdgst, ddgst) = self.t.digests();
                let info = ConnInfo {
                    listen: &self.listen,
                    peer: &self.peer,
                    reactor: self.reactor,
                    opts: &self.opts,
                    hdgst,
                    ddgst,
                };
                let data = self.slots[si as usize]
                    .buf
                    .as_ref()
                    .map(|b| &b[..])
                    .unwrap_or(&[]);
                match controller::connect(&self.target, &info, cmd, data) {
                    Ok(c) => {
                        let cntlid = c.ctrl.cntlid;
                        self.qid = c.qid;
                        self.sqsize = c.sqsize as u16;
                        self.epoch = c.ctrl.epoch();
                        if c.qid != 0 {
                            self.ns.refresh(&c.ctrl.subsys);
                        }
                        self.ctrl = Some(c.ctrl);
                        self.pg.qpair_opened(self.qid == 0);
                        self.complete(si, Status::SUCCESS, u32::from(cntlid));
                        self.grow_slots(c.sqsize as usize + EXTRA_SLOTS);
                    }
                    Err((status, dw0)) => {
                        crate::log_limited!(
                            INFO,
                            "{} {}: Connect rejected: {}",
                            T::NAME,
                            self.peer,
                            status.name_in(true)
                        );
                        self.complete(si, status, dw0);
                    }
                }
            }
            fctype::PROPERTY_GET if self.qid == 0 => {
                let ctrl = self.ctrl.clone().expect("checked at capsule");
                match PropertyGet::from_command(cmd).map(|p| ctrl.property_get(&p)) {
                    Some(Ok(v)) => {
                        self.complete64(si, v);
                    }
                    Some(Err(s)) => self.complete(si, s, 0),
                    None => self.complete(si, Status::INVALID_FIELD.with_dnr(), 0),
                }
            }
            fctype::PROPERTY_SET if self.qid == 0 => {
                let ctrl = self.ctrl.clone().expect("checked at capsule");
                let st = match PropertySet::from_command(cmd) {
                    Some(p) => ctrl.property_set(&p),
                    None => Status::INVALID_FIELD.with_dnr(),
                };
                self.complete(si, st, 0);
            }
            fctype::DISCONNECT => {
                self.complete(si, Status::SUCCESS, 0);
                T::close(self);
            }
            _ => self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    fn exec_admin(&mut self, si: u16, cmd: &Command) {
        let ctrl = self.ctrl.clone().expect("checked at capsule");
        let out = ctrl.admin(&self.target, cmd, self.slots[si as usize].data_mut());
        match out {
            AdminOutcome::Done { status, dw0 } => self.complete(si, status, dw0),
            AdminOutcome::HoldAer => {
                if self.aers.len() >= MAX_AERS {
                    self.complete(si, Status::ASYNC_EVENT_LIMIT_EXCEEDED.with_dnr(), 0);
                } else {
                    self.slots[si as usize].state = SlotState::HeldAer;
                    self.aers.push(si);
                }
            }
        }
    }

    fn exec_io(&mut self, si: u16) {
        let cmd = self.slots[si as usize].cmd;
        if !supported_io_opcode(cmd.opcode) {
            return self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0);
        }
        let nsid = cmd.nsid();
        let Some(host) = self.ctrl.as_ref().map(|c| c.hostid) else {
            return self.complete(si, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        let Some(ns) = self.ns.get(nsid) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        if is_reservation_opcode(cmd.opcode) {
            return self.exec_reservation(si, &cmd);
        }
        // Checked here, at the last step before the bdev, so commands that waited (for data,
        // for a full queue) see a preempt that happened meanwhile.
        if let Some(st) = ns.resv_refusal(&host, cmd.opcode, self.slots[si as usize].abort_seen) {
            return self.complete(si, st, 0);
        }
        let nblocks_dev = ns.ns.num_blocks();
        let shift = ns.block_shift;
        let s = &mut self.slots[si as usize];
        let tag = u64::from(si);
        let io = match cmd.opcode {
            io::READ | io::WRITE => {
                let rw = ReadWrite::from_command(&cmd);
                if rw.end_lba().is_none_or(|e| e > nblocks_dev) {
                    return self.complete(si, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                if u64::from(rw.nblocks) << shift != u64::from(s.xfer_len) {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                }
                let Some(buf) = s.buf.take() else {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                };
                let Some(buf) = aligned_for(buf, ns.buf_align) else {
                    return self.complete(si, Status::INTERNAL, 0);
                };
                let n = u64::from(rw.nblocks);
                if cmd.opcode == io::READ {
                    BdevIo::read(rw.slba, n, smallvec![buf], tag)
                } else {
                    BdevIo::write(rw.slba, n, smallvec![buf], tag)
                }
            }
            io::FLUSH => BdevIo::no_data(IoType::Flush, 0, 0, tag),
            io::WRITE_ZEROES => {
                let wz = WriteZeroes::from_command(&cmd);
                let end = wz.slba.checked_add(u64::from(wz.nblocks));
                if end.is_none_or(|e| e > nblocks_dev) {
                    return self.complete(si, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                BdevIo::no_data(IoType::WriteZeroes, wz.slba, u64::from(wz.nblocks), tag)
            }
            io::DATASET_MANAGEMENT => {
                let dsm = DatasetManagement::from_command(&cmd);
                if !dsm.deallocate {
                    // Attribute hints only: nothing to do.
                    return self.complete(si, Status::SUCCESS, 0);
                }
                if (s.xfer_len as usize) < dsm.data_len() {
                    return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
                }
                s.status = Status::SUCCESS;
                s.next_range = 0;
                s.pending = 0;
                return self.submit_dsm(si);
            }
            _ => return self.complete(si, Status::INVALID_OPCODE.with_dnr(), 0),
        };
        s.pending = 1;
        let ns = self.ns.get(nsid).expect("looked up above");
        if let Err(io) = ns.chan.submit(io) {
            let s = &mut self.slots[si as usize];
            s.pending = 0;
            s.buf = io.bufs.into_iter().next();
            crate::bdev::bump(&self.pg.pending_bdev_io, 1);
            self.retry.push_back(si);
        }
    }

    /// Submits the remaining deallocate ranges of a DSM command as unmaps.
    fn submit_dsm(&mut self, si: u16) {
        let cmd = self.slots[si as usize].cmd;
        let dsm = DatasetManagement::from_command(&cmd);
        let nsid = cmd.nsid();
        let Some(ns) = self.ns.get(nsid) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        let dev_blocks = ns.ns.num_blocks();
        // Ranges resubmitted after a full queue must not slip past a preempt either.
        let refusal = match self.ctrl.as_ref() {
            Some(c) => ns.resv_refusal(&c.hostid, cmd.opcode, self.slots[si as usize].abort_seen),
            None => Some(Status::COMMAND_SEQUENCE_ERROR.with_dnr()),
        };
        let s = &mut self.slots[si as usize];
        let Some(buf) = s.buf.as_ref() else {
            return self.complete(si, Status::SGL_INVALID_DATA_LENGTH.with_dnr(), 0);
        };
        let Some(ranges) = DsmRange::slice_from(&buf[..dsm.data_len()]) else {
            return self.complete(si, Status::INTERNAL, 0);
        };
        let mut i = s.next_range as usize;
        if let Some(st) = refusal {
            s.status = st;
            i = ranges.len();
        }
        let mut stalled = false;
        while i < ranges.len() {
            let r = ranges[i];
            let (slba, nlb) = (r.slba.get(), u64::from(r.nlb.get()));
            if nlb > 0 {
                if slba.checked_add(nlb).is_none_or(|e| e > dev_blocks) {
                    s.status = Status::LBA_OUT_OF_RANGE.with_dnr();
                    break;
                }
                let io = BdevIo::no_data(IoType::Unmap, slba, nlb, u64::from(si));
                if ns.chan.submit(io).is_err() {
                    stalled = true;
                    break;
                }
                s.pending += 1;
            }
            i += 1;
        }
        s.next_range = i as u16;
        if stalled {
            crate::bdev::bump(&self.pg.pending_bdev_io, 1);
            self.retry.push_back(si);
            return;
        }
        if s.pending == 0 {
            let st = s.status;
            self.complete(si, st, 0);
        } else {
            // The last completion finishes the command.
            s.next_range = u16::MAX;
        }
    }

    /// Reservation Register, Acquire, Release or Report: run at once on the namespace's
    /// reservation state, never at the bdev.
    fn exec_reservation(&mut self, si: u16, cmd: &Command) {
        use nvme_spec::resv::{ResvAcquire, ResvRegister, ResvRelease, ResvReport};
        let (Some(ctrl), Some(ns)) = (self.ctrl.as_ref(), self.ns.get(cmd.nsid())) else {
            return self.complete(si, Status::INVALID_NAMESPACE.with_dnr(), 0);
        };
        let host = ctrl.hostid;
        let resv = &ns.ns.resv;
        let s = &mut self.slots[si as usize];
        let data = s.data_mut();
        let status = match cmd.opcode {
            io::RESERVATION_REGISTER => {
                resv.register(&host, &ResvRegister::from_command(cmd), data)
            }
            io::RESERVATION_ACQUIRE => resv.acquire(&host, &ResvAcquire::from_command(cmd), data),
            io::RESERVATION_RELEASE => resv.release(&host, &ResvRelease::from_command(cmd), data),
            io::RESERVATION_REPORT => resv.report(&ResvReport::from_command(cmd), data),
            _ => Status::INVALID_OPCODE.with_dnr(),
        };
        if !status.is_success() {
            tracing::debug!(
                "{} {}: {} on namespace {}: {status}",
                T::NAME,
                self.peer,
                cmd.opcode_name(false),
                cmd.nsid()
            );
        }
        self.complete(si, status, 0);
    }

    /// Polls bdev completions and retries I/O that found a queue full.
    pub(in crate::nvmf) fn poll_io(&mut self) -> bool {
        if self.qid == 0 {
            return false;
        }
        if let Some(c) = &self.ctrl {
            self.ns.refresh(&c.subsys);
        }
        let mut n = 0;
        // Collect completions first: the slots and the output queue are borrowed by the
        // handler while the channel is borrowed by the poll.
        let mut batch: smallvec::SmallVec<[IoCompletion; 32]> = smallvec::SmallVec::new();
        loop {
            let got = self.ns.poll(&mut |c| batch.push(c));
            if got == 0 && batch.is_empty() {
                break;
            }
            n += got;
            for c in batch.drain(..) {
                self.io_done(c);
            }
            if got < 32 {
                break;
            }
        }
        while let Some(&si) = self.retry.front() {
            self.retry.pop_front();
            let before = self.retry.len();
            let cmd = self.slots[si as usize].cmd;
            if cmd.opcode == io::DATASET_MANAGEMENT {
                self.submit_dsm(si);
            } else {
                self.exec_io(si);
            }
            if self.retry.len() > before {
                break; // still full
            }
            n += 1;
        }
        n > 0
    }

    fn io_done(&mut self, c: IoCompletion) {
        let si = c.tag as u16;
        let Some(s) = self.slots.get_mut(si as usize) else {
            return;
        };
        if s.state != SlotState::Exec {
            return;
        }
        let st = nvme_status(c.io_type, c.status);
        if !st.is_success() && s.status.is_success() {
            s.status = st;
        }
        // A read's data goes to the host from its buffer; a write's buffer (perhaps lent
        // by the transport) is done with.
        if c.io_type == IoType::Read {
            s.buf = c.bufs.into_iter().next().and_then(whole_buf);
        }
        s.pending = s.pending.saturating_sub(1);
        if s.pending == 0 && (c.io_type != IoType::Unmap || s.next_range == u16::MAX) {
            let st = s.status;
            self.complete(si, st, 0);
        }
    }
}

/// `buf`, or a copy of it where the bdev needs its buffers aligned more than it is (in-capsule
/// data lent from a transport's receive buffer starts wherever the PDU put it). `None` when
/// no memory is left for the copy.
fn aligned_for(buf: BufView, align: u32) -> Option<BufView> {
    if buf.addr().is_multiple_of(align.max(1) as usize) {
        return Some(buf);
    }
    let mut copy = BufView::new(buf.len())
        .inspect_err(|e| crate::log_limited!(WARN, "nvmf: no buffer to align a write: {e}"))
        .ok()?;
    copy.bytes_mut()?.copy_from_slice(&buf);
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_view_is_copied_only_for_a_bdev_that_needs_more_alignment() {
        let mut whole = BufView::new(8192).unwrap();
        for (i, b) in whole.bytes_mut().unwrap().iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut rest = whole.split_off(72).unwrap();
        let _after = rest.split_off(4096).unwrap();
        let at = rest.addr();
        let want: Vec<u8> = rest.to_vec();

        let same = aligned_for(rest, 4).unwrap();
        assert_eq!(same.addr(), at, "dword-aligned already: no copy");

        let copy = aligned_for(same, 512).unwrap();
        assert!(copy.addr().is_multiple_of(512));
        assert_eq!(&copy[..], &want[..]);
    }
}
