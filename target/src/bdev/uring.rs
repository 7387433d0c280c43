//! `uring`: a file or a kernel block device through io_uring, with O_DIRECT. The embedded
//! default where no NVMe device is bound to vfio-pci.
//!
//! Each channel owns one ring. `submit` only fills a submission entry; `poll` hands everything
//! queued since the last poll to the kernel in one `io_uring_enter` and reaps completions
//! from the shared completion ring, which needs no syscall. Per-I/O state lives in slots
//! allocated when the channel opens (the iovec array included), and a slot's index is the
//! entry's `user_data`, so the I/O path allocates nothing.

use super::*;
use io_uring::{opcode, types, IoUring};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// I/O one channel keeps in flight; beyond it `submit` hands the I/O back.
pub const QUEUE_DEPTH: u32 = 128;
/// The kernel's limit on iovecs per request.
const IOV_MAX: usize = 1024;
/// iovecs each slot reserves up front; an I/O with more buffers grows its slot once.
const IOVS_PER_SLOT: usize = 8;

// From <linux/fs.h>: _IO(0x12, 104) and _IOR(0x12, 114, size_t).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

pub struct UringBdev {
    info: BdevInfo,
    file: Arc<File>,
    path: PathBuf,
    /// False when the filesystem refused O_DIRECT and we went through the page cache.
    direct: bool,
    block_device: bool,
}

impl UringBdev {
    /// Opens `path` (a regular file or a block device). `block_size` None or 0 takes the
    /// device's logical block size, or 512 for a file.
    pub fn open(
        name: String,
        path: &Path,
        block_size: Option<u32>,
        uuid: Uuid,
    ) -> Result<Self, BdevError> {
        Self::open_with(name, path, block_size, uuid, &|p, flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(p)
        })
    }

    /// `open` with the open(2) call injectable, so tests can play a filesystem without O_DIRECT.
    fn open_with(
        name: String,
        path: &Path,
        block_size: Option<u32>,
        uuid: Uuid,
        opener: &dyn Fn(&Path, i32) -> std::io::Result<File>,
    ) -> Result<Self, BdevError> {
        let io_err = |what: String| move |source| BdevError::Io { what, source };
        let meta =
            std::fs::metadata(path).map_err(io_err(format!("cannot use {}", path.display())))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(BdevError::InvalidParam(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        // O_EXCL on a block device fails with EBUSY while it is mounted or in use, so we never
        // write under a filesystem.
        let excl = if block_device { libc::O_EXCL } else { 0 };
        let open_err = |e| io_err(format!("cannot open {}", path.display()))(e);
        let buffered = |why: &str| -> Result<File, BdevError> {
            let f = opener(path, excl).map_err(open_err)?;
            tracing::warn!(
                "uring bdev {name}: {why} for {}; using buffered I/O (slower, and writes are \
                 only durable after a flush)",
                path.display()
            );
            Ok(f)
        };
        let (mut file, mut direct) = match opener(path, libc::O_DIRECT | excl) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (buffered("the filesystem refuses O_DIRECT")?, false)
            }
            Err(e) => return Err(open_err(e)),
        };
        // A file's direct-I/O alignment is its filesystem's and disk's, not ours to guess:
        // Linux 6.1+ tells it (0 = no direct I/O on this file after all).
        let dio = if block_device {
            None
        } else {
            dio_alignment(&file)
        };
        if direct && dio == Some((0, 0)) {
            file = buffered("the filesystem does no direct I/O")?;
            direct = false;
        }
        let (logical, size) = if block_device {
            device_geometry(&file).map_err(io_err(format!(
                "cannot read the geometry of {}",
                path.display()
            )))?
        } else {
            let offset_align = dio.filter(|_| direct).map_or(512, |(_, o)| o);
            (offset_align.clamp(512, 65536), meta.len())
        };
        let mem_align = dio.filter(|_| direct).map_or(1, |(m, _)| m);
        let bs = match block_size.filter(|&b| b != 0) {
            None => logical,
            Some(b) if b < 512 || b % 512 != 0 || b > 65536 => {
                return Err(BdevError::InvalidParam(format!(
                    "block_size {b} must be a multiple of 512 up to 65536"
                )))
            }
            Some(b) if b < logical || b % logical != 0 => {
                return Err(BdevError::InvalidParam(format!(
                    "block_size {b} is not a multiple of the logical block size {logical} of {}",
                    path.display()
                )))
            }
            Some(b) => b,
        };
        if size == 0 {
            return Err(BdevError::InvalidParam(format!(
                "{} is empty; give it a size first (truncate -s 1G {})",
                path.display(),
                path.display()
            )));
        }
        if size % bs as u64 != 0 {
            return Err(BdevError::InvalidParam(format!(
                "{} has {size} bytes, not a multiple of the block size {bs}",
                path.display()
            )));
        }
        let mut info = BdevInfo::new(
            name,
            "URING bdev",
            bs,
            size / bs as u64,
            uuid,
            IoTypes::all(),
        );
        // O_DIRECT needs buffers aligned to the logical block; our block is a multiple of it.
        info.required_alignment = bs.max(mem_align);
        // A file's page cache or a device's volatile cache: flush matters.
        info.write_cache = true;
        Ok(UringBdev {
            info,
            file: Arc::new(file),
            path: path.to_path_buf(),
            direct,
            block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

/// (memory, offset) alignment that O_DIRECT needs on this file, where the kernel says.
/// Where the kernel may write a read's data. `submit` refused reads into shared views, so the
/// buffer is writable; the null fallback can only fail the read (EFAULT), never write elsewhere.
fn read_ptr(b: &mut BufView) -> *mut u8 {
    b.bytes_mut()
        .map_or(std::ptr::null_mut(), |s| s.as_mut_ptr())
}

fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data, so all-zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the descriptor itself; the kernel writes
    // into the live `stx` only.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// (logical block size, size in bytes) of a block device.
fn device_geometry(file: &File) -> std::io::Result<(u32, u64)> {
    let mut lbs: libc::c_int = 0;
    let mut size: u64 = 0;
    // SAFETY: BLKSSZGET writes one int and BLKGETSIZE64 one u64 into the live locals we pass.
    unsafe {
        if libc::ioctl(file.as_raw_fd(), BLKSSZGET as _, &mut lbs) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((u32::try_from(lbs).unwrap_or(512).max(512), size))
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn module(&self) -> &'static str {
        "uring"
    }

    fn open_channel(&self, _: Option<&ReactorHandle>) -> Result<Box<dyn BdevChannel>, BdevError> {
        let ring = IoUring::new(QUEUE_DEPTH).map_err(|source| BdevError::Io {
            what: format!("cannot create an io_uring for {}", self.info.name),
            source,
        })?;
        let slots = (0..QUEUE_DEPTH)
            .map(|_| Slot {
                io: None,
                iov: Vec::with_capacity(IOVS_PER_SLOT),
                len: 0,
            })
            .collect();
        Ok(Box::new(UringChannel {
            ring,
            file: self.file.clone(),
            slots,
            free: (0..QUEUE_DEPTH).rev().collect(),
            retry: Vec::with_capacity(QUEUE_DEPTH as usize),
            ready: ReadyQueue::default(),
            block_size: self.info.block_size as u64,
            block_device: self.block_device,
            submit_warned: false,
        }))
    }

    fn config(&self) -> Option<(&'static str, Value)> {
        Some((
            "bdev_uring_create",
            serde_json::json!({
                "name": self.info.name,
                "filename": self.path,
                "block_size": self.info.block_size,
                "uuid": self.info.uuid,
            }),
        ))
    }

    fn driver_specific(&self) -> Value {
        let mut v = serde_json::json!({
            "filename": self.path,
            "block_device": self.block_device,
            "direct_io": self.direct,
        });
        if !self.direct {
            v["note"] =
                "the filesystem refused O_DIRECT: buffered I/O through the page cache".into();
        }
        v
    }
}

/// The state of one I/O in flight. `iov` points into the I/O's buffers, which stay in `io`
/// (and so stay put) until the kernel has completed the request.
struct Slot {
    io: Option<BdevIo>,
    iov: Vec<libc::iovec>,
    /// Bytes a read or write must move; less is a failure.
    len: u64,
}

pub struct UringChannel {
    ring: IoUring,
    file: Arc<File>,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// Write-zeroes to redo as hole punches (filesystems without ZERO_RANGE).
    retry: Vec<u32>,
    ready: ReadyQueue,
    block_size: u64,
    block_device: bool,
    submit_warned: bool,
}

impl UringChannel {
    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// The submission entry for the I/O in slot `idx`.
    fn entry(&mut self, idx: u32, punch_instead_of_zero: bool) -> io_uring::squeue::Entry {
        let fd = self.fd();
        let bs = self.block_size;
        let slot = &mut self.slots[idx as usize];
        let io = slot.io.as_mut().expect("an occupied slot");
        let offset = io.offset_blocks * bs;
        let len = io.num_blocks * bs;
        slot.len = len;
        let entry = match io.io_type {
            IoType::Read | IoType::Write if io.bufs.len() == 1 => {
                let b = &mut io.bufs[0];
                // A DmaBuf is at most 4 MiB, so its length fits.
                let n = b.len() as u32;
                if io.io_type == IoType::Read {
                    opcode::Read::new(fd, read_ptr(b), n).offset(offset).build()
                } else {
                    opcode::Write::new(fd, b.as_ptr(), n).offset(offset).build()
                }
            }
            IoType::Read | IoType::Write => {
                slot.iov.clear();
                let read = io.io_type == IoType::Read;
                slot.iov.extend(io.bufs.iter_mut().map(|b| {
                    libc::iovec {
                        iov_base: if read {
                            read_ptr(b)
                        } else {
                            b.as_ptr().cast_mut()
                        }
                        .cast(),
                        iov_len: b.len(),
                    }
                }));
                let (ptr, n) = (slot.iov.as_ptr(), slot.iov.len() as u32);
                if io.io_type == IoType::Read {
                    opcode::Readv::new(fd, ptr, n).offset(offset).build()
                } else {
                    opcode::Writev::new(fd, ptr, n).offset(offset).build()
                }
            }
            // Durable data is what a flush promises; fdatasync skips unrelated metadata.
            IoType::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoType::Unmap => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoType::WriteZeroes if punch_instead_of_zero => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoType::WriteZeroes => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoType::Reset => unreachable!("reset completes without the kernel"),
        };
        entry.user_data(idx as u64)
    }

    /// Queues slot `idx`'s entry; false when the submission ring is full.
    fn push(&mut self, idx: u32, punch_instead_of_zero: bool) -> bool {
        let entry = self.entry(idx, punch_instead_of_zero);
        // SAFETY: every pointer in the entry (buffers, iovecs) lives in slot `idx`, which is
        // neither reused nor dropped until this entry's completion has been reaped (see Drop).
        unsafe { self.ring.submission().push(&entry).is_ok() }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Pushes queued entries to the kernel: one syscall for everything since the last poll.
    fn flush_submissions(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {}
            // The kernel is short of resources or has too many completions pending: the entries
            // stay queued and go with the next poll.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => {
                if !self.submit_warned {
                    self.submit_warned = true;
                    crate::log_limited!(
                        WARN,
                        "io_uring submit failed: {e}; retrying on the next poll"
                    );
                }
            }
        }
    }

    /// Turns every available completion into an `IoCompletion`; returns how many.
    fn reap(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let idx = cqe.user_data() as u32;
            let res = cqe.result();
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            let Some(io) = slot.io.take() else {
                continue;
            };
            let status = if res < 0 {
                IoStatus::IoError(-res)
            } else if io.io_type.has_data() && res as u64 != slot.len {
                // A short transfer: the file shrank under us, or the device ended early.
                IoStatus::IoError(libc::EIO)
            } else {
                IoStatus::Success
            };
            if io.io_type == IoType::WriteZeroes && res == -libc::EOPNOTSUPP && !self.block_device {
                // tmpfs and others punch holes but cannot zero a range: a hole reads as zeroes.
                slot.io = Some(io);
                self.retry.push(idx);
                continue;
            }
            self.free.push(idx);
            n += 1;
            done(io.complete(status));
        }
        drop(cq);
        while let Some(idx) = self.retry.pop() {
            if !self.push(idx, true) {
                // Cannot happen (a slot frees its entry before it retries), but never leak an I/O.
                let io = self.slots[idx as usize].io.take().expect("a retried slot");
                self.free.push(idx);
                n += 1;
                done(io.complete(IoStatus::IoError(libc::EAGAIN)));
            }
        }
        n
    }
}

impl BdevChannel for UringChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), BdevIo> {
        if io.io_type == IoType::Reset {
            // Nothing is queued inside plexd and the kernel cannot abort file I/O: done.
            self.ready.push(io.complete(IoStatus::Success));
            return Ok(());
        }
        // The kernel writes a read's data through a raw pointer: only into buffers no other
        // view shares (see `read_ptr`).
        let read_only = io.io_type == IoType::Read && io.bufs.iter().any(|b| !b.is_writable());
        if io.bufs.len() > IOV_MAX || read_only {
            self.ready.push(io.complete(IoStatus::InvalidBuffer));
            return Ok(());
        }
        let Some(idx) = self.free.pop() else {
            return Err(io);
        };
        self.slots[idx as usize].io = Some(io);
        if !self.push(idx, false) {
            let io = self.slots[idx as usize].io.take().expect("just stored");
            self.free.push(idx);
            return Err(io);
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut n = self.ready.drain(done);
        self.flush_submissions();
        n += self.reap(done);
        // Retried write-zeroes are queued now; send them without waiting for the next poll.
        self.flush_submissions();
        n
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // The kernel may still be writing into buffers of I/O in flight: wait for it before
        // the buffers go back to the pool.
        let mut discard = |_c: IoCompletion| {};
        while self.in_flight() > 0 {
            self.reap(&mut discard);
            if self.in_flight() == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(
                        "io_uring wait failed with {} I/O in flight: {e}; leaking their buffers",
                        self.in_flight()
                    );
                    for s in self.slots.iter_mut() {
                        if let Some(io) = s.io.take() {
                            std::mem::forget(io);
                        }
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{buf, run_io};
    use super::*;

    /// A temporary directory on a real disk filesystem (O_DIRECT works there; tmpfs may not).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("plexd-uring-")
            .tempdir_in("/var/tmp")
            .expect("a temp dir in /var/tmp")
    }

    fn file_of(dir: &Path, len: u64) -> PathBuf {
        let p = dir.join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    fn uring(reg: &BdevRegistry, path: &Path, bs: Option<u32>) -> Arc<BdevEntry> {
        let b = UringBdev::open("u0".into(), path, bs, Uuid::new_v4()).unwrap();
        reg.register(Arc::new(b)).unwrap()
    }

    #[test]
    fn write_then_read_back_through_the_file() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 1 << 20);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, Some(4096));
        assert_eq!(e.info().num_blocks(), 256);
        assert_eq!(e.info().required_alignment, 4096);
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::write(3, 2, buf(8192, 0xa5), 1));
        assert_eq!((c.tag, c.status), (1, IoStatus::Success));
        let c = run_io(&mut ch, BdevIo::read(3, 2, buf(8192, 0), 2));
        assert_eq!(c.status, IoStatus::Success);
        assert!(c.bufs[0].iter().all(|&b| b == 0xa5));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[3 * 4096..5 * 4096].iter().all(|&b| b == 0xa5));
        assert!(on_disk[..3 * 4096].iter().all(|&b| b == 0));
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Flush, 0, 0, 3));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Reset, 0, 0, 4));
        assert_eq!(c.status, IoStatus::Success);
        let s = e.io_stats();
        assert_eq!(s.num_flush_ops.load(Ordering::Relaxed), 1);
        assert_eq!(s.bytes_read.load(Ordering::Relaxed), 8192);
    }

    #[test]
    fn vectored_io_spans_buffers_in_order() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 64 * 512);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, None);
        assert_eq!(e.info().block_size, 512);
        let mut ch = e.open_channel().unwrap();
        let mut bufs = buf(512, 1);
        bufs.extend(buf(1024, 2));
        bufs.extend(buf(512, 3));
        let c = run_io(&mut ch, BdevIo::write(4, 4, bufs, 1));
        assert_eq!(c.status, IoStatus::Success);
        let mut rbufs = buf(1024, 0);
        rbufs.extend(buf(1024, 0));
        let c = run_io(&mut ch, BdevIo::read(4, 4, rbufs, 2));
        assert_eq!(c.status, IoStatus::Success);
        assert!(c.bufs[0][..512].iter().all(|&b| b == 1));
        assert!(c.bufs[0][512..].iter().all(|&b| b == 2));
        assert!(c.bufs[1][..512].iter().all(|&b| b == 2));
        assert!(c.bufs[1][512..].iter().all(|&b| b == 3));
    }

    #[test]
    fn unmap_and_write_zeroes_read_back_zero() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 16 * 4096);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, Some(4096));
        let mut ch = e.open_channel().unwrap();
        run_io(&mut ch, BdevIo::write(0, 4, buf(16384, 7), 1));
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Unmap, 1, 1, 2));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::WriteZeroes, 3, 1, 3));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::read(0, 4, buf(16384, 9), 4));
        let blocks: Vec<u8> = c.bufs[0].chunks(4096).map(|b| b[0]).collect();
        assert_eq!(blocks, vec![7, 0, 7, 0]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * 4096);
    }

    #[test]
    fn out_of_range_and_bad_buffers_are_errors() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 16 * 512);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, None);
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::read(15, 2, buf(1024, 0), 1));
        assert_eq!(c.status, IoStatus::OutOfRange);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Unmap, 16, 1, 2));
        assert_eq!(c.status, IoStatus::OutOfRange);
        let c = run_io(&mut ch, BdevIo::write(0, 2, buf(512, 0), 3));
        assert_eq!(c.status, IoStatus::InvalidBuffer);
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn a_shrunk_file_gives_an_io_error_not_a_panic() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 16 * 512);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, None);
        let mut ch = e.open_channel().unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 * 512)
            .unwrap();
        let c = run_io(&mut ch, BdevIo::read(12, 1, buf(512, 0), 1));
        assert_eq!(c.status, IoStatus::IoError(libc::EIO));
    }

    #[test]
    fn queue_depth_64_in_flight() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 64 * 4096);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, Some(4096));
        let mut ch = e.open_channel().unwrap();
        let drain = |ch: &mut IoChannel, want: usize| {
            let mut got = Vec::new();
            for _ in 0..1_000_000 {
                ch.poll(&mut |c| got.push(c));
                if got.len() == want {
                    break;
                }
                std::thread::yield_now();
            }
            got
        };
        for i in 0..64u64 {
            ch.submit(BdevIo::write(i, 1, buf(4096, i as u8 + 1), i))
                .expect("room for 64");
        }
        assert_eq!(ch.in_flight(), 64);
        let got = drain(&mut ch, 64);
        assert_eq!(got.len(), 64);
        assert!(got.iter().all(|c| c.status.is_ok()));
        for i in 0..64u64 {
            ch.submit(BdevIo::read(i, 1, buf(4096, 0), 100 + i))
                .expect("room for 64");
        }
        let got = drain(&mut ch, 64);
        assert_eq!(got.len(), 64);
        for c in got {
            let i = c.tag - 100;
            assert_eq!(c.status, IoStatus::Success);
            assert!(c.bufs[0].iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
    }

    #[test]
    fn a_full_channel_hands_io_back() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 4096);
        let reg = BdevRegistry::default();
        let e = uring(&reg, &path, None);
        let mut ch = e.open_channel().unwrap();
        let mut refused = None;
        for i in 0..=QUEUE_DEPTH as u64 {
            if let Err(io) = ch.submit(BdevIo::no_data(IoType::Flush, 0, 0, i)) {
                refused = Some(io.tag);
                break;
            }
        }
        assert_eq!(refused, Some(QUEUE_DEPTH as u64));
        drop(ch); // waits for the kernel to finish every flush
    }

    #[test]
    fn geometry_is_checked() {
        let dir = disk_dir();
        let open = |len: u64, bs: Option<u32>| {
            let p = file_of(dir.path(), len);
            UringBdev::open("x".into(), &p, bs, Uuid::new_v4())
        };
        assert!(open(0, None).is_err(), "empty file");
        assert!(open(4096 + 512, Some(4096)).is_err(), "not a multiple");
        assert!(open(4096, Some(1000)).is_err(), "odd block size");
        assert!(open(4096, Some(4096)).is_ok());
        assert!(UringBdev::open("x".into(), dir.path(), None, Uuid::new_v4()).is_err());
        assert!(UringBdev::open(
            "x".into(),
            &dir.path().join("missing"),
            None,
            Uuid::new_v4()
        )
        .is_err());
    }

    /// A loop device over a file, detached when dropped.
    struct Loop(String);

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    /// The block device path: geometry from the ioctls, exclusive open, discard and zeroing.
    /// Ignored by default (counted as such); `cargo test -- --include-ignored` runs it as root,
    /// where a missing loop device is a failure.
    #[test]
    #[ignore = "needs root: losetup for a loop block device"]
    fn block_device_through_a_loop_device() {
        let dir = disk_dir();
        let path = file_of(dir.path(), 8 << 20);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(&path)
            .output()
            .expect("losetup runs (util-linux installed)");
        assert!(
            out.status.success(),
            "losetup could not attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let _detach = Loop(dev.clone());
        let dev = Path::new(&dev);
        assert!(
            UringBdev::open("b".into(), dev, Some(512), Uuid::new_v4()).is_err(),
            "a block smaller than the device's logical block"
        );
        let b = UringBdev::open("b0".into(), dev, None, Uuid::new_v4()).unwrap();
        assert_eq!((b.info().block_size, b.info().num_blocks()), (4096, 2048));
        assert_eq!(b.driver_specific()["block_device"], true);
        assert!(
            UringBdev::open("b1".into(), dev, None, Uuid::new_v4()).is_err(),
            "O_EXCL: one user at a time"
        );
        let reg = BdevRegistry::default();
        let e = reg.register(Arc::new(b)).unwrap();
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::write(2040, 8, buf(8 * 4096, 0x3c), 1));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Unmap, 2041, 1, 2));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::WriteZeroes, 2043, 2, 3));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::no_data(IoType::Flush, 0, 0, 4));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::read(2040, 8, buf(8 * 4096, 0xff), 5));
        assert_eq!(c.status, IoStatus::Success);
        let firsts: Vec<u8> = c.bufs[0].chunks(4096).map(|b| b[0]).collect();
        assert_eq!(firsts, [0x3c, 0, 0x3c, 0, 0, 0x3c, 0x3c, 0x3c]);
    }

    /// On a filesystem that refuses O_DIRECT at open (tmpfs before Linux 6.6), we fall back to
    /// buffered I/O and say so. The opener plays that filesystem; the file is on /dev/shm.
    #[test]
    fn buffered_fallback_on_dev_shm() {
        let dir = tempfile::Builder::new()
            .prefix("plexd-uring-")
            .tempdir_in("/dev/shm")
            .expect("a temp dir in /dev/shm");
        let path = file_of(dir.path(), 8 * 4096);
        let no_direct = |p: &Path, flags: i32| {
            if flags & libc::O_DIRECT != 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(p)
        };
        let b = UringBdev::open_with("s0".into(), &path, Some(4096), Uuid::new_v4(), &no_direct)
            .unwrap();
        assert!(!b.is_direct());
        assert_eq!(b.driver_specific()["direct_io"], false);
        assert!(b.driver_specific()["note"].is_string());
        let reg = BdevRegistry::default();
        let e = reg.register(Arc::new(b)).unwrap();
        let mut ch = e.open_channel().unwrap();
        run_io(&mut ch, BdevIo::write(0, 2, buf(8192, 3), 1));
        // tmpfs has no ZERO_RANGE: write zeroes falls back to punching a hole.
        let c = run_io(&mut ch, BdevIo::no_data(IoType::WriteZeroes, 1, 1, 2));
        assert_eq!(c.status, IoStatus::Success);
        let c = run_io(&mut ch, BdevIo::read(0, 2, buf(8192, 9), 3));
        assert!(c.bufs[0][..4096].iter().all(|&b| b == 3));
        assert!(c.bufs[0][4096..].iter().all(|&b| b == 0));
        // And the real open on /dev/shm works one way or the other.
        let real = UringBdev::open("s1".into(), &path, Some(4096), Uuid::new_v4()).unwrap();
        let e = reg.register(Arc::new(real)).unwrap();
        let mut ch = e.open_channel().unwrap();
        let c = run_io(&mut ch, BdevIo::read(0, 1, buf(4096, 9), 4));
        assert_eq!(c.status, IoStatus::Success);
        assert!(c.bufs[0].iter().all(|&b| b == 3));
    }
}
