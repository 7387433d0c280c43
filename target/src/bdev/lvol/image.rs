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
    let txns = format::decode_txns(&stream).map_err(|e| {
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
    Ok((state, Resume { seq, prev }))
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
