//! NVMe/RDMA connection setup: the RDMA CM private data exchanged when a host
//! connects one queue (NVMe RDMA Transport Specification 1.0, section 3.1
//! "Setup & Initialization", Figures 5 to 7 and 11; NVMe-oF 1.1 section 7.3).
//!
//! Each NVMe queue pair is one RDMA reliable-connected QP. The host's
//! RDMA_CM_REQUEST carries a [`CmRequest`] (QID and queue sizes); the
//! controller answers with an RDMA_CM_ACCEPT carrying a [`CmAccept`], or with
//! an RDMA_CM_REJECT carrying a [`CmReject`] whose status is a
//! [`CmRejectStatus`]. The NVMe Connect command then follows as the first
//! capsule on the new QP. All fields are little-endian.
//!
//! A controller calls [`CmRequest::parse`] on the received private data, then
//! [`CmRequest::validate`] with its own limits, and on error rejects with
//! [`CmReject::new`].

use thiserror::Error;
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// IANA-assigned port for NVMe over Fabrics: the default RDMA CM service
/// (UDP port for RoCEv2, TCP port for iWARP). Linux: `NVME_RDMA_IP_PORT`.
pub const DEFAULT_PORT: u16 = 4420;
/// The only private data record format defined (RECFMT 0 = 1.0).
/// Linux: `NVME_RDMA_CM_FMT_1_0`.
pub const RECFMT_1_0: u16 = 0;
/// Admin queue depth: the Linux host asks for exactly this (HSQSIZE 31) and
/// the Linux target rejects a larger admin queue. Linux: `NVME_AQ_DEPTH`.
pub const ADMIN_QUEUE_DEPTH: u16 = 32;
/// Largest private data an RDMA CM connect request carries on InfiniBand or
/// RoCE: 92 bytes of IB CM REQ private data less the 36-byte header RDMA CM
/// puts first for IP-addressed IDs. The receiver sees all 56 bytes, so a
/// request longer than [`CmRequest::SIZE`] is normal there.
pub const IB_REQ_PRIVATE_DATA_MAX: usize = 92 - 36;
/// Largest private data of an IB CM REP (RDMA_CM_ACCEPT) message.
pub const IB_REP_PRIVATE_DATA_MAX: usize = 196;
/// Largest private data of an IB CM REJ (RDMA_CM_REJECT) message.
pub const IB_REJ_PRIVATE_DATA_MAX: usize = 148;

/// Status of an RDMA_CM_REJECT (spec Figure 11 "RDMA Transport Errors").
/// 0 and 0Ah..=FFFFh are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
#[repr(u16)]
pub enum CmRejectStatus {
    /// The private data is too short. Linux: `NVME_RDMA_CM_INVALID_LEN`.
    #[error("RDMA invalid private data length")]
    InvalidLength = 0x01,
    /// RECFMT is not 0. Linux: `NVME_RDMA_CM_INVALID_RECFMT`.
    #[error("RDMA invalid RECFMT")]
    InvalidRecfmt = 0x02,
    /// QID out of range. Linux: `NVME_RDMA_CM_INVALID_QID`.
    #[error("RDMA invalid QID")]
    InvalidQid = 0x03,
    /// HSQSIZE zero or too large. Linux: `NVME_RDMA_CM_INVALID_HSQSIZE`.
    #[error("RDMA invalid HSQSIZE")]
    InvalidHsqsize = 0x04,
    /// HRQSIZE too small for HSQSIZE. Linux: `NVME_RDMA_CM_INVALID_HRQSIZE`.
    #[error("RDMA invalid HRQSIZE")]
    InvalidHrqsize = 0x05,
    /// The controller cannot create the QP. Linux: `NVME_RDMA_CM_NO_RSC`.
    #[error("RDMA no resources")]
    NoResources = 0x06,
    /// Invalid inbound RDMA read queue depth. Linux: `NVME_RDMA_CM_INVALID_IRD`.
    #[error("RDMA invalid IRD")]
    InvalidIrd = 0x07,
    /// Invalid outbound RDMA read depth. Linux: `NVME_RDMA_CM_INVALID_ORD`.
    #[error("RDMA invalid ORD")]
    InvalidOrd = 0x08,
    /// CNTLID names no controller this I/O queue can join (RDMA Transport
    /// 1.0; absent from NVMe-oF 1.1). Linux: `NVME_RDMA_CM_INVALID_CNTLID`.
    #[error("RDMA invalid CNTLID")]
    InvalidCntlid = 0x09,
}

impl CmRejectStatus {
    /// Decodes a STS value; `None` for reserved values.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x01 => Self::InvalidLength,
            0x02 => Self::InvalidRecfmt,
            0x03 => Self::InvalidQid,
            0x04 => Self::InvalidHsqsize,
            0x05 => Self::InvalidHrqsize,
            0x06 => Self::NoResources,
            0x07 => Self::InvalidIrd,
            0x08 => Self::InvalidOrd,
            0x09 => Self::InvalidCntlid,
            _ => return None,
        })
    }

    /// The STS value on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }
}

/// RDMA_CM_REQUEST private data (spec Figure 5), sent by the host.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmRequest {
    /// Record format; 0.
    pub recfmt: U16,
    /// Queue to create: 0 = admin queue.
    pub qid: U16,
    /// Receive queue entries the host posted for response capsules.
    pub hrqsize: U16,
    /// Host send queue size, 0's based; equals the Connect command's SQSIZE.
    pub hsqsize: U16,
    /// Controller ID for an I/O queue, 0 for the admin queue. Senders older
    /// than RDMA Transport 1.0 (Linux before 6.12) leave it 0 (reserved).
    pub cntlid: U16,
    /// Reserved.
    pub rsvd: [u8; 22],
}
const _: () = assert!(core::mem::size_of::<CmRequest>() == CmRequest::SIZE);
const _: () = assert!(CmRequest::SIZE <= IB_REQ_PRIVATE_DATA_MAX);

impl Default for CmRequest {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl CmRequest {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// A request with raw wire values (`hsqsize` 0's based).
    pub fn new(qid: u16, hrqsize: u16, hsqsize: u16, cntlid: u16) -> Self {
        let mut r = Self::new_zeroed();
        r.recfmt.set(RECFMT_1_0);
        r.qid.set(qid);
        r.hrqsize.set(hrqsize);
        r.hsqsize.set(hsqsize);
        r.cntlid.set(cntlid);
        r
    }

    /// A request for a queue of `depth` entries, laid out as the Linux and
    /// SPDK hosts do: HSQSIZE = depth - 1, HRQSIZE = depth. `depth` is
    /// clamped to at least 2 (HSQSIZE 0 is invalid); `cntlid` is dropped for
    /// the admin queue, which the spec requires to carry 0.
    pub fn for_queue(qid: u16, depth: u16, cntlid: u16) -> Self {
        let depth = depth.max(2);
        let cntlid = if qid == 0 { 0 } else { cntlid };
        Self::new(qid, depth, depth - 1, cntlid)
    }

    /// Decodes the private data of a connect request.
    ///
    /// Checks only what needs no controller state: at least 32 bytes (else
    /// [`CmRejectStatus::InvalidLength`]) and RECFMT 0 (else
    /// [`CmRejectStatus::InvalidRecfmt`]). Longer input is accepted and the
    /// tail ignored, because InfiniBand and RoCE deliver the request padded
    /// to [`IB_REQ_PRIVATE_DATA_MAX`] bytes. Reserved bytes are not checked:
    /// CNTLID was carved out of them, and a later field may be too. Never
    /// panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, CmRejectStatus> {
        let (r, _) = Self::read_from_prefix(bytes).map_err(|_| CmRejectStatus::InvalidLength)?;
        if r.recfmt.get() != RECFMT_1_0 {
            return Err(CmRejectStatus::InvalidRecfmt);
        }
        Ok(r)
    }

    /// Checks the request against the controller's limits:
    ///
    /// - QID must be 0 (admin) or in `1..=max_io_queues`, else `InvalidQid`.
    /// - HSQSIZE must be at least 1 (a queue of two entries; SQSIZE 0 is
    ///   invalid in Connect too) and the queue, HSQSIZE + 1 entries, must fit
    ///   the depth limit, else `InvalidHsqsize`. The limit is
    ///   `max_queue_depth` (1's based, e.g. MQES + 1) for I/O queues and
    ///   [`ADMIN_QUEUE_DEPTH`] for the admin queue, as the Linux target does.
    /// - HRQSIZE must be at least HSQSIZE + 1, so the host has a receive
    ///   posted for a response to every command it can have outstanding,
    ///   else `InvalidHrqsize`. The Linux and SPDK hosts send exactly
    ///   HSQSIZE + 1.
    ///
    /// CNTLID is left to the caller, who knows the controllers: on an I/O
    /// queue 0 means "not sent" (older hosts), and on the admin queue the
    /// SPDK host sends its previous CNTLID when reconnecting after a reset
    /// although the spec asks for 0, so it is ignored there.
    pub fn validate(&self, max_queue_depth: u16, max_io_queues: u16) -> Result<(), CmRejectStatus> {
        let qid = self.qid.get();
        if qid > max_io_queues {
            return Err(CmRejectStatus::InvalidQid);
        }
        let limit = if qid == 0 {
            ADMIN_QUEUE_DEPTH
        } else {
            max_queue_depth
        };
        let hsqsize = self.hsqsize.get();
        if hsqsize == 0 || hsqsize >= limit {
            return Err(CmRejectStatus::InvalidHsqsize);
        }
        if u32::from(self.hrqsize.get()) < self.sq_entries() {
            return Err(CmRejectStatus::InvalidHrqsize);
        }
        Ok(())
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid.get()
    }

    /// Host receive queue size (HRQSIZE).
    pub fn hrqsize(&self) -> u16 {
        self.hrqsize.get()
    }

    /// Host send queue size as sent (HSQSIZE, 0's based).
    pub fn hsqsize(&self) -> u16 {
        self.hsqsize.get()
    }

    /// Submission queue entries, 1's based (HSQSIZE + 1; up to 65536).
    pub fn sq_entries(&self) -> u32 {
        u32::from(self.hsqsize.get()) + 1
    }

    /// Controller ID (CNTLID).
    pub fn cntlid(&self) -> u16 {
        self.cntlid.get()
    }

    /// The 32 bytes to send.
    pub fn to_bytes(&self) -> [u8; CmRequest::SIZE] {
        zerocopy::transmute!(*self)
    }
}

/// RDMA_CM_ACCEPT private data (spec Figure 6), sent by the controller.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmAccept {
    /// Record format; 0.
    pub recfmt: U16,
    /// Receive queue entries the controller posted for command capsules.
    /// The spec words it as "equal to HSQSIZE"; Linux and SPDK targets send
    /// the 1's based depth they accepted (HSQSIZE + 1 or less).
    pub crqsize: U16,
    /// Reserved.
    pub rsvd: [u8; 28],
}
const _: () = assert!(core::mem::size_of::<CmAccept>() == CmAccept::SIZE);
const _: () = assert!(CmAccept::SIZE <= IB_REP_PRIVATE_DATA_MAX);

impl Default for CmAccept {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl CmAccept {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// An accept with record format 0.
    pub fn new(crqsize: u16) -> Self {
        let mut a = Self::new_zeroed();
        a.recfmt.set(RECFMT_1_0);
        a.crqsize.set(crqsize);
        a
    }

    /// Reads the first 32 bytes; `None` if shorter. RECFMT is not checked.
    /// Longer input is normal: IB pads REP private data to 196 bytes.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(a, _)| a)
    }

    /// Controller receive queue size.
    pub fn crqsize(&self) -> u16 {
        self.crqsize.get()
    }

    /// The 32 bytes to send.
    pub fn to_bytes(&self) -> [u8; CmAccept::SIZE] {
        zerocopy::transmute!(*self)
    }
}

/// RDMA_CM_REJECT private data (spec Figure 7), sent by the controller.
/// 4 bytes, as the Linux and SPDK targets send.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmReject {
    /// Record format; 0.
    pub recfmt: U16,
    /// Status ([`CmRejectStatus`] as a number).
    pub sts: U16,
}
const _: () = assert!(core::mem::size_of::<CmReject>() == CmReject::SIZE);
const _: () = assert!(CmReject::SIZE <= IB_REJ_PRIVATE_DATA_MAX);

impl Default for CmReject {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl CmReject {
    /// Size in bytes.
    pub const SIZE: usize = 4;

    /// A reject with record format 0 and status `sts`.
    pub fn new(sts: CmRejectStatus) -> Self {
        let mut r = Self::new_zeroed();
        r.recfmt.set(RECFMT_1_0);
        r.sts.set(sts.code());
        r
    }

    /// Reads the first 4 bytes; `None` if shorter. RECFMT is not checked.
    /// Longer input is normal: IB pads REJ private data to 148 bytes.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(r, _)| r)
    }

    /// The status, or `None` for a reserved value.
    pub fn status(&self) -> Option<CmRejectStatus> {
        CmRejectStatus::from_u16(self.sts.get())
    }

    /// The 4 bytes to send.
    pub fn to_bytes(&self) -> [u8; CmReject::SIZE] {
        zerocopy::transmute!(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    const ALL: [CmRejectStatus; 9] = [
        CmRejectStatus::InvalidLength,
        CmRejectStatus::InvalidRecfmt,
        CmRejectStatus::InvalidQid,
        CmRejectStatus::InvalidHsqsize,
        CmRejectStatus::InvalidHrqsize,
        CmRejectStatus::NoResources,
        CmRejectStatus::InvalidIrd,
        CmRejectStatus::InvalidOrd,
        CmRejectStatus::InvalidCntlid,
    ];

    #[test]
    fn field_offsets_match_figures() {
        assert_eq!(offset_of!(CmRequest, recfmt), 0);
        assert_eq!(offset_of!(CmRequest, qid), 2);
        assert_eq!(offset_of!(CmRequest, hrqsize), 4);
        assert_eq!(offset_of!(CmRequest, hsqsize), 6);
        assert_eq!(offset_of!(CmRequest, cntlid), 8);
        assert_eq!(offset_of!(CmRequest, rsvd), 10);
        assert_eq!(offset_of!(CmAccept, crqsize), 2);
        assert_eq!(offset_of!(CmAccept, rsvd), 4);
        assert_eq!(offset_of!(CmReject, sts), 2);
    }

    #[test]
    fn status_codes() {
        let want: [u16; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        for (s, w) in ALL.iter().zip(want) {
            assert_eq!(s.code(), w);
            assert_eq!(CmRejectStatus::from_u16(w), Some(*s));
        }
        assert_eq!(CmRejectStatus::from_u16(0), None);
        assert_eq!(CmRejectStatus::from_u16(0x0A), None);
        assert_eq!(CmRejectStatus::from_u16(0xFFFF), None);
        assert_eq!(
            CmRejectStatus::InvalidHsqsize.to_string(),
            "RDMA invalid HSQSIZE"
        );
    }

    #[test]
    fn request_known_bytes() {
        // I/O queue 3 of controller 0x0102, 128 entries, as a host sends it.
        let mut want = [0u8; 32];
        want[..10].copy_from_slice(&[
            0x00, 0x00, // RECFMT 0
            0x03, 0x00, // QID 3
            0x80, 0x00, // HRQSIZE 128
            0x7F, 0x00, // HSQSIZE 127 (0's based)
            0x02, 0x01, // CNTLID 0x0102
        ]);
        let r = CmRequest::for_queue(3, 128, 0x0102);
        assert_eq!(r.to_bytes(), want);
        assert_eq!(CmRequest::new(3, 128, 127, 0x0102), r);

        let p = CmRequest::parse(&want).unwrap();
        assert_eq!(
            (p.qid(), p.hrqsize(), p.hsqsize(), p.cntlid()),
            (3, 128, 127, 0x0102)
        );
        assert_eq!(p.sq_entries(), 128);
    }

    #[test]
    fn admin_request_known_bytes() {
        // Admin queue as the Linux host sends it: HRQSIZE 32, HSQSIZE 31.
        let mut want = [0u8; 32];
        want[4] = 0x20;
        want[6] = 0x1F;
        // CNTLID is forced to 0 on the admin queue.
        assert_eq!(CmRequest::for_queue(0, 32, 7).to_bytes(), want);
        let p = CmRequest::parse(&want).unwrap();
        assert_eq!(p.validate(128, 4), Ok(()));
    }

    #[test]
    fn accept_known_bytes() {
        let mut want = [0u8; 32];
        want[3] = 0x01; // CRQSIZE 256 (0x0100)
        let a = CmAccept::new(256);
        assert_eq!(a.to_bytes(), want);
        assert_eq!(CmAccept::read(&want), Some(a));
        assert_eq!(CmAccept::read(&want).unwrap().crqsize(), 256);
    }

    #[test]
    fn reject_known_bytes() {
        assert_eq!(
            CmReject::new(CmRejectStatus::InvalidRecfmt).to_bytes(),
            [0x00, 0x00, 0x02, 0x00]
        );
        assert_eq!(
            CmReject::new(CmRejectStatus::InvalidCntlid).to_bytes(),
            [0x00, 0x00, 0x09, 0x00]
        );
        let r = CmReject::read(&[0x00, 0x00, 0x06, 0x00]).unwrap();
        assert_eq!(r.status(), Some(CmRejectStatus::NoResources));
        let reserved = CmReject::read(&[0x00, 0x00, 0x0A, 0x00]).unwrap();
        assert_eq!(reserved.status(), None);
        assert_eq!(reserved.sts.get(), 0x0A);
    }

    #[test]
    fn round_trips() {
        for qid in [0u16, 1, 7, 0xFFFF] {
            for depth in [2u16, 32, 1024, 0xFFFF] {
                let r = CmRequest::for_queue(qid, depth, 0xABCD);
                assert_eq!(CmRequest::parse(&r.to_bytes()), Ok(r));
            }
        }
        let raw = CmRequest::new(9, 0, 0xFFFF, 0xFFFF);
        assert_eq!(CmRequest::parse(&raw.to_bytes()), Ok(raw));
        for crq in [0u16, 1, 0xFFFF] {
            let a = CmAccept::new(crq);
            assert_eq!(CmAccept::read(&a.to_bytes()), Some(a));
        }
        for s in ALL {
            let r = CmReject::new(s);
            assert_eq!(CmReject::read(&r.to_bytes()).unwrap().status(), Some(s));
        }
    }

    #[test]
    fn for_queue_clamps_depth() {
        let r = CmRequest::for_queue(1, 0, 1);
        assert_eq!((r.hsqsize(), r.hrqsize()), (1, 2));
        let r = CmRequest::for_queue(1, 1, 1);
        assert_eq!((r.hsqsize(), r.hrqsize()), (1, 2));
    }

    #[test]
    fn parse_short_input_is_invalid_length() {
        let full = CmRequest::for_queue(1, 64, 1).to_bytes();
        for n in 0..CmRequest::SIZE {
            assert_eq!(
                CmRequest::parse(&full[..n]),
                Err(CmRejectStatus::InvalidLength),
                "{n} bytes"
            );
        }
        assert!(CmAccept::read(&[0u8; 31]).is_none());
        assert!(CmReject::read(&[0u8; 3]).is_none());
        assert!(CmReject::read(&[]).is_none());
    }

    #[test]
    fn parse_accepts_padded_input() {
        // IB/RoCE deliver 56 bytes; the tail and reserved bytes are ignored.
        let mut buf = [0xEEu8; IB_REQ_PRIVATE_DATA_MAX];
        buf[..10].copy_from_slice(&[0, 0, 2, 0, 16, 0, 15, 0, 5, 0]);
        let r = CmRequest::parse(&buf).unwrap();
        assert_eq!(
            (r.qid(), r.hrqsize(), r.hsqsize(), r.cntlid()),
            (2, 16, 15, 5)
        );
        assert_eq!(r.rsvd, [0xEE; 22]);
        assert_eq!(r.validate(64, 4), Ok(()));

        let mut acc = [0u8; IB_REP_PRIVATE_DATA_MAX];
        acc[2] = 16;
        assert_eq!(CmAccept::read(&acc).unwrap().crqsize(), 16);
        let mut rej = [0u8; IB_REJ_PRIVATE_DATA_MAX];
        rej[2] = 4;
        assert_eq!(
            CmReject::read(&rej).unwrap().status(),
            Some(CmRejectStatus::InvalidHsqsize)
        );
    }

    #[test]
    fn parse_rejects_nonzero_recfmt() {
        for recfmt in [1u16, 0x0100, 0xFFFF] {
            let mut b = CmRequest::for_queue(1, 64, 1).to_bytes();
            b[..2].copy_from_slice(&recfmt.to_le_bytes());
            assert_eq!(CmRequest::parse(&b), Err(CmRejectStatus::InvalidRecfmt));
        }
    }

    #[test]
    fn validate_qid_range() {
        assert_eq!(CmRequest::for_queue(0, 32, 0).validate(128, 0), Ok(()));
        assert_eq!(CmRequest::for_queue(4, 128, 1).validate(128, 4), Ok(()));
        assert_eq!(
            CmRequest::for_queue(5, 128, 1).validate(128, 4),
            Err(CmRejectStatus::InvalidQid)
        );
        assert_eq!(
            CmRequest::for_queue(1, 32, 1).validate(128, 0),
            Err(CmRejectStatus::InvalidQid)
        );
        assert_eq!(
            CmRequest::for_queue(0xFFFF, 32, 1).validate(128, 0xFFFE),
            Err(CmRejectStatus::InvalidQid)
        );
    }

    #[test]
    fn validate_hsqsize() {
        // Zero: a one-entry queue.
        assert_eq!(
            CmRequest::new(1, 1, 0, 1).validate(128, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
        // The depth limit is inclusive: 128 entries = HSQSIZE 127.
        assert_eq!(CmRequest::new(1, 128, 127, 1).validate(128, 4), Ok(()));
        assert_eq!(
            CmRequest::new(1, 129, 128, 1).validate(128, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
        assert_eq!(
            CmRequest::new(1, 0xFFFF, 0xFFFF, 1).validate(0xFFFF, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
        // Admin queue: at most 32 entries whatever the I/O limit.
        assert_eq!(CmRequest::new(0, 32, 31, 0).validate(1024, 4), Ok(()));
        assert_eq!(
            CmRequest::new(0, 33, 32, 0).validate(1024, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
        assert_eq!(
            CmRequest::new(0, 1, 0, 0).validate(1024, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
    }

    #[test]
    fn validate_hrqsize() {
        assert_eq!(
            CmRequest::new(1, 63, 63, 1).validate(128, 4),
            Err(CmRejectStatus::InvalidHrqsize)
        );
        assert_eq!(
            CmRequest::new(1, 0, 63, 1).validate(128, 4),
            Err(CmRejectStatus::InvalidHrqsize)
        );
        assert_eq!(
            CmRequest::new(0, 31, 31, 0).validate(128, 4),
            Err(CmRejectStatus::InvalidHrqsize)
        );
        // More receive buffers than needed is fine.
        assert_eq!(CmRequest::new(1, 0xFFFF, 63, 1).validate(128, 4), Ok(()));
    }

    #[test]
    fn validate_ignores_cntlid() {
        // The SPDK host sends its old CNTLID on the admin queue after a reset.
        assert_eq!(CmRequest::new(0, 32, 31, 0x1234).validate(128, 4), Ok(()));
        // Older Linux hosts send 0 on I/O queues.
        assert_eq!(CmRequest::new(1, 32, 31, 0).validate(128, 4), Ok(()));
    }

    #[test]
    fn validate_checks_qid_first() {
        // Every field bad: the QID is reported.
        assert_eq!(
            CmRequest::new(9, 0, 0, 0).validate(128, 4),
            Err(CmRejectStatus::InvalidQid)
        );
        // HSQSIZE before HRQSIZE.
        assert_eq!(
            CmRequest::new(1, 0, 0, 0).validate(128, 4),
            Err(CmRejectStatus::InvalidHsqsize)
        );
    }
}
