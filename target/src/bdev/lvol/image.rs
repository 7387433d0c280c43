//! Reading a store's metadata from its bytes: which superblock is current, the checkpoint it
//! points at, and the journal after it. Pure functions over byte slices, shared by examine
//! (through the bdev layer), `plexctl lvstore check` (a file or device read directly) and the
//! fuzz target; every failure names the page it found wrong.

use super::format::{self, Superblock, PAGE};
use super::state::State;
use std::io::{Read, Seek, SeekFrom};

/// Where the journal goes on after a load: the page replay stopped at, chained to the last
/// page it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub seq: u64,
    pub prev: Option<u32>,
    /// The journal ends inside a transaction (a torn batch): pages written after it would be
    /// read as its continuation, so a checkpoint must come before the next journal write.
    pub torn: bool,
}

/// The current superblock of the first two pages: `None` when neither looks like one.
pub fn pick_superblock(head: &[u8]) -> Result<Option<Superblock>, String> {
    let slots: Vec<&[u8]> = head.chunks(PAGE).take(2).collect();
    if !slots.iter().any(|p| Superblock::has_magic(p)) {
        return Ok(None);
    }
    let mut found = Vec::new();
    let mut why = Vec::new();
    for (i, p) in slots.iter().enumerate() {
        match Superblock::decode(p) {
            Ok(sb) => found.push(sb),
            Err(e) if Superblock::has_magic(p) => {
                why.push(format!("superblock slot {i} (page {i}): {e}"))
            }
            Err(_) => {}
        }
    }
    found.sort_by_key(|s| s.seq);
    match found.pop() {
        Some(sb) => Ok(Some(sb)),
        None => Err(why.join("; ")),
    }
}

/// Whether the store described fits the device it is on.
pub fn check_fits(sb: &Superblock, block_size: u64, size: u64, name: &str) -> Result<(), String> {
    if sb.block_size as u64 != block_size {
        return Err(format!(
            "the store was made on {} byte blocks; {name} has {block_size}",
            sb.block_size
        ));
    }
    if sb.end_bytes() > size {
        return Err(format!(
            "the store needs {} bytes; {name} has only {size} (truncated?)",
            sb.end_bytes()
        ));
    }
    Ok(())
}

/// The first page and page count of the current checkpoint.
pub fn checkpoint_pages(sb: &Superblock) -> (u64, u64) {
    (
        sb.ckpt_page[sb.active as usize],
        sb.ckpt_len.div_ceil(PAGE as u64).max(1),
    )
}

/// The state: the checkpoint, then every whole transaction of the journal after it, while
/// each page is the next one in the chain. `journal` is the whole ring.
pub fn replay(sb: &Superblock, ckpt: &[u8], journal: &[u8]) -> Result<(State, Resume), String> {
    let area = sb.ckpt_page[sb.active as usize];
    let Some(ckpt) = ckpt.get(..sb.ckpt_len as usize) else {
        return Err(format!(
            "checkpoint at page {area}: shorter than its length"
        ));
    };
    if crc32c::crc32c(ckpt) != sb.ckpt_crc {
        return Err(format!(
            "checkpoint at page {area}: checksum mismatch (superblock seq {})",
            sb.seq
        ));
    }
    let c =
        format::Checkpoint::decode(ckpt).map_err(|e| format!("checkpoint at page {area}: {e}"))?;
    if c.uuid != sb.uuid {
        return Err(format!(
            "checkpoint at page {area} belongs to store {}",
            c.uuid
        ));
    }
    let mut state = State::from_checkpoint(&c, sb.total_clusters as u32)
        .map_err(|e| format!("checkpoint at page {area}: {e}"))?;
    let mut seq = sb.journal_seq;
    let mut prev = None;
    let mut stream = Vec::new();
    for _ in 0..sb.journal_pages {
        let at = (seq % sb.journal_pages) as usize * PAGE;
        let Some(page) = journal.get(at..at + PAGE) else {
            break;
        };
        let Some(payload) = format::read_journal_page(page, &sb.uuid, seq, prev) else {
            break;
        };
        stream.extend_from_slice(payload);
        prev = Some(format::sealed_crc(page));
        seq += 1;
    }
    let (txns, used) = format::decode_txns(&stream).map_err(|e| {
        format!(
            "journal from page {}: {e}",
            sb.journal_page + sb.journal_seq % sb.journal_pages
        )
    })?;
    for (i, t) in txns.iter().enumerate() {
        state.apply_txn(t).map_err(|e| {
            format!(
                "journal transaction {i} (from page {}): {e}",
                sb.journal_page + sb.journal_seq % sb.journal_pages
            )
        })?;
    }
    let problems = state.check();
    if !problems.is_empty() {
        return Err(format!("inconsistent metadata: {}", problems.join("; ")));
    }
    if c.journal_seq != sb.journal_seq {
        return Err(format!(
            "checkpoint at page {area} follows journal page {}, the superblock says {}",
            c.journal_seq, sb.journal_seq
        ));
    }
    let torn = used < stream.len();
    Ok((state, Resume { seq, prev, torn }))
}

/// Reads and replays a store from a file or block device (`plexctl lvstore check`, offline).
pub fn read_file(
    f: &mut (impl Read + Seek),
    size: u64,
) -> Result<Option<(Superblock, State)>, String> {
    let mut read = |page: u64, pages: u64| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; (pages as usize) * PAGE];
        f.seek(SeekFrom::Start(page * PAGE as u64))
            .and_then(|_| f.read_exact(&mut b))
            .map_err(|e| format!("reading page {page}: {e}"))?;
        Ok(b)
    };
    if size < 2 * PAGE as u64 {
        return Ok(None);
    }
    let Some(sb) = pick_superblock(&read(0, 2)?)? else {
        return Ok(None);
    };
    check_fits(&sb, sb.block_size as u64, size, "the device")?;
    let (cp, cn) = checkpoint_pages(&sb);
    let ckpt = read(cp, cn)?;
    let journal = read(sb.journal_page, sb.journal_pages)?;
    let (state, _) = replay(&sb, &ckpt, &journal)?;
    Ok(Some((sb, state)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::lvol::format::{encode_txn, journal_page, sealed_crc, Op, JOURNAL_PAYLOAD};
    use uuid::Uuid;

    /// A store of 64 clusters, its checkpoint at journal page 0, and `stream` as its journal.
    fn image(stream: &[u8]) -> (Superblock, Vec<u8>, Vec<u8>) {
        let uuid = Uuid::from_u128(1);
        let st = State::new(uuid, "lvs".into(), 64, 64);
        let ckpt = st.to_checkpoint(0).encode();
        let sb = Superblock {
            seq: 1,
            uuid,
            cluster_size: 1 << 20,
            block_size: 512,
            data_offset: 1 << 20,
            total_clusters: 64,
            journal_page: 2,
            journal_pages: 8,
            ckpt_page: [10, 20],
            ckpt_pages: 10,
            active: 0,
            ckpt_len: ckpt.len() as u64,
            ckpt_crc: crc32c::crc32c(&ckpt),
            journal_seq: 0,
        };
        let mut journal = vec![0u8; 8 * PAGE];
        let mut prev = 0;
        for (i, chunk) in stream.chunks(JOURNAL_PAYLOAD).enumerate() {
            let page = journal_page(&uuid, i as u64, prev, chunk);
            prev = sealed_crc(&page);
            journal[i * PAGE..(i + 1) * PAGE].copy_from_slice(&page);
        }
        (sb, ckpt, journal)
    }

    #[test]
    fn a_transaction_torn_across_pages_is_left_out_and_flagged() {
        let mut stream = Vec::new();
        encode_txn(&[Op::RenameStore { name: "a".into() }], &mut stream);
        // A transaction long enough to span two pages.
        let big: Vec<Op> = (0..800)
            .map(|i| Op::RenameStore {
                name: format!("name-{i}"),
            })
            .collect();
        encode_txn(&big, &mut stream);
        let (sb, ckpt, journal) = image(&stream);
        let (st, r) = replay(&sb, &ckpt, &journal).unwrap();
        assert_eq!((st.name.as_str(), r.torn), ("name-799", false));
        assert_eq!(r.seq, stream.len().div_ceil(JOURNAL_PAYLOAD) as u64);

        // Its second page never made it.
        let mut torn = journal.clone();
        torn[PAGE + 100] ^= 1;
        let (st, r) = replay(&sb, &ckpt, &torn).unwrap();
        assert_eq!((st.name.as_str(), r.torn, r.seq), ("a", true, 1));
    }
}
