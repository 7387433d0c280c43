//! The discovery service: the log page listing every subsystem's listeners that a host may
//! reach, and the discovery subsystem's own entry.

use super::NvmfTarget;
use nvme_spec::log::{subtype, DiscoveryLogEntry, DiscoveryLogHeader};
use nvme_spec::IntoBytes;

/// The whole discovery log page for `hostnqn`: header and one entry per (subsystem,
/// listener) the host may connect to.
pub fn log_page(target: &NvmfTarget, hostnqn: &str) -> Vec<u8> {
    let entries: Vec<DiscoveryLogEntry> = target
        .discovery_entries(hostnqn)
        .iter()
        .filter_map(|(s, l)| {
            let entry = if l.trtype == "RDMA" {
                DiscoveryLogEntry::rdma
            } else {
                DiscoveryLogEntry::tcp
            };
            let e = entry(
                subtype::NVME,
                &s.nqn,
                &l.traddr,
                &l.trsvcid,
                l.adrfam == "IPv6",
                // One port per distinct listen address; a stable small number.
                port_id(&l.traddr, &l.trsvcid),
            );
            if e.is_none() {
                // NQNs and listen addresses are validated when created, so this is a bug.
                tracing::warn!(nqn = %s.nqn, listener = %l, "discovery entry does not fit; left out");
            }
            // Space padded as SPDK writes them, so hosts see what they always saw.
            e.map(DiscoveryLogEntry::with_space_padded_addresses)
        })
        .collect();
    let mut hdr = DiscoveryLogHeader::default();
    hdr.genctr.set(target.genctr());
    hdr.numrec.set(entries.len() as u64);
    let mut page = Vec::with_capacity(hdr.as_bytes().len() + entries.as_bytes().len());
    page.extend_from_slice(hdr.as_bytes());
    page.extend_from_slice(entries.as_bytes());
    page
}

fn port_id(traddr: &str, trsvcid: &str) -> u16 {
    let h = crc32c::crc32c(format!("{traddr}:{trsvcid}").as_bytes());
    (h as u16) & 0x7FFF
}
