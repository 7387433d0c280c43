//! Receiving: the socket read into the window, PDUs parsed from it, their data lent to their
//! commands or placed in the commands' buffers, and the commands handed to the queue.

use super::*;

impl Conn {
    /// Lets the receive buffer go while the connection has nothing buffered and nothing to
    /// read, so an idle connection holds none.
    pub(super) fn release_rbuf(&mut self) {
        if !self.t.rx_ready && matches!(self.t.rx, Rx::Header) {
            self.t.window.release_if_empty();
        }
    }

    /// Reads more bytes into the window so that at least `need` are unparsed. Returns false
    /// when the socket has nothing now.
    fn fill(&mut self, need: usize) -> Result<bool, Fatal> {
        if !self.t.rx_ready {
            return Ok(false);
        }
        let room = match self.t.window.room(need) {
            Ok(r) => r,
            Err(e) => {
                // The bytes wait in the socket until buffers come back.
                crate::log_limited!(WARN, "nvmf/tcp {}: no receive buffer: {e}", self.peer);
                return Ok(false);
            }
        };
        let room_len = room.len().min(read_limit(self.awaiting_data));
        match self.t.sock.read(&mut room[..room_len]) {
            Ok(0) => Err(Fatal::Gone),
            Ok(n) => {
                // A short read emptied the socket: the next byte to arrive raises a new
                // edge, so no read that would only say EAGAIN is needed.
                if n < room_len {
                    self.t.rx_ready = false;
                }
                self.t.window.filled(n);
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
                    let avail = self.t.window.avail();
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
                    let d = self.t.window.avail();
                    if d.len() < 4 {
                        if !self.fill(4)? {
                            break;
                        }
                        continue;
                    }
                    let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    self.t.window.consume(4);
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
        let avail = self.t.window.avail();
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
        let have = self.t.window.unparsed();
        if have > 0 {
            let n = have.min((end - off) as usize);
            let src = &self.t.window.avail()[..n];
            if let Some(b) = slot_bytes(&mut self.slots, slot) {
                b[off as usize..off as usize + n].copy_from_slice(src);
            }
            if ddgst {
                crc = crc32c::crc32c_append(crc, src);
            }
            self.t.window.consume(n);
            off += n as u32;
            progressed = true;
        }
        if off < end && self.t.window.unparsed() == 0 {
            // Straight from the socket into the buffer, and whatever follows into the window.
            let want = (end - off) as usize;
            let dst: *mut u8 = match slot_bytes(&mut self.slots, slot) {
                Some(b) => b[off as usize..].as_mut_ptr(),
                // Discarding: read into the window and drop below.
                None => std::ptr::null_mut(),
            };
            let n = if dst.is_null() {
                match self.fill(1) {
                    Ok(true) => {
                        let got = self.t.window.avail();
                        let n = got.len().min(want);
                        if ddgst {
                            crc = crc32c::crc32c_append(crc, &got[..n]);
                        }
                        self.t.window.consume(n);
                        n
                    }
                    Ok(false) => 0,
                    Err(e) => return Err(e),
                }
            } else if !self.t.rx_ready {
                0
            } else {
                let limit = read_limit(self.awaiting_data);
                let (room, room_len) = match self.t.window.room(1) {
                    Ok(r) => (r.as_mut_ptr(), r.len().min(limit)),
                    // No window now: the data alone.
                    Err(_) => (std::ptr::null_mut(), 0),
                };
                let iov = [
                    libc::iovec {
                        iov_base: dst as *mut libc::c_void,
                        iov_len: want,
                    },
                    libc::iovec {
                        iov_base: room as *mut libc::c_void,
                        iov_len: room_len,
                    },
                ];
                // SAFETY: both iovecs point into buffers we own mutably (the slot's buffer has
                // at least `off + want` bytes, checked when the transfer was set up; the
                // window's room is its own, never lent) and outlive the call.
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
                    if r < want + room_len {
                        self.t.rx_ready = false; // short: the socket is empty (see `fill`)
                    }
                    let n = r.min(want);
                    if ddgst {
                        if let Some(b) = slot_bytes(&mut self.slots, slot) {
                            crc = crc32c::crc32c_append(crc, &b[off as usize..off as usize + n]);
                        }
                    }
                    self.t.window.filled(r - n);
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
                self.t.window.consume(hdr.plen() as usize);
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
                let at = hdr.data_offset.max(hlen as u32) as usize;
                if hdr.data_len == 0 {
                    self.t.window.consume(at.min(self.t.window.unparsed()));
                } else {
                    self.t.window.consume(at);
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
                self.t
                    .window
                    .consume(hdr.data_offset.max(hlen as u32) as usize);
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
            self.expect_data(NO_SLOT, data_len, ddgst);
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
        // Data that arrived with its capsule is lent to the command as it lies in the window.
        let lent = if data_len > 0 {
            self.t.window.lend(data_len as usize)
        } else {
            None
        };
        let crc = match &lent {
            Some(b) if ddgst => crc32c::crc32c(b),
            _ => 0,
        };
        let lent_data = lent.is_some();
        self.slots[si as usize].buf = lent;
        let started = self.start_command(si, xfer_len, data_len > 0, refused);
        // A refused command's data (what is still to come of it) is skipped.
        let slot = if started { si } else { NO_SLOT };
        let kind = DataKind::Capsule;
        if !lent_data {
            self.expect_data(slot, data_len, ddgst);
        } else if ddgst {
            self.t.rx = Rx::Digest { slot, crc, kind };
        } else {
            self.data_done(slot, kind, true);
        }
    }

    /// The capsule's `data_len` bytes of data (and digest) follow, for `slot`'s buffer
    /// (`NO_SLOT`: skipped, no command wants them).
    fn expect_data(&mut self, slot: u16, data_len: u32, ddgst: bool) {
        if data_len > 0 {
            self.t.rx = Rx::Data {
                slot,
                off: 0,
                end: data_len,
                ddgst,
                crc: 0,
                kind: DataKind::Capsule,
            };
        }
    }
}

/// The bytes of `slot`'s buffer, to place its PDU data in (`None`: discard the data).
fn slot_bytes(slots: &mut [Slot], slot: u16) -> Option<&mut [u8]> {
    slots.get_mut(slot as usize)?.bytes_mut()
}

/// How much a read may bring into the window. While the host owes data for R2Ts, what follows
/// is mostly H2CData, whose data goes to its command's buffer: a read that filled the window
/// would bring most of it there first and copy it again (with 128 KiB writes that copy was an
/// eighth of the reactor). A 32 KiB read takes the next header and some data, and the rest of
/// the data comes straight from the socket into the buffer: 128 KiB writes cost the reactor 9 %
/// less. An 8 KiB read saved a little more of the reactor but lost 7 % of the IOPS (not looked
/// into: the host's core sets that pace).
fn read_limit(awaiting_data: u16) -> usize {
    const WHILE_DATA_IS_OWED: usize = 32 << 10;
    if awaiting_data > 0 {
        WHILE_DATA_IS_OWED
    } else {
        usize::MAX
    }
}
