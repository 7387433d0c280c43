//! Fuzzes the NVMe/RDMA CM private data decoders (connect request, accept,
//! reject) with arbitrary bytes. Besides "no panic", it checks that an
//! accepted request re-encodes to the bytes it came from, and that
//! `validate` only passes requests inside the limits it was given, since the
//! target sizes its queues from those fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_spec::rdma::{
    CmAccept, CmReject, CmRejectStatus, CmRequest, ADMIN_QUEUE_DEPTH, RECFMT_1_0,
};

fuzz_target!(|data: &[u8]| {
    // The first four bytes pick the controller's limits; the rest is private data.
    let (limits, rest) = data.split_at(data.len().min(4));
    let mut l = [0u8; 4];
    l[..limits.len()].copy_from_slice(limits);
    let max_queue_depth = u16::from_le_bytes([l[0], l[1]]);
    let max_io_queues = u16::from_le_bytes([l[2], l[3]]);

    match CmRequest::parse(rest) {
        Ok(r) => {
            assert!(rest.len() >= CmRequest::SIZE);
            assert_eq!(r.recfmt.get(), RECFMT_1_0);
            assert_eq!(&r.to_bytes()[..], &rest[..CmRequest::SIZE]);
            assert_eq!(CmRequest::parse(&r.to_bytes()), Ok(r));
            match r.validate(max_queue_depth, max_io_queues) {
                Ok(()) => {
                    assert!(r.qid() <= max_io_queues);
                    let limit = if r.qid() == 0 {
                        ADMIN_QUEUE_DEPTH
                    } else {
                        max_queue_depth
                    };
                    assert!(r.hsqsize() >= 1 && r.sq_entries() <= u32::from(limit));
                    assert!(u32::from(r.hrqsize()) >= r.sq_entries());
                }
                Err(s) => {
                    assert!(matches!(
                        s,
                        CmRejectStatus::InvalidQid
                            | CmRejectStatus::InvalidHsqsize
                            | CmRejectStatus::InvalidHrqsize
                    ));
                    reject_round_trip(s);
                }
            }
        }
        Err(s) => {
            assert!(matches!(
                s,
                CmRejectStatus::InvalidLength | CmRejectStatus::InvalidRecfmt
            ));
            assert_eq!(
                s == CmRejectStatus::InvalidLength,
                rest.len() < CmRequest::SIZE
            );
            reject_round_trip(s);
        }
    }

    // The same bytes as the controller's answers, as a host would read them.
    if let Some(a) = CmAccept::read(rest) {
        assert_eq!(&a.to_bytes()[..], &rest[..CmAccept::SIZE]);
        let _ = a.crqsize();
    } else {
        assert!(rest.len() < CmAccept::SIZE);
    }
    if let Some(j) = CmReject::read(rest) {
        assert_eq!(&j.to_bytes()[..], &rest[..CmReject::SIZE]);
        if let Some(s) = j.status() {
            assert_eq!(s.code(), j.sts.get());
            let _ = s.to_string();
        }
    } else {
        assert!(rest.len() < CmReject::SIZE);
    }
});

fn reject_round_trip(s: CmRejectStatus) {
    let bytes = CmReject::new(s).to_bytes();
    assert_eq!(CmReject::read(&bytes).and_then(|r| r.status()), Some(s));
}
