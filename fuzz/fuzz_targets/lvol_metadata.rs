//! The volume store's metadata readers (`plexd::bdev::lvol::{format,image}`) over damaged
//! metadata: the superblock slots, the checkpoint and the journal of a small store made here.
//! Random bytes would stop at the first CRC, so the input edits a valid image and can re-seal
//! what it edited, which takes the fuzzer past the checksums to every check behind them:
//!
//! ```text
//! byte 0      knobs: bit 0 re-seal the superblock slot, bit 1 re-seal the journal pages,
//!             bit 2 re-seal the checkpoint (its CRC in the superblock), bit 3 patch the
//!             journal (else the checkpoint), bit 4 cut the journal short
//! bytes 1..3  n, little-endian
//! then        n bytes XORed onto the current superblock, the rest onto the checkpoint or
//!             the journal
//! ```
//!
//! An input of the three bytes `knobs 0 0` is the valid template. Besides "no panic": whatever
//! loads passes the checker, and a superblock that decodes encodes back to its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexd::bdev::lvol::format::{
    self, encode_txn, BlobRecord, Op, Superblock, JOURNAL_PAYLOAD, PAGE, THIN,
};
use plexd::bdev::lvol::image;
use plexd::bdev::lvol::state::State;
use std::sync::OnceLock;
use uuid::Uuid;

const STORE: Uuid = Uuid::from_bytes([0x5a; 16]);
const JOURNAL_PAGES: u64 = 8;

struct Template {
    sb: Superblock,
    ckpt: Vec<u8>,
    journal: Vec<u8>,
}

fn blob(id: u32, name: &str, parent: u32) -> BlobRecord {
    BlobRecord {
        id,
        flags: THIN,
        parent,
        uuid: Uuid::from_bytes([id as u8; 16]),
        name: name.into(),
        clusters: 8,
        created: 1,
    }
}

fn template() -> Template {
    let mut st = State::new(STORE, "lvs".into(), 64, 16);
    st.apply(&Op::CreateBlob(blob(1, "a", 0))).unwrap();
    st.apply(&Op::Alloc { blob: 1, index: 0, cluster: 2, count: 3 }).unwrap();
    let ckpt = st.to_checkpoint(5).encode();
    let sb = Superblock {
        seq: 4,
        uuid: STORE,
        cluster_size: 1 << 20,
        block_size: 512,
        data_offset: 1 << 20,
        total_clusters: 64,
        journal_page: 2,
        journal_pages: JOURNAL_PAGES,
        ckpt_page: [10, 20],
        ckpt_pages: 10,
        active: 1,
        ckpt_len: ckpt.len() as u64,
        ckpt_crc: crc32c::crc32c(&ckpt),
        journal_seq: 5,
    };
    let mut stream = Vec::new();
    encode_txn(
        &[
            Op::Snapshot {
                origin: 1,
                new_id: 2,
                uuid: Uuid::from_bytes([9; 16]),
                name: "s".into(),
                created: 2,
            },
            Op::CleanFrom { cluster: 20 },
        ],
        &mut stream,
    );
    encode_txn(&[Op::Alloc { blob: 2, index: 1, cluster: 17, count: 1 }], &mut stream);
    encode_txn(&[Op::CreateBlob(blob(3, "c", 1))], &mut stream);
    encode_txn(&[Op::Free { blob: 2, index: 1, count: 1 }], &mut stream);
    let mut journal = vec![0u8; JOURNAL_PAGES as usize * PAGE];
    let mut prev = 0;
    for (i, chunk) in stream.chunks(JOURNAL_PAYLOAD / 3).enumerate() {
        let seq = 5 + i as u64;
        let page = format::journal_page(&STORE, seq, prev, chunk);
        prev = format::sealed_crc(&page);
        let at = (seq % JOURNAL_PAGES) as usize * PAGE;
        journal[at..at + PAGE].copy_from_slice(&page);
    }
    Template { sb, ckpt, journal }
}

fn patch(base: &mut [u8], with: &[u8]) {
    for (o, w) in base.iter_mut().zip(with) {
        *o ^= w;
    }
}

fn seal(page: &mut [u8]) {
    let n = page.len();
    let crc = crc32c::crc32c(&page[..n - 4]);
    page[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let knobs = data[0];
    let n = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let rest = &data[3..];
    let (psb, prest) = rest.split_at(n.min(rest.len()));
    static T: OnceLock<Template> = OnceLock::new();
    let t = T.get_or_init(template);

    let mut ckpt = t.ckpt.clone();
    let mut journal = t.journal.clone();
    if knobs & 8 != 0 {
        patch(&mut journal, prest);
        if knobs & 2 != 0 {
            for p in journal.chunks_exact_mut(PAGE) {
                seal(p);
            }
        }
    } else {
        patch(&mut ckpt, prest);
    }
    if knobs & 16 != 0 {
        journal.truncate(prest.len() % journal.len().max(1));
    }
    let mut sb = t.sb.clone();
    if knobs & 4 != 0 {
        sb.ckpt_crc = crc32c::crc32c(&ckpt);
    }
    let mut head = vec![0u8; 2 * PAGE];
    let slot = (sb.seq % 2) as usize * PAGE;
    head[slot..slot + PAGE].copy_from_slice(&sb.encode());
    patch(&mut head[slot..slot + PAGE], psb);
    if knobs & 1 != 0 {
        seal(&mut head[slot..slot + PAGE]);
    }

    let picked = match image::pick_superblock(&head) {
        Ok(Some(sb)) => sb,
        Ok(None) => return,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    assert_eq!(picked.encode(), head[slot..slot + PAGE], "not canonical");
    match image::replay(&picked, &ckpt, &journal) {
        Ok((state, resume)) => {
            assert!(state.check().is_empty(), "{:?}", state.check());
            assert!(resume.seq >= picked.journal_seq);
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
