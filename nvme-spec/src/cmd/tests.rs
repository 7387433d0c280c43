use super::*;
use core::mem::offset_of;

#[test]
fn command_offsets() {
    assert_eq!(offset_of!(Command, opcode), 0);
    assert_eq!(offset_of!(Command, flags), 1);
    assert_eq!(offset_of!(Command, cid), 2);
    assert_eq!(offset_of!(Command, nsid), 4);
    assert_eq!(offset_of!(Command, mptr), 16);
    assert_eq!(offset_of!(Command, dptr), 24);
    assert_eq!(offset_of!(Command, cdw10), 40);
    assert_eq!(offset_of!(Command, cdw15), 60);
    assert_eq!(offset_of!(Completion, sqhd), 8);
    assert_eq!(offset_of!(Completion, cid), 12);
    assert_eq!(offset_of!(Completion, status), 14);
}

#[test]
fn read_command_bytes() {
    // A Linux-host style NVMe/TCP read: opcode 02h, PSDT 01b, cid 0x1234,
    // nsid 1, SGL transport data block of 8 KiB, slba 0x1_0000_0010, nlb 15 (16 blocks), FUA.
    let mut b = [0u8; 64];
    b[0] = 0x02;
    b[1] = 0x40;
    b[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[32..36].copy_from_slice(&8192u32.to_le_bytes());
    b[39] = 0x5A;
    b[40..44].copy_from_slice(&0x10u32.to_le_bytes());
    b[44..48].copy_from_slice(&1u32.to_le_bytes());
    b[48..52].copy_from_slice(&(15u32 | 1 << 30).to_le_bytes());
    let c = Command::read(&b).unwrap();
    assert_eq!(c.cid(), 0x1234);
    assert_eq!(c.psdt(), 1);
    assert!(c.sgl1().is_tcp_transport());
    assert_eq!(c.sgl1().len(), 8192);
    let rw = ReadWrite::from_command(&c);
    assert_eq!(rw.slba, 0x1_0000_0010);
    assert_eq!(rw.nblocks, 16);
    assert!(rw.fua);
    // And build the same bytes back.
    let mut d = Command::write_blocks(1, 0x1_0000_0010, 16, true).with_cid(0x1234);
    d.opcode = io::READ;
    d.set_sgl1(SglDescriptor::tcp_transport(8192));
    assert_eq!(d.as_bytes(), &b[..]);
    assert!(Command::read(&b[..63]).is_none());
}

#[test]
fn sgl_forms() {
    let s = SglDescriptor::in_capsule(0, 4096);
    assert_eq!(s.as_bytes()[15], 0x01);
    assert_eq!(&s.as_bytes()[8..12], &4096u32.to_le_bytes());
    assert!(s.is_in_capsule());
    let t = SglDescriptor::tcp_transport(512);
    assert_eq!(t.as_bytes()[15], 0x5A);
    let k = SglDescriptor::keyed_data_block(0xdead_beef, 0x12_3456, 0xAABB_CCDD, true);
    assert_eq!(&k.as_bytes()[8..11], &[0x56, 0x34, 0x12]);
    assert_eq!(&k.as_bytes()[11..15], &0xAABB_CCDDu32.to_le_bytes());
    assert_eq!(k.as_bytes()[15], 0x4F);
    assert_eq!(k.keyed_len(), 0x12_3456);
    assert_eq!(k.keyed_key(), 0xAABB_CCDD);
}

#[test]
fn completion_status_and_phase() {
    let mut c = Completion::new(7, Status::INVALID_FIELD.with_dnr());
    assert!(!c.phase());
    c.set_phase(true);
    assert_eq!(c.as_bytes()[14..16], 0x8005u16.to_le_bytes());
    assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
    c.set_result64(0x1122_3344_5566_7788);
    assert_eq!(&c.as_bytes()[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(c.result64(), 0x1122_3344_5566_7788);
    assert_eq!(Completion::read(c.as_bytes()), Some(c));
}

#[test]
fn dsm_and_ranges() {
    let c = Command::dataset_management(3, 256, true);
    assert_eq!(c.cdw10.get(), 255);
    assert_eq!(c.cdw11.get(), 4);
    let d = DatasetManagement::from_command(&c);
    assert_eq!(d.nranges, 256);
    assert!(d.deallocate);
    assert_eq!(d.data_len(), 4096);
    let mut buf = [0u8; 32];
    buf[4..8].copy_from_slice(&8u32.to_le_bytes());
    buf[8..16].copy_from_slice(&100u64.to_le_bytes());
    let r = DsmRange::slice_from(&buf).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].nlb.get(), 8);
    assert_eq!(r[0].slba.get(), 100);
    assert!(DsmRange::slice_from(&buf[..20]).is_none());
}

#[test]
fn write_zeroes_bits() {
    let c = Command::write_zeroes(1, 5, 65536, true);
    assert_eq!(c.cdw12.get(), 0xFFFF | 1 << 25);
    let w = WriteZeroes::from_command(&c);
    assert_eq!((w.slba, w.nblocks, w.deac, w.fua), (5, 65536, true, false));
}

#[test]
fn get_log_page_numd() {
    // 4096 bytes = 1024 dwords -> NUMD 0-based 1023: NUMDL 0x3FF, NUMDU 0.
    let c = Command::get_log_page(NSID_ALL, 0x02, 0, true, 4096, 512);
    assert_eq!(c.cdw10.get(), 0x02 | 1 << 15 | 0x3FF << 16);
    assert_eq!(c.cdw11.get(), 0);
    assert_eq!(c.cdw12.get(), 512);
    let g = GetLogPage::from_command(&c);
    assert_eq!(g.len_bytes(), 4096);
    assert!(g.rae);
    // Large request spills into NUMDU.
    let c = Command::get_log_page(0, 0x70, 0, false, 1 << 20, 1 << 33);
    assert_eq!(c.cdw10.get() >> 16, 0xFFFF);
    assert_eq!(c.cdw11.get() & 0xFFFF, 0x3);
    assert_eq!(c.cdw13.get(), 2);
    let g = GetLogPage::from_command(&c);
    assert_eq!((g.numd, g.offset), (1 << 18, 1 << 33));
    let mut m = Command::new(admin::GET_LOG_PAGE);
    m.cdw10.set(0xFFFF_0000);
    m.cdw11.set(0xFFFF);
    assert_eq!(GetLogPage::from_command(&m).numd, u32::MAX);
}

#[test]
fn identify_features_abort() {
    let c = Command::identify(0x01, 0, 0x22, 0);
    assert_eq!(c.cdw10.get(), 0x0022_0001);
    let i = Identify::from_command(&c);
    assert_eq!((i.cns, i.cntid), (1, 0x22));
    let c = Command::set_features(0x07, 0x0003_0003, true);
    assert_eq!(c.cdw10.get(), 0x8000_0007);
    let s = SetFeatures::from_command(&c);
    assert!(s.sv);
    let g = GetFeatures::from_command(&Command::get_features(0x0F, 3, 0));
    assert_eq!((g.fid, g.sel), (0x0F, 3));
    let a = Abort::from_command(&Command::abort(2, 0xBEEF));
    assert_eq!((a.sqid, a.cid), (2, 0xBEEF));
    assert_eq!(Command::abort(2, 0xBEEF).cdw10.get(), 0xBEEF_0002);
}

#[test]
fn create_queue() {
    let mut c = Command::new(admin::CREATE_IO_SQ);
    CreateIoQueue {
        qid: 1,
        qsize: 1024,
        pc: true,
        iv_or_cqid: 1,
        qprio: 2,
        ..Default::default()
    }
    .apply(&mut c, true);
    assert_eq!(c.cdw10.get(), 1 | 1023 << 16);
    assert_eq!(c.cdw11.get(), 1 | 2 << 1 | 1 << 16);
    let q = CreateIoQueue::from_command(&c);
    assert_eq!((q.qid, q.qsize, q.qprio, q.iv_or_cqid), (1, 1024, 2, 1));
}

#[test]
fn prps_and_flags() {
    let mut c = Command::new(io::READ);
    c.flags = flags::FUSE_FIRST | flags::PSDT_SGL_MPTR_CONTIG;
    assert_eq!(c.fuse(), 1);
    c.set_prps(0x1000, 0x2000);
    assert_eq!(
        (c.prp1(), c.prp2(), c.psdt(), c.fuse()),
        (0x1000, 0x2000, 0, 1)
    );
    assert_eq!(c.opcode_name(false), "Read");
    assert_eq!(
        Command::new(admin::FABRICS).opcode_name(true),
        "Property Set"
    );
}
