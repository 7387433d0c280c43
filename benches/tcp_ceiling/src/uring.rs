//! The target side over io_uring: a single-shot or a multishot recv into provided buffers,
//! sends as SQEs (`--target-io uring`, `uring-multishot`).

use super::*;

const RECV_TAG: u64 = 1;
const BUF_GROUP: u16 = 0;
const PROVIDED_BUFS: u16 = 64;
const PROVIDED_BUF_LEN: usize = 64 << 10;

/// A ring of provided buffers for multishot recv: the kernel takes one per completion, and we
/// give it back once its bytes are counted.
struct ProvidedBufs {
    ring: *mut io_uring::types::BufRingEntry,
    ring_len: usize,
    bufs: Vec<u8>,
    tail: u16,
}

impl ProvidedBufs {
    fn register(uring: &io_uring::IoUring) -> io::Result<ProvidedBufs> {
        let ring_len =
            usize::from(PROVIDED_BUFS) * std::mem::size_of::<io_uring::types::BufRingEntry>();
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut p = ProvidedBufs {
            ring: ring.cast(),
            ring_len,
            bufs: vec![0u8; usize::from(PROVIDED_BUFS) * PROVIDED_BUF_LEN],
            tail: 0,
        };
        // SAFETY: the ring is page-aligned memory that outlives the registration (the
        // io_uring is dropped before `p` in `target_uring`).
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                ring as u64,
                PROVIDED_BUFS,
                BUF_GROUP,
                0,
            )?
        };
        for bid in 0..PROVIDED_BUFS {
            p.give_back(bid);
        }
        Ok(p)
    }

    fn take(&self, bid: u16, n: usize) -> &[u8] {
        let at = usize::from(bid) * PROVIDED_BUF_LEN;
        &self.bufs[at..at + n.min(PROVIDED_BUF_LEN)]
    }

    fn give_back(&mut self, bid: u16) {
        let at = usize::from(bid) * PROVIDED_BUF_LEN;
        let slot = usize::from(self.tail & (PROVIDED_BUFS - 1));
        // SAFETY: `slot` is inside the ring's PROVIDED_BUFS entries; the kernel reads only
        // entries behind the tail, which is published after the entry is written.
        unsafe {
            let e = &mut *self.ring.add(slot);
            e.set_addr(self.bufs[at..].as_ptr() as u64);
            e.set_len(PROVIDED_BUF_LEN as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = io_uring::types::BufRingEntry::tail(self.ring)
                as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for ProvidedBufs {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `register`, no longer registered.
        unsafe { libc::munmap(self.ring.cast(), self.ring_len) };
    }
}
/// IORING_ENTER_GETEVENTS: run the deferred task work, which completes the recv.
const ENTER_GETEVENTS: u32 = 1;
const SEND_TAG: u64 = 2;

/// The target over io_uring: one recv and one writev in flight at most, submitted together
/// with the completions' task work in one io_uring_enter per pass, and no enter at all while
/// nothing is due (DEFER_TASKRUN with the task-run flag says when the kernel holds news).
pub(crate) fn target_uring(stream: TcpStream, job: &Job, side: &mut TargetSide) -> io::Result<()> {
    // io_uring honours O_NONBLOCK by failing with EAGAIN; blocking sockets let it wait for
    // data itself.
    stream.set_nonblocking(false)?;
    let fd = stream.as_raw_fd();
    let mut ring: io_uring::IoUring = io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(8)?;
    let mut provided = if job.target_io == TargetIo::UringMultishot {
        Some(ProvidedBufs::register(&ring)?)
    } else {
        None
    };
    let (mut recv_armed, mut send_armed) = (false, false);
    loop {
        let mut to_submit = 0;
        if !recv_armed {
            let e = match &provided {
                Some(_) => io_uring::opcode::RecvMulti::new(io_uring::types::Fd(fd), BUF_GROUP)
                    .build()
                    .user_data(RECV_TAG),
                None => io_uring::opcode::Recv::new(
                    io_uring::types::Fd(fd),
                    side.buf.as_mut_ptr(),
                    side.buf.len() as u32,
                )
                .build()
                .user_data(RECV_TAG),
            };
            // SAFETY: `side.buf` is neither moved nor touched until this recv completes.
            unsafe { ring.submission().push(&e) }.map_err(|_| io::Error::other("ring full"))?;
            recv_armed = true;
            to_submit += 1;
        }
        if !send_armed && side.out.prepare() {
            let e = io_uring::opcode::Writev::new(
                io_uring::types::Fd(fd),
                side.out.iov.as_ptr(),
                side.out.iov.len() as u32,
            )
            .build()
            .user_data(SEND_TAG);
            // SAFETY: the iovecs and what they point at stay unchanged until it completes.
            unsafe { ring.submission().push(&e) }.map_err(|_| io::Error::other("ring full"))?;
            send_armed = true;
            to_submit += 1;
        }
        let news = ring.submission().taskrun() || !ring.completion().is_empty();
        if to_submit > 0 || news {
            // SAFETY: no timeout argument is passed.
            unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(to_submit, 0, ENTER_GETEVENTS, None)
            }?;
        }
        let mut closed = false;
        for cqe in ring.completion() {
            let res = cqe.result();
            match cqe.user_data() {
                RECV_TAG => {
                    let flags = cqe.flags();
                    recv_armed = provided.is_some() && io_uring::cqueue::more(flags);
                    match res {
                        0 => closed = true,
                        n if n > 0 => match (&mut provided, io_uring::cqueue::buffer_select(flags))
                        {
                            (Some(p), Some(bid)) => {
                                side.out.queued += side.framer.feed(p.take(bid, n as usize));
                                p.give_back(bid);
                            }
                            _ => side.received(n as usize),
                        },
                        e if -e == libc::ENOBUFS => {}
                        e if -e == libc::ECONNRESET => closed = true,
                        e => return Err(io::Error::from_raw_os_error(-e)),
                    }
                }
                _ => {
                    send_armed = false;
                    if res < 0 {
                        return Err(io::Error::from_raw_os_error(-res));
                    }
                    side.out.advance(res as usize);
                }
            }
        }
        if closed {
            break;
        }
        side.follow(job);
    }
    // The ring first: no recv may still write into the provided buffers once they go.
    drop(ring);
    drop(provided);
    Ok(())
}
