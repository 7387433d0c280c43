//! The NVM command set on top of the bdev layer: a queue's namespace table (one bdev channel
//! per namespace, opened on the queue's reactor) and the mapping of bdev outcomes to NVMe
//! status.

use super::reservation::HostId;
use super::subsystem::{Namespace, Subsystem};
use crate::bdev::{IoChannel, IoCompletion, IoStatus, IoType};
use nvme_spec::opcode::{io, DataDirection};
use nvme_spec::{Command, Status};
use std::sync::Arc;

/// The NVMe status for a bdev outcome.
pub fn nvme_status(io_type: IoType, s: IoStatus) -> Status {
    match s {
        IoStatus::Success => Status::SUCCESS,
        IoStatus::OutOfRange => Status::LBA_OUT_OF_RANGE.with_dnr(),
        IoStatus::InvalidBuffer => Status::SGL_INVALID_DATA_LENGTH.with_dnr(),
        // A flush on a device without a cache has nothing to do.
        IoStatus::Unsupported if io_type == IoType::Flush => Status::SUCCESS,
        IoStatus::Unsupported => Status::INVALID_OPCODE.with_dnr(),
        // The media errors a device or file reports. Anything else (no memory, a device
        // gone from under a mirror, a full queue) is not the medium's fault; a media status
        // would tell the host its blocks are bad (Linux logs a critical medium error).
        IoStatus::IoError(libc::EIO | libc::ENODATA | libc::EILSEQ | libc::EBADMSG) => {
            match io_type {
                IoType::Read => Status::UNRECOVERED_READ_ERROR,
                IoType::Write | IoType::WriteZeroes => Status::WRITE_FAULT,
                _ => Status::INTERNAL,
            }
        }
        IoStatus::IoError(_) => Status::INTERNAL,
        // The device went away or was reset: the host may retry (no DNR).
        IoStatus::Aborted => Status::ABORTED_SQ_DELETION,
        IoStatus::Nvme { sct, sc } => Status::new(sct, sc),
    }
}

/// Which way a command moves data. Fabrics commands carry it in FCTYPE's low bits, others
/// in the opcode's.
pub fn data_direction(cmd: &Command) -> DataDirection {
    let code = if cmd.is_fabrics() {
        cmd.fctype()
    } else {
        cmd.opcode
    };
    DataDirection::from_opcode(code)
}

/// Whether an I/O opcode is one we execute.
pub fn supported_io_opcode(op: u8) -> bool {
    matches!(
        op,
        io::READ
            | io::WRITE
            | io::FLUSH
            | io::WRITE_ZEROES
            | io::DATASET_MANAGEMENT
            | io::RESERVATION_REGISTER
            | io::RESERVATION_REPORT
            | io::RESERVATION_ACQUIRE
            | io::RESERVATION_RELEASE
    )
}

/// Whether an I/O opcode is a reservation command (run by the target, not the bdev).
pub fn is_reservation_opcode(op: u8) -> bool {
    matches!(
        op,
        io::RESERVATION_REGISTER
            | io::RESERVATION_REPORT
            | io::RESERVATION_ACQUIRE
            | io::RESERVATION_RELEASE
    )
}

/// Whether a reservation counts an opcode as a write (the Base spec's write command group,
/// with Flush, as SPDK counts it); every other data command counts as a read.
pub fn reservation_write_class(op: u8) -> bool {
    matches!(
        op,
        io::WRITE
            | io::WRITE_ZEROES
            | io::DATASET_MANAGEMENT
            | io::FLUSH
            | io::WRITE_UNCORRECTABLE
            | io::COPY
    )
}

/// A namespace as one queue sees it.
pub struct NsIo {
    pub ns: Arc<Namespace>,
    pub chan: IoChannel,
    pub block_shift: u32,
    /// Where the bdev needs its buffers to start (a multiple of this), fixed at its creation.
    pub buf_align: u32,
    /// This queue's host's rights under the namespace's reservation, as of `resv_gen`.
    resv_gen: u64,
    may_read: bool,
    may_write: bool,
}

impl NsIo {
    /// Whether the reservation lets `host` run a read (or write) command now. One atomic
    /// load unless the reservation changed since this queue last looked.
    pub fn resv_allows(&mut self, host: &HostId, write: bool) -> bool {
        let gen = self.ns.resv.access_gen();
        if gen != self.resv_gen {
            let a = self.ns.resv.access(host);
            self.resv_gen = gen;
            self.may_read = a.read;
            self.may_write = a.write;
        }
        if write {
            self.may_write
        } else {
            self.may_read
        }
    }

    /// The status a data command of `host` that arrived when the abort count was `seen` must
    /// end with instead of reaching the bdev, if any.
    pub fn resv_refusal(&mut self, host: &HostId, op: u8, seen: u64) -> Option<Status> {
        if self.ns.resv.aborted_since(host, seen) {
            return Some(Status::ABORTED_PREEMPT);
        }
        if !self.resv_allows(host, reservation_write_class(op)) {
            return Some(Status::RESERVATION_CONFLICT.with_dnr());
        }
        None
    }
}

/// A queue's namespaces, indexed by NSID - 1, refreshed when the subsystem's generation
/// changes. Channels of removed namespaces keep being polled until their I/O drains.
#[derive(Default)]
pub struct NsTable {
    gen: u64,
    loaded: bool,
    table: Vec<Option<NsIo>>,
    draining: Vec<IoChannel>,
}

impl NsTable {
    /// Reloads from `subsys` if its namespaces changed since the last look. Runs on the
    /// queue's reactor (channels are opened there).
    pub fn refresh(&mut self, subsys: &Subsystem) {
        let gen = subsys.ns_generation();
        if self.loaded && gen == self.gen {
            return;
        }
        self.loaded = true;
        self.gen = gen;
        let current = subsys.namespaces();
        // Keep channels whose namespace is unchanged; retire the others.
        for (i, slot) in self.table.iter_mut().enumerate() {
            let keep = slot.as_ref().is_some_and(|n| {
                current
                    .iter()
                    .any(|c| c.nsid as usize == i + 1 && Arc::ptr_eq(c, &n.ns))
            });
            if !keep {
                if let Some(n) = slot.take() {
                    if n.chan.in_flight() > 0 {
                        self.draining.push(n.chan);
                    }
                }
            }
        }
        for ns in current {
            let i = ns.nsid as usize - 1;
            if self.table.len() <= i {
                self.table.resize_with(i + 1, || None);
            }
            if self.table[i].is_some() {
                continue;
            }
            match ns.bdev.open_channel() {
                Ok(chan) => {
                    let block_shift = ns.block_size().trailing_zeros();
                    let buf_align = ns.bdev.info().required_alignment.max(1);
                    self.table[i] = Some(NsIo {
                        ns,
                        chan,
                        block_shift,
                        buf_align,
                        // Forces a look at the reservation on the first command.
                        resv_gen: u64::MAX,
                        may_read: true,
                        may_write: true,
                    });
                }
                Err(e) => tracing::warn!("nvmf: namespace {} unusable: {e}", ns.nsid),
            }
        }
    }

    pub fn get(&mut self, nsid: u32) -> Option<&mut NsIo> {
        let i = (nsid as usize).checked_sub(1)?;
        self.table.get_mut(i)?.as_mut()
    }

    /// Polls every channel; returns how many I/O completed.
    pub fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut n = 0;
        for ns in self.table.iter_mut().flatten() {
            if ns.chan.in_flight() > 0 {
                n += ns.chan.poll(done);
            }
        }
        if !self.draining.is_empty() {
            for c in &mut self.draining {
                n += c.poll(done);
            }
            self.draining.retain(|c| c.in_flight() > 0);
        }
        n
    }

    /// I/O that waits on a device (in flight, less what a rate limit holds back: the
    /// channel wakes its reactor for those itself).
    pub fn awaiting_device(&self) -> usize {
        self.in_flight()
            - self
                .table
                .iter()
                .flatten()
                .map(|n| n.chan.throttled())
                .sum::<usize>()
            - self.draining.iter().map(|c| c.throttled()).sum::<usize>()
    }

    /// I/O submitted and not yet completed, over every channel.
    pub fn in_flight(&self) -> usize {
        self.table
            .iter()
            .flatten()
            .map(|n| n.chan.in_flight())
            .sum::<usize>()
            + self.draining.iter().map(|c| c.in_flight()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert!(nvme_status(IoType::Read, IoStatus::OutOfRange).same_code(Status::LBA_OUT_OF_RANGE));
        assert!(nvme_status(IoType::Flush, IoStatus::Unsupported).is_success());
        assert!(nvme_status(IoType::Unmap, IoStatus::Unsupported).same_code(Status::INVALID_OPCODE));
        assert!(nvme_status(IoType::Read, IoStatus::IoError(libc::EIO))
            .same_code(Status::UNRECOVERED_READ_ERROR));
        assert!(
            nvme_status(IoType::Write, IoStatus::IoError(libc::EIO)).same_code(Status::WRITE_FAULT)
        );
        for errno in [libc::ENOMEM, libc::EAGAIN, libc::ENODEV] {
            for t in [IoType::Read, IoType::Write] {
                let s = nvme_status(t, IoStatus::IoError(errno));
                assert!(s.same_code(Status::INTERNAL), "{t:?} errno {errno}: {s}");
                assert!(!s.dnr, "{t:?} errno {errno}: the host may retry");
            }
        }
        let s = nvme_status(IoType::Read, IoStatus::Nvme { sct: 2, sc: 0x81 });
        assert_eq!((s.sct, s.sc), (2, 0x81));
    }

    #[test]
    fn directions() {
        let w = Command::new(io::WRITE);
        assert_eq!(data_direction(&w), DataDirection::HostToController);
        let c = nvme_spec::fabrics::Connect::default().to_command(0);
        assert_eq!(data_direction(&c), DataDirection::HostToController);
        let pg = nvme_spec::fabrics::PropertyGet {
            size: nvme_spec::fabrics::PropertySize::Four,
            offset: 0,
        }
        .to_command(0);
        assert_eq!(data_direction(&pg), DataDirection::None);
    }
}
