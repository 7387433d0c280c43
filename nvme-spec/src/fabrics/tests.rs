use super::*;
use crate::status::Status;
use core::mem::offset_of;
use zerocopy::IntoBytes;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0c0f6a1e-4a41-4c8e-9d3f-2b1f8f0a7e11";
const SUB: &str = "nqn.2024-05.io.plexstor:vol-1";

#[test]
fn connect_data_layout() {
    assert_eq!(offset_of!(ConnectData, cntlid), 16);
    assert_eq!(offset_of!(ConnectData, subnqn), 256);
    assert_eq!(offset_of!(ConnectData, hostnqn), 512);
    assert_eq!(offset_of!(ConnectData, rsvd2), 768);
    let d = ConnectData::new([0xAB; 16], CNTLID_DYNAMIC, SUB, HOST).unwrap();
    let b = d.as_bytes();
    assert_eq!(&b[..16], &[0xAB; 16]);
    assert_eq!(&b[16..18], &[0xFF, 0xFF]);
    assert_eq!(&b[256..256 + SUB.len()], SUB.as_bytes());
    assert_eq!(b[256 + SUB.len()], 0);
    assert_eq!(&b[512..512 + HOST.len()], HOST.as_bytes());
    let back = ConnectData::read(b).unwrap();
    assert_eq!(back.subnqn(), Ok(SUB));
    assert_eq!(back.hostnqn(), Ok(HOST));
    assert_eq!(back.cntlid(), 0xFFFF);
    assert!(ConnectData::read(&b[..1023]).is_none());
    assert!(ConnectData::new([0; 16], 1, &"a".repeat(256), HOST).is_none());
}

#[test]
fn connect_data_nqn_checks() {
    let mut d = ConnectData::default();
    assert_eq!(d.subnqn(), Err(NqnError::Empty));
    d.subnqn = [b'a'; 256];
    assert_eq!(d.subnqn(), Err(NqnError::TooLong));
    d.subnqn = [0; 256];
    d.subnqn[..224].fill(b'a');
    assert_eq!(d.subnqn(), Err(NqnError::TooLong));
    d.subnqn[223] = 0;
    assert_eq!(d.subnqn().map(str::len), Ok(223));
    d.hostnqn[..4].copy_from_slice(&[b'n', 0xFF, 0xFE, b'q']);
    assert_eq!(d.hostnqn(), Err(NqnError::NotUtf8));
    // Bytes after the NUL are ignored.
    d.hostnqn = [0; 256];
    d.hostnqn[..3].copy_from_slice(b"abc");
    d.hostnqn[10] = b'z';
    assert_eq!(d.hostnqn(), Ok("abc"));
}

#[test]
fn connect_command_bytes() {
    // Admin queue Connect: QID 0, SQSIZE 32 (wire 31), KATO 5000 ms.
    let c = Connect {
        recfmt: 0,
        qid: 0,
        sqsize: 32,
        cattr: 0,
        kato: 5000,
    }
    .to_command(0x10);
    let b = c.as_bytes();
    assert_eq!(b[0], 0x7F);
    assert_eq!(b[1], 0x40);
    assert_eq!(&b[2..4], &[0x10, 0]);
    assert_eq!(b[4], 0x01);
    assert_eq!(&b[32..36], &1024u32.to_le_bytes());
    assert_eq!(b[39], 0x01);
    assert_eq!(&b[40..42], &[0, 0]);
    assert_eq!(&b[42..44], &[0, 0]);
    assert_eq!(&b[44..46], &31u16.to_le_bytes());
    assert_eq!(b[46], 0);
    assert_eq!(&b[48..52], &5000u32.to_le_bytes());
    // I/O queue 3 of 128 entries with a CATTR.
    let c = Connect {
        recfmt: 0,
        qid: 3,
        sqsize: 128,
        cattr: 4,
        kato: 0,
    }
    .to_command(1);
    assert_eq!(&c.as_bytes()[42..47], &[3, 0, 127, 0, 4]);
    assert_eq!(
        Connect::from_command(&c),
        Some(Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 128,
            cattr: 4,
            kato: 0
        })
    );
    // Not a Connect.
    let mut p = c;
    p.nsid.set(u32::from(fctype::PROPERTY_GET));
    assert_eq!(Connect::from_command(&p), None);
    p.opcode = 0x06;
    p.nsid.set(1);
    assert_eq!(Connect::from_command(&p), None);
}

#[test]
fn connect_responses() {
    let ok = connect_success(7, 0x12, authreq::ATR);
    assert_eq!(ok.result.get(), 0x12 | 1 << 17);
    assert_eq!(connect_result_cntlid(&ok), 0x12);
    assert_eq!(connect_result_authreq(&ok), authreq::ATR);
    // Bad host NQN: IATTR 1 (data), IPO 512.
    let dw0 = invalid_param_dw0(InvalidParamIn::Data, connect_data_offset::HOSTNQN);
    assert_eq!(dw0, 0x0001_0200);
    assert_eq!(decode_invalid_param_dw0(dw0), (InvalidParamIn::Data, 512));
    // Bad QID in the SQE: IATTR 0, IPO 42.
    let dw0 = invalid_param_dw0(InvalidParamIn::Command, connect_sqe_offset::QID);
    assert_eq!(dw0, 42);
    let mut cqe = Completion::new(7, Status::CONNECT_INVALID_PARAMETERS);
    cqe.result.set(dw0);
    assert_eq!(cqe.status().sc, 0x82);
    assert_eq!(cqe.status().sct, 1);
}

#[test]
fn property_commands() {
    let g = PropertyGet {
        size: PropertySize::Eight,
        offset: 0,
    };
    let c = g.to_command(3);
    assert_eq!(c.as_bytes()[4], 0x04);
    assert_eq!(c.as_bytes()[40], 1);
    assert_eq!(&c.as_bytes()[44..48], &[0, 0, 0, 0]);
    assert_eq!(PropertyGet::from_command(&c), Some(g));
    let s = PropertySet {
        size: PropertySize::Four,
        offset: 0x14,
        value: 0x0046_0001,
    };
    let c = s.to_command(4);
    assert_eq!(c.as_bytes()[4], 0x00);
    assert_eq!(c.as_bytes()[40], 0);
    assert_eq!(&c.as_bytes()[44..48], &0x14u32.to_le_bytes());
    assert_eq!(&c.as_bytes()[48..56], &0x0046_0001u64.to_le_bytes());
    assert_eq!(PropertySet::from_command(&c), Some(s));
    // Upper half of a 4-byte set is ignored; reserved sizes are refused.
    let mut c2 = c;
    c2.cdw13.set(0xDEAD);
    assert_eq!(PropertySet::from_command(&c2).unwrap().value, 0x0046_0001);
    c2.cdw10.set(2);
    assert_eq!(PropertySet::from_command(&c2), None);
    assert_eq!(PropertyGet::from_command(&c), None);
    let d = Disconnect::default().to_command(9);
    assert_eq!(d.as_bytes()[4], 0x08);
    assert_eq!(Disconnect::from_command(&d), Some(Disconnect { recfmt: 0 }));
    assert_eq!(Disconnect::from_command(&c), None);
}

#[test]
fn nqn_validation() {
    assert_eq!(validate_nqn(DISCOVERY_NQN), Ok(()));
    assert_eq!(validate_nqn(HOST), Ok(()));
    assert_eq!(validate_nqn(SUB), Ok(()));
    assert_eq!(validate_nqn("nqn.2016-06.io.spdk:cnode1"), Ok(()));
    assert_eq!(validate_nqn("nqn.2014-08.com.example"), Ok(()));
    assert_eq!(validate_nqn(""), Err(NqnError::Empty));
    assert_eq!(
        validate_nqn("iqn.2016-06.io.spdk:x"),
        Err(NqnError::BadPrefix)
    );
    assert_eq!(validate_nqn("nqn.16-06.io.spdk:x"), Err(NqnError::BadDate));
    assert_eq!(
        validate_nqn("nqn.2016-13.io.spdk:x"),
        Err(NqnError::BadDate)
    );
    assert_eq!(
        validate_nqn("nqn.2016-00.io.spdk:x"),
        Err(NqnError::BadDate)
    );
    assert_eq!(validate_nqn("nqn.2016-06"), Err(NqnError::BadDate));
    assert_eq!(validate_nqn("nqn.2016-06io.spdk"), Err(NqnError::BadDate));
    assert_eq!(validate_nqn("nqn.2016-06.:x"), Err(NqnError::BadDomain));
    assert_eq!(
        validate_nqn("nqn.2016-06.io..spdk:x"),
        Err(NqnError::BadDomain)
    );
    assert_eq!(
        validate_nqn("nqn.2016-06.io.sp dk:x"),
        Err(NqnError::BadDomain)
    );
    assert_eq!(
        validate_nqn("nqn.2016-06.-io.spdk"),
        Err(NqnError::BadDomain)
    );
    assert_eq!(
        validate_nqn("nqn.2014-08.org.nvmexpress:uuid:not-a-uuid"),
        Err(NqnError::BadUuid)
    );
    assert_eq!(
        validate_nqn("nqn.2014-08.org.nvmexpress:uuid:0c0f6a1e-4a41-4c8e-9d3f-2b1f8f0a7e1"),
        Err(NqnError::BadUuid)
    );
    // Length limit is 223 bytes.
    let base = "nqn.2024-01.io.plexstor:";
    let ok = format!("{base}{}", "x".repeat(223 - base.len()));
    assert_eq!(validate_nqn(&ok), Ok(()));
    assert_eq!(validate_nqn(&format!("{ok}y")), Err(NqnError::TooLong));
    // Multi-byte UTF-8 is allowed after the domain and never splits a check.
    assert_eq!(validate_nqn("nqn.2024-01.io.plexstor:völ"), Ok(()));
    assert_eq!(validate_nqn("nqn.2024-0ö.io"), Err(NqnError::BadDate));
}
