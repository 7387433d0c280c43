//! Sending: the queued capsules, H2C data and their digests gathered into one `writev`.

use super::*;

impl<B: IoBuf> TcpQueue<B> {
    fn item_segs<'a>(slots: &'a Slots<B, TcpSlot>, wire: &Wire, it: TxItem) -> [&'a [u8]; 3] {
        let s = &slots[it.cid as usize];
        let data = s.buf.as_deref().unwrap_or(&[]);
        if it.h2c {
            let lo = s.t.r2t_next as usize;
            let hi = lo + s.t.chunk_len as usize;
            [
                &s.t.h2c_hdr[..s.t.h2c_hdr_len as usize],
                data.get(lo..hi).unwrap_or(&[]),
                if wire.ddgst { &s.t.h2c_ddgst[..] } else { &[] },
            ]
        } else if s.t.in_capsule {
            [
                &s.t.hdr[..s.t.hdr_len as usize],
                data,
                if wire.ddgst { &s.t.ddgst[..] } else { &[] },
            ]
        } else {
            [&s.t.hdr[..s.t.hdr_len as usize], &[], &[]]
        }
    }

    fn item_len(&self, it: TxItem) -> usize {
        Self::item_segs(&self.slots, &self.wire, it)
            .iter()
            .map(|s| s.len())
            .sum()
    }

    /// Writes queued PDUs, as many as the socket takes, batching them into `writev`s.
    pub fn flush(&mut self) -> Result<()> {
        while !self.txq.is_empty() {
            let Some(sock) = &self.sock else {
                return Err(Error::Disconnected);
            };
            let (res, asked) = {
                let mut iov: SmallVec<[IoSlice<'_>; IOV_BATCH]> = SmallVec::new();
                let mut skip = self.tx_off;
                let mut asked = 0usize;
                for &it in self.txq.iter() {
                    for seg in Self::item_segs(&self.slots, &self.wire, it) {
                        if seg.is_empty() {
                            continue;
                        }
                        if skip >= seg.len() {
                            skip -= seg.len();
                            continue;
                        }
                        let seg = &seg[skip..];
                        skip = 0;
                        asked += seg.len();
                        iov.push(IoSlice::new(seg));
                    }
                    if iov.len() + 3 > IOV_BATCH {
                        break;
                    }
                }
                ((&*sock).write_vectored(&iov), asked)
            };
            match res {
                Ok(0) => return Err(self.lost(Error::Closed)),
                Ok(n) => {
                    self.advance(n);
                    if n < asked {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.lost(Error::Io {
                        what: "send",
                        source: e,
                    }))
                }
            }
        }
        Ok(())
    }

    pub(super) fn lost(&mut self, e: Error) -> Error {
        debug!(qid = self.params.qid, "connection lost: {e}");
        self.disconnect();
        e
    }

    fn advance(&mut self, n: usize) {
        let mut n = n + self.tx_off;
        self.tx_off = 0;
        while let Some(&it) = self.txq.front() {
            let l = self.item_len(it);
            if n < l {
                self.tx_off = n;
                break;
            }
            n -= l;
            self.txq.pop_front();
            let s = &mut self.slots[it.cid as usize];
            s.t.tx_pending = s.t.tx_pending.saturating_sub(1);
            s.capsule_sent |= !it.h2c;
            if it.h2c {
                s.t.r2t_next += s.t.chunk_len;
                if s.t.r2t_next < s.t.r2t_end {
                    self.next_chunk(it.cid);
                }
            }
        }
    }

    /// Prepares the next H2CData PDU of the open R2T of `cid` and queues it.
    pub(super) fn next_chunk(&mut self, cid: u16) {
        let wire = self.wire;
        let max = self.maxh2cdata;
        let s = &mut self.slots[cid as usize];
        let len = (s.t.r2t_end - s.t.r2t_next).min(max);
        s.t.chunk_len = len;
        let last = s.t.r2t_next + len == s.t.r2t_end;
        s.t.h2c_hdr_len =
            wire.h2c_data(&mut s.t.h2c_hdr, cid, s.t.r2t_ttag, s.t.r2t_next, len, last) as u8;
        if wire.ddgst {
            let lo = s.t.r2t_next as usize;
            let d = s
                .buf
                .as_deref()
                .and_then(|b| b.get(lo..lo + len as usize))
                .map_or(0, pdu::crc);
            s.t.h2c_ddgst = d.to_le_bytes();
        }
        s.t.tx_pending += 1;
        self.txq.push_back(TxItem { cid, h2c: true });
    }
}
