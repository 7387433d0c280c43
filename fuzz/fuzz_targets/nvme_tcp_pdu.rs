//! Fuzzes the NVMe/TCP PDU header parser and the command, Connect and
//! Identify-descriptor decoders with arbitrary bytes. Besides "no panic", it
//! checks that an accepted header describes a PDU whose pieces fit in PLEN,
//! since the transports slice receive buffers with those ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_spec::cmd::{
    Abort, CreateIoQueue, DatasetManagement, GetFeatures, GetLogPage, Identify, ReadWrite,
    SetFeatures, WriteZeroes,
};
use nvme_spec::fabrics::{validate_nqn, Connect, Disconnect, PropertyGet, PropertySet};
use nvme_spec::identify::parse_ns_id_descriptors;
use nvme_spec::tcp::{ParseOptions, PduBody, Role, TermReq};
use nvme_spec::{Command, Completion, ConnectData, DsmRange, PduHeader, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else {
        return;
    };
    let receiver = if knobs & 1 == 0 { Role::Controller } else { Role::Host };
    let opts = ParseOptions {
        receiver,
        hdgst: knobs & 2 != 0,
        ddgst: knobs & 4 != 0,
        pda: (knobs >> 3) & 0x1F,
        max_h2c_data: 128 * 1024,
        max_in_capsule_data: 8192,
    };

    let needed = PduHeader::bytes_needed(rest, &opts);
    match PduHeader::parse(rest, &opts) {
        Ok(h) => {
            let plen = h.plen() as usize;
            assert!(needed.is_ok());
            assert!(h.header_len() <= plen);
            assert!(h.header_len() <= rest.len());
            let data = h.data_range();
            assert!(data.start <= data.end);
            if h.data_len > 0 {
                assert!(data.start >= h.header_len());
            }
            let end = h.data_digest_range().map_or(data.end, |r| r.end);
            assert!(end <= plen, "pieces overrun PLEN: {h:?}");
            if let PduBody::CapsuleCmd(c) = h.body {
                decode_command(&c.cmd);
                if let Some(payload) = rest.get(data) {
                    decode_payloads(payload);
                }
            }
        }
        Err(e) => {
            if !e.is_incomplete() {
                assert!(e.fes().is_some());
                let mut out = [0u8; 152];
                let n = TermReq::encode(&mut out, receiver, &e, rest).unwrap();
                assert!((24..=152).contains(&n));
            }
        }
    }

    // The same bytes as a bare SQE, CQE and payloads.
    if let Some(c) = Command::read(rest) {
        decode_command(&c);
    }
    if let Some(cqe) = Completion::read(rest) {
        let s = cqe.status();
        assert_eq!(Status::from_word(s.to_word(cqe.phase())), s);
        let _ = s.to_string();
    }
    decode_payloads(rest);
});

fn decode_command(c: &Command) {
    let _ = c.opcode_name(true);
    let _ = c.opcode_name(false);
    let _ = c.sgl1();
    let rw = ReadWrite::from_command(c);
    let _ = rw.end_lba();
    let mut back = Command::new(c.opcode);
    rw.apply(&mut back);
    assert_eq!(ReadWrite::from_command(&back).slba, rw.slba);
    let _ = WriteZeroes::from_command(c);
    let _ = DatasetManagement::from_command(c).data_len();
    let _ = Identify::from_command(c);
    let _ = GetFeatures::from_command(c);
    let _ = SetFeatures::from_command(c);
    let g = GetLogPage::from_command(c);
    let _ = g.len_bytes();
    let _ = Abort::from_command(c);
    let _ = CreateIoQueue::from_command(c);
    if let Some(conn) = Connect::from_command(c) {
        let again = Connect::from_command(&conn.to_command(c.cid())).unwrap();
        assert_eq!(again, conn);
    }
    let _ = PropertyGet::from_command(c);
    let _ = PropertySet::from_command(c);
    let _ = Disconnect::from_command(c);
}

fn decode_payloads(bytes: &[u8]) {
    if let Some(d) = ConnectData::read(bytes) {
        if let Ok(n) = d.subnqn() {
            let _ = validate_nqn(n);
        }
        if let Ok(n) = d.hostnqn() {
            let _ = validate_nqn(n);
        }
    }
    if let Ok(s) = core::str::from_utf8(bytes) {
        let _ = validate_nqn(s);
    }
    for _ in parse_ns_id_descriptors(bytes) {}
    if let Some(r) = DsmRange::slice_from(bytes) {
        for range in r {
            let _ = range.slba.get().checked_add(u64::from(range.nlb.get()));
        }
    }
}
