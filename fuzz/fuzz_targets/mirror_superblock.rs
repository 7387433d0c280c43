//! The mirror's on-disk metadata decoders (`plexd::bdev::mirror::superblock`) over damaged
//! metadata. Random bytes almost never pass a CRC, so the input edits valid metadata instead
//! and can repair the checksums afterwards, which takes the fuzzer past the CRC to every field
//! check behind it:
//!
//! ```text
//! byte 0      knobs: bit 0 re-seal slot A's CRC, bit 1 slot B's, bit 2 re-seal the bitmap
//!             chunks', bit 3 4096-byte blocks (else 512), bit 4 pass the mirror UUID as
//!             expected, bit 5 cut the bitmap short to the patch's length
//! bytes 1..3  n, little-endian
//! then        n bytes XORed onto slot A, the rest onto slot B; all of it onto the bitmap
//! ```
//!
//! So an input of the three bytes `knobs 0 0` is the valid template (the seeds in
//! fuzz/corpus/mirror_superblock/ are such inputs). Besides "no panic", it checks that whatever
//! decodes encodes back to the very bytes it came from, and that a chunk that failed marks all
//! its regions dirty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexd::bdev::mirror::superblock::{
    decode_bitmap, decode_chunk, pick_header, Bitmap, Layout, PlexRecord, PlexState, Slot,
    Superblock, CHUNK_HEADER_BYTES, HEADER_BYTES,
};
use std::sync::OnceLock;
use uuid::Uuid;

const MIRROR: Uuid = Uuid::from_bytes([0xaa; 16]);

struct Template {
    layout: Layout,
    a: Vec<u8>,
    b: Vec<u8>,
    bitmap: Vec<u8>,
}

fn template(block_size: u32) -> Template {
    // Three bitmap chunks at 512-byte blocks, two at 4096.
    let plex_bytes: u64 = if block_size == 512 {
        600 << 20
    } else {
        3 << 30
    };
    let layout = Layout::new(block_size, plex_bytes / u64::from(block_size), 64 << 10).unwrap();
    let plexes = [
        (1, PlexState::InSync),
        (2, PlexState::Resyncing { next_region: 5 }),
        (3, PlexState::Faulted { reason: 7 }),
    ]
    .into_iter()
    .map(|(n, state)| PlexRecord {
        uuid: Uuid::from_bytes([n; 16]),
        node: format!("node{n}"),
        location: format!("nqn.2024-01.io.plexstor:m/{n}"),
        state,
        in_sync_generation: 1,
    })
    .collect();
    let mut sb = Superblock::new(MIRROR, "m0", Uuid::from_bytes([2; 16]), &layout, plexes).unwrap();
    sb.seq = 10;
    let a = sb.encode().unwrap();
    sb.seq = 11;
    sb.generation = 2;
    let b = sb.encode().unwrap();
    let dirty = Bitmap::from_ranges(layout.regions(), [0..3, 4000..4100, 9000..9001]);
    let bitmap = (0..layout.chunk_count())
        .flat_map(|i| dirty.encode_chunk(&layout, MIRROR, i).unwrap())
        .collect();
    Template {
        layout,
        a,
        b,
        bitmap,
    }
}

fn patch(base: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for (o, w) in out.iter_mut().zip(with) {
        *o ^= w;
    }
    out
}

/// Recomputes a CRC32C stored at `at` over `bytes` taken with that field as zero.
fn seal(bytes: &mut [u8], at: usize) {
    bytes[at..at + 4].fill(0);
    let crc = crc32c::crc32c(bytes);
    bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let knobs = data[0];
    let n = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let rest = &data[3..];
    let (pa, pb) = rest.split_at(n.min(rest.len()));
    static TEMPLATES: OnceLock<[Template; 2]> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| [template(512), template(4096)]);
    let t = &templates[usize::from(knobs & 8 != 0)];
    let bs = t.layout.block_size() as usize;

    let mut a = patch(&t.a, pa);
    let mut b = patch(&t.b, pb);
    if knobs & 1 != 0 {
        seal(&mut a[..HEADER_BYTES], 12);
    }
    if knobs & 2 != 0 {
        seal(&mut b[..HEADER_BYTES], 12);
    }
    let expect = (knobs & 16 != 0).then_some(MIRROR);
    match pick_header(&a, &b, expect) {
        Ok(p) => {
            let raw = match p.slot {
                Slot::A => &a,
                Slot::B => &b,
            };
            let again = p.superblock.encode().expect("a decoded header encodes");
            assert_eq!(again[..HEADER_BYTES], raw[..HEADER_BYTES], "not canonical");
            assert_eq!(Superblock::decode(&again).unwrap(), p.superblock);
            assert_eq!(p.superblock.slot(), p.slot);
            if let Some(m) = expect {
                assert_eq!(p.superblock.mirror_uuid, m);
            }
            if let Ok(l) = p.superblock.layout(t.layout.plex_blocks()) {
                assert!(l.chunk_count() <= l.bitmap_chunks());
                assert!(l.data_offset_blocks() + l.data_blocks() <= l.plex_blocks());
                // Bounded so a fuzzed geometry cannot ask for a huge bitmap.
                if l.regions() <= 1 << 20 {
                    let (bm, _) = decode_bitmap(&l, p.superblock.mirror_uuid, &t.bitmap);
                    assert_eq!(bm.len(), l.regions());
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let mut bitmap = patch(&t.bitmap, rest);
    if knobs & 4 != 0 {
        for c in bitmap.chunks_exact_mut(bs) {
            seal(c, 8);
        }
    }
    if knobs & 32 != 0 {
        bitmap.truncate(rest.len());
    }
    let l = &t.layout;
    let (bm, problems) = decode_bitmap(l, MIRROR, &bitmap);
    assert_eq!(bm.len(), l.regions());
    for i in 0..l.chunk_count() {
        let regions = l.regions_in_chunk(i);
        match problems.iter().find(|p| p.index == i) {
            Some(p) => {
                assert_eq!(p.regions, regions);
                assert!(
                    regions.clone().all(|r| bm.test(r)),
                    "chunk {i} not all dirty"
                );
            }
            None => {
                let raw = &bitmap[i as usize * bs..][..bs];
                assert_eq!(bm.encode_chunk(l, MIRROR, i).unwrap(), raw, "chunk {i}");
            }
        }
    }
    // The bytes as one bare chunk, whatever their length.
    if let Ok(words) = decode_chunk(rest, MIRROR, 0, u64::MAX) {
        assert_eq!(words.len() * 8 + CHUNK_HEADER_BYTES, rest.len());
    }
});
