//! Discovery: fetch and parse the discovery log page (LID 70h) from a discovery controller.
//!
//! Layouts come from `nvme_spec::log` (header: GENCTR, NUMREC, RECFMT; 1024-byte entries).

use nvme_spec::log::{DiscoveryLogEntry, DiscoveryLogHeader};
use nvme_spec::FromBytes;
use serde::Serialize;

use crate::ctrlr::Controller;
use crate::error::{Error, Result};
use crate::trid::{AdrFam, TrType, TransportId};

const LID_DISCOVERY: u8 = 0x70;
const HDR: usize = 1024;
const ENTRY: usize = 1024;
/// More records than this is not a discovery log we believe.
const MAX_RECORDS: u64 = 4096;
/// Bytes per Get Log Page (well under any MDTS and the admin in-capsule limits).
const CHUNK: usize = 16 * 1024;

/// One discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryEntry {
    /// Transport type (1 RDMA, 2 FC, 3 TCP, 254 loop).
    pub trtype: u8,
    /// Address family (1 IPv4, 2 IPv6).
    pub adrfam: u8,
    /// Subsystem type (1 referral, 2 NVM subsystem, 3 current discovery subsystem).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID (0xFFFF: dynamic).
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    /// Transport service ID (port).
    pub trsvcid: String,
    /// Transport address.
    pub traddr: String,
    /// Subsystem NQN.
    pub subnqn: String,
}

impl DiscoveryEntry {
    /// Subtype name as `nvme discover` prints it.
    pub fn subtype_name(&self) -> &'static str {
        match self.subtype {
            1 => "referral",
            2 => "nvme subsystem",
            3 => "current discovery subsystem",
            _ => "unknown",
        }
    }

    /// A transport ID for this entry, if it is TCP over IP.
    pub fn trid(&self) -> Option<TransportId> {
        if self.trtype != 3 {
            return None;
        }
        let adrfam = match self.adrfam {
            1 => AdrFam::Ipv4,
            2 => AdrFam::Ipv6,
            _ => return None,
        };
        Some(TransportId {
            trtype: TrType::Tcp,
            adrfam,
            traddr: self.traddr.clone(),
            trsvcid: self.trsvcid.parse().ok()?,
            subnqn: self.subnqn.clone(),
            hostnqn: None,
            nsid: None,
        })
    }
}

/// The discovery log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryLog {
    /// Generation counter the entries belong to.
    pub genctr: u64,
    /// The entries.
    pub entries: Vec<DiscoveryEntry>,
}

/// (GENCTR, NUMREC) from the log header.
pub fn parse_header(b: &[u8]) -> Result<(u64, u64)> {
    let Ok((h, _)) = DiscoveryLogHeader::read_from_prefix(b) else {
        return Err(Error::Protocol("discovery log header too short".into()));
    };
    let recfmt = h.recfmt.get();
    if recfmt != 0 {
        return Err(Error::Unsupported(format!(
            "discovery log record format {recfmt}"
        )));
    }
    Ok((h.genctr.get(), h.numrec.get()))
}

/// Parses one 1024-byte entry (a shorter slice yields an all-zero entry).
pub fn parse_entry(b: &[u8]) -> DiscoveryEntry {
    let e = DiscoveryLogEntry::read_from_prefix(b)
        .map(|(e, _)| e)
        .unwrap_or_else(|_| nvme_spec::FromZeros::new_zeroed());
    DiscoveryEntry {
        trtype: e.trtype,
        adrfam: e.adrfam,
        subtype: e.subtype,
        treq: e.treq,
        portid: e.portid.get(),
        cntlid: e.cntlid.get(),
        asqsz: e.asqsz.get(),
        trsvcid: e.trsvcid_str().unwrap_or("").to_string(),
        traddr: e.traddr_str().unwrap_or("").to_string(),
        subnqn: e.subnqn_str().unwrap_or("").to_string(),
    }
}

/// Parses a whole log (header plus entries); `numrec` must fit in `b`.
pub fn parse_log(b: &[u8]) -> Result<DiscoveryLog> {
    let (genctr, numrec) = parse_header(b)?;
    if numrec > MAX_RECORDS || b.len() < HDR + numrec as usize * ENTRY {
        return Err(Error::Protocol(format!(
            "discovery log claims {numrec} records"
        )));
    }
    let entries = (0..numrec as usize)
        .map(|i| parse_entry(&b[HDR + i * ENTRY..HDR + (i + 1) * ENTRY]))
        .collect();
    Ok(DiscoveryLog { genctr, entries })
}

fn read_log(c: &mut Controller, offset: usize, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(CHUNK);
        let cmd = nvme_spec::Command::get_log_page(
            0,
            LID_DISCOVERY,
            0,
            false,
            n as u32,
            (offset + out.len()) as u64,
        );
        let (_, b) = c.admin_command(cmd, Some(n))?;
        out.extend_from_slice(&b.unwrap_or_default());
    }
    Ok(out)
}

/// Fetches the discovery log. If GENCTR changes while reading, reads again (a few times).
pub fn get_log(c: &mut Controller) -> Result<DiscoveryLog> {
    for _ in 0..10 {
        let hdr = read_log(c, 0, HDR)?;
        let (genctr, numrec) = parse_header(&hdr)?;
        if numrec > MAX_RECORDS {
            return Err(Error::Protocol(format!(
                "discovery log claims {numrec} records"
            )));
        }
        let mut all = hdr;
        all.extend_from_slice(&read_log(c, HDR, numrec as usize * ENTRY)?);
        let again = read_log(c, 0, HDR)?;
        if parse_header(&again)?.0 == genctr {
            return parse_log(&all);
        }
        tracing::debug!("discovery log changed while reading (genctr {genctr}); reading again");
    }
    Err(Error::Protocol("discovery log keeps changing".into()))
}
