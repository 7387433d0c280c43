use super::header::{hdr, rec};
use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn uuid(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn plex(n: u8, state: PlexState) -> PlexRecord {
    PlexRecord {
        uuid: uuid(n),
        node: format!("node-{n}"),
        location: format!("nqn.2024-01.io.plexstor:disk{n}/1"),
        state,
        in_sync_generation: 1,
    }
}

/// A header with every field away from its default.
fn sample(block_size: u32) -> Superblock {
    let layout = Layout::new(
        block_size,
        8 * GIB / u64::from(block_size),
        DEFAULT_REGION_SIZE,
    )
    .unwrap()
    .with_data_blocks(5 * GIB / u64::from(block_size) + 3)
    .unwrap();
    let mut sb = Superblock::new(
        uuid(0xaa),
        "mirror0",
        uuid(2),
        &layout,
        vec![
            plex(1, PlexState::InSync),
            plex(2, PlexState::Resyncing { next_region: 77 }),
            plex(
                3,
                PlexState::OutOfSync {
                    since_unix_secs: 1_700_000_000,
                },
            ),
        ],
    )
    .unwrap();
    sb.seq = 6;
    sb.generation = 9;
    sb.clean = true;
    sb
}

fn every_state() -> Vec<PlexState> {
    vec![
        PlexState::InSync,
        PlexState::OutOfSync {
            since_unix_secs: u64::MAX,
        },
        PlexState::Resyncing { next_region: 0 },
        PlexState::New,
        PlexState::Faulted { reason: u32::MAX },
    ]
}

/// Rewrites the header's CRC, so a test can reach the checks behind it.
fn fix_crc(b: &mut [u8]) {
    let crc = crc_skipping(&b[..HEADER_BYTES], hdr::CRC);
    b[hdr::CRC..hdr::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[track_caller]
fn inconsistent_msg(r: Result<Superblock, SbError>) -> String {
    match r {
        Err(SbError::Inconsistent(m)) => m,
        other => panic!("expected Inconsistent, got {other:?}"),
    }
}

#[test]
fn header_round_trips_byte_for_byte() {
    for bs in [512, 4096, 8192, 64 << 10] {
        let sb = sample(bs);
        let bytes = sb.encode().unwrap();
        assert_eq!(
            bytes.len() as u64,
            header_slot_blocks(bs).unwrap() * u64::from(bs)
        );
        let back = Superblock::decode(&bytes).unwrap();
        assert_eq!(back, sb);
        assert_eq!(back.encode().unwrap(), bytes);
    }
    for state in every_state() {
        let mut sb = sample(512);
        sb.plexes = vec![PlexRecord {
            uuid: uuid(2),
            node: String::new(),
            location: "l".repeat(MAX_LOCATION_BYTES),
            state,
            in_sync_generation: 0,
        }];
        sb.mirror_name = "é".repeat(MAX_NAME_BYTES / 2);
        sb.clean = false;
        let back = Superblock::decode(&sb.encode().unwrap()).unwrap();
        assert_eq!(back, sb);
    }
}

#[test]
fn every_flipped_byte_is_refused() {
    let good = sample(512).encode().unwrap();
    for at in 0..HEADER_BYTES {
        for x in [0x01, 0x80, 0xff] {
            let mut b = good.clone();
            b[at] ^= x;
            match Superblock::decode(&b) {
                Err(SbError::BadMagic { .. }) => assert!(at < 8),
                Err(SbError::BadChecksum { .. }) => assert!(at >= 8),
                other => panic!("byte {at} ^ {x:#x}: {other:?}"),
            }
        }
    }
    // Bytes past the header are not covered and not read.
    let mut b = good.clone();
    b[HEADER_BYTES - 1 + 1..].fill(0x5a);
    assert_eq!(Superblock::decode(&b).unwrap(), sample(512));
}

/// With the checksum made right again, a changed byte is either refused by a field check
/// or read as a header that encodes back to exactly those bytes: nothing is half read.
#[test]
fn flipped_bytes_behind_a_good_checksum_never_read_differently() {
    let good = sample(4096).encode().unwrap();
    let mut accepted = 0;
    for at in 8..HEADER_BYTES {
        if at == hdr::CRC {
            continue;
        }
        for x in [0x01, 0x02, 0x80, 0xff] {
            let mut b = good.clone();
            b[at] ^= x;
            fix_crc(&mut b);
            match Superblock::decode(&b) {
                Ok(sb) => {
                    accepted += 1;
                    assert_eq!(sb.encode().unwrap()[..HEADER_BYTES], b[..HEADER_BYTES]);
                }
                Err(SbError::Inconsistent(_)) | Err(SbError::UnsupportedVersion(_)) => {}
                Err(e) => panic!("byte {at} ^ {x:#x}: {e:?}"),
            }
        }
    }
    // Seq, generation, names, times… do change under flips; the test must see some.
    assert!(accepted > 100, "{accepted}");
}

#[test]
fn each_refusal_says_why() {
    let good = sample(512).encode().unwrap();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        fix_crc(&mut b);
        Superblock::decode(&b)
    };

    assert_eq!(
        Superblock::decode(&good[..100]),
        Err(SbError::ShortBuffer {
            need: 4096,
            got: 100
        })
    );
    assert!(matches!(
        Superblock::decode(&[0; 4096]),
        Err(SbError::BadMagic {
            found: [0, 0, 0, 0, 0, 0, 0, 0]
        })
    ));
    assert_eq!(
        edit(&|b| b[hdr::VERSION] = 2),
        Err(SbError::UnsupportedVersion(2))
    );
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + rec::STATE] = 9));
    assert!(m.contains("unknown plex state code 9"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + rec::STATE] = 4));
    assert!(m.contains("carries argument"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::NAME] = 0xff));
    assert!(m.contains("not UTF-8"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 65));
    assert!(m.contains("exceeds"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 3));
    assert!(m.contains("past its length"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 0));
    assert!(m.contains("past its length"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEX_COUNT] = 4));
    assert!(m.contains("4 plexes"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEX_COUNT] = 2));
    assert!(m.contains("unused plex record 2"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 3 * 256 + 100] = 1));
    assert!(m.contains("unused plex record 3"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::FLAGS] = 2));
    assert!(m.contains("flags"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[110] = 1));
    assert!(m.contains("reserved header byte 110"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[4000] = 1));
    assert!(m.contains("reserved header byte 4000"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + 210] = 1));
    assert!(m.contains("reserved byte 210 of plex record 1"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::BLOCK_SIZE + 1] = 3));
    assert!(m.contains("block size"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::REGION_SIZE] = 1));
    assert!(m.contains("region size"), "{m}");
    let m = inconsistent_msg(edit(&|b| {
        b[hdr::DATA_OFFSET..][..8].copy_from_slice(&3u64.to_le_bytes())
    }));
    assert!(m.contains("inside the metadata"), "{m}");
    let m = inconsistent_msg(edit(&|b| {
        b[hdr::BITMAP_CHUNKS..][..4].copy_from_slice(&1u32.to_le_bytes())
    }));
    assert!(m.contains("do not fit a bitmap"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::THIS_PLEX] = 9));
    assert!(m.contains("not in the plex table"), "{m}");
    let m = inconsistent_msg(edit(&|b| {
        b[hdr::PLEXES + 256..][..16].copy_from_slice(&[1; 16])
    }));
    assert!(m.contains("listed twice"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::MIRROR_UUID..][..16].fill(0)));
    assert!(m.contains("nil"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::GENERATION..][..8].fill(0)));
    assert!(m.contains("after the mirror's"), "{m}");
    let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + rec::STATE_ARG + 4] = 1));
    assert!(m.contains("resync resumes at region"), "{m}");
    let m = inconsistent_msg(edit(&|b| {
        b[hdr::PLEXES + rec::STATE] = 5;
        b[hdr::PLEXES + rec::STATE_ARG + 4] = 1;
    }));
    assert!(m.contains("fault reason"), "{m}");
}

#[test]
fn encode_refuses_what_decode_would() {
    type Edit = Box<dyn Fn(&mut Superblock)>;
    let bad: Vec<Edit> = vec![
        Box::new(|s| s.mirror_name = "n".repeat(65)),
        Box::new(|s| s.mirror_name.clear()),
        Box::new(|s| s.plexes.push(plex(4, PlexState::New))),
        Box::new(|s| s.plexes.clear()),
        Box::new(|s| s.plexes[0].node = "n".repeat(33)),
        Box::new(|s| s.plexes[0].location = "n".repeat(129)),
        Box::new(|s| s.plexes[0].uuid = Uuid::nil()),
        Box::new(|s| s.plexes[0].uuid = uuid(3)),
        Box::new(|s| s.this_plex = uuid(7)),
        Box::new(|s| s.mirror_blocks = 0),
        Box::new(|s| s.block_size = 520),
    ];
    for (i, f) in bad.iter().enumerate() {
        let mut sb = sample(512);
        f(&mut sb);
        assert!(
            matches!(sb.encode(), Err(SbError::Inconsistent(_))),
            "case {i}"
        );
    }
}

fn slots(a: &Superblock, b: &Superblock) -> (Vec<u8>, Vec<u8>) {
    (a.encode().unwrap(), b.encode().unwrap())
}

fn at_seq(seq: u64) -> Superblock {
    let mut s = sample(512);
    s.seq = seq;
    s.generation = 10 + seq % 5;
    s
}

#[test]
fn newer_slot_wins() {
    let (a, b) = slots(&at_seq(6), &at_seq(7));
    let p = pick_header(&a, &b, None).unwrap();
    assert_eq!(
        (p.slot, p.superblock.seq, p.other_problem),
        (Slot::B, 7, None)
    );
    let (a, b) = slots(&at_seq(8), &at_seq(7));
    let p = pick_header(&a, &b, Some(uuid(0xaa))).unwrap();
    assert_eq!((p.slot, p.superblock.seq), (Slot::A, 8));
    assert_eq!(next_slot(p.slot), Slot::B);
    assert_eq!(Slot::for_seq(p.superblock.seq + 1), next_slot(p.slot));
}

#[test]
fn seq_wraps() {
    let (a, b) = slots(&at_seq(0), &at_seq(u64::MAX));
    let p = pick_header(&a, &b, None).unwrap();
    assert_eq!((p.slot, p.superblock.seq), (Slot::A, 0));
    let (a, b) = slots(&at_seq(u64::MAX - 1), &at_seq(u64::MAX));
    assert_eq!(pick_header(&a, &b, None).unwrap().slot, Slot::B);
}

#[test]
fn torn_write_leaves_the_older_slot() {
    let (a, old_b) = slots(&at_seq(4), &at_seq(3));
    // The new B changes bytes in the first and the third 512-byte sector.
    let mut next = at_seq(5);
    next.plexes[2].location = "moved".into();
    let new_b = next.encode().unwrap();
    let mut torn = 0;
    for cut in (0..=HEADER_BYTES).step_by(512) {
        // Sectors written in order or out of order, over the old B or over zeros (a new
        // plex): the result is the new header whole or the old A, never a mix.
        let mut head_new = old_b.clone();
        head_new[..cut].copy_from_slice(&new_b[..cut]);
        let mut tail_new = old_b.clone();
        tail_new[cut..].copy_from_slice(&new_b[cut..]);
        let mut over_zero = vec![0; new_b.len()];
        over_zero[..cut].copy_from_slice(&new_b[..cut]);
        for b in [head_new, tail_new, over_zero] {
            let p = pick_header(&a, &b, None).unwrap();
            if p.slot == Slot::B {
                assert_eq!(p.superblock, next, "cut {cut}");
            } else {
                assert_eq!(p.superblock, at_seq(4), "cut {cut}");
                if b != old_b {
                    torn += 1;
                    assert!(p.other_problem.is_some());
                }
            }
        }
    }
    assert!(torn >= 4, "{torn}");
    // A fresh plex: B never written.
    let p = pick_header(&a, &[0; 4096], None).unwrap();
    assert!(matches!(p.other_problem, Some(SbError::BadMagic { .. })));
}

#[test]
fn unusable_slots_are_named() {
    let a = at_seq(4).encode().unwrap();
    // A header in the wrong slot (a misdirected write) is not trusted.
    match pick_header(&a, &a, None).unwrap().other_problem {
        Some(SbError::Inconsistent(m)) => assert!(m.contains("slot B"), "{m}"),
        other => panic!("{other:?}"),
    }
    match pick_header(&[0; 4096], &a[..10], None) {
        Err(SbError::NoValidHeader { a, b }) => {
            assert!(matches!(*a, SbError::BadMagic { .. }));
            assert!(matches!(*b, SbError::ShortBuffer { .. }));
        }
        other => panic!("{other:?}"),
    }
    let (a, b) = slots(&at_seq(4), &at_seq(5));
    let err = pick_header(&a, &b, Some(uuid(0xbb))).unwrap_err();
    let SbError::NoValidHeader { a: ea, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        **ea,
        SbError::ForeignMirror {
            expected: uuid(0xbb),
            found: uuid(0xaa)
        }
    );
    assert!(err.to_string().contains("slot A"));
    // Both valid, different mirrors: an interrupted creation; neither is trusted.
    let mut other = at_seq(5);
    other.mirror_uuid = uuid(0xbb);
    let (a, b) = slots(&at_seq(4), &other);
    assert!(matches!(
        pick_header(&a, &b, None),
        Err(SbError::Inconsistent(_))
    ));
    // …unless the caller says which mirror it wants.
    let p = pick_header(&a, &b, Some(uuid(0xaa))).unwrap();
    assert_eq!(p.slot, Slot::A);
    assert!(matches!(
        p.other_problem,
        Some(SbError::ForeignMirror { .. })
    ));
}

// ---- layout ------------------------------------------------------------------------------

fn check_invariants(l: &Layout) {
    let bs = u64::from(l.block_size());
    assert_eq!(l.slot_range(Slot::A).end, l.slot_range(Slot::B).start);
    assert!(l.slot_blocks() * bs >= HEADER_BYTES as u64);
    assert_eq!(l.bitmap_range().start, l.slot_range(Slot::B).end);
    assert!(l.chunk_count() <= l.bitmap_chunks());
    assert!(l.chunk_block(l.bitmap_chunks() - 1) < l.data_offset_blocks());
    assert_eq!(l.data_offset_blocks() * bs % DATA_ALIGN_BYTES, 0);
    assert!(l.data_offset_blocks() + l.data_blocks() <= l.plex_blocks());
    let rb = l.region_blocks();
    assert!(l.regions() * rb >= l.data_blocks());
    assert!((l.regions() - 1) * rb < l.data_blocks());
    assert_eq!(l.region_of(l.data_blocks() - 1), l.regions() - 1);
    assert_eq!(l.region_range(l.regions() - 1).end, l.data_blocks());
    assert_eq!(l.chunk_of(l.regions() - 1), l.chunk_count() - 1);
    assert_eq!(l.regions_in_chunk(0).start, 0);
    assert_eq!(l.regions_in_chunk(l.chunk_count() - 1).end, l.regions());
    assert!(l.regions_in_chunk(l.chunk_count()).is_empty());
    assert_eq!(l.regions_per_chunk() % 64, 0);
    assert_eq!(l.regions_of(0..l.data_blocks()), 0..l.regions());
}

#[test]
fn layout_arithmetic_over_odd_sizes() {
    for bs in [512u32, 4096] {
        let mut region = MIN_REGION_SIZE;
        while region <= 64 * MIB {
            // The smallest plex that fits, found by the error, then a few just above it.
            let need = match Layout::new(bs, 1, region) {
                Err(SbError::PlexTooSmall {
                    need_blocks,
                    have_blocks: 1,
                }) => need_blocks,
                other => panic!("{other:?}"),
            };
            assert!(matches!(
                Layout::new(bs, need - 1, region),
                Err(SbError::PlexTooSmall { .. })
            ));
            let ten_tib = (10u64 << 40) / u64::from(bs);
            for plex in [need, need + 1, need + 7, need + 4095, ten_tib, ten_tib + 3] {
                let l = Layout::new(bs, plex, region).unwrap();
                assert_eq!(l.data_offset_blocks() + l.data_blocks(), plex);
                check_invariants(&l);
                // The header records it; a reader gets the same layout back, also after
                // the plex grew.
                let sb = Superblock::new(uuid(1), "m", uuid(2), &l, vec![plex_rec(2)]).unwrap();
                let back = Superblock::decode(&sb.encode().unwrap()).unwrap();
                assert_eq!(back.layout(plex).unwrap(), l);
                let grown = back.layout(plex + 12345).unwrap();
                assert_eq!(grown.data_offset_blocks(), l.data_offset_blocks());
                assert_eq!(grown.data_blocks(), l.data_blocks());
                assert!(matches!(
                    back.layout(plex - 1),
                    Err(SbError::PlexTooSmall { .. })
                ));
                // A smaller mirror on this plex.
                let half = l.with_data_blocks(l.data_blocks().div_ceil(2)).unwrap();
                check_invariants(&half);
            }
            region *= 2;
        }
    }
}

fn plex_rec(n: u8) -> PlexRecord {
    plex(n, PlexState::InSync)
}

#[test]
fn layout_known_values() {
    // 512-byte blocks: 8-block slots, 3840 regions per chunk.
    let l = Layout::new(512, (10u64 << 40) / 512, MIB).unwrap();
    assert_eq!(l.slot_range(Slot::B), 8..16);
    assert_eq!(l.bitmap_chunks(), (10u64 << 20).div_ceil(3840) as u32);
    assert_eq!(l.data_offset_blocks(), 2 * MIB / 512);
    // 4096-byte blocks: one-block slots.
    let l = Layout::new(4096, 1 << 20, MIB).unwrap();
    assert_eq!(l.slot_range(Slot::A), 0..1);
    assert_eq!(l.bitmap_range(), 2..3);
    assert_eq!(l.data_offset_blocks(), 256);
    assert_eq!(l.regions(), (4 * GIB - MIB) / MIB);
    assert_eq!(l.region_of(255), 0);
    assert_eq!(l.region_of(256), 1);
    assert_eq!(l.regions_of(255..257), 0..2);
    assert_eq!(l.regions_of(5..5), 0..0);
    // Smallest plex: 1 MiB of metadata and one block.
    assert_eq!(
        Layout::new(4096, 10, DEFAULT_REGION_SIZE),
        Err(SbError::PlexTooSmall {
            need_blocks: 257,
            have_blocks: 10
        })
    );
    let l = Layout::new(4096, 257, DEFAULT_REGION_SIZE).unwrap();
    assert_eq!((l.data_blocks(), l.regions()), (1, 1));
    assert_eq!(l.region_range(0), 0..1);
}

#[test]
fn layout_refuses_bad_geometry() {
    for (bs, plex, region) in [
        (520, 1 << 30, MIB),
        (256, 1 << 30, MIB),
        (1 << 17, 1 << 30, MIB),
        (512, 1 << 30, 3 * MIB),
        (512, 1 << 30, 32 << 10),
        (512, 1 << 30, 2 * GIB),
        (64 << 10, 1 << 30, 64 << 10),
        (512, u64::MAX, MIB),
    ] {
        if bs == 64 << 10 {
            // Region equal to the block size is fine.
            assert!(Layout::new(bs, plex, region).is_ok());
            continue;
        }
        assert!(
            matches!(Layout::new(bs, plex, region), Err(SbError::Geometry(_))),
            "{bs} {plex} {region}"
        );
    }
    let l = Layout::new(4096, 1 << 20, MIB).unwrap();
    assert!(l.with_data_blocks(0).is_err());
    assert!(l.with_data_blocks(l.data_blocks() + 1).is_err());
    // Largest plex whose bitmap chunk index still fits 32 bits.
    assert!(Layout::new(512, u64::MAX / 512, MIN_REGION_SIZE).is_err());
    let l = Layout::new(64 << 10, u64::MAX >> 16, MAX_REGION_SIZE).unwrap();
    check_invariants(&l);
}

// ---- bitmap ------------------------------------------------------------------------------

#[test]
fn bitmap_operations() {
    let mut b = Bitmap::new(200);
    assert_eq!((b.len(), b.count(), b.is_empty()), (200, 0, false));
    assert!(!b.set(3));
    assert!(b.set(3));
    assert!(b.test(3));
    assert!(!b.set(500));
    assert!(!b.test(500));
    b.set_range(60..130);
    assert_eq!(b.count(), 71);
    b.clear_range(64..128);
    assert_eq!(
        b.iter_set().collect::<Vec<_>>(),
        vec![3, 60, 61, 62, 63, 128, 129]
    );
    assert!(b.clear(3));
    assert!(!b.clear(3));
    b.set_all();
    assert_eq!(b.count(), 200);
    assert_eq!(b.words()[3] >> 8, 0, "bits past len stay zero");
    let c = Bitmap::from_ranges(200, [0..1, 190..1000]);
    assert_eq!(
        c.iter_set().collect::<Vec<_>>(),
        [0].into_iter().chain(190..200).collect::<Vec<_>>()
    );
    // Every range against a bit-by-bit model.
    for start in 0..70 {
        for end in start..140 {
            let b = Bitmap::from_ranges(130, std::iter::once(start..end));
            let want: Vec<u64> = (start..end.min(130)).collect();
            assert_eq!(b.iter_set().collect::<Vec<_>>(), want);
        }
    }
}

#[test]
fn chunks_round_trip() {
    let mirror = uuid(0xaa);
    let l = Layout::new(512, 20 * GIB / 512, 64 << 10).unwrap();
    assert!(l.chunk_count() > 3);
    let mut bm = Bitmap::new(l.regions());
    for r in (0..l.regions()).step_by(37) {
        bm.set(r);
    }
    bm.set(l.regions() - 1);
    let mut all = Vec::new();
    for i in 0..l.chunk_count() {
        let c = bm.encode_chunk(&l, mirror, i).unwrap();
        assert_eq!(c.len(), 512);
        let r = l.regions_in_chunk(i);
        let words = decode_chunk(&c, mirror, i, r.end - r.start).unwrap();
        assert_eq!(encode_chunk(mirror, i, &words, 512).unwrap(), c);
        all.extend(c);
    }
    assert!(bm.encode_chunk(&l, mirror, l.chunk_count()).is_err());
    let (back, problems) = decode_bitmap(&l, mirror, &all);
    assert_eq!(problems, vec![]);
    assert_eq!(back, bm);
}

#[test]
fn bad_chunks_make_their_regions_dirty() {
    let mirror = uuid(0xaa);
    let l = Layout::new(512, 20 * GIB / 512, 64 << 10).unwrap();
    let clean = Bitmap::new(l.regions());
    let chunks: Vec<Vec<u8>> = (0..l.chunk_count())
        .map(|i| clean.encode_chunk(&l, mirror, i).unwrap())
        .collect();
    let last = l.chunk_count() - 1;

    // Any damaged byte of chunk 1: exactly its regions are dirty.
    for at in 0..512 {
        let mut bytes = chunks.concat();
        bytes[512 + at] ^= 0x10;
        let (bm, problems) = decode_bitmap(&l, mirror, &bytes);
        assert_eq!(problems.len(), 1, "byte {at}");
        assert_eq!(problems[0].index, 1);
        assert!(matches!(
            problems[0].error,
            SbError::BadChecksum { .. } | SbError::BadMagic { .. }
        ));
        assert_eq!(
            bm,
            Bitmap::from_ranges(l.regions(), [l.regions_in_chunk(1)])
        );
    }

    // Another mirror's chunk, a chunk at the wrong index, a never-written chunk, a chunk
    // with bits past the mirror's end, and chunks missing from a short read.
    let mut bytes = chunks.concat();
    let bs = 512;
    bytes[0..bs].copy_from_slice(&clean.encode_chunk(&l, uuid(0xbb), 0).unwrap());
    bytes[bs..2 * bs].copy_from_slice(&chunks[2]);
    bytes[2 * bs..3 * bs].fill(0);
    let past = vec![u64::MAX; (l.regions_per_chunk() / 64) as usize];
    let last_at = last as usize * bs;
    bytes[last_at..last_at + bs].copy_from_slice(&encode_chunk(mirror, last, &past, 512).unwrap());
    let (bm, problems) = decode_bitmap(&l, mirror, &bytes);
    let kinds: Vec<(u32, &SbError)> = problems.iter().map(|p| (p.index, &p.error)).collect();
    assert!(matches!(kinds[0], (0, SbError::ForeignMirror { .. })));
    assert!(matches!(kinds[1], (1, SbError::Inconsistent(_))));
    assert!(matches!(kinds[2], (2, SbError::BadMagic { .. })));
    assert!(matches!(kinds[3], (i, SbError::Inconsistent(_)) if i == last));
    let want: Vec<_> = [0, 1, 2, last]
        .iter()
        .map(|&i| l.regions_in_chunk(i))
        .collect();
    assert_eq!(bm, Bitmap::from_ranges(l.regions(), want));

    let (bm, problems) = decode_bitmap(&l, mirror, &chunks.concat()[..bs + 100]);
    assert_eq!(problems.len() as u32, l.chunk_count() - 1);
    assert!(matches!(problems[0].error, SbError::ShortBuffer { .. }));
    assert_eq!(bm.count(), l.regions() - l.regions_per_chunk());

    // decode_chunk itself on odd lengths.
    for len in [0, 8, 100, 511, 513, 4095] {
        assert!(matches!(
            decode_chunk(&vec![0; len], mirror, 0, 1),
            Err(SbError::Geometry(_))
        ));
    }
    assert!(encode_chunk(mirror, 0, &past, 512).is_ok());
    assert!(encode_chunk(mirror, 0, &[0; 61], 512).is_err());
}
