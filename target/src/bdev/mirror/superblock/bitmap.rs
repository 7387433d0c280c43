//! The write-intent bitmap: one bit per region, set while the region may differ between
//! plexes, kept on disk in one checksummed chunk per block.

use super::*;

/// Byte offsets of a bitmap chunk.
mod chunk {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const INDEX: usize = 12;
    pub const MIRROR_UUID: usize = 16;
    pub const BITS: usize = super::CHUNK_HEADER_BYTES;
}

/// One bit per region, set while the region may differ between plexes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.count(), self.len)
    }
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// `len` bits with those in `ranges` set (clipped to `len`).
    pub fn from_ranges(len: u64, ranges: impl IntoIterator<Item = Range<u64>>) -> Bitmap {
        let mut b = Bitmap::new(len);
        for r in ranges {
            b.set_range(r);
        }
        b
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bits as words, bit `i` at `words[i / 64] >> (i % 64)`; bits past `len` are zero.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// False for a bit past the end.
    pub fn test(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` and says whether it was set before (a bit that was clear needs its chunk
    /// written before the data). Bits past the end are ignored: no region lives there.
    pub fn set(&mut self, i: u64) -> bool {
        let was = self.test(i);
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
        was
    }

    /// Clears bit `i` and says whether it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        let was = self.test(i);
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
        was
    }

    pub fn set_range(&mut self, r: Range<u64>) {
        self.fill(r, true);
    }

    pub fn clear_range(&mut self, r: Range<u64>) {
        self.fill(r, false);
    }

    pub fn set_all(&mut self) {
        self.set_range(0..self.len);
    }

    fn fill(&mut self, r: Range<u64>, value: bool) {
        let (start, end) = (r.start.min(self.len), r.end.min(self.len));
        let mut i = start;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i += hi - lo;
        }
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indexes of the set bits, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// The words chunk `index` of `layout` holds (fewer than a full chunk's at the end).
    pub fn chunk_words(&self, layout: &Layout, index: u32) -> &[u64] {
        let per_words = (layout.regions_per_chunk() / 64) as usize;
        let start = (index as usize)
            .saturating_mul(per_words)
            .min(self.words.len());
        &self.words[start..(start + per_words).min(self.words.len())]
    }

    /// Chunk `index` of this bitmap as the block to write at `layout.chunk_block(index)`.
    pub fn encode_chunk(
        &self,
        layout: &Layout,
        mirror_uuid: Uuid,
        index: u32,
    ) -> Result<Vec<u8>, SbError> {
        if index >= layout.chunk_count() {
            return Err(SbError::Geometry(format!(
                "chunk {index} requested, the bitmap has {}",
                layout.chunk_count()
            )));
        }
        encode_chunk(
            mirror_uuid,
            index,
            self.chunk_words(layout, index),
            layout.block_size(),
        )
    }
}

/// A bitmap chunk of `block_size` bytes holding `words` (fewer than the chunk holds are padded
/// with zero). The caller must not pass bits for regions the mirror lacks: readers refuse them.
pub fn encode_chunk(
    mirror_uuid: Uuid,
    index: u32,
    words: &[u64],
    block_size: u32,
) -> Result<Vec<u8>, SbError> {
    check_block_size(block_size)?;
    let per_words = (regions_per_chunk(block_size) / 64) as usize;
    if words.len() > per_words {
        return Err(SbError::Geometry(format!(
            "{} words do not fit a chunk of {block_size} bytes ({per_words} words)",
            words.len()
        )));
    }
    let mut b = vec![0u8; block_size as usize];
    put(&mut b, chunk::MAGIC, &CHUNK_MAGIC);
    put(&mut b, chunk::INDEX, &index.to_le_bytes());
    put(&mut b, chunk::MIRROR_UUID, mirror_uuid.as_bytes());
    for (i, w) in words.iter().enumerate() {
        put(&mut b, chunk::BITS + i * 8, &w.to_le_bytes());
    }
    let crc = crc_skipping(&b, chunk::CRC);
    put(&mut b, chunk::CRC, &crc.to_le_bytes());
    Ok(b)
}

/// Decodes one bitmap chunk (`bytes` is exactly one block) into its words, checking it is
/// chunk `index` of mirror `mirror_uuid` and that no bit is set at or past `regions` (the
/// number of regions this chunk covers).
pub fn decode_chunk(
    bytes: &[u8],
    mirror_uuid: Uuid,
    index: u32,
    regions: u64,
) -> Result<Vec<u64>, SbError> {
    let block_size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    check_block_size(block_size)?;
    let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if magic != CHUNK_MAGIC {
        return Err(SbError::BadMagic { found: magic });
    }
    let stored = get_u32(bytes, chunk::CRC);
    let computed = crc_skipping(bytes, chunk::CRC);
    if stored != computed {
        return Err(SbError::BadChecksum { stored, computed });
    }
    let found = get_uuid(bytes, chunk::MIRROR_UUID);
    if found != mirror_uuid {
        return Err(SbError::ForeignMirror {
            expected: mirror_uuid,
            found,
        });
    }
    let at = get_u32(bytes, chunk::INDEX);
    if at != index {
        return Err(inconsistent(format!(
            "chunk {at} found where chunk {index} belongs"
        )));
    }
    let words: Vec<u64> = bytes[chunk::BITS..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let past = Bitmap {
        words: words.clone(),
        len: words.len() as u64 * 64,
    }
    .iter_set()
    .find(|&i| i >= regions);
    if let Some(i) = past {
        return Err(inconsistent(format!(
            "chunk {index} sets bit {i}, it covers only {regions} regions"
        )));
    }
    Ok(words)
}

/// A chunk [`decode_bitmap`] could not use; its regions were taken as dirty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkProblem {
    pub index: u32,
    pub regions: Range<u64>,
    pub error: SbError,
}

/// The bitmap from the bytes of chunks `0..layout.chunk_count()` read back to back. A chunk
/// that is missing, torn, or not this mirror's counts as all dirty: the worst a bad chunk can
/// cause is extra resync, never a skipped one.
pub fn decode_bitmap(
    layout: &Layout,
    mirror_uuid: Uuid,
    bytes: &[u8],
) -> (Bitmap, Vec<ChunkProblem>) {
    let mut bitmap = Bitmap::new(layout.regions());
    let mut problems = Vec::new();
    let bs = layout.block_size() as usize;
    let per_words = (layout.regions_per_chunk() / 64) as usize;
    for index in 0..layout.chunk_count() {
        let regions = layout.regions_in_chunk(index);
        let start = index as usize * bs;
        let decoded = match bytes.get(start..start + bs) {
            Some(b) => decode_chunk(b, mirror_uuid, index, regions.end - regions.start),
            None => Err(SbError::ShortBuffer {
                need: (start + bs) as u64,
                got: bytes.len() as u64,
            }),
        };
        match decoded {
            Ok(words) => {
                let first = index as usize * per_words;
                let end = (first + per_words).min(bitmap.words.len());
                bitmap.words[first..end].copy_from_slice(&words[..end - first]);
            }
            Err(error) => {
                bitmap.set_range(regions.clone());
                problems.push(ChunkProblem {
                    index,
                    regions,
                    error,
                });
            }
        }
    }
    (bitmap, problems)
}
