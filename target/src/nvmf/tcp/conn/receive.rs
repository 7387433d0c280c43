//! Receiving: the socket read into `rbuf`, PDUs parsed from it, their data placed in the
//! commands' buffers, and the commands handed to the queue.

use super::*;

impl Conn {
    /// Gives the connection a receive buffer before a read: a spare one of this reactor's
    /// if there is one.
    fn take_rbuf(&mut self) {
        if self.t.rbuf.is_empty() {
            self.t.rbuf = SPARE_RBUFS
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| vec![0u8; RBUF_LEN].into_boxed_slice());
        }
    }

    /// Gives the receive buffer back while the connection has nothing buffered and nothing
    /// to read, so an idle connection holds none.
    pub(super) fn release_rbuf(&mut self) {
        if self.t.rbuf.is_empty()
            || self.t.rx_ready
            || self.t.rpos != self.t.rlen
            || !matches!(self.t.rx, Rx::Header)
        {
            return;
        }
        let b = std::mem::take(&mut self.t.rbuf);
        self.t.rpos = 0;
        self.t.rlen = 0;
        SPARE_RBUFS.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_RBUFS_MAX {
                s.push(b);
            }
        });
    }

    /// Reads more bytes into `rbuf` so that at least `need` are available from `rpos`.
    /// Returns false when the socket has nothing now.
    fn fill(&mut self, need: usize) -> Result<bool, Fatal> {
        if !self.t.rx_ready {
            return Ok(false);
        }
        self.take_rbuf();
        if self.t.rpos == self.t.rlen {
            self.t.rpos = 0;
            self.t.rlen = 0;
        } else if self.t.rbuf.len() - self.t.rpos < need {
            self.t.rbuf.copy_within(self.t.rpos..self.t.rlen, 0);
            self.t.rlen -= self.t.rpos;
            self.t.rpos = 0;
        }
        let room = self.t.rbuf.len() - self.t.rlen;
        match self.t.sock.read(&mut self.t.rbuf[self.t.rlen..]) {
            Ok(0) => Err(Fatal::Gone),
            Ok(n) => {
                // A short read emptied the socket: the next byte to arrive raises a new
                // edge, so no read that would only say EAGAIN is needed.
                if n < room {
                    self.t.rx_ready = false;
                }
                self.t.rlen += n;
                self.t.last_rx_ms = controller::now_ms();
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.t.rx_ready = false;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(_) => Err(Fatal::Gone),
        }
    }

    pub(super) fn poll_rx(&mut self) -> Result<bool, Fatal> {
        let mut busy = false;
        for _ in 0..RX_BUDGET {
            match self.t.rx {
                Rx::Header => {
                    let avail = &self.t.rbuf[self.t.rpos..self.t.rlen];
                    let need = match PduHeader::bytes_needed(avail, &self.t.popts) {
                        Ok(n) => n,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    if avail.len() < need {
                        if !self.fill(need)? {
                            break;
                        }
                        continue;
                    }
                    let hdr = match PduHeader::parse(avail, &self.t.popts) {
                        Ok(h) => h,
                        Err(e) => return Err(self.pdu_error(&e)),
                    };
                    let hl = hdr.header_len().min(128).min(avail.len());
                    self.t.cur_hdr[..hl].copy_from_slice(&avail[..hl]);
                    self.t.cur_hdr_len = hl;
                    busy = true;
                    self.handle_pdu(&hdr)?;
                }
                Rx::Data { .. } => {
                    if !self.rx_data()? {
                        break;
                    }
                    busy = true;
                }
                Rx::Digest { slot, crc, kind } => {
                    if self.t.rlen - self.t.rpos < 4 {
                        if !self.fill(4)? {
                            break;
                        }
                        continue;
                    }
                    let d = &self.t.rbuf[self.t.rpos..self.t.rpos + 4];
                    let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    self.t.rpos += 4;
                    self.t.rx = Rx::Header;
                    busy = true;
                    self.data_done(slot, kind, got == crc);
                }
            }
            if self.t.state != State::Ready && self.t.state != State::AwaitIcReq {
                break;
            }
        }
        Ok(busy)
    }

    fn pdu_error(&mut self, e: &PduError) -> Fatal {
        let avail = &self.t.rbuf[self.t.rpos..self.t.rlen];
        let n = avail.len().min(128);
        self.t.cur_hdr[..n].copy_from_slice(&avail[..n]);
        self.t.cur_hdr_len = n;
        match e.fes() {
            Some(f) => Fatal::term(f, e.fei(), e.to_string()),
            None => Fatal::Gone,
        }
    }

    /// Moves PDU data into its slot's buffer. Returns false when the socket is dry.
    fn rx_data(&mut self) -> Result<bool, Fatal> {
        let Rx::Data {
            slot,
            mut off,
            end,
            ddgst,
            mut crc,
            kind,
        } = self.t.rx
        else {
            return Ok(false);
        };
        let mut progressed = false;
        // Bytes already read.
        let have = self.t.rlen - self.t.rpos;
        if have > 0 {
            let n = have.min((end - off) as usize);
            let src = &self.t.rbuf[self.t.rpos..self.t.rpos + n];
            if slot != NO_SLOT {
                if let Some(b) = self.slots[slot as usize].buf.as_mut() {
                    b[off as usize..off as usize + n].copy_from_slice(src);
                }
            }
            if ddgst {
                crc = crc32c::crc32c_append(crc, src);
            }
            self.t.rpos += n;
            off += n as u32;
            progressed = true;
        }
        if off < end && self.t.rpos == self.t.rlen {
            // Straight from the socket into the buffer, and whatever follows into rbuf.
            self.t.rpos = 0;
            self.t.rlen = 0;
            let want = (end - off) as usize;
            let dst: *mut u8 = match self
                .slots
                .get_mut(slot as usize)
                .and_then(|s| s.buf.as_mut())
            {
                Some(b) => b[off as usize..].as_mut_ptr(),
                // Discarding: read into rbuf and drop below.
                None => std::ptr::null_mut(),
            };
            let n = if dst.is_null() {
                match self.fill(1) {
                    Ok(true) => {
                        let n = self.t.rlen.min(want);
                        if ddgst {
                            crc = crc32c::crc32c_append(crc, &self.t.rbuf[..n]);
                        }
                        self.t.rpos = n;
                        n
                    }
                    Ok(false) => 0,
                    Err(e) => return Err(e),
                }
            } else if !self.t.rx_ready {
                0
            } else {
                self.take_rbuf();
                let iov = [
                    libc::iovec {
                        iov_base: dst as *mut libc::c_void,
                        iov_len: want,
                    },
                    libc::iovec {
                        iov_base: self.t.rbuf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: self.t.rbuf.len(),
                    },
                ];
                // SAFETY: both iovecs point into buffers we own mutably (the slot's DmaBuf has
                // at least `off + want` bytes, checked when the transfer was set up) and
                // outlive the call.
                let r = unsafe { libc::readv(self.t.fd, iov.as_ptr(), 2) };
                if r == 0 {
                    return Err(Fatal::Gone);
                }
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == ErrorKind::WouldBlock {
                        self.t.rx_ready = false;
                        0
                    } else if e.kind() == ErrorKind::Interrupted {
                        0
                    } else {
                        return Err(Fatal::Gone);
                    }
                } else {
                    self.t.last_rx_ms = controller::now_ms();
                    let r = r as usize;
                    if r < want + self.t.rbuf.len() {
                        self.t.rx_ready = false; // short: the socket is empty (see `fill`)
                    }
                    let n = r.min(want);
                    if ddgst {
                        if let Some(b) = self.slots[slot as usize].buf.as_ref() {
                            crc = crc32c::crc32c_append(crc, &b[off as usize..off as usize + n]);
                        }
                    }
                    self.t.rlen = r - n;
                    n
                }
            };
            if n > 0 {
                off += n as u32;
                progressed = true;
            }
        }
        if off == end {
            if ddgst {
                self.t.rx = Rx::Digest { slot, crc, kind };
            } else {
                self.t.rx = Rx::Header;
                self.data_done(slot, kind, true);
            }
            return Ok(true);
        }
        self.t.rx = Rx::Data {
            slot,
            off,
            end,
            ddgst,
            crc,
            kind,
        };
        Ok(progressed)
    }

    /// A PDU's data has fully arrived (and its digest matched if `digest_ok`).
    fn data_done(&mut self, slot: u16, kind: DataKind, digest_ok: bool) {
        if slot == NO_SLOT {
            return;
        }
        let si = slot;
        if !digest_ok {
            crate::log_limited!(
                WARN,
                "nvmf/tcp {}: data digest mismatch in {} data of cid {}; failing the command",
                self.peer,
                if kind == DataKind::H2C {
                    "H2CData"
                } else {
                    "in-capsule"
                },
                self.slots[si as usize].cmd.cid()
            );
            // The PDU framing is intact, so this is not fatal to the connection (the spec has no
            // FES for it): as SPDK does, the command fails with a transport error the host may
            // retry, and its data never reaches the bdev. The status is held until the rest of
            // the transfer has arrived, so later H2CData PDUs of this command still find it.
            self.slots[si as usize].status = Status::TRANSIENT_TRANSPORT_ERROR;
        }
        let s = &self.slots[si as usize];
        if kind == DataKind::H2C && s.recvd < s.xfer_len {
            self.await_data(si);
            return;
        }
        self.data_arrived(si);
    }

    fn handle_pdu(&mut self, hdr: &PduHeader) -> Result<(), Fatal> {
        let hlen = hdr.header_len();
        match (self.t.state, hdr.body) {
            (State::AwaitIcReq, PduBody::IcReq(req)) => {
                self.t.rpos += hdr.plen() as usize;
                self.t.hpda = req.hpda;
                self.t.hdgst = req.hdgst();
                self.t.ddgst = req.ddgst();
                let resp = IcResp::new(0, self.t.hdgst, self.t.ddgst, self.opts.max_h2c_data());
                let mut p = OutPdu::empty();
                p.hdr[..128].copy_from_slice(resp.as_bytes());
                p.hlen = 128;
                self.t.out.push_back(p);
                self.t.popts = ParseOptions {
                    receiver: Role::Controller,
                    hdgst: self.t.hdgst,
                    ddgst: self.t.ddgst,
                    pda: 0,
                    max_h2c_data: self.opts.max_h2c_data(),
                    max_in_capsule_data: self.opts.in_capsule_data_size,
                };
                self.t.state = State::Ready;
                Ok(())
            }
            (_, PduBody::TermReq(t)) => {
                tracing::info!(
                    "nvmf/tcp {}: host terminated the connection ({})",
                    self.peer,
                    fes::name(t.fes.get())
                );
                Err(Fatal::Gone)
            }
            (State::Ready, PduBody::CapsuleCmd(c)) => {
                self.t.rpos += hdr.data_offset.max(hlen as u32) as usize;
                if hdr.data_len == 0 {
                    self.t.rpos = self.t.rpos.min(self.t.rlen);
                }
                self.handle_capsule(c.cmd, hdr.data_len, hdr.ddgst);
                Ok(())
            }
            (State::Ready, PduBody::H2CData(d)) => {
                let ttag = d.ttag.get();
                let si = ttag as usize;
                let ok = self.slots.get(si).is_some_and(|s| {
                    s.state == SlotState::AwaitData && s.cmd.cid() == d.cccid.get()
                });
                if !ok {
                    return Err(Fatal::term(
                        fes::INVALID_HEADER_FIELD,
                        10,
                        format!("H2CData for unknown transfer tag {ttag}"),
                    ));
                }
                let s = &mut self.slots[si];
                let datao = d.datao.get();
                let datal = d.datal.get();
                if datao != s.recvd || u64::from(datao) + u64::from(datal) > u64::from(s.xfer_len) {
                    return Err(Fatal::term(
                        fes::DATA_OUT_OF_RANGE,
                        0,
                        format!(
                            "H2CData offset {datao} length {datal} outside the {}-byte transfer",
                            s.xfer_len
                        ),
                    ));
                }
                s.recvd += datal;
                s.state = SlotState::RecvData;
                self.awaiting_data -= 1;
                self.t.rpos += hdr.data_offset.max(hlen as u32) as usize;
                self.t.rx = Rx::Data {
                    slot: ttag,
                    off: datao,
                    end: datao + datal,
                    ddgst: hdr.ddgst,
                    crc: 0,
                    kind: DataKind::H2C,
                };
                if datal == 0 {
                    self.t.rx = Rx::Header;
                    self.data_done(ttag, DataKind::H2C, true);
                }
                Ok(())
            }
            (st, _) => Err(Fatal::term(
                fes::PDU_SEQUENCE_ERROR,
                0,
                format!(
                    "{} PDU not expected {}",
                    hdr.pdu_type.name(),
                    if st == State::AwaitIcReq {
                        "before ICReq"
                    } else {
                        "now"
                    }
                ),
            )),
        }
    }

    // ---- commands ----

    fn handle_capsule(&mut self, cmd: Command, data_len: u32, ddgst: bool) {
        let Some(si) = self.take_slot(cmd) else {
            self.discard(data_len, ddgst);
            return;
        };
        let sgl = cmd.sgl1();
        let mut refused = None;
        let xfer_len = if data_len > 0 {
            if sgl.desc_type() != sgl_type::DATA_BLOCK || sgl.subtype() != sgl_subtype::OFFSET {
                refused = Some(Status::SGL_INVALID_TYPE);
            } else if sgl.addr() != 0 {
                refused = Some(Status::SGL_INVALID_OFFSET);
            } else if sgl.len() != data_len {
                refused = Some(Status::SGL_INVALID_DATA_LENGTH);
            }
            data_len
        } else {
            let len = sgl.len();
            if len > 0
                && (sgl.desc_type() != sgl_type::TRANSPORT_DATA_BLOCK
                    || sgl.subtype() != sgl_subtype::TRANSPORT_A)
            {
                refused = Some(Status::SGL_INVALID_TYPE);
            }
            len
        };
        if self.start_command(si, xfer_len, data_len > 0, refused) {
            self.t.rx = Rx::Data {
                slot: si,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        } else {
            self.discard(data_len, ddgst);
        }
    }

    /// Skips `data_len` bytes of PDU data (and its digest) that no command wants.
    fn discard(&mut self, data_len: u32, ddgst: bool) {
        if data_len > 0 {
            self.t.rx = Rx::Data {
                slot: NO_SLOT,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        }
    }
}
