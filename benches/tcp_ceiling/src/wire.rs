//! NVMe/TCP's PDU shapes as the ceiling puts them on the wire: headers with the right sizes
//! and types, the messages of one I/O, counting whole messages in a byte stream, and sending
//! queued messages in few writev calls.

use super::*;

const CH_LEN: usize = 8;
const CMD_HLEN: usize = 72;
const C2H_HLEN: usize = 24;
const RESP_LEN: usize = 24;
const PDU_CAPSULE_CMD: u8 = 0x04;
const PDU_CAPSULE_RESP: u8 = 0x05;
const PDU_C2H_DATA: u8 = 0x07;
const C2H_LAST_PDU: u8 = 0x04;
const C2H_SUCCESS: u8 = 0x08;
const IOV_MAX: usize = 1024;

/// An NVMe/TCP PDU header of `hlen` bytes (common header filled in, the rest zero) for a PDU
/// carrying `data_len` bytes of data right after it.
fn pdu_header(pdu_type: u8, flags: u8, hlen: usize, data_len: usize) -> Vec<u8> {
    let mut h = vec![0u8; hlen];
    h[0] = pdu_type;
    h[1] = flags;
    h[2] = hlen as u8;
    h[3] = if data_len > 0 { hlen as u8 } else { 0 };
    h[4..8].copy_from_slice(&((hlen + data_len) as u32).to_le_bytes());
    h
}

/// What one I/O puts on the wire from each side: (host's segments, target's segments).
pub(crate) fn messages(
    shape: Shape,
    io_size: usize,
    read_resp: bool,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let data = vec![0x5au8; io_size];
    let resp = pdu_header(PDU_CAPSULE_RESP, 0, RESP_LEN, 0);
    match shape {
        Shape::Read => {
            let cmd = pdu_header(PDU_CAPSULE_CMD, 0, CMD_HLEN, 0);
            let flags = if read_resp {
                C2H_LAST_PDU
            } else {
                C2H_LAST_PDU | C2H_SUCCESS
            };
            let c2h = pdu_header(PDU_C2H_DATA, flags, C2H_HLEN, io_size);
            let mut reply = vec![c2h, data];
            if read_resp {
                reply.push(resp);
            }
            (vec![cmd], reply)
        }
        Shape::Write => {
            let cmd = pdu_header(PDU_CAPSULE_CMD, 0, CMD_HLEN, io_size);
            (vec![cmd, data], vec![resp])
        }
    }
}

/// True for a PDU that ends an I/O on the side receiving it: a command (target side), a
/// response, or C2H data carrying the success flag (host side).
fn ends_io(pdu_type: u8, flags: u8) -> bool {
    pdu_type == PDU_CAPSULE_CMD
        || pdu_type == PDU_CAPSULE_RESP
        || (pdu_type == PDU_C2H_DATA && flags & C2H_SUCCESS != 0)
}

/// Splits the received byte stream into PDUs by their common header's PLEN.
#[derive(Default)]
pub(crate) struct Framer {
    ch: [u8; CH_LEN],
    have: usize,
    rest: usize,
    ends: bool,
}

impl Framer {
    /// Takes received bytes; returns how many I/Os the PDUs they complete ended.
    pub(crate) fn feed(&mut self, mut b: &[u8]) -> usize {
        let mut ios = 0;
        while !b.is_empty() {
            if self.rest == 0 {
                let take = (CH_LEN - self.have).min(b.len());
                self.ch[self.have..self.have + take].copy_from_slice(&b[..take]);
                self.have += take;
                b = &b[take..];
                if self.have < CH_LEN {
                    break;
                }
                self.have = 0;
                let plen = u32::from_le_bytes([self.ch[4], self.ch[5], self.ch[6], self.ch[7]]);
                assert!(plen as usize > CH_LEN, "PDU length {plen} in the stream");
                self.rest = plen as usize - CH_LEN;
                self.ends = ends_io(self.ch[0], self.ch[1]);
            } else {
                let take = self.rest.min(b.len());
                self.rest -= take;
                b = &b[take..];
                if self.rest == 0 && self.ends {
                    ios += 1;
                }
            }
        }
        ios
    }
}

/// Messages due on one side, all of the same shape, sent with writev straight from `segs`.
pub(crate) struct Outbox {
    segs: Vec<Vec<u8>>,
    msg_len: usize,
    /// Whole messages not yet completely sent.
    pub(crate) queued: usize,
    /// Bytes of the first of them already sent.
    off: usize,
    pub(crate) iov: Vec<libc::iovec>,
}

impl Outbox {
    pub(crate) fn new(segs: Vec<Vec<u8>>) -> Outbox {
        let msg_len = segs.iter().map(Vec::len).sum();
        Outbox {
            segs,
            msg_len,
            queued: 0,
            off: 0,
            iov: Vec::with_capacity(IOV_MAX),
        }
    }

    /// Fills `iov` with as much as is due; false when nothing is.
    pub(crate) fn prepare(&mut self) -> bool {
        if self.queued == 0 {
            return false;
        }
        let msgs = (IOV_MAX / self.segs.len()).min(self.queued);
        self.iov.clear();
        let mut skip = self.off;
        for _ in 0..msgs {
            for s in &self.segs {
                if skip >= s.len() {
                    skip -= s.len();
                    continue;
                }
                self.iov.push(libc::iovec {
                    iov_base: s[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: s.len() - skip,
                });
                skip = 0;
            }
        }
        true
    }

    /// Counts `n` bytes of what `prepare` offered as sent.
    pub(crate) fn advance(&mut self, n: usize) {
        let sent = self.off + n;
        self.queued -= sent / self.msg_len;
        self.off = sent % self.msg_len;
    }

    /// One writev of as much as is due; true when it sent anything.
    pub(crate) fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        if !self.prepare() {
            return Ok(false);
        }
        // SAFETY: every iovec points into `self.segs`, alive and unchanged during the call.
        let n = unsafe { libc::writev(fd, self.iov.as_ptr(), self.iov.len() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        self.advance(n as usize);
        Ok(n > 0)
    }
}
