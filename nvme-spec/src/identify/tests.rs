use super::*;
use core::mem::offset_of;

#[test]
fn controller_offsets() {
    type C = IdentifyController;
    assert_eq!(offset_of!(C, sn), 4);
    assert_eq!(offset_of!(C, mn), 24);
    assert_eq!(offset_of!(C, fr), 64);
    assert_eq!(offset_of!(C, rab), 72);
    assert_eq!(offset_of!(C, ieee), 73);
    assert_eq!(offset_of!(C, cmic), 76);
    assert_eq!(offset_of!(C, mdts), 77);
    assert_eq!(offset_of!(C, cntlid), 78);
    assert_eq!(offset_of!(C, ver), 80);
    assert_eq!(offset_of!(C, rtd3r), 84);
    assert_eq!(offset_of!(C, rtd3e), 88);
    assert_eq!(offset_of!(C, oaes), 92);
    assert_eq!(offset_of!(C, ctratt), 96);
    assert_eq!(offset_of!(C, rrls), 100);
    assert_eq!(offset_of!(C, cntrltype), 111);
    assert_eq!(offset_of!(C, fguid), 112);
    assert_eq!(offset_of!(C, crdt1), 128);
    assert_eq!(offset_of!(C, crdt3), 132);
    assert_eq!(offset_of!(C, nvmsr), 253);
    assert_eq!(offset_of!(C, mec), 255);
    assert_eq!(offset_of!(C, oacs), 256);
    assert_eq!(offset_of!(C, acl), 258);
    assert_eq!(offset_of!(C, aerl), 259);
    assert_eq!(offset_of!(C, frmw), 260);
    assert_eq!(offset_of!(C, lpa), 261);
    assert_eq!(offset_of!(C, elpe), 262);
    assert_eq!(offset_of!(C, npss), 263);
    assert_eq!(offset_of!(C, avscc), 264);
    assert_eq!(offset_of!(C, apsta), 265);
    assert_eq!(offset_of!(C, wctemp), 266);
    assert_eq!(offset_of!(C, cctemp), 268);
    assert_eq!(offset_of!(C, mtfa), 270);
    assert_eq!(offset_of!(C, hmpre), 272);
    assert_eq!(offset_of!(C, tnvmcap), 280);
    assert_eq!(offset_of!(C, unvmcap), 296);
    assert_eq!(offset_of!(C, rpmbs), 312);
    assert_eq!(offset_of!(C, edstt), 316);
    assert_eq!(offset_of!(C, kas), 320);
    assert_eq!(offset_of!(C, hctma), 322);
    assert_eq!(offset_of!(C, sanicap), 328);
    assert_eq!(offset_of!(C, hmminds), 332);
    assert_eq!(offset_of!(C, nsetidmax), 338);
    assert_eq!(offset_of!(C, anatt), 342);
    assert_eq!(offset_of!(C, anacap), 343);
    assert_eq!(offset_of!(C, anagrpmax), 344);
    assert_eq!(offset_of!(C, nanagrpid), 348);
    assert_eq!(offset_of!(C, pels), 352);
    assert_eq!(offset_of!(C, domainid), 356);
    assert_eq!(offset_of!(C, megcap), 368);
    assert_eq!(offset_of!(C, sqes), 512);
    assert_eq!(offset_of!(C, cqes), 513);
    assert_eq!(offset_of!(C, maxcmd), 514);
    assert_eq!(offset_of!(C, nn), 516);
    assert_eq!(offset_of!(C, oncs), 520);
    assert_eq!(offset_of!(C, fuses), 522);
    assert_eq!(offset_of!(C, fna), 524);
    assert_eq!(offset_of!(C, vwc), 525);
    assert_eq!(offset_of!(C, awun), 526);
    assert_eq!(offset_of!(C, awupf), 528);
    assert_eq!(offset_of!(C, nvscc), 530);
    assert_eq!(offset_of!(C, nwpc), 531);
    assert_eq!(offset_of!(C, acwu), 532);
    assert_eq!(offset_of!(C, ocfs), 534);
    assert_eq!(offset_of!(C, sgls), 536);
    assert_eq!(offset_of!(C, mnan), 540);
    assert_eq!(offset_of!(C, maxdna), 544);
    assert_eq!(offset_of!(C, maxcna), 560);
    assert_eq!(offset_of!(C, subnqn), 768);
    assert_eq!(offset_of!(C, ioccsz), 1792);
    assert_eq!(offset_of!(C, iorcsz), 1796);
    assert_eq!(offset_of!(C, icdoff), 1800);
    assert_eq!(offset_of!(C, fcatt), 1802);
    assert_eq!(offset_of!(C, msdbd), 1803);
    assert_eq!(offset_of!(C, ofcs), 1804);
    assert_eq!(offset_of!(C, psd), 2048);
    assert_eq!(offset_of!(C, vs), 3072);
}

#[test]
fn namespace_offsets() {
    type N = IdentifyNamespace;
    assert_eq!(offset_of!(N, ncap), 8);
    assert_eq!(offset_of!(N, nuse), 16);
    assert_eq!(offset_of!(N, nsfeat), 24);
    assert_eq!(offset_of!(N, nlbaf), 25);
    assert_eq!(offset_of!(N, flbas), 26);
    assert_eq!(offset_of!(N, mc), 27);
    assert_eq!(offset_of!(N, dpc), 28);
    assert_eq!(offset_of!(N, dps), 29);
    assert_eq!(offset_of!(N, nmic), 30);
    assert_eq!(offset_of!(N, rescap), 31);
    assert_eq!(offset_of!(N, fpi), 32);
    assert_eq!(offset_of!(N, dlfeat), 33);
    assert_eq!(offset_of!(N, nawun), 34);
    assert_eq!(offset_of!(N, noiob), 46);
    assert_eq!(offset_of!(N, nvmcap), 48);
    assert_eq!(offset_of!(N, npwg), 64);
    assert_eq!(offset_of!(N, npwa), 66);
    assert_eq!(offset_of!(N, npdg), 68);
    assert_eq!(offset_of!(N, npda), 70);
    assert_eq!(offset_of!(N, nows), 72);
    assert_eq!(offset_of!(N, mssrl), 74);
    assert_eq!(offset_of!(N, mcl), 76);
    assert_eq!(offset_of!(N, msrc), 80);
    assert_eq!(offset_of!(N, anagrpid), 92);
    assert_eq!(offset_of!(N, nsattr), 99);
    assert_eq!(offset_of!(N, nvmsetid), 100);
    assert_eq!(offset_of!(N, endgid), 102);
    assert_eq!(offset_of!(N, nguid), 104);
    assert_eq!(offset_of!(N, eui64), 120);
    assert_eq!(offset_of!(N, lbaf), 128);
    assert_eq!(offset_of!(N, vs), 3712);
    assert_eq!(offset_of!(PowerState, enlat), 4);
    assert_eq!(offset_of!(PowerState, idlp), 16);
    assert_eq!(offset_of!(PowerState, actp), 20);
}

#[test]
fn ascii_fields_are_space_padded() {
    let mut c = IdentifyController::default();
    c.set_serial("PLX0001");
    c.set_model("plexstor");
    c.set_firmware_rev("0.1.0-very-long");
    assert_eq!(&c.as_bytes()[4..24], b"PLX0001             ");
    assert_eq!(&c.mn[..10], b"plexstor  ");
    assert_eq!(&c.fr, b"0.1.0-ve");
    assert_eq!(c.serial(), Some("PLX0001"));
    assert_eq!(c.model(), Some("plexstor"));
    c.set_serial("bad\u{7f}\n");
    assert_eq!(&c.sn[..5], b"bad??");
    assert!(c.set_subnqn("nqn.2024-01.io.plexstor:vol1"));
    assert_eq!(c.subnqn_str(), Some("nqn.2024-01.io.plexstor:vol1"));
    assert_eq!(c.as_bytes()[768], b'n');
    assert!(!c.set_subnqn(&"x".repeat(256)));
    c.mdts = 5;
    assert_eq!(c.max_transfer_bytes(4096), Some(128 * 1024));
    c.mdts = 0;
    assert_eq!(c.max_transfer_bytes(4096), None);
}

#[test]
fn lba_formats() {
    let mut n = IdentifyNamespace::default();
    n.nsze.set(1 << 21);
    n.nlbaf = 1;
    n.lbaf[0] = LbaFormat::new(512);
    n.lbaf[1] = LbaFormat::new(4096);
    n.set_lba_format_index(1);
    assert_eq!(n.flbas, 1);
    assert_eq!(n.block_size(), Some(4096));
    assert_eq!(n.as_bytes()[128 + 4 + 2], 12);
    n.set_lba_format_index(33);
    assert_eq!(n.flbas, 0x41);
    assert_eq!(n.lba_format_index(), 33);
    n.lbaf[33].lbads = 200;
    assert_eq!(n.block_size(), None);
}

#[test]
fn ns_list() {
    let (l, n) = NamespaceList::from_ids(1, [5, 1, 3, 3, 0, 2]);
    assert_eq!(n, 3);
    assert_eq!(l.iter().collect::<Vec<_>>(), vec![2, 3, 5]);
    assert_eq!(&l.as_bytes()[..4], &2u32.to_le_bytes());
    let (l, n) = NamespaceList::from_ids(0, (1..=2000).rev());
    assert_eq!(n, 1024);
    assert_eq!(l.ids[1023].get(), 1024);
    assert_eq!(l.iter().count(), 1024);
}

#[test]
fn ns_descriptors() {
    let mut buf = [0xAAu8; 4096];
    let nguid = [7u8; 16];
    let used = encode_ns_id_descriptors(
        &mut buf,
        &[
            NsIdDescriptor::Nguid(nguid),
            NsIdDescriptor::Uuid([9; 16]),
            NsIdDescriptor::Csi(csi::NVM),
        ],
    )
    .unwrap();
    assert_eq!(used, 20 + 20 + 5);
    assert_eq!(&buf[..4], &[2, 16, 0, 0]);
    assert_eq!(&buf[20..24], &[3, 16, 0, 0]);
    assert_eq!(&buf[40..45], &[4, 1, 0, 0, 0]);
    assert_eq!(buf[45], 0);
    let got: Vec<_> = parse_ns_id_descriptors(&buf).collect();
    assert_eq!(
        got,
        vec![
            NsIdDescriptor::Nguid(nguid),
            NsIdDescriptor::Uuid([9; 16]),
            NsIdDescriptor::Csi(0)
        ]
    );
    assert!(encode_ns_id_descriptors(&mut buf[..10], &[NsIdDescriptor::Nguid(nguid)]).is_none());
    // Wrong length for its type, or overrunning the buffer: stop.
    assert_eq!(
        parse_ns_id_descriptors(&[1, 4, 0, 0, 1, 2, 3, 4]).count(),
        0
    );
    assert_eq!(parse_ns_id_descriptors(&[2, 16, 0, 0, 1]).count(), 0);
}
