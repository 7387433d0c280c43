//! The discovery service: the log page listing every subsystem's listeners that a host may
//! reach, and the discovery subsystem's own entry.

use super::spec::{self, disc, DiscEntry, DISC_ENTRY_LEN, DISC_HDR_LEN};
use super::NvmfTarget;

/// The whole discovery log page for `hostnqn`: header and one entry per (subsystem,
/// listener) the host may connect to.
pub fn log_page(target: &NvmfTarget, hostnqn: &str) -> Vec<u8> {
    let entries = target.discovery_entries(hostnqn);
    let genctr = target.genctr();
    let mut page = vec![0u8; DISC_HDR_LEN + entries.len() * DISC_ENTRY_LEN];
    spec::encode_disc_header(&mut page, genctr, entries.len() as u64);
    for (i, (s, l)) in entries.iter().enumerate() {
        let off = DISC_HDR_LEN + i * DISC_ENTRY_LEN;
        DiscEntry {
            trtype: disc::TRTYPE_TCP,
            adrfam: if l.adrfam == "IPv6" {
                disc::ADRFAM_IPV6
            } else {
                disc::ADRFAM_IPV4
            },
            subtype: disc::SUBTYPE_NVME,
            treq: disc::TREQ_NOT_REQUIRED,
            // One port per distinct listen address; a stable small number.
            portid: port_id(&l.traddr, &l.trsvcid),
            cntlid: 0xFFFF,
            asqsz: 32,
            trsvcid: &l.trsvcid,
            subnqn: &s.nqn,
            traddr: &l.traddr,
        }
        .encode(&mut page[off..off + DISC_ENTRY_LEN]);
    }
    page
}

fn port_id(traddr: &str, trsvcid: &str) -> u16 {
    let h = crc32c::crc32c(format!("{traddr}:{trsvcid}").as_bytes());
    (h as u16) & 0x7FFF
}
