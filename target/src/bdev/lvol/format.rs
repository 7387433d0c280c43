//! The volume store's on-disk format (docs/lvol-on-disk-format.md): how the superblock, the
//! journal pages and the checkpoint are laid out in bytes. Everything here is pure: bytes in,
//! values or a [`FormatError`] naming what is wrong out. Nothing read from a disk can panic
//! it (`fuzz/fuzz_targets/lvol_metadata.rs`).

use std::fmt;
use uuid::Uuid;

/// Metadata is read and written in pages of this size, whatever the base's block size.
pub const PAGE: usize = 4096;
pub const VERSION: u32 = 1;
pub const SUPER_MAGIC: [u8; 8] = *b"PLXLVS\0\x01";
pub const JOURNAL_MAGIC: [u8; 8] = *b"PLXLVJ\0\x01";
pub const CKPT_MAGIC: [u8; 8] = *b"PLXLVC\0\x01";
/// The two superblock slots are pages 0 and 1.
pub const SUPER_SLOTS: u64 = 2;
/// A journal page: magic, store uuid, seq, previous page's CRC, used bytes; CRC last.
const JOURNAL_HEADER: usize = 8 + 16 + 8 + 4 + 4;
pub const JOURNAL_PAYLOAD: usize = PAGE - JOURNAL_HEADER - 4;
pub const MAX_NAME: usize = 255;

/// Blob flags.
pub const THIN: u32 = 1;
pub const READ_ONLY: u32 = 2;
pub const SNAPSHOT: u32 = 4;
const KNOWN_FLAGS: u32 = THIN | READ_ONLY | SNAPSHOT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

/// CRC32C of a page with its last four bytes (where the CRC goes) left out.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32c::crc32c(&page[..page.len() - 4])
}

fn seal(page: &mut [u8]) {
    let crc = page_crc(page);
    let n = page.len();
    page[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(page: &[u8]) -> bool {
    page.len() == PAGE && page_crc(page).to_le_bytes() == page[PAGE - 4..]
}

// ---- little-endian cursor ----------------------------------------------------------------

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v)
    }
    pub fn uuid(&mut self, u: &Uuid) {
        self.bytes(u.as_bytes())
    }
    /// A name: length byte, then UTF-8 (names are at most [`MAX_NAME`] bytes).
    pub fn name(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
        self.u8(b.len() as u8);
        self.bytes(b);
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        match self.buf.get(self.pos..self.pos.saturating_add(n)) {
            Some(b) => {
                self.pos += n;
                Ok(b)
            }
            None => err(format!("truncated at byte {} (wanted {n} more)", self.pos)),
        }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn uuid(&mut self) -> Result<Uuid, FormatError> {
        Ok(Uuid::from_bytes(self.arr()?))
    }
    pub fn name(&mut self) -> Result<String, FormatError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => err("a name is not UTF-8"),
        }
    }
}

// ---- superblock ---------------------------------------------------------------------------

/// Where everything is, and which checkpoint is current. Rewritten (in the older slot) only
/// when a checkpoint completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Higher wins between the two slots.
    pub seq: u64,
    pub uuid: Uuid,
    pub cluster_size: u64,
    /// The base's block size when the store was made.
    pub block_size: u32,
    /// Byte offset of cluster 0 (a multiple of the cluster size).
    pub data_offset: u64,
    pub total_clusters: u64,
    pub journal_page: u64,
    pub journal_pages: u64,
    pub ckpt_page: [u64; 2],
    pub ckpt_pages: u64,
    /// Which checkpoint area is current.
    pub active: u8,
    pub ckpt_len: u64,
    pub ckpt_crc: u32,
    /// The journal page the checkpoint is followed by.
    pub journal_seq: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&SUPER_MAGIC);
        w.u32(VERSION);
        w.u32(0);
        w.u64(self.seq);
        w.uuid(&self.uuid);
        w.u64(self.cluster_size);
        w.u32(self.block_size);
        w.u32(0);
        w.u64(self.data_offset);
        w.u64(self.total_clusters);
        w.u64(self.journal_page);
        w.u64(self.journal_pages);
        w.u64(self.ckpt_page[0]);
        w.u64(self.ckpt_page[1]);
        w.u64(self.ckpt_pages);
        w.u8(self.active);
        w.bytes(&[0; 7]);
        w.u64(self.ckpt_len);
        w.u32(self.ckpt_crc);
        w.u32(0);
        w.u64(self.journal_seq);
        let mut page = w.0;
        page.resize(PAGE, 0);
        seal(&mut page);
        page
    }

    /// Whether `page` starts like a store's superblock (examine looks before it decodes).
    pub fn has_magic(page: &[u8]) -> bool {
        page.starts_with(&SUPER_MAGIC)
    }

    pub fn decode(page: &[u8]) -> Result<Superblock, FormatError> {
        if page.len() != PAGE {
            return err(format!("superblock is {} bytes, not {PAGE}", page.len()));
        }
        if !Self::has_magic(page) {
            return err("no volume store magic");
        }
        if !sealed(page) {
            return err("superblock checksum mismatch");
        }
        let mut r = Reader::new(&page[8..]);
        let version = r.u32()?;
        if version != VERSION {
            return err(format!(
                "superblock version {version}; this plexd reads version {VERSION}"
            ));
        }
        // Reserved fields are zero: a version that gives them a meaning bumps VERSION.
        let mut reserved = r.u32()? as u64;
        let seq = r.u64()?;
        let uuid = r.uuid()?;
        let cluster_size = r.u64()?;
        let block_size = r.u32()?;
        reserved |= r.u32()? as u64;
        let data_offset = r.u64()?;
        let total_clusters = r.u64()?;
        let journal_page = r.u64()?;
        let journal_pages = r.u64()?;
        let ckpt_page = [r.u64()?, r.u64()?];
        let ckpt_pages = r.u64()?;
        let active = r.u8()?;
        reserved |= r.take(7)?.iter().map(|&b| b as u64).sum::<u64>();
        let ckpt_len = r.u64()?;
        let ckpt_crc = r.u32()?;
        reserved |= r.u32()? as u64;
        let journal_seq = r.u64()?;
        let used = 8 + r.pos;
        if reserved != 0 || page[used..PAGE - 4].iter().any(|&b| b != 0) {
            return err("superblock has bytes set in its reserved fields");
        }
        let sb = Superblock {
            seq,
            uuid,
            cluster_size,
            block_size,
            data_offset,
            total_clusters,
            journal_page,
            journal_pages,
            ckpt_page,
            ckpt_pages,
            active,
            ckpt_len,
            ckpt_crc,
            journal_seq,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// The geometry must make sense before anything is read through it.
    fn validate(&self) -> Result<(), FormatError> {
        let page = PAGE as u64;
        if self.cluster_size < page
            || !self.cluster_size.is_multiple_of(page)
            || self.cluster_size > 1 << 32
        {
            return err(format!("cluster size {} is invalid", self.cluster_size));
        }
        if !matches!(self.block_size, 512 | 4096) {
            return err(format!("block size {} is invalid", self.block_size));
        }
        if self.active > 1 {
            return err(format!("active checkpoint {} is not 0 or 1", self.active));
        }
        // 2^26 clusters is 256 TiB at 4 MiB; the bound keeps a damaged count from making a
        // load allocate gigabytes.
        if self.total_clusters == 0 || self.total_clusters > 1 << 26 {
            return err(format!("{} clusters is invalid", self.total_clusters));
        }
        if self.journal_pages < 2 || self.ckpt_pages == 0 {
            return err("journal or checkpoint area is empty");
        }
        // Areas in order: superblocks, journal, checkpoint A, checkpoint B, data.
        let areas = [
            (SUPER_SLOTS, self.journal_page, self.journal_pages),
            (
                self.journal_page.saturating_add(self.journal_pages),
                self.ckpt_page[0],
                self.ckpt_pages,
            ),
            (
                self.ckpt_page[0].saturating_add(self.ckpt_pages),
                self.ckpt_page[1],
                self.ckpt_pages,
            ),
        ];
        for (min_start, start, len) in areas {
            if start < min_start || start.checked_add(len).is_none() {
                return err("metadata areas overlap");
            }
        }
        let meta_end = (self.ckpt_page[1] + self.ckpt_pages).saturating_mul(page);
        if self.data_offset < meta_end || !self.data_offset.is_multiple_of(self.cluster_size) {
            return err(format!(
                "data offset {} is inside the metadata or not on a cluster",
                self.data_offset
            ));
        }
        if self.ckpt_len > self.ckpt_pages * page {
            return err("checkpoint longer than its area");
        }
        Ok(())
    }

    /// The byte just past the store on its base.
    pub fn end_bytes(&self) -> u64 {
        self.data_offset
            .saturating_add(self.total_clusters.saturating_mul(self.cluster_size))
    }
}

// ---- journal ------------------------------------------------------------------------------

/// One change to the store. A transaction is a list of these, applied all or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateBlob(BlobRecord),
    DeleteBlob {
        id: u32,
    },
    /// Clusters `cluster..cluster+count` become indexes `index..` of blob `blob`.
    Alloc {
        blob: u32,
        index: u32,
        cluster: u32,
        count: u32,
    },
    /// Indexes `index..index+count` of `blob` give their clusters back.
    Free {
        blob: u32,
        index: u32,
        count: u32,
    },
    Resize {
        blob: u32,
        clusters: u64,
    },
    /// Blob `origin` becomes the snapshot (read-only, named `name`), and a new, empty, thin
    /// blob `new_id` takes the origin's name, uuid and size, with the snapshot as parent. No
    /// cluster moves, so it costs the same whatever was written.
    Snapshot {
        origin: u32,
        new_id: u32,
        uuid: Uuid,
        name: String,
        created: u64,
    },
    SetParent {
        blob: u32,
        parent: u32,
    },
    SetFlags {
        blob: u32,
        flags: u32,
    },
    Rename {
        blob: u32,
        name: String,
    },
    RenameStore {
        name: String,
    },
    /// Clusters from `cluster` on hold zeroes and were never handed out.
    CleanFrom {
        cluster: u32,
    },
}

/// A blob (an lvol or a snapshot) as the checkpoint and `CreateBlob` carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    pub id: u32,
    pub flags: u32,
    /// 0: none.
    pub parent: u32,
    pub uuid: Uuid,
    pub name: String,
    pub clusters: u64,
    /// Unix seconds.
    pub created: u64,
}

impl BlobRecord {
    fn encode(&self, w: &mut Writer) {
        w.u32(self.id);
        w.u32(self.flags);
        w.u32(self.parent);
        w.uuid(&self.uuid);
        w.name(&self.name);
        w.u64(self.clusters);
        w.u64(self.created);
    }

    fn decode(r: &mut Reader) -> Result<BlobRecord, FormatError> {
        let b = BlobRecord {
            id: r.u32()?,
            flags: r.u32()?,
            parent: r.u32()?,
            uuid: r.uuid()?,
            name: r.name()?,
            clusters: r.u64()?,
            created: r.u64()?,
        };
        if b.id == 0 {
            return err("blob id 0");
        }
        if b.flags & !KNOWN_FLAGS != 0 {
            return err(format!("blob {} has unknown flags {:#x}", b.id, b.flags));
        }
        Ok(b)
    }
}

impl Op {
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Op::CreateBlob(b) => {
                w.u8(1);
                b.encode(w);
            }
            Op::DeleteBlob { id } => {
                w.u8(2);
                w.u32(*id);
            }
            Op::Alloc {
                blob,
                index,
                cluster,
                count,
            } => {
                w.u8(3);
                w.u32(*blob);
                w.u32(*index);
                w.u32(*cluster);
                w.u32(*count);
            }
            Op::Free { blob, index, count } => {
                w.u8(4);
                w.u32(*blob);
                w.u32(*index);
                w.u32(*count);
            }
            Op::Resize { blob, clusters } => {
                w.u8(5);
                w.u32(*blob);
                w.u64(*clusters);
            }
            Op::Snapshot {
                origin,
                new_id,
                uuid,
                name,
                created,
            } => {
                w.u8(6);
                w.u32(*origin);
                w.u32(*new_id);
                w.uuid(uuid);
                w.name(name);
                w.u64(*created);
            }
            Op::SetParent { blob, parent } => {
                w.u8(7);
                w.u32(*blob);
                w.u32(*parent);
            }
            Op::SetFlags { blob, flags } => {
                w.u8(8);
                w.u32(*blob);
                w.u32(*flags);
            }
            Op::Rename { blob, name } => {
                w.u8(9);
                w.u32(*blob);
                w.name(name);
            }
            Op::RenameStore { name } => {
                w.u8(10);
                w.name(name);
            }
            Op::CleanFrom { cluster } => {
                w.u8(11);
                w.u32(*cluster);
            }
        }
    }

    pub fn decode(r: &mut Reader) -> Result<Op, FormatError> {
        Ok(match r.u8()? {
            1 => Op::CreateBlob(BlobRecord::decode(r)?),
            2 => Op::DeleteBlob { id: r.u32()? },
            3 => Op::Alloc {
                blob: r.u32()?,
                index: r.u32()?,
                cluster: r.u32()?,
                count: r.u32()?,
            },
            4 => Op::Free {
                blob: r.u32()?,
                index: r.u32()?,
                count: r.u32()?,
            },
            5 => Op::Resize {
                blob: r.u32()?,
                clusters: r.u64()?,
            },
            6 => Op::Snapshot {
                origin: r.u32()?,
                new_id: r.u32()?,
                uuid: r.uuid()?,
                name: r.name()?,
                created: r.u64()?,
            },
            7 => Op::SetParent {
                blob: r.u32()?,
                parent: r.u32()?,
            },
            8 => Op::SetFlags {
                blob: r.u32()?,
                flags: r.u32()?,
            },
            9 => Op::Rename {
                blob: r.u32()?,
                name: r.name()?,
            },
            10 => Op::RenameStore { name: r.name()? },
            11 => Op::CleanFrom { cluster: r.u32()? },
            t => return err(format!("unknown journal op {t}")),
        })
    }
}

/// A transaction as journal bytes: its length, then its ops.
pub fn encode_txn(ops: &[Op], out: &mut Vec<u8>) {
    let mut w = Writer::default();
    w.u16(ops.len() as u16);
    for op in ops {
        op.encode(&mut w);
    }
    out.extend_from_slice(&(w.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&w.0);
}

/// Splits the journal's byte stream into whole transactions, and says how many bytes they
/// took. A transaction cut short at the end (its last pages never written) is left out: it
/// was never acknowledged.
pub fn decode_txns(stream: &[u8]) -> Result<(Vec<Vec<Op>>, usize), FormatError> {
    let mut r = Reader::new(stream);
    let mut txns = Vec::new();
    let mut whole = 0;
    while !r.at_end() {
        let Ok(len) = r.u32() else { break };
        let Ok(body) = r.take(len as usize) else {
            break;
        };
        let mut b = Reader::new(body);
        let n = b.u16()?;
        let mut ops = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            ops.push(Op::decode(&mut b)?);
        }
        if !b.at_end() {
            return err("journal transaction has bytes after its last op");
        }
        txns.push(ops);
        whole = r.pos;
    }
    Ok((txns, whole))
}

/// One journal page, sealed. `prev_crc` chains it to the page before, so a stale page left
/// from a torn write of an earlier lap never passes for the next one.
pub fn journal_page(uuid: &Uuid, seq: u64, prev_crc: u32, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= JOURNAL_PAYLOAD);
    let mut w = Writer::default();
    w.bytes(&JOURNAL_MAGIC);
    w.uuid(uuid);
    w.u64(seq);
    w.u32(prev_crc);
    w.u32(payload.len() as u32);
    w.bytes(payload);
    let mut page = w.0;
    page.resize(PAGE, 0);
    seal(&mut page);
    page
}

/// A journal page's payload, if the page is the one expected next: sealed, this store's,
/// sequence `seq`, following a page whose CRC was `prev_crc` (`None` for the first page after
/// a checkpoint). `None` marks the end of the journal.
pub fn read_journal_page<'a>(
    page: &'a [u8],
    uuid: &Uuid,
    seq: u64,
    prev_crc: Option<u32>,
) -> Option<&'a [u8]> {
    if !sealed(page) || !page.starts_with(&JOURNAL_MAGIC) {
        return None;
    }
    let mut r = Reader::new(&page[8..]);
    let ok = r.uuid().ok()? == *uuid && r.u64().ok()? == seq;
    let prev = r.u32().ok()?;
    let len = r.u32().ok()? as usize;
    if !ok || prev_crc.is_some_and(|p| p != prev) || len > JOURNAL_PAYLOAD {
        return None;
    }
    page.get(JOURNAL_HEADER..JOURNAL_HEADER + len)
}

/// The CRC a page is sealed with (what the next page chains to).
pub fn sealed_crc(page: &[u8]) -> u32 {
    page_crc(page)
}

// ---- checkpoint ---------------------------------------------------------------------------

/// The whole store at one journal sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub uuid: Uuid,
    pub name: String,
    pub journal_seq: u64,
    pub clean_from: u32,
    pub next_blob: u32,
    pub blobs: Vec<(BlobRecord, Vec<Extent>)>,
}

/// Indexes `index..index+count` of a blob held in clusters `cluster..cluster+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub index: u32,
    pub cluster: u32,
    pub count: u32,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&CKPT_MAGIC);
        w.u32(VERSION);
        w.uuid(&self.uuid);
        w.name(&self.name);
        w.u64(self.journal_seq);
        w.u32(self.clean_from);
        w.u32(self.next_blob);
        w.u32(self.blobs.len() as u32);
        for (b, extents) in &self.blobs {
            b.encode(&mut w);
            w.u32(extents.len() as u32);
            for e in extents {
                w.u32(e.index);
                w.u32(e.cluster);
                w.u32(e.count);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, FormatError> {
        let mut r = Reader::new(bytes);
        if r.take(8)? != CKPT_MAGIC {
            return err("no checkpoint magic");
        }
        let version = r.u32()?;
        if version != VERSION {
            return err(format!("checkpoint version {version}"));
        }
        let mut c = Checkpoint {
            uuid: r.uuid()?,
            name: r.name()?,
            journal_seq: r.u64()?,
            clean_from: r.u32()?,
            next_blob: r.u32()?,
            blobs: Vec::new(),
        };
        let n = r.u32()?;
        for _ in 0..n {
            let b = BlobRecord::decode(&mut r)?;
            let ne = r.u32()?;
            // Each extent is 12 bytes: a count beyond what is left is damage, not a reason to
            // allocate.
            if ne as usize > bytes.len() / 12 {
                return err(format!("blob {} claims {ne} extents", b.id));
            }
            let mut extents = Vec::with_capacity(ne as usize);
            for _ in 0..ne {
                extents.push(Extent {
                    index: r.u32()?,
                    cluster: r.u32()?,
                    count: r.u32()?,
                });
            }
            c.blobs.push((b, extents));
        }
        if !r.at_end() {
            return err("checkpoint has bytes after its last blob");
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample_super() -> Superblock {
        Superblock {
            seq: 3,
            uuid: Uuid::from_u128(7),
            cluster_size: 1 << 20,
            block_size: 512,
            data_offset: 4 << 20,
            total_clusters: 100,
            journal_page: 2,
            journal_pages: 64,
            ckpt_page: [66, 70],
            ckpt_pages: 4,
            active: 1,
            ckpt_len: 100,
            ckpt_crc: 0xdead_beef,
            journal_seq: 9,
        }
    }

    #[test]
    fn a_superblock_round_trips_and_any_flipped_byte_is_refused() {
        let sb = sample_super();
        let page = sb.encode();
        assert_eq!(Superblock::decode(&page).unwrap(), sb);
        for i in (0..PAGE).step_by(97) {
            let mut bad = page.clone();
            bad[i] ^= 0x10;
            assert!(Superblock::decode(&bad).is_err(), "byte {i}");
        }
        assert!(Superblock::decode(&page[..100]).is_err());
    }

    #[test]
    fn a_superblock_with_overlapping_areas_is_refused_even_when_sealed() {
        let mut sb = sample_super();
        sb.ckpt_page = [10, 70];
        let e = Superblock::decode(&sb.encode()).unwrap_err();
        assert!(e.0.contains("overlap"), "{e}");
        let mut sb = sample_super();
        sb.data_offset = 0;
        assert!(
            Superblock::decode(&sb.encode()).is_err(),
            "data over the metadata"
        );
        let mut sb = sample_super();
        sb.data_offset = (4 << 20) + 512;
        assert!(
            Superblock::decode(&sb.encode()).is_err(),
            "data not on a cluster"
        );
    }

    fn ops() -> Vec<Op> {
        vec![
            Op::CreateBlob(BlobRecord {
                id: 4,
                flags: THIN,
                parent: 0,
                uuid: Uuid::from_u128(9),
                name: "vol".into(),
                clusters: 10,
                created: 1,
            }),
            Op::Alloc {
                blob: 4,
                index: 2,
                cluster: 7,
                count: 3,
            },
            Op::Snapshot {
                origin: 4,
                new_id: 5,
                uuid: Uuid::from_u128(10),
                name: "snap".into(),
                created: 2,
            },
            Op::CleanFrom { cluster: 12 },
        ]
    }

    #[test]
    fn transactions_round_trip_and_a_torn_tail_is_left_out() {
        let mut stream = Vec::new();
        encode_txn(&ops(), &mut stream);
        encode_txn(&[Op::DeleteBlob { id: 5 }], &mut stream);
        let (txns, used) = decode_txns(&stream).unwrap();
        assert_eq!(txns, vec![ops(), vec![Op::DeleteBlob { id: 5 }]]);
        assert_eq!(used, stream.len());
        let (cut, used) = decode_txns(&stream[..stream.len() - 1]).unwrap();
        assert_eq!(cut, vec![ops()]);
        assert!(used < stream.len() - 1, "the torn tail is not counted");
    }

    #[test]
    fn a_journal_page_is_taken_only_in_its_place_in_the_chain() {
        let u = Uuid::from_u128(1);
        let p = journal_page(&u, 5, 0x1234, b"hello");
        assert_eq!(
            read_journal_page(&p, &u, 5, Some(0x1234)),
            Some(&b"hello"[..])
        );
        assert_eq!(read_journal_page(&p, &u, 5, None), Some(&b"hello"[..]));
        assert_eq!(read_journal_page(&p, &u, 6, None), None);
        assert_eq!(read_journal_page(&p, &u, 5, Some(1)), None);
        assert_eq!(read_journal_page(&p, &Uuid::from_u128(2), 5, None), None);
        let mut bad = p.clone();
        bad[40] ^= 1;
        assert_eq!(read_journal_page(&bad, &u, 5, None), None);
    }

    #[test]
    fn a_checkpoint_round_trips_and_damage_is_an_error() {
        let c = Checkpoint {
            uuid: Uuid::from_u128(3),
            name: "lvs".into(),
            journal_seq: 77,
            clean_from: 40,
            next_blob: 6,
            blobs: vec![(
                BlobRecord {
                    id: 5,
                    flags: READ_ONLY | SNAPSHOT,
                    parent: 0,
                    uuid: Uuid::from_u128(4),
                    name: "s".into(),
                    clusters: 8,
                    created: 3,
                },
                vec![Extent {
                    index: 0,
                    cluster: 1,
                    count: 2,
                }],
            )],
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b).unwrap(), c);
        for n in 0..b.len() {
            assert!(Checkpoint::decode(&b[..n]).is_err(), "cut at {n}");
        }
    }
}
