//! The mirror header: one per plex, kept in two slots written in turn, so a torn write
//! leaves the other slot whole; [`pick_header`] chooses between them.

use super::*;

/// What the mirror knows about one plex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlexState {
    /// Holds the same data as every other in-sync plex.
    InSync,
    /// Missed writes since this time; the bitmap says where.
    OutOfSync { since_unix_secs: u64 },
    /// Being copied to; regions before `next_region` are done, so a restart resumes there.
    Resyncing { next_region: u64 },
    /// Added to the mirror, holds nothing of it yet: needs a full copy.
    New,
    /// Taken out of service; the code is the mirror's, this format does not interpret it.
    Faulted { reason: u32 },
}

impl PlexState {
    fn code_and_arg(self) -> (u8, u64) {
        match self {
            PlexState::InSync => (1, 0),
            PlexState::OutOfSync { since_unix_secs } => (2, since_unix_secs),
            PlexState::Resyncing { next_region } => (3, next_region),
            PlexState::New => (4, 0),
            PlexState::Faulted { reason } => (5, u64::from(reason)),
        }
    }

    fn from_code(code: u8, arg: u64) -> Result<PlexState, String> {
        let no_arg = |s| {
            if arg == 0 {
                Ok(s)
            } else {
                Err(format!(
                    "state code {code} carries argument {arg}, must be 0"
                ))
            }
        };
        match code {
            1 => no_arg(PlexState::InSync),
            2 => Ok(PlexState::OutOfSync {
                since_unix_secs: arg,
            }),
            3 => Ok(PlexState::Resyncing { next_region: arg }),
            4 => no_arg(PlexState::New),
            5 => u32::try_from(arg)
                .map(|reason| PlexState::Faulted { reason })
                .map_err(|_| format!("fault reason {arg} exceeds 32 bits")),
            _ => Err(format!("unknown plex state code {code}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlexRecord {
    pub uuid: Uuid,
    /// Node that serves the plex; at most [`MAX_NODE_BYTES`] bytes, may be empty.
    pub node: String,
    /// How to find it again: a bdev name, or `nqn…/nsid`; at most [`MAX_LOCATION_BYTES`].
    pub location: String,
    pub state: PlexState,
    /// The mirror generation at which this plex was last known in sync.
    pub in_sync_generation: u64,
}

/// A mirror header, the same on every plex but for `this_plex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every header write; its parity picks the slot ([`Slot::for_seq`]).
    pub seq: u64,
    /// Bumped on every membership or plex-state change.
    pub generation: u64,
    pub mirror_uuid: Uuid,
    /// 1 to [`MAX_NAME_BYTES`] bytes of UTF-8.
    pub mirror_name: String,
    /// The plex this copy of the header lives on; must be in `plexes`.
    pub this_plex: Uuid,
    pub block_size: u32,
    pub region_size: u64,
    /// The mirror's size in blocks.
    pub mirror_blocks: u64,
    /// Plex block where data starts (recorded so data never moves if the plex grows).
    pub data_offset_blocks: u64,
    pub bitmap_chunks: u32,
    /// Set at clean shutdown, cleared before the first write after open: while set, the
    /// bitmap need not be consulted.
    pub clean: bool,
    pub plexes: Vec<PlexRecord>,
}

/// Byte offsets of the v1 header (see docs/mirror-on-disk-format.md).
pub(super) mod hdr {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CRC: usize = 12;
    pub const SEQ: usize = 16;
    pub const GENERATION: usize = 24;
    pub const MIRROR_UUID: usize = 32;
    pub const THIS_PLEX: usize = 48;
    pub const BLOCK_SIZE: usize = 64;
    pub const BITMAP_CHUNKS: usize = 68;
    pub const REGION_SIZE: usize = 72;
    pub const MIRROR_BLOCKS: usize = 80;
    pub const DATA_OFFSET: usize = 88;
    pub const FLAGS: usize = 96;
    pub const NAME_LEN: usize = 100;
    pub const PLEX_COUNT: usize = 101;
    pub const NAME: usize = 128;
    pub const PLEXES: usize = 256;
    pub const PLEX_RECORD: usize = 256;
    pub const FLAG_CLEAN: u32 = 1;
    /// Bytes that v1 reserves: zero when written, refused when not.
    pub const RESERVED: [(usize, usize); 3] = [(102, 128), (192, 256), (1280, super::HEADER_BYTES)];
}

/// Byte offsets inside a plex record.
pub(super) mod rec {
    pub const UUID: usize = 0;
    pub const IN_SYNC_GEN: usize = 16;
    pub const STATE_ARG: usize = 24;
    pub const STATE: usize = 32;
    pub const NODE_LEN: usize = 33;
    pub const LOCATION_LEN: usize = 34;
    pub const NODE: usize = 40;
    pub const LOCATION: usize = 72;
    pub const RESERVED: [(usize, usize); 2] = [(35, 40), (200, 256)];
}

/// A string field: `len` bytes of UTF-8 in a `max`-byte area, the rest zero.
fn get_str(area: &[u8], len: u8, what: &str) -> Result<String, SbError> {
    let len = usize::from(len);
    if len > area.len() {
        return Err(inconsistent(format!(
            "{what} length {len} exceeds its {} bytes",
            area.len()
        )));
    }
    if area[len..].iter().any(|&b| b != 0) {
        return Err(inconsistent(format!(
            "{what} has non-zero bytes past its length"
        )));
    }
    String::from_utf8(area[..len].to_vec())
        .map_err(|_| inconsistent(format!("{what} is not UTF-8")))
}

fn first_nonzero(b: &[u8], range: (usize, usize)) -> Option<usize> {
    b[range.0..range.1]
        .iter()
        .position(|&x| x != 0)
        .map(|p| p + range.0)
}

/// True if sequence number `a` was written after `b`, allowing for wrap-around: the two slots
/// are at most a few writes apart, never 2^63.
fn seq_newer(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

impl Superblock {
    /// The first header of a new mirror (seq 0, generation 1, not clean), with its geometry
    /// from `layout`, whose data area must already be the mirror's size.
    pub fn new(
        mirror_uuid: Uuid,
        mirror_name: &str,
        this_plex: Uuid,
        layout: &Layout,
        plexes: Vec<PlexRecord>,
    ) -> Result<Superblock, SbError> {
        let sb = Superblock {
            seq: 0,
            generation: 1,
            mirror_uuid,
            mirror_name: mirror_name.to_owned(),
            this_plex,
            block_size: layout.block_size,
            region_size: layout.region_size,
            mirror_blocks: layout.data_blocks,
            data_offset_blocks: layout.data_offset_blocks,
            bitmap_chunks: layout.bitmap_chunks,
            clean: false,
            plexes,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// The slot this header belongs in.
    pub fn slot(&self) -> Slot {
        Slot::for_seq(self.seq)
    }

    /// Geometry of this header on a plex of `plex_blocks` blocks.
    pub fn layout(&self, plex_blocks: u64) -> Result<Layout, SbError> {
        Layout::from_superblock(self, plex_blocks)
    }

    /// Rules shared by encode and decode, so whatever encodes also decodes.
    fn validate(&self) -> Result<Layout, SbError> {
        if self.mirror_uuid.is_nil() {
            return Err(inconsistent("mirror UUID is nil"));
        }
        if self.this_plex.is_nil() {
            return Err(inconsistent("this-plex UUID is nil"));
        }
        if self.mirror_name.is_empty() || self.mirror_name.len() > MAX_NAME_BYTES {
            return Err(inconsistent(format!(
                "mirror name of {} bytes, must be 1 to {MAX_NAME_BYTES}",
                self.mirror_name.len()
            )));
        }
        let layout = Layout::from_parts(
            self.block_size,
            self.region_size,
            self.bitmap_chunks,
            self.data_offset_blocks,
            self.mirror_blocks,
        )?;
        if self.plexes.is_empty() || self.plexes.len() > MAX_PLEXES {
            return Err(inconsistent(format!(
                "{} plexes, must be 1 to {MAX_PLEXES}",
                self.plexes.len()
            )));
        }
        for (i, p) in self.plexes.iter().enumerate() {
            if p.uuid.is_nil() {
                return Err(inconsistent(format!("plex {i} has a nil UUID")));
            }
            if self.plexes[..i].iter().any(|q| q.uuid == p.uuid) {
                return Err(inconsistent(format!("plex {} is listed twice", p.uuid)));
            }
            if p.node.len() > MAX_NODE_BYTES {
                return Err(inconsistent(format!(
                    "plex {i} node name of {} bytes, at most {MAX_NODE_BYTES}",
                    p.node.len()
                )));
            }
            if p.location.len() > MAX_LOCATION_BYTES {
                return Err(inconsistent(format!(
                    "plex {i} location of {} bytes, at most {MAX_LOCATION_BYTES}",
                    p.location.len()
                )));
            }
            if p.in_sync_generation > self.generation {
                return Err(inconsistent(format!(
                    "plex {i} in sync at generation {}, after the mirror's {}",
                    p.in_sync_generation, self.generation
                )));
            }
            if let PlexState::Resyncing { next_region } = p.state {
                if next_region > layout.regions() {
                    return Err(inconsistent(format!(
                        "plex {i} resync resumes at region {next_region}, the mirror has {}",
                        layout.regions()
                    )));
                }
            }
        }
        if !self.plexes.iter().any(|p| p.uuid == self.this_plex) {
            return Err(inconsistent(format!(
                "this plex {} is not in the plex table",
                self.this_plex
            )));
        }
        Ok(layout)
    }

    /// One slot's bytes: [`HEADER_BYTES`] rounded up to whole blocks, zero past the header.
    pub fn encode(&self) -> Result<Vec<u8>, SbError> {
        self.validate()?;
        let mut b = vec![0u8; (slot_blocks(self.block_size) * u64::from(self.block_size)) as usize];
        put(&mut b, hdr::MAGIC, &HEADER_MAGIC);
        put(&mut b, hdr::VERSION, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, hdr::SEQ, &self.seq.to_le_bytes());
        put(&mut b, hdr::GENERATION, &self.generation.to_le_bytes());
        put(&mut b, hdr::MIRROR_UUID, self.mirror_uuid.as_bytes());
        put(&mut b, hdr::THIS_PLEX, self.this_plex.as_bytes());
        put(&mut b, hdr::BLOCK_SIZE, &self.block_size.to_le_bytes());
        put(
            &mut b,
            hdr::BITMAP_CHUNKS,
            &self.bitmap_chunks.to_le_bytes(),
        );
        put(&mut b, hdr::REGION_SIZE, &self.region_size.to_le_bytes());
        put(
            &mut b,
            hdr::MIRROR_BLOCKS,
            &self.mirror_blocks.to_le_bytes(),
        );
        put(
            &mut b,
            hdr::DATA_OFFSET,
            &self.data_offset_blocks.to_le_bytes(),
        );
        let flags = if self.clean { hdr::FLAG_CLEAN } else { 0 };
        put(&mut b, hdr::FLAGS, &flags.to_le_bytes());
        // Lengths fit a byte: validate() bounded them.
        b[hdr::NAME_LEN] = self.mirror_name.len() as u8;
        b[hdr::PLEX_COUNT] = self.plexes.len() as u8;
        put(&mut b, hdr::NAME, self.mirror_name.as_bytes());
        for (i, p) in self.plexes.iter().enumerate() {
            let r = &mut b[hdr::PLEXES + i * hdr::PLEX_RECORD..][..hdr::PLEX_RECORD];
            let (code, arg) = p.state.code_and_arg();
            put(r, rec::UUID, p.uuid.as_bytes());
            put(r, rec::IN_SYNC_GEN, &p.in_sync_generation.to_le_bytes());
            put(r, rec::STATE_ARG, &arg.to_le_bytes());
            r[rec::STATE] = code;
            r[rec::NODE_LEN] = p.node.len() as u8;
            r[rec::LOCATION_LEN] = p.location.len() as u8;
            put(r, rec::NODE, p.node.as_bytes());
            put(r, rec::LOCATION, p.location.as_bytes());
        }
        let crc = crc_skipping(&b[..HEADER_BYTES], hdr::CRC);
        put(&mut b, hdr::CRC, &crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes a header from the start of `bytes` (at least [`HEADER_BYTES`]; the rest of the
    /// slot is ignored). Checks magic, then checksum, then version: the first three fields keep
    /// their place and the CRC its coverage in every version, so a damaged version field reads
    /// as damage rather than as a format this build lacks.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, SbError> {
        if bytes.len() < HEADER_BYTES {
            return Err(SbError::ShortBuffer {
                need: HEADER_BYTES as u64,
                got: bytes.len() as u64,
            });
        }
        let b = &bytes[..HEADER_BYTES];
        let magic: [u8; 8] = b[..8].try_into().expect("8 bytes");
        if magic != HEADER_MAGIC {
            return Err(SbError::BadMagic { found: magic });
        }
        let stored = get_u32(b, hdr::CRC);
        let computed = crc_skipping(b, hdr::CRC);
        if stored != computed {
            return Err(SbError::BadChecksum { stored, computed });
        }
        let version = get_u32(b, hdr::VERSION);
        if version != FORMAT_VERSION {
            return Err(SbError::UnsupportedVersion(version));
        }
        for r in hdr::RESERVED {
            if let Some(at) = first_nonzero(b, r) {
                return Err(inconsistent(format!(
                    "reserved header byte {at} is not zero"
                )));
            }
        }
        let flags = get_u32(b, hdr::FLAGS);
        if flags & !hdr::FLAG_CLEAN != 0 {
            return Err(inconsistent(format!("unknown header flags {flags:#x}")));
        }
        let name = get_str(
            &b[hdr::NAME..][..MAX_NAME_BYTES],
            b[hdr::NAME_LEN],
            "mirror name",
        )?;
        let count = usize::from(b[hdr::PLEX_COUNT]);
        if count > MAX_PLEXES {
            return Err(inconsistent(format!(
                "{count} plexes, at most {MAX_PLEXES}"
            )));
        }
        let mut plexes = Vec::with_capacity(count);
        for i in 0..PLEX_RECORD_SLOTS {
            let r = &b[hdr::PLEXES + i * hdr::PLEX_RECORD..][..hdr::PLEX_RECORD];
            if i >= count {
                if let Some(at) = first_nonzero(r, (0, hdr::PLEX_RECORD)) {
                    return Err(inconsistent(format!(
                        "unused plex record {i} has non-zero byte {at}"
                    )));
                }
                continue;
            }
            for res in rec::RESERVED {
                if let Some(at) = first_nonzero(r, res) {
                    return Err(inconsistent(format!(
                        "reserved byte {at} of plex record {i} is not zero"
                    )));
                }
            }
            let what = format!("plex {i} node name");
            let node = get_str(&r[rec::NODE..][..MAX_NODE_BYTES], r[rec::NODE_LEN], &what)?;
            let what = format!("plex {i} location");
            let location = get_str(
                &r[rec::LOCATION..][..MAX_LOCATION_BYTES],
                r[rec::LOCATION_LEN],
                &what,
            )?;
            plexes.push(PlexRecord {
                uuid: get_uuid(r, rec::UUID),
                node,
                location,
                state: PlexState::from_code(r[rec::STATE], get_u64(r, rec::STATE_ARG))
                    .map_err(|e| inconsistent(format!("plex {i}: {e}")))?,
                in_sync_generation: get_u64(r, rec::IN_SYNC_GEN),
            });
        }
        let sb = Superblock {
            seq: get_u64(b, hdr::SEQ),
            generation: get_u64(b, hdr::GENERATION),
            mirror_uuid: get_uuid(b, hdr::MIRROR_UUID),
            mirror_name: name,
            this_plex: get_uuid(b, hdr::THIS_PLEX),
            block_size: get_u32(b, hdr::BLOCK_SIZE),
            region_size: get_u64(b, hdr::REGION_SIZE),
            mirror_blocks: get_u64(b, hdr::MIRROR_BLOCKS),
            data_offset_blocks: get_u64(b, hdr::DATA_OFFSET),
            bitmap_chunks: get_u32(b, hdr::BITMAP_CHUNKS),
            clean: flags & hdr::FLAG_CLEAN != 0,
            plexes,
        };
        // Every byte is a field checked above or reserved, so the encoding is canonical. This
        // backstop keeps it so if a field is ever added without its check: a header that would
        // not be written back byte for byte is refused rather than half understood.
        let again = sb.encode()?;
        if let Some(at) = (0..HEADER_BYTES).find(|&i| again[i] != b[i]) {
            return Err(inconsistent(format!(
                "header byte {at} is not in canonical form"
            )));
        }
        Ok(sb)
    }

    /// Decodes the header read from `slot`, which must be the slot its seq belongs in (a header
    /// found in the wrong slot was misdirected or copied, and is not trusted), and, if
    /// `expect` names a mirror, must belong to it.
    pub fn decode_slot(
        bytes: &[u8],
        slot: Slot,
        expect: Option<Uuid>,
    ) -> Result<Superblock, SbError> {
        let sb = Superblock::decode(bytes)?;
        if sb.slot() != slot {
            return Err(inconsistent(format!(
                "header with seq {} found in slot {slot}, belongs in slot {}",
                sb.seq,
                sb.slot()
            )));
        }
        match expect {
            Some(expected) if expected != sb.mirror_uuid => Err(SbError::ForeignMirror {
                expected,
                found: sb.mirror_uuid,
            }),
            _ => Ok(sb),
        }
    }
}

/// The header [`pick_header`] chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picked {
    pub superblock: Superblock,
    pub slot: Slot,
    /// Why the other slot was not used, if it was not valid: worth a log line, and the next
    /// header write (to that slot) repairs it.
    pub other_problem: Option<SbError>,
}

/// Chooses the current header from the bytes of slots A and B: the valid one with the newer
/// seq, or the only valid one. `expect` (the mirror's UUID, when the caller knows it) turns a
/// slot of another mirror into [`SbError::ForeignMirror`].
///
/// Two valid slots of different mirrors are refused: that is a mirror creation (which writes
/// both slots) interrupted on a plex that held another mirror, and neither header can be
/// trusted to be the one wanted.
pub fn pick_header(a: &[u8], b: &[u8], expect: Option<Uuid>) -> Result<Picked, SbError> {
    let ra = Superblock::decode_slot(a, Slot::A, expect);
    let rb = Superblock::decode_slot(b, Slot::B, expect);
    match (ra, rb) {
        (Ok(sa), Ok(sb)) => {
            if sa.mirror_uuid != sb.mirror_uuid {
                return Err(inconsistent(format!(
                    "slot A holds mirror {}, slot B mirror {}: an interrupted mirror creation?",
                    sa.mirror_uuid, sb.mirror_uuid
                )));
            }
            let (superblock, slot) = if seq_newer(sa.seq, sb.seq) {
                (sa, Slot::A)
            } else {
                (sb, Slot::B)
            };
            Ok(Picked {
                superblock,
                slot,
                other_problem: None,
            })
        }
        (Ok(sa), Err(e)) => Ok(Picked {
            superblock: sa,
            slot: Slot::A,
            other_problem: Some(e),
        }),
        (Err(e), Ok(sb)) => Ok(Picked {
            superblock: sb,
            slot: Slot::B,
            other_problem: Some(e),
        }),
        (Err(a), Err(b)) => Err(SbError::NoValidHeader {
            a: Box::new(a),
            b: Box::new(b),
        }),
    }
}
