//! Wire formats the target needs that nvme-spec does not have yet (its `log` module is a
//! placeholder). Written as plain byte encoders at the spec's offsets.
// TODO(nvme-spec): move the log page layouts (discovery log, SMART, firmware slot, changed
// namespace list, error log) into nvme-spec::log.

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Asynchronous event completion dword 0: type, info and the log page to read.
pub fn aen_dw0(event_type: u8, info: u8, log_page: u8) -> u32 {
    u32::from(event_type & 7) | (u32::from(info) << 8) | (u32::from(log_page) << 16)
}

pub mod aen {
    /// Event type "Notice".
    pub const TYPE_NOTICE: u8 = 2;
    /// Notice: namespace attribute changed.
    pub const NOTICE_NS_CHANGED: u8 = 0x00;
    /// Notice: discovery log page changed.
    pub const NOTICE_DISCOVERY_CHANGED: u8 = 0xF0;
}

/// Discovery log page: a 1024-byte header then 1024-byte entries.
pub const DISC_HDR_LEN: usize = 1024;
pub const DISC_ENTRY_LEN: usize = 1024;

pub mod disc {
    pub const TRTYPE_TCP: u8 = 3;
    pub const ADRFAM_IPV4: u8 = 1;
    pub const ADRFAM_IPV6: u8 = 2;
    /// Entry describes a discovery subsystem (referral).
    pub const SUBTYPE_DISCOVERY: u8 = 1;
    pub const SUBTYPE_NVME: u8 = 2;
    /// Entry describes the discovery subsystem being asked.
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// TREQ: secure channel not required.
    pub const TREQ_NOT_REQUIRED: u8 = 0x2;
    /// TCP TSAS: no security.
    pub const SECTYPE_NONE: u8 = 0;
}

/// One discovery log entry.
pub struct DiscEntry<'a> {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    pub asqsz: u16,
    pub trsvcid: &'a str,
    pub subnqn: &'a str,
    pub traddr: &'a str,
}

fn put_padded(out: &mut [u8], s: &str, pad: u8) {
    let b = s.as_bytes();
    let n = b.len().min(out.len());
    out[..n].copy_from_slice(&b[..n]);
    out[n..].fill(pad);
}

impl DiscEntry<'_> {
    /// Encodes into a 1024-byte slot.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..DISC_ENTRY_LEN];
        out.fill(0);
        out[0] = self.trtype;
        out[1] = self.adrfam;
        out[2] = self.subtype;
        out[3] = self.treq;
        out[4..6].copy_from_slice(&self.portid.to_le_bytes());
        out[6..8].copy_from_slice(&self.cntlid.to_le_bytes());
        out[8..10].copy_from_slice(&self.asqsz.to_le_bytes());
        // TRSVCID and TRADDR are space padded ASCII, SUBNQN NUL padded.
        put_padded(&mut out[32..64], self.trsvcid, b' ');
        put_padded(&mut out[256..512], self.subnqn, 0);
        put_padded(&mut out[512..768], self.traddr, b' ');
        // TSAS for TCP: SECTYPE at byte 0.
        out[768] = disc::SECTYPE_NONE;
    }
}

/// Encodes the discovery log header.
pub fn encode_disc_header(out: &mut [u8], genctr: u64, numrec: u64) {
    let out = &mut out[..DISC_HDR_LEN];
    out.fill(0);
    out[0..8].copy_from_slice(&genctr.to_le_bytes());
    out[8..16].copy_from_slice(&numrec.to_le_bytes());
    // RECFMT 0.
}

/// SMART / Health Information log (512 bytes). We report a healthy, cool device.
pub fn encode_smart(out: &mut [u8], data_units_read: u128, data_units_written: u128) {
    let out = &mut out[..512];
    out.fill(0);
    // Composite temperature in Kelvin (bytes 1..3): 25 °C.
    out[1..3].copy_from_slice(&298u16.to_le_bytes());
    // Available spare 100%, threshold 10%.
    out[3] = 100;
    out[4] = 10;
    out[32..48].copy_from_slice(&data_units_read.to_le_bytes());
    out[48..64].copy_from_slice(&data_units_written.to_le_bytes());
}

/// Firmware Slot Information log (512 bytes): slot 1 active, holding `rev`.
pub fn encode_firmware_slot(out: &mut [u8], rev: &str) {
    let out = &mut out[..512];
    out.fill(0);
    out[0] = 1; // AFI: slot 1 active
    put_padded(&mut out[8..16], rev, b' ');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_entry_offsets() {
        let mut b = vec![0xAAu8; 1024];
        DiscEntry {
            trtype: disc::TRTYPE_TCP,
            adrfam: disc::ADRFAM_IPV4,
            subtype: disc::SUBTYPE_NVME,
            treq: disc::TREQ_NOT_REQUIRED,
            portid: 7,
            cntlid: 0xFFFF,
            asqsz: 32,
            trsvcid: "4420",
            subnqn: "nqn.x",
            traddr: "127.0.0.1",
        }
        .encode(&mut b);
        assert_eq!(&b[0..4], &[3, 1, 2, 2]);
        assert_eq!(&b[4..6], &[7, 0]);
        assert_eq!(&b[32..37], b"4420 ");
        assert_eq!(&b[256..262], b"nqn.x\0");
        assert_eq!(&b[512..522], b"127.0.0.1 ");
        assert_eq!(b[1023], 0);
    }

    #[test]
    fn aen_encoding() {
        assert_eq!(
            aen_dw0(
                aen::TYPE_NOTICE,
                aen::NOTICE_NS_CHANGED,
                lid::CHANGED_NS_LIST
            ),
            0x0004_0002
        );
    }
}
