use super::*;
use crate::status::Status;
use core::mem::offset_of;

fn ctrl(hdgst: bool, ddgst: bool) -> ParseOptions {
    ParseOptions {
        hdgst,
        ddgst,
        max_h2c_data: 128 * 1024,
        max_in_capsule_data: 8192,
        ..ParseOptions::new(Role::Controller)
    }
}

fn host(hdgst: bool, ddgst: bool) -> ParseOptions {
    ParseOptions {
        hdgst,
        ddgst,
        ..ParseOptions::new(Role::Host)
    }
}

/// Serializes a header, appends a header digest if `hdgst`, and pads to `plen`
/// with `fill` so the buffer holds a whole PDU.
fn pdu(header: &[u8], hdgst: bool) -> Vec<u8> {
    let mut v = header.to_vec();
    if hdgst {
        v.extend_from_slice(&header_digest(header).to_le_bytes());
    }
    let plen = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if v.len() < plen {
        v.resize(plen, 0x5A);
    }
    v
}

fn err(buf: &[u8], o: &ParseOptions) -> PduError {
    PduHeader::parse(buf, o).unwrap_err()
}

#[test]
fn crc32c_known_answer() {
    assert_eq!(data_digest(b"123456789"), 0xE306_9283);
    assert_eq!(data_digest(&[0u8; 32]), 0x8A91_36AA);
    let mut d = DataDigest::new();
    d.update(b"1234");
    d.update(b"");
    d.update(b"56789");
    assert_eq!(d.value(), 0xE306_9283);
    assert!(verify_data_digest(b"123456789", &[0x83, 0x92, 0x06, 0xE3]));
    assert!(!verify_data_digest(b"123456789", &[0x83, 0x92, 0x06]));
    assert!(!verify_data_digest(b"123456780", &[0x83, 0x92, 0x06, 0xE3]));
}

#[test]
fn layouts() {
    assert_eq!(offset_of!(CommonHeader, plen), 4);
    assert_eq!(offset_of!(IcReq, pfv), 8);
    assert_eq!(offset_of!(IcReq, hpda), 10);
    assert_eq!(offset_of!(IcReq, dgst), 11);
    assert_eq!(offset_of!(IcReq, maxr2t), 12);
    assert_eq!(offset_of!(IcResp, cpda), 10);
    assert_eq!(offset_of!(IcResp, maxh2cdata), 12);
    assert_eq!(offset_of!(TermReq, fes), 8);
    assert_eq!(offset_of!(TermReq, fei), 10);
    assert_eq!(offset_of!(CapsuleCmd, cmd), 8);
    assert_eq!(offset_of!(CapsuleResp, cqe), 8);
    assert_eq!(offset_of!(H2CData, cccid), 8);
    assert_eq!(offset_of!(H2CData, ttag), 10);
    assert_eq!(offset_of!(H2CData, datao), 12);
    assert_eq!(offset_of!(H2CData, datal), 16);
    assert_eq!(offset_of!(C2HData, datao), 12);
    assert_eq!(offset_of!(C2HData, datal), 16);
    assert_eq!(offset_of!(R2T, ttag), 10);
    assert_eq!(offset_of!(R2T, r2to), 12);
    assert_eq!(offset_of!(R2T, r2tl), 16);
}

#[test]
fn icreq_bytes_and_parse() {
    // What the Linux host sends: type 0, flags 0, hlen 128, pdo 0, plen 128,
    // pfv 0, hpda 0, dgst = hdgst|ddgst, maxr2t 0.
    let r = IcReq::new(0, true, true, 0);
    let b = r.as_bytes();
    assert_eq!(&b[..12], &[0, 0, 128, 0, 128, 0, 0, 0, 0, 0, 0, 3]);
    assert!(b[12..].iter().all(|&x| x == 0));
    let h = PduHeader::parse(b, &ParseOptions::new(Role::Controller)).unwrap();
    assert_eq!(h.pdu_type, PduType::IcReq);
    assert_eq!((h.plen(), h.data_len, h.header_len()), (128, 0, 128));
    match h.body {
        PduBody::IcReq(r) => assert!(r.hdgst() && r.ddgst()),
        other => panic!("{other:?}"),
    }
    // Digests never apply to ICReq, even when a (wrongly configured) caller says so.
    assert!(PduHeader::parse(b, &ctrl(true, true)).is_ok());
}

#[test]
fn icresp_round_trip() {
    let r = IcResp::new(0, false, true, 128 * 1024);
    let b = r.as_bytes();
    assert_eq!(
        &b[..16],
        &[1, 0, 128, 0, 128, 0, 0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    );
    let h = PduHeader::parse(b, &ParseOptions::new(Role::Host)).unwrap();
    assert_eq!(h.body, PduBody::IcResp(r));
}

#[test]
fn capsule_cmd_layouts() {
    let cmd = Command::write_blocks(1, 0, 8, false).with_cid(9);
    // No data, no digests.
    let c = CapsuleCmd::new(cmd, 0, false, false, 0).unwrap();
    assert_eq!(c.as_bytes()[..8], [4, 0, 72, 0, 72, 0, 0, 0]);
    let h = PduHeader::parse(c.as_bytes(), &ctrl(false, false)).unwrap();
    assert_eq!((h.data_offset, h.data_len), (0, 0));
    assert_eq!(h.body, PduBody::CapsuleCmd(c));
    // 4 KiB in-capsule data with both digests: PDO = 72 + 4, PLEN = 76 + 4096 + 4.
    let c = CapsuleCmd::new(cmd, 4096, true, true, 0).unwrap();
    assert_eq!(c.ch.flags, pdu_flags::HDGSTF | pdu_flags::DDGSTF);
    assert_eq!((c.ch.pdo, c.ch.plen()), (76, 4176));
    let buf = pdu(c.as_bytes(), true);
    let h = PduHeader::parse(&buf, &ctrl(true, true)).unwrap();
    assert_eq!(h.data_range(), 76..4172);
    assert_eq!(h.data_digest_range(), Some(4172..4176));
    assert_eq!(h.header_len(), 76);
    // CPDA 31 (128-byte alignment) pushes PDO to 128.
    let c = CapsuleCmd::new(cmd, 512, false, false, 31).unwrap();
    assert_eq!((c.ch.pdo, c.ch.plen()), (128, 640));
    let o = ParseOptions {
        pda: 31,
        ..ctrl(false, false)
    };
    assert_eq!(PduHeader::parse(c.as_bytes(), &o).unwrap().data_offset, 128);
    // Header digest but no data digest: DDGSTF stays clear.
    let c = CapsuleCmd::new(cmd, 0, true, true, 0).unwrap();
    assert_eq!(
        (c.ch.flags, c.ch.pdo, c.ch.plen()),
        (pdu_flags::HDGSTF, 0, 76)
    );
    assert!(PduHeader::parse(&pdu(c.as_bytes(), true), &ctrl(true, true)).is_ok());
}

#[test]
fn data_pdus_round_trip() {
    let d = H2CData::new(3, 7, 8192, 4096, true, false, true, 0).unwrap();
    assert_eq!((d.ch.pdo, d.ch.plen()), (24, 24 + 4096 + 4));
    assert_eq!(d.ch.flags, pdu_flags::DDGSTF | pdu_flags::LAST_PDU);
    let h = PduHeader::parse(d.as_bytes(), &ctrl(false, true)).unwrap();
    assert!(h.last_pdu());
    assert_eq!(h.body, PduBody::H2CData(d));

    let d = C2HData::new(3, 0, 512, false, true, true, false, 0).unwrap();
    assert_eq!(
        d.ch.flags,
        pdu_flags::HDGSTF | pdu_flags::LAST_PDU | pdu_flags::SUCCESS
    );
    assert_eq!((d.ch.pdo, d.ch.plen()), (28, 540));
    let h = PduHeader::parse(&pdu(d.as_bytes(), true), &host(true, false)).unwrap();
    assert!(h.success() && h.last_pdu());
    assert_eq!(h.data_range(), 28..540);

    let r = R2T::new(3, 1, 0, 65536, false);
    assert_eq!(r.as_bytes()[..8], [9, 0, 24, 0, 24, 0, 0, 0]);
    assert_eq!(
        PduHeader::parse(r.as_bytes(), &host(false, false))
            .unwrap()
            .body,
        PduBody::R2T(r)
    );

    let resp = CapsuleResp::new(
        Completion::new(3, Status::LBA_OUT_OF_RANGE.with_dnr()),
        true,
    );
    let buf = pdu(resp.as_bytes(), true);
    assert_eq!(buf.len(), 28);
    let h = PduHeader::parse(&buf, &host(true, true)).unwrap();
    match h.body {
        PduBody::CapsuleResp(r) => assert_eq!(r.cqe.status(), Status::LBA_OUT_OF_RANGE.with_dnr()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn term_req_encode_and_parse() {
    let bad = [0x04u8, 0, 99, 0, 72, 0, 0, 0];
    let e = err(&bad, &ctrl(false, false));
    assert_eq!(
        e,
        PduError::InvalidField {
            offset: 2,
            what: "HLEN does not match the PDU type"
        }
    );
    assert_eq!((e.fes(), e.fei()), (Some(fes::INVALID_HEADER_FIELD), 2));
    let mut out = [0u8; 200];
    let n = TermReq::encode(&mut out, Role::Controller, &e, &bad).unwrap();
    assert_eq!(n, 32);
    assert_eq!(&out[..14], &[3, 0, 24, 0, 32, 0, 0, 0, 1, 0, 2, 0, 0, 0]);
    assert_eq!(&out[24..32], &bad);
    let h = PduHeader::parse(&out[..n], &host(true, true)).unwrap();
    assert_eq!(h.pdu_type, PduType::C2HTermReq);
    assert_eq!(h.data_range(), 24..32);
    match h.body {
        PduBody::TermReq(t) => assert_eq!((t.fes.get(), t.fei.get()), (1, 2)),
        other => panic!("{other:?}"),
    }
    // At most 128 bytes of the offending header are echoed; a short buffer truncates.
    let n = TermReq::encode(&mut out, Role::Host, &e, &[0u8; 300]).unwrap();
    assert_eq!(n, 152);
    assert_eq!(out[0], 2);
    assert!(PduHeader::parse(&out[..n], &ctrl(false, false)).is_ok());
    assert_eq!(
        TermReq::encode(&mut out[..30], Role::Host, &e, &[0u8; 300]),
        Some(30)
    );
    assert_eq!(TermReq::encode(&mut out[..10], Role::Host, &e, &bad), None);
    let t = PduError::Truncated { needed: 8, have: 0 };
    assert_eq!(TermReq::encode(&mut out, Role::Host, &t, &bad), None);
}

#[test]
fn bytes_needed() {
    let o = ctrl(true, false);
    assert_eq!(PduHeader::bytes_needed(&[], &o), Ok(8));
    assert_eq!(PduHeader::bytes_needed(&[4, 1, 72], &o), Ok(8));
    assert_eq!(
        PduHeader::bytes_needed(&[4, 1, 72, 0, 76, 0, 0, 0], &o),
        Ok(76)
    );
    assert_eq!(
        PduHeader::bytes_needed(&[0, 0, 128, 0, 128, 0, 0, 0], &o),
        Ok(128)
    );
    assert_eq!(
        PduHeader::bytes_needed(&[6, 0, 24, 0, 28, 0, 0, 0], &ctrl(false, false)),
        Ok(24)
    );
    // A digest flag that contradicts the negotiation fails before the header is read.
    assert!(matches!(
        PduHeader::bytes_needed(&[6, 1, 24, 0, 28, 0, 0, 0], &ctrl(false, false)),
        Err(PduError::InvalidField { offset: 1, .. })
    ));
    assert!(matches!(
        PduHeader::bytes_needed(&[8, 0, 24, 0, 24, 0, 0, 0], &o),
        Err(PduError::UnknownType(8))
    ));
    assert!(matches!(
        PduHeader::bytes_needed(&[4, 1, 200, 0, 76, 0, 0, 0], &o),
        Err(PduError::InvalidField { offset: 2, .. })
    ));
}

#[test]
fn rejects_truncated() {
    let c = CapsuleCmd::new(Command::flush(1), 0, true, false, 0).unwrap();
    let buf = pdu(c.as_bytes(), true);
    for n in 0..buf.len() {
        let e = err(&buf[..n], &ctrl(true, false));
        assert!(e.is_incomplete(), "{n}: {e:?}");
        assert_eq!(e.fes(), None);
    }
    assert!(PduHeader::parse(&buf, &ctrl(true, false)).is_ok());
}

#[test]
fn rejects_unknown_and_misdirected_types() {
    for t in [0x08u8, 0x0A, 0x0B, 0x10, 0x7F, 0xFF] {
        let b = [t, 0, 24, 0, 24, 0, 0, 0];
        let e = err(&b, &ctrl(false, false));
        assert_eq!(e, PduError::UnknownType(t));
        assert_eq!((e.fes(), e.fei()), (Some(1), 0));
    }
    // A host never receives a CapsuleCmd; a controller never receives R2T or ICResp.
    let c = CapsuleCmd::new(Command::flush(1), 0, false, false, 0).unwrap();
    assert!(matches!(
        err(c.as_bytes(), &host(false, false)),
        PduError::WrongDirection { .. }
    ));
    let r = R2T::new(1, 1, 0, 4096, false);
    assert!(matches!(
        err(r.as_bytes(), &ctrl(false, false)),
        PduError::WrongDirection { .. }
    ));
    let r = IcResp::new(0, false, false, 4096);
    assert_eq!(
        err(r.as_bytes(), &ctrl(false, false)).fes(),
        Some(fes::INVALID_HEADER_FIELD)
    );
}

#[test]
fn rejects_bad_hlen_pdo_plen() {
    let o = ctrl(false, false);
    let good = CapsuleCmd::new(Command::flush(1), 512, false, false, 0).unwrap();
    let base = pdu(good.as_bytes(), false);
    assert!(PduHeader::parse(&base, &o).is_ok());
    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        err(&b, &o)
    };
    let fei = |e: PduError| (e.fes(), e.fei());
    assert_eq!(fei(mutate(&|b| b[2] = 24)), (Some(1), 2));
    assert_eq!(fei(mutate(&|b| b[2] = 0)), (Some(1), 2));
    // PDO inside the header, misaligned, past the data, or zero while data is present.
    assert_eq!(fei(mutate(&|b| b[3] = 8)), (Some(1), 3));
    assert_eq!(fei(mutate(&|b| b[3] = 74)), (Some(1), 3));
    assert_eq!(fei(mutate(&|b| b[3] = 76)), (Some(1), 3));
    assert_eq!(fei(mutate(&|b| b[3] = 0)), (Some(1), 3));
    // PLEN shorter than PDO.
    assert_eq!(
        fei(mutate(&|b| b[4..8].copy_from_slice(&71u32.to_le_bytes()))),
        (Some(1), 4)
    );
    // PLEN 0 and PLEN == PDO (empty data) with DDGSTF.
    assert_eq!(
        fei(mutate(&|b| b[4..8].copy_from_slice(&0u32.to_le_bytes()))),
        (Some(1), 4)
    );

    // PDUs without data: any PDO, or PLEN != HLEN, is invalid.
    let r = CapsuleResp::new(Completion::new(1, Status::SUCCESS), false);
    let mut b = r.as_bytes().to_vec();
    b[3] = 24;
    assert_eq!(fei(err(&b, &host(false, false))), (Some(1), 3));
    let mut b = r.as_bytes().to_vec();
    b[4] = 28;
    assert_eq!(fei(err(&b, &host(false, false))), (Some(1), 4));
    let mut b = IcReq::new(0, false, false, 0).as_bytes().to_vec();
    b[4] = 0;
    b[5] = 1;
    assert_eq!(fei(err(&b, &o)), (Some(1), 4));

    // Termination requests: PLEN within 24..=152.
    let mut t = TermReq::new(PduType::H2CTermReq, 1, 0, 0)
        .as_bytes()
        .to_vec();
    t[4] = 153;
    assert_eq!(fei(err(&t, &o)), (Some(1), 4));
    t[4] = 23;
    assert_eq!(fei(err(&t, &o)), (Some(1), 4));

    // Alignment under PDA 1 (8 bytes) with a header digest (header ends at 76):
    // 80 is the padded offset, 76 (no padding, as SPDK sends) is tolerated,
    // 78 is misaligned and 84 is past the padding.
    let o8 = ParseOptions {
        pda: 1,
        ..ctrl(true, false)
    };
    let aligned = CapsuleCmd::new(Command::flush(1), 512, true, false, 1).unwrap();
    assert_eq!(aligned.ch.pdo, 80);
    assert!(PduHeader::parse(&pdu(aligned.as_bytes(), true), &o8).is_ok());
    for (pdo, ok) in [(76u8, true), (78, false), (84, false), (72, false)] {
        let mut c = aligned;
        c.ch.pdo = pdo;
        let r = PduHeader::parse(&pdu(c.as_bytes(), true), &o8);
        assert_eq!(r.is_ok(), ok, "pdo {pdo}: {r:?}");
        if !ok {
            assert_eq!(fei(r.unwrap_err()), (Some(1), 3));
        }
    }
}

#[test]
fn rejects_digest_flag_mismatches() {
    let cmd = Command::flush(1);
    // HDGSTF set but not negotiated, and the reverse.
    let c = CapsuleCmd::new(cmd, 0, true, false, 0).unwrap();
    let b = pdu(c.as_bytes(), true);
    assert_eq!(err(&b, &ctrl(false, false)).fei(), 1);
    let c = CapsuleCmd::new(cmd, 0, false, false, 0).unwrap();
    assert_eq!(err(c.as_bytes(), &ctrl(true, false)).fei(), 1);
    // DDGSTF set but not negotiated.
    let c = CapsuleCmd::new(cmd, 64, false, true, 0).unwrap();
    assert_eq!(err(&pdu(c.as_bytes(), false), &ctrl(false, false)).fei(), 1);
    // DDGSTF missing although negotiated and data present (PLEN without digest).
    let c = CapsuleCmd::new(cmd, 64, false, false, 0).unwrap();
    assert_eq!(err(&pdu(c.as_bytes(), false), &ctrl(false, true)).fei(), 1);
    // DDGSTF on a PDU that has no data.
    let mut r = R2T::new(1, 1, 0, 4096, false);
    r.ch.flags |= pdu_flags::DDGSTF;
    assert_eq!(err(r.as_bytes(), &host(false, true)).fei(), 1);
    let mut c = CapsuleCmd::new(cmd, 0, false, false, 0).unwrap();
    c.ch.flags |= pdu_flags::DDGSTF;
    assert_eq!(err(c.as_bytes(), &ctrl(false, true)).fei(), 1);
    // Digest flags on ICReq or a termination request.
    let mut i = IcReq::new(0, true, true, 0);
    i.ch.flags = pdu_flags::HDGSTF;
    assert_eq!(err(i.as_bytes(), &ctrl(false, false)).fei(), 1);
    // SUCCESS without LAST_PDU.
    let mut d = C2HData::new(1, 0, 16, false, false, false, false, 0).unwrap();
    d.ch.flags |= pdu_flags::SUCCESS;
    assert_eq!(err(&pdu(d.as_bytes(), false), &host(false, false)).fei(), 1);
}

#[test]
fn rejects_header_digest_mismatch() {
    let c = CapsuleCmd::new(Command::flush(1), 0, true, false, 0).unwrap();
    let mut b = pdu(c.as_bytes(), true);
    b[72] ^= 1;
    let e = err(&b, &ctrl(true, false));
    assert!(matches!(e, PduError::HeaderDigest { .. }));
    assert_eq!((e.fes(), e.fei()), (Some(fes::HEADER_DIGEST_ERROR), 0));
    // A flipped header bit is caught too.
    let mut b = pdu(c.as_bytes(), true);
    b[8 + 4] ^= 0x80;
    assert!(matches!(
        err(&b, &ctrl(true, false)),
        PduError::HeaderDigest { .. }
    ));
}

#[test]
fn rejects_data_length_problems() {
    // DATAL disagrees with PLEN.
    let mut d = H2CData::new(1, 1, 0, 4096, true, false, false, 0).unwrap();
    d.datal.set(4095);
    assert_eq!(err(d.as_bytes(), &ctrl(false, false)).fei(), 16);
    let mut d = C2HData::new(1, 0, 4096, true, false, false, false, 0).unwrap();
    d.datal.set(8192);
    assert_eq!(err(d.as_bytes(), &host(false, false)).fei(), 16);
    // More than MAXH2CDATA in one H2CData PDU.
    let d = H2CData::new(1, 1, 0, 256 * 1024, true, false, false, 0).unwrap();
    let e = err(d.as_bytes(), &ctrl(false, false));
    assert_eq!(
        e,
        PduError::DataLimitExceeded {
            len: 256 * 1024,
            max: 128 * 1024
        }
    );
    assert_eq!(e.fes(), Some(fes::DATA_LIMIT_EXCEEDED));
    // In-capsule data over the advertised capsule size.
    let c = CapsuleCmd::new(Command::flush(1), 8193, false, false, 0).unwrap();
    assert!(matches!(
        err(c.as_bytes(), &ctrl(false, false)),
        PduError::DataLimitExceeded { .. }
    ));
    let c = CapsuleCmd::new(Command::flush(1), 8192, false, false, 0).unwrap();
    assert!(PduHeader::parse(c.as_bytes(), &ctrl(false, false)).is_ok());
}

#[test]
fn rejects_bad_ic_parameters() {
    let mut i = IcReq::new(0, false, false, 0);
    i.pfv.set(1);
    let e = err(i.as_bytes(), &ctrl(false, false));
    assert_eq!((e.fes(), e.fei()), (Some(fes::UNSUPPORTED_PARAMETER), 8));
    let i = IcReq::new(32, false, false, 0);
    assert_eq!(err(i.as_bytes(), &ctrl(false, false)).fei(), 10);
    let r = IcResp::new(0, false, false, 2048);
    assert_eq!(err(r.as_bytes(), &host(false, false)).fei(), 12);
    let r = IcResp::new(0, false, false, 4098);
    assert_eq!(err(r.as_bytes(), &host(false, false)).fei(), 12);
    let r = IcResp::new(40, false, false, 4096);
    assert_eq!(err(r.as_bytes(), &host(false, false)).fei(), 10);
}

#[test]
fn layout_overflow_is_none() {
    assert!(PduLayout::compute(PduType::C2HData, u32::MAX - 10, true, true, 0).is_none());
    assert!(C2HData::new(1, 0, u32::MAX, true, false, false, false, 0).is_none());
    assert_eq!(pda_alignment(0), 4);
    assert_eq!(pda_alignment(31), 128);
}

#[test]
fn names() {
    assert_eq!(PduType::R2T.name(), "R2T");
    assert_eq!(fes::name(5), "Data Transfer Limit Exceeded");
    assert_eq!(PduType::from_u8(9), Some(PduType::R2T));
    assert_eq!(PduType::from_u8(8), None);
    let e = PduError::InvalidField {
        offset: 3,
        what: "x",
    };
    assert_eq!(e.to_string(), "invalid PDU header field at byte 3: x");
}

/// Deterministic garbage through every parser configuration: must never panic.
#[test]
fn garbage_never_panics() {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = [0u8; 300];
    for i in 0..20_000 {
        for b in buf.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
        // Bias towards plausible headers so the deeper checks run.
        buf[0] %= 12;
        if i % 2 == 0 {
            buf[2] = PduType::from_u8(buf[0]).map_or(24, |t| t.header_len());
        }
        let len = (s as usize >> 8) % buf.len();
        for o in [
            ctrl(false, false),
            ctrl(true, true),
            host(true, false),
            host(false, true),
        ] {
            let o = ParseOptions {
                pda: (s >> 40) as u8 % 33,
                ..o
            };
            let _ = PduHeader::bytes_needed(&buf[..len], &o);
            if let Err(e) = PduHeader::parse(&buf[..len], &o) {
                let mut out = [0u8; 160];
                let _ = TermReq::encode(&mut out, o.receiver, &e, &buf[..len]);
            }
        }
    }
}
