//! Sending: responses queued as `OutPdu`s and written with as few `writev`s as the socket
//! allows; and what the transport-neutral queue asks of TCP (R2T, C2HData, responses).

use super::*;

impl Conn {
    /// Queues a PDU whose first 24 bytes are a header needing the header digest if enabled.
    fn push_out(&mut self, mut p: OutPdu) {
        if self.t.hdgst && p.hlen == 24 {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            p.hlen = 28;
        }
        self.t.out.push_back(p);
    }

    /// Writes queued PDUs with as few writev calls as the socket allows.
    pub(super) fn flush(&mut self) -> std::io::Result<bool> {
        let mut busy = false;
        while self.t.tx_ready && !self.t.out.is_empty() {
            // Filled from the front; only the first `n` are passed to the kernel, so the
            // rest need no zeroing on every flush.
            let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MAX_IOV];
            let mut n = 0;
            for p in self.t.out.iter() {
                if n + 3 > MAX_IOV {
                    break;
                }
                let mut pos = p.sent as usize;
                let hl = usize::from(p.hlen);
                if pos < hl {
                    iov[n].write(libc::iovec {
                        iov_base: p.hdr[pos..hl].as_ptr() as *mut libc::c_void,
                        iov_len: hl - pos,
                    });
                    n += 1;
                    pos = hl;
                }
                let dl = p.data_len as usize;
                if dl > 0 && pos < hl + dl {
                    let b = self.slots[p.slot as usize]
                        .buf
                        .as_ref()
                        .expect("a queued data PDU keeps its buffer");
                    let o = pos - hl;
                    iov[n].write(libc::iovec {
                        iov_base: b[o..dl].as_ptr() as *mut libc::c_void,
                        iov_len: dl - o,
                    });
                    n += 1;
                    pos = hl + dl;
                }
                let gl = usize::from(p.dlen);
                if gl > 0 && pos < hl + dl + gl {
                    let o = pos - hl - dl;
                    iov[n].write(libc::iovec {
                        iov_base: p.ddgst[o..gl].as_ptr() as *mut libc::c_void,
                        iov_len: gl - o,
                    });
                    n += 1;
                }
            }
            // SAFETY: the first `n` iovecs were written above; each points into memory owned
            // by `self.t.out` or by the slots' buffers, which are not touched until writev
            // returns.
            let r =
                unsafe { libc::writev(self.t.fd, iov.as_ptr().cast::<libc::iovec>(), n as i32) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => {
                        self.t.tx_ready = false;
                        break;
                    }
                    ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            busy = true;
            self.t.last_tx_ms = controller::now_ms();
            let mut left = r as u32;
            while left > 0 {
                let Some(p) = self.t.out.front_mut() else {
                    break;
                };
                let rem = p.total() - p.sent;
                if left >= rem {
                    left -= rem;
                    let (slot, free) = (p.slot, p.free_slot);
                    self.t.out.pop_front();
                    if free {
                        self.free_slot(slot);
                    }
                } else {
                    p.sent += left;
                    left = 0;
                }
            }
            // Completed PDUs with zero remaining (should not happen) are popped next pass.
            while self.t.out.front().is_some_and(|p| p.sent == p.total()) {
                let p = self.t.out.pop_front().expect("front exists");
                if p.free_slot {
                    self.free_slot(p.slot);
                }
            }
        }
        Ok(busy)
    }
}

impl Transport for Tcp {
    const NAME: &'static str = "nvmf/tcp";

    fn digests(&self) -> (bool, bool) {
        (self.hdgst, self.ddgst)
    }

    fn fetch_data(q: &mut Conn, si: u16) {
        let s = &q.slots[si as usize];
        let r2t = R2T::new(s.cmd.cid(), si, 0, s.xfer_len, q.t.hdgst);
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(r2t.as_bytes());
        p.hlen = 24;
        q.push_out(p);
    }

    fn respond(q: &mut Conn, si: u16, cqe: Completion, with_data: bool) {
        if !with_data {
            q.free_slot(si);
            return Self::send_cqe(q, cqe);
        }
        let s = &mut q.slots[si as usize];
        let len = s.xfer_len;
        let cid = cqe.cid.get();
        // The SUCCESS flag saves the response PDU; it cannot carry a result.
        let success_flag = q.opts.c2h_success && cqe.result.get() == 0 && cqe.dw1.get() == 0;
        let (hdgst, ddgst) = (q.t.hdgst, q.t.ddgst);
        let Some(h) = C2HData::new(cid, 0, len, true, success_flag, hdgst, ddgst, q.t.hpda) else {
            q.free_slot(si);
            let mut cqe = cqe;
            cqe.set_status(Status::INTERNAL);
            cqe.result.set(0);
            return Self::send_cqe(q, cqe);
        };
        s.state = SlotState::Sending;
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(h.as_bytes());
        let mut hl = 24;
        if hdgst {
            let d = header_digest(&p.hdr[..24]);
            p.hdr[24..28].copy_from_slice(&d.to_le_bytes());
            hl = 28;
        }
        // Padding up to PDO (zeros already).
        let pdo = usize::from(h.ch.pdo).max(hl);
        p.hlen = pdo as u16;
        p.slot = si;
        p.data_len = len;
        if ddgst {
            let b = s.buf.as_ref().expect("checked");
            let d = crc32c::crc32c(&b[..len as usize]);
            p.ddgst = d.to_le_bytes();
            p.dlen = 4;
        }
        if success_flag {
            p.free_slot = true;
            q.t.out.push_back(p);
        } else {
            q.t.out.push_back(p);
            // The data PDU still references the slot; free it after the response is sent.
            let r = CapsuleResp::new(cqe, hdgst);
            let mut r_pdu = OutPdu::empty();
            r_pdu.hdr[..24].copy_from_slice(r.as_bytes());
            r_pdu.hlen = 24;
            r_pdu.slot = si;
            r_pdu.free_slot = true;
            q.push_out(r_pdu);
        }
    }

    fn send_cqe(q: &mut Conn, cqe: Completion) {
        let r = CapsuleResp::new(cqe, q.t.hdgst);
        let mut p = OutPdu::empty();
        p.hdr[..24].copy_from_slice(r.as_bytes());
        p.hlen = 24;
        q.push_out(p);
    }

    fn close(q: &mut Conn) {
        q.close();
    }
}
