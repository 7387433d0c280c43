//! Transport IDs in SPDK's syntax:
//! `trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1`.
//!
//! Keys are case-insensitive, pairs are separated by whitespace, and `key=value` is accepted as
//! well as `key:value` (SPDK takes both). Values keep their case: NQNs contain `:` themselves,
//! so only the first separator of a pair splits it.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use thiserror::Error;

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Default NVMe/TCP I/O port (IANA).
pub const DEFAULT_TCP_PORT: u16 = 4420;

/// The transports the model knows. Only TCP has a data path today; the others parse so that
/// a transport ID written for them gives a clear "not supported" rather than a syntax error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrType {
    /// NVMe/TCP.
    Tcp,
    /// NVMe over RDMA (not implemented yet).
    Rdma,
    /// Local PCIe controller through VFIO.
    Pcie,
}

impl TrType {
    /// SPDK's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrType::Tcp => "TCP",
            TrType::Rdma => "RDMA",
            TrType::Pcie => "PCIe",
        }
    }
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdrFam {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl AdrFam {
    /// SPDK's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AdrFam::Ipv4 => "IPv4",
            AdrFam::Ipv6 => "IPv6",
        }
    }
}

/// Why a transport ID string was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TridError {
    #[error("transport ID `{0}` is not `key:value` (example: `trtype:TCP traddr:127.0.0.1 trsvcid:4420 subnqn:nqn...`)")]
    NotKeyValue(String),
    #[error(
        "unknown transport ID key `{0}` (known: trtype adrfam traddr trsvcid subnqn hostnqn ns)"
    )]
    UnknownKey(String),
    #[error("transport ID key `{0}` given twice")]
    Duplicate(String),
    #[error("unknown trtype `{0}` (known: TCP, RDMA, PCIe)")]
    BadTrType(String),
    #[error("unknown adrfam `{0}` (known: IPv4, IPv6)")]
    BadAdrFam(String),
    #[error("trsvcid `{0}` is not a port number 1-65535")]
    BadPort(String),
    #[error("ns `{0}` is not a namespace ID 1-4294967294")]
    BadNsid(String),
    #[error("transport ID has no traddr")]
    MissingTraddr,
    #[error("transport ID has no trtype")]
    MissingTrType,
    #[error("NQN `{0}` is longer than 223 bytes or empty")]
    BadNqn(String),
    #[error("traddr `{traddr}` does not match adrfam {adrfam}")]
    FamilyMismatch {
        traddr: String,
        adrfam: &'static str,
    },
}

/// A parsed transport ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportId {
    /// Transport type.
    pub trtype: TrType,
    /// Address family (defaults from traddr when not given).
    pub adrfam: AdrFam,
    /// Address: an IP literal or a host name.
    pub traddr: String,
    /// Port.
    pub trsvcid: u16,
    /// Subsystem NQN; the discovery NQN when not given (as in SPDK).
    pub subnqn: String,
    /// Host NQN to present, if the ID names one (plexperf's `hostnqn:` extension, like SPDK's).
    pub hostnqn: Option<String>,
    /// Restrict to one namespace (plexperf's `ns:` extension, like SPDK's perf).
    pub nsid: Option<u32>,
}

impl TransportId {
    /// A TCP transport ID.
    pub fn tcp(addr: SocketAddr, subnqn: &str) -> Self {
        TransportId {
            trtype: TrType::Tcp,
            adrfam: if addr.is_ipv4() {
                AdrFam::Ipv4
            } else {
                AdrFam::Ipv6
            },
            traddr: addr.ip().to_string(),
            trsvcid: addr.port(),
            subnqn: subnqn.to_string(),
            hostnqn: None,
            nsid: None,
        }
    }

    /// Whether this ID names the discovery subsystem.
    pub fn is_discovery(&self) -> bool {
        // A PCIe controller is named by its address alone; it is never a discovery service.
        self.trtype != TrType::Pcie && self.subnqn == DISCOVERY_NQN
    }

    /// Resolves traddr:trsvcid to a socket address of the right family.
    pub fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        let want_v4 = self.adrfam == AdrFam::Ipv4;
        (self.traddr.as_str(), self.trsvcid)
            .to_socket_addrs()?
            .find(|a| a.is_ipv4() == want_v4)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} has no {} address", self.traddr, self.adrfam.as_str()),
                )
            })
    }
}

fn check_nqn(s: &str) -> Result<String, TridError> {
    // NVMe Base 2.0 §4.5: at most 223 bytes of UTF-8 (the field is 256 with a NUL).
    if s.is_empty() || s.len() > 223 {
        return Err(TridError::BadNqn(s.to_string()));
    }
    Ok(s.to_string())
}

impl FromStr for TransportId {
    type Err = TridError;

    fn from_str(s: &str) -> Result<Self, TridError> {
        let mut trtype = None;
        let mut adrfam = None;
        let mut traddr: Option<String> = None;
        let mut trsvcid = None;
        let mut subnqn = None;
        let mut hostnqn = None;
        let mut nsid = None;
        for pair in s.split_whitespace() {
            let sep = pair
                .find([':', '='])
                .ok_or_else(|| TridError::NotKeyValue(pair.to_string()))?;
            let (key, val) = (&pair[..sep], &pair[sep + 1..]);
            if key.is_empty() || val.is_empty() {
                return Err(TridError::NotKeyValue(pair.to_string()));
            }
            let key_l = key.to_ascii_lowercase();
            fn set<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), TridError> {
                if slot.is_some() {
                    return Err(TridError::Duplicate(key.to_string()));
                }
                *slot = Some(v);
                Ok(())
            }
            match key_l.as_str() {
                "trtype" => {
                    let t = match val.to_ascii_lowercase().as_str() {
                        "tcp" => TrType::Tcp,
                        "rdma" => TrType::Rdma,
                        "pcie" => TrType::Pcie,
                        _ => return Err(TridError::BadTrType(val.to_string())),
                    };
                    set(&mut trtype, key, t)?
                }
                "adrfam" => {
                    let f = match val.to_ascii_lowercase().as_str() {
                        "ipv4" => AdrFam::Ipv4,
                        "ipv6" => AdrFam::Ipv6,
                        _ => return Err(TridError::BadAdrFam(val.to_string())),
                    };
                    set(&mut adrfam, key, f)?
                }
                "traddr" => set(&mut traddr, key, val.to_string())?,
                "trsvcid" => {
                    let p: u16 = val
                        .parse()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| TridError::BadPort(val.to_string()))?;
                    set(&mut trsvcid, key, p)?
                }
                "subnqn" => set(&mut subnqn, key, check_nqn(val)?)?,
                "hostnqn" => set(&mut hostnqn, key, check_nqn(val)?)?,
                "ns" => {
                    let n: u32 = val
                        .parse()
                        .ok()
                        .filter(|&n| n != 0 && n != u32::MAX)
                        .ok_or_else(|| TridError::BadNsid(val.to_string()))?;
                    set(&mut nsid, key, n)?
                }
                _ => return Err(TridError::UnknownKey(key.to_string())),
            }
        }
        let trtype = trtype.ok_or(TridError::MissingTrType)?;
        let traddr = traddr.ok_or(TridError::MissingTraddr)?;
        let literal: Option<IpAddr> = traddr.parse().ok();
        let adrfam = match (adrfam, literal) {
            (Some(f), Some(ip)) => {
                if (f == AdrFam::Ipv4) != ip.is_ipv4() {
                    return Err(TridError::FamilyMismatch {
                        traddr,
                        adrfam: f.as_str(),
                    });
                }
                f
            }
            (Some(f), None) => f,
            (None, Some(IpAddr::V6(_))) => AdrFam::Ipv6,
            (None, _) => AdrFam::Ipv4,
        };
        Ok(TransportId {
            trtype,
            adrfam,
            traddr,
            trsvcid: trsvcid.unwrap_or(DEFAULT_TCP_PORT),
            subnqn: subnqn.unwrap_or_else(|| DISCOVERY_NQN.to_string()),
            hostnqn,
            nsid,
        })
    }
}

impl TransportId {
    /// What names the controller, without the host's part (hostnqn, ns): a PCIe controller
    /// by its address alone, a fabrics one by address, port and subsystem.
    pub fn controller_address(&self) -> String {
        if self.trtype == TrType::Pcie {
            return format!("trtype:PCIe traddr:{}", self.traddr);
        }
        format!(
            "trtype:{} adrfam:{} traddr:{} trsvcid:{} subnqn:{}",
            self.trtype.as_str(),
            self.adrfam.as_str(),
            self.traddr,
            self.trsvcid,
            self.subnqn
        )
    }
}

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.controller_address())?;
        if let Some(h) = self
            .hostnqn
            .as_ref()
            .filter(|_| self.trtype != TrType::Pcie)
        {
            write!(f, " hostnqn:{h}")?;
        }
        if let Some(n) = self.nsid {
            write!(f, " ns:{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_syntax_and_round_trips() {
        let s = "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1";
        let t: TransportId = s.parse().unwrap();
        assert_eq!(t.trtype, TrType::Tcp);
        assert_eq!(t.trsvcid, 4420);
        assert_eq!(t.subnqn, "nqn.2016-06.io.spdk:cnode1");
        assert_eq!(t.to_string(), s);
        assert_eq!(t.to_string().parse::<TransportId>().unwrap(), t);
    }

    #[test]
    fn case_equals_and_defaults() {
        let t: TransportId = "TrType=tcp TRADDR=::1 ns:2".parse().unwrap();
        assert_eq!(t.adrfam, AdrFam::Ipv6);
        assert_eq!(t.trsvcid, DEFAULT_TCP_PORT);
        assert!(t.is_discovery());
        assert_eq!(t.nsid, Some(2));
    }

    #[test]
    fn clear_errors() {
        let e = |s: &str| s.parse::<TransportId>().unwrap_err();
        assert_eq!(e("trtype:TCP"), TridError::MissingTraddr);
        assert_eq!(e("traddr:1.2.3.4"), TridError::MissingTrType);
        assert_eq!(e("trtype:FC traddr:x"), TridError::BadTrType("FC".into()));
        assert_eq!(
            e("trtype:TCP traddr:x trsvcid:0"),
            TridError::BadPort("0".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:x trsvcid:99999"),
            TridError::BadPort("99999".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:x foo:1"),
            TridError::UnknownKey("foo".into())
        );
        assert_eq!(
            e("trtype:TCP trtype:TCP"),
            TridError::Duplicate("trtype".into())
        );
        assert_eq!(
            e("trtype:TCP traddr"),
            TridError::NotKeyValue("traddr".into())
        );
        assert!(matches!(
            e("trtype:TCP adrfam:IPv6 traddr:127.0.0.1"),
            TridError::FamilyMismatch { .. }
        ));
        assert!(matches!(
            e("trtype:TCP traddr:x subnqn:"),
            TridError::NotKeyValue(_)
        ));
    }
}
