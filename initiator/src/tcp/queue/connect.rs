//! Connecting a queue: the TCP handshake, ICReq/ICResp, and Fabrics Connect, all without
//! blocking; and tearing a connection down.

use super::*;

impl<B: IoBuf> TcpQueue<B> {
    /// Starts a (re)connection with Fabrics Connect for `cntlid` (0xFFFF for the admin queue:
    /// dynamic controller): opens a non-blocking socket and begins the TCP handshake. Only
    /// non-blocking system calls; [`TcpQueue::poll_connect`] does the rest. Commands still
    /// active from a previous connection are sent again once connected.
    pub fn start_connect(&mut self, cntlid: u16) -> Result<()> {
        self.disconnect();
        let addr = self.tcp.addr;
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(Error::io("socket"))?;
        sock.set_nonblocking(true)
            .map_err(Error::io("O_NONBLOCK"))?;
        match sock.connect(&addr.into()) {
            // Loopback may finish at once; the writable check in TcpHandshake sees that too.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "TCP connect",
                    source: e,
                })
            }
        }
        let sock = TcpStream::from(sock);
        sock.set_nodelay(true).map_err(Error::io("TCP_NODELAY"))?;
        self.sock = Some(sock);
        self.conn = ConnState::TcpHandshake {
            cntlid,
            deadline: self.step_deadline(),
        };
        Ok(())
    }

    /// Advances a connection started by [`TcpQueue::start_connect`] as far as it goes without
    /// blocking. A step that outlives the connect timeout, or any error, fails the attempt and
    /// leaves the queue disconnected (active commands stay in their slots).
    pub fn poll_connect(&mut self) -> Result<ConnectProgress> {
        let res = self.advance_connect();
        if res.is_err() {
            self.disconnect();
        }
        res
    }

    /// Connects and waits for it (up to the connect timeout per step): for control-plane
    /// threads only, such as controller bring-up.
    pub fn connect(&mut self, cntlid: u16) -> Result<u16> {
        self.start_connect(cntlid)?;
        loop {
            if let ConnectProgress::Connected { cntlid } = self.poll_connect()? {
                return Ok(cntlid);
            }
            let waiting_to_send = matches!(
                self.conn,
                ConnState::TcpHandshake { .. }
                    | ConnState::SendingIcReq { .. }
                    | ConnState::SendingConnect { .. }
            );
            let events = if waiting_to_send {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            self.wait_fd(events, Duration::from_millis(100));
        }
    }

    /// Where the connection stands.
    #[cfg(test)]
    pub fn conn_state(&self) -> ConnState {
        self.conn
    }

    /// A connection attempt is under way (started, neither connected nor failed yet).
    pub fn is_connecting(&self) -> bool {
        !matches!(self.conn, ConnState::Down | ConnState::Up)
    }

    fn step_deadline(&self) -> Instant {
        Instant::now() + self.params.connect_timeout
    }

    fn advance_connect(&mut self) -> Result<ConnectProgress> {
        loop {
            match self.conn {
                ConnState::Down => return Err(Error::Disconnected),
                ConnState::Up => {
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    })
                }
                ConnState::TcpHandshake { cntlid, deadline } => {
                    // Writable (or in error) once the handshake has finished either way.
                    if !self.fd_ready(libc::POLLOUT) {
                        return still_pending(deadline, "TCP connect");
                    }
                    let Some(sock) = &self.sock else {
                        return Err(Error::Disconnected);
                    };
                    if let Some(e) = sock.take_error().map_err(Error::io("TCP connect"))? {
                        return Err(Error::Io {
                            what: "TCP connect",
                            source: e,
                        });
                    }
                    // HPDA 0: no padding before C2H data; MAXR2T 0: one R2T outstanding per
                    // command.
                    let t = &self.tcp;
                    let icreq = IcReq::new(0, t.hdgst, t.ddgst, 0);
                    self.handshake_tx.clear();
                    self.handshake_tx.extend_from_slice(icreq.as_bytes());
                    self.conn = ConnState::SendingIcReq {
                        cntlid,
                        sent: 0,
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::SendingIcReq {
                    cntlid,
                    sent,
                    deadline,
                } => {
                    let sent = self.send_handshake(sent, "send ICReq")?;
                    if sent < self.handshake_tx.len() {
                        self.conn = ConnState::SendingIcReq {
                            cntlid,
                            sent,
                            deadline,
                        };
                        return still_pending(deadline, "send ICReq");
                    }
                    self.conn = ConnState::AwaitingIcResp {
                        cntlid,
                        got: 0,
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::AwaitingIcResp {
                    cntlid,
                    got,
                    deadline,
                } => match self.receive_icresp(got)? {
                    IcRespRead::Partial { got } => {
                        self.conn = ConnState::AwaitingIcResp {
                            cntlid,
                            got,
                            deadline,
                        };
                        return still_pending(deadline, "ICResp");
                    }
                    IcRespRead::Complete(ic) => {
                        self.apply_icresp(&ic)?;
                        self.prepare_fabrics_connect(cntlid)?;
                        self.conn = ConnState::SendingConnect {
                            sent: 0,
                            deadline: self.step_deadline(),
                        };
                    }
                },
                ConnState::SendingConnect { sent, deadline } => {
                    let sent = self.send_handshake(sent, "send Fabrics Connect")?;
                    if sent < self.handshake_tx.len() {
                        self.conn = ConnState::SendingConnect { sent, deadline };
                        return still_pending(deadline, "send Fabrics Connect");
                    }
                    // Sent from `handshake_tx` rather than the transmit queue: mark it here,
                    // so its response is the one answer this connection takes yet.
                    let cid = self.slots.internal_cid();
                    self.slots[cid as usize].capsule_sent = true;
                    self.conn = ConnState::AwaitingConnectResp {
                        deadline: self.step_deadline(),
                    };
                }
                ConnState::AwaitingConnectResp { deadline } => {
                    self.poll_internal()?;
                    let Some((status, dw0)) = self.internal_done.take() else {
                        return still_pending(deadline, "Fabrics Connect");
                    };
                    if !status.is_success() {
                        return Err(Error::Nvme {
                            cmd: "Fabrics Connect",
                            status,
                        });
                    }
                    self.cntlid = (dw0 & 0xffff) as u16;
                    self.conn = ConnState::Up;
                    debug!(qid = self.params.qid, cntlid = self.cntlid, ?self.wire, maxh2cdata = self.maxh2cdata, "queue connected");
                    // Re-issue commands that were in flight on the previous connection, and
                    // those submitted while connecting; give up on those lost too often.
                    for cid in self.slots.resend_after_reconnect(self.params.qid) {
                        self.requeue(cid);
                    }
                    return Ok(ConnectProgress::Connected {
                        cntlid: self.cntlid,
                    });
                }
            }
        }
    }

    /// Writes what the socket takes of `handshake_tx` from `sent` on; returns the new `sent`.
    fn send_handshake(&mut self, mut sent: usize, what: &'static str) -> Result<usize> {
        let Some(sock) = &self.sock else {
            return Err(Error::Disconnected);
        };
        while sent < self.handshake_tx.len() {
            match (&*sock).write(&self.handshake_tx[sent..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::Io { what, source: e }),
            }
        }
        Ok(sent)
    }

    /// Reads ICResp bytes into the front of the staging buffer (idle until connected), never
    /// past the end of the PDU the header announces.
    fn receive_icresp(&mut self, mut got: usize) -> Result<IcRespRead> {
        let opts = ParseOptions::new(Role::Host);
        loop {
            let need = PduHeader::bytes_needed(&self.rx[..got], &opts)
                .map_err(|e| Error::Protocol(format!("bad ICResp: {e}")))?;
            if got >= need {
                break;
            }
            let Some(sock) = &self.sock else {
                return Err(Error::Disconnected);
            };
            let Some(dst) = self.rx.get_mut(got..need) else {
                return Err(Error::Protocol(format!("ICResp header of {need} bytes")));
            };
            match (&*sock).read(dst) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(IcRespRead::Partial { got })
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "receive ICResp",
                        source: e,
                    })
                }
            }
        }
        match PduHeader::parse(&self.rx[..got], &opts) {
            Ok(PduHeader {
                body: PduBody::IcResp(ic),
                ..
            }) => Ok(IcRespRead::Complete(ic)),
            Ok(PduHeader {
                body: PduBody::TermReq(t),
                ..
            }) => Err(Error::TermReq {
                fes: t.fes.get(),
                fei: t.fei.get(),
            }),
            Ok(h) => Err(Error::Protocol(format!(
                "expected ICResp, got {}",
                h.pdu_type.name()
            ))),
            Err(e) => Err(Error::Protocol(format!("bad ICResp: {e}"))),
        }
    }

    /// Takes on what ICResp negotiated: digests, the controller's PDA and MAXH2CDATA.
    fn apply_icresp(&mut self, ic: &IcResp) -> Result<()> {
        let p = &self.tcp;
        // The controller may turn a digest on only if we asked for it.
        if (ic.hdgst() && !p.hdgst) || (ic.ddgst() && !p.ddgst) {
            return Err(Error::Protocol(
                "ICResp enables a digest the host did not request".into(),
            ));
        }
        if p.hdgst != ic.hdgst() || p.ddgst != ic.ddgst() {
            // Loud: whoever asked for digests believes the data is checked end to end.
            warn!(
                qid = self.params.qid,
                addr = %p.addr,
                hdgst_requested = p.hdgst,
                hdgst = ic.hdgst(),
                ddgst_requested = p.ddgst,
                ddgst = ic.ddgst(),
                "controller declined a requested NVMe/TCP digest; running without it"
            );
        }
        self.wire = Wire {
            hdgst: ic.hdgst(),
            ddgst: ic.ddgst(),
            cpda: ic.cpda,
        };
        self.popts = ParseOptions {
            hdgst: ic.hdgst(),
            ddgst: ic.ddgst(),
            ..ParseOptions::new(Role::Host)
        };
        // Smaller H2CData PDUs than allowed are fine; the clamp keeps PLEN arithmetic small.
        self.maxh2cdata = ic.maxh2cdata.get().min(MAX_CHUNK);
        // The ICResp bytes are consumed; PDUs start afresh in the staging buffer.
        self.rx_start = 0;
        self.rx_end = 0;
        self.rx_state = Rx::Hdr;
        Ok(())
    }

    /// Encodes the Fabrics Connect capsule into `handshake_tx` and opens the reserved slot
    /// its response completes.
    fn prepare_fabrics_connect(&mut self, cntlid: u16) -> Result<()> {
        let p = &self.params;
        let sqe = Connect {
            recfmt: 0,
            qid: p.qid,
            sqsize: u32::from(p.qsize),
            cattr: connect_cattr(p.qid),
            kato: p.kato_ms,
        }
        .to_command(0);
        let data = ConnectData::new(p.hostid, cntlid, &p.subnqn, &p.hostnqn)
            .ok_or_else(|| Error::Unsupported("NQN longer than 255 bytes".into()))?;
        let data = data.as_bytes();
        let cid = self.slots.internal_cid();
        self.internal_done = None;
        self.start_cmd(cid, sqe, Dir::ToCtrl, None, 0, true);
        let slot = &mut self.slots[cid as usize];
        // Connect data is always in-capsule, and larger than the slot's header area: the
        // whole capsule goes out from `handshake_tx` instead of the transmit queue.
        slot.t.in_capsule = false;
        slot.sqe
            .set_sgl1(SglDescriptor::in_capsule(0, data.len() as u32));
        let n = self
            .wire
            .capsule_cmd(&mut slot.t.hdr, &slot.sqe, data.len());
        self.handshake_tx.clear();
        self.handshake_tx.extend_from_slice(&slot.t.hdr[..n]);
        self.handshake_tx.extend_from_slice(data);
        if self.wire.ddgst {
            self.handshake_tx
                .extend_from_slice(&pdu::crc(data).to_le_bytes());
        }
        Ok(())
    }

    /// Waits until the socket is readable or `t` passes (control path only).
    pub fn wait_readable(&self, t: Duration) {
        self.wait_fd(libc::POLLIN, t)
    }

    fn wait_fd(&self, events: libc::c_short, t: Duration) {
        if self.raw_fd().is_none() {
            std::thread::sleep(t);
            return;
        }
        self.poll_fd(events, t.as_millis().clamp(1, 1000) as libc::c_int);
    }

    /// Whether the socket has one of `events` (or an error or hang-up) now, without waiting.
    fn fd_ready(&self, events: libc::c_short) -> bool {
        self.poll_fd(events, 0)
    }

    fn poll_fd(&self, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
        let Some(fd) = self.raw_fd() else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n > 0 && pfd.revents != 0
    }

    /// Closes the socket, abandoning any connection attempt. Active commands stay in their
    /// slots (to be re-sent once connected again, or failed by `fail_all`).
    pub fn disconnect(&mut self) {
        if let Some(s) = self.sock.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.conn = ConnState::Down;
        self.txq.clear();
        self.tx_off = 0;
        self.rx_state = Rx::Hdr;
        self.rx_start = 0;
        self.rx_end = 0;
        for s in self.slots.iter_mut() {
            s.t.tx_pending = 0;
        }
        self.slots.connection_lost();
    }

    /// Sends an H2CTermReq (best effort) and disconnects; returns the error to report.
    pub(super) fn terminate(
        &mut self,
        fes: u16,
        fei: u32,
        hdr: Option<(usize, usize)>,
        why: String,
    ) -> Error {
        warn!(
            qid = self.params.qid,
            fes, fei, "terminating connection: {why}"
        );
        if let Some(sock) = &self.sock {
            let offending = match hdr {
                Some((a, b)) => self.rx.get(a..b).unwrap_or(&[]),
                None => &[],
            };
            let (b, n) = pdu::encode_term_req(fes, fei, offending);
            // Best effort: whatever fits in the socket buffer now.
            let _ = (&*sock).write(&b[..n]);
        }
        self.disconnect();
        Error::Protocol(why)
    }
}
