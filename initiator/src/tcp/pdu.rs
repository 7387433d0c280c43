//! The host's view of NVMe/TCP PDUs: a thin layer over `nvme_spec::tcp`, which owns every byte
//! layout and the validating header parser. What is here is only what a host sender needs on
//! top: writing a header (plus digest and CPDA padding) into a slot's fixed header area.

use nvme_spec::tcp::{header_digest, CapsuleCmd, H2CData, PduType, TermReq, TERM_REQ_MAX_DATA};
use nvme_spec::{Command, IntoBytes};

/// Room for any header with its digest and CPDA padding. The data starts at the first
/// multiple of the controller's alignment, (CPDA + 1) * 4 bytes, after the header: a 72-byte
/// capsule header and its 4-byte digest, padded to CPDA 17's 72-byte alignment, end at 144,
/// the furthest of any CPDA (0..=31; the ICResp parser refuses more).
pub const MAX_HDR: usize = 144;
/// A termination request with the largest offending-header copy.
pub const TERM_MAX: usize = 24 + TERM_REQ_MAX_DATA;

/// CRC32C as NVMe/TCP digests use it.
#[inline]
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Digest and alignment settings negotiated for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub hdgst: bool,
    pub ddgst: bool,
    /// The controller's PDA from ICResp (0's based dwords).
    pub cpda: u8,
}

impl Wire {
    /// Copies `hdr` into `dst`, appends the header digest and zero padding up to PDO.
    /// Returns the number of bytes before the data (PDO, or the header length with no data).
    fn place(&self, dst: &mut [u8; MAX_HDR], hdr: &[u8], pdo: u8) -> usize {
        let hlen = hdr.len();
        dst[..hlen].copy_from_slice(hdr);
        let mut end = hlen;
        if self.hdgst {
            dst[hlen..hlen + 4].copy_from_slice(&header_digest(hdr).to_le_bytes());
            end += 4;
        }
        let pdo = pdo as usize;
        if pdo > end {
            dst[end..pdo].fill(0);
            end = pdo;
        }
        end
    }

    /// Writes a CapsuleCmd header for `sqe` with `data_len` bytes of in-capsule data following.
    pub fn capsule_cmd(&self, dst: &mut [u8; MAX_HDR], sqe: &Command, data_len: usize) -> usize {
        // A capsule is at most IOCCSZ bytes, far below PLEN's 4 GiB: new() cannot fail here.
        let h = CapsuleCmd::new(*sqe, data_len as u32, self.hdgst, self.ddgst, self.cpda)
            .expect("capsule length fits in PLEN");
        self.place(dst, h.as_bytes(), h.ch.pdo)
    }

    /// Writes an H2CData header. Returns the header bytes to send before the data.
    pub fn h2c_data(
        &self,
        dst: &mut [u8; MAX_HDR],
        cccid: u16,
        ttag: u16,
        datao: u32,
        datal: u32,
        last: bool,
    ) -> usize {
        // datal <= MAXH2CDATA (u32) and PDO <= 128: PLEN overflow would need a 4 GiB chunk.
        let h = H2CData::new(
            cccid, ttag, datao, datal, last, self.hdgst, self.ddgst, self.cpda,
        )
        .expect("H2CData length fits in PLEN");
        self.place(dst, h.as_bytes(), h.ch.pdo)
    }
}

/// An H2CTermReq carrying up to 128 bytes of the offending header.
pub fn encode_term_req(fes: u16, fei: u32, offending: &[u8]) -> ([u8; TERM_MAX], usize) {
    let mut b = [0u8; TERM_MAX];
    let n = offending.len().min(TERM_REQ_MAX_DATA);
    let h = TermReq::new(PduType::H2CTermReq, fes, fei, n);
    b[..24].copy_from_slice(h.as_bytes());
    b[24..24 + n].copy_from_slice(&offending[..n]);
    (b, 24 + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer: a controller asking for CPDA 16 pushed the Connect capsule's data
    /// to offset 136, past the 128 bytes then kept for a header, and the host panicked.
    #[test]
    fn every_cpda_fits_the_header_area() {
        let mut dst = [0u8; MAX_HDR];
        let mut furthest = 0;
        for cpda in 0..=31u8 {
            for hdgst in [false, true] {
                let w = Wire {
                    hdgst,
                    ddgst: false,
                    cpda,
                };
                let n = w.capsule_cmd(&mut dst, &Command::default(), 1024);
                let m = w.h2c_data(&mut dst, 0, 0, 0, 4096, true);
                furthest = furthest.max(n).max(m);
            }
        }
        assert_eq!(
            furthest, MAX_HDR,
            "MAX_HDR is the furthest any header reaches"
        );
    }
}
