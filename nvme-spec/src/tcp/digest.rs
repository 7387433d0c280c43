//! CRC32C header and data digests (HDGST, DDGST).

/// CRC32C of a PDU header (the `hlen` bytes before HDGST).
pub fn header_digest(header: &[u8]) -> u32 {
    crc32c::crc32c(header)
}

/// CRC32C of contiguous PDU data.
pub fn data_digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Incremental CRC32C for PDU data spread over several buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDigest(u32);

impl DataDigest {
    /// A fresh digest.
    pub const fn new() -> Self {
        DataDigest(0)
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    /// The digest so far (stored little-endian on the wire).
    pub const fn value(&self) -> u32 {
        self.0
    }
}

/// Checks a received data digest (4 little-endian bytes) against `data`.
pub fn verify_data_digest(data: &[u8], digest: &[u8]) -> bool {
    match <[u8; 4]>::try_from(digest) {
        Ok(d) => u32::from_le_bytes(d) == data_digest(data),
        Err(_) => false,
    }
}
