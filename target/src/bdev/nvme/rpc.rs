//! `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`, `bdev_nvme_reset_controller`,
//! `bdev_nvme_get_controllers`, with SPDK's parameter names.

use super::*;
use crate::rpc::{Methods, RpcError};
use serde::Deserialize;
use std::str::FromStr;

impl From<NvmeError> for RpcError {
    fn from(e: NvmeError) -> Self {
        RpcError::errno(e.errno(), e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    /// SPDK sends a string; a number is accepted too.
    trsvcid: Option<Value>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    fabrics_connect_timeout_us: Option<u64>,
    num_io_queues: Option<u32>,
    #[serde(default)]
    ctrlr_loss_timeout_sec: i64,
    #[serde(default)]
    reconnect_delay_sec: u64,
    #[serde(default)]
    fast_io_fail_timeout_sec: u64,
    /// SPDK's bound on the names returned; every namespace gets a bdev here.
    #[allow(dead_code)]
    max_bdevs: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detach {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<Value>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetCtrlr {
    name: String,
    /// SPDK's choice of one controller of a multipath bdev; ours have one.
    #[allow(dead_code)]
    cntlid: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetControllers {
    name: Option<String>,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::invalid_params(msg)
}

fn svcid(v: &Option<Value>) -> Result<Option<String>, RpcError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(bad("trsvcid must be a port number (string or integer)")),
    }
}

/// SPDK's rules for the three coupled reconnect parameters.
fn check_resiliency(loss: i64, delay: u64, fast: u64) -> Result<(), RpcError> {
    if loss < -1 {
        return Err(bad("ctrlr_loss_timeout_sec must be -1 (retry forever), 0 (never retry) or a number of seconds"));
    }
    if loss == 0 {
        if delay != 0 || fast != 0 {
            return Err(bad("reconnect_delay_sec and fast_io_fail_timeout_sec need ctrlr_loss_timeout_sec other than 0"));
        }
        return Ok(());
    }
    if delay == 0 {
        return Err(bad(
            "reconnect_delay_sec must be at least 1 when ctrlr_loss_timeout_sec is not 0",
        ));
    }
    if loss > 0 && delay > loss as u64 {
        return Err(bad(
            "reconnect_delay_sec must not exceed ctrlr_loss_timeout_sec",
        ));
    }
    if fast != 0 {
        if loss > 0 && fast > loss as u64 {
            return Err(bad(
                "fast_io_fail_timeout_sec must not exceed ctrlr_loss_timeout_sec",
            ));
        }
        if fast < delay {
            return Err(bad(
                "fast_io_fail_timeout_sec must be at least reconnect_delay_sec",
            ));
        }
    }
    Ok(())
}

/// The host ID that goes with a host NQN: the UUID in a `…:uuid:` NQN (as the kernel
/// does), else one derived from the NQN, so a saved config reconnects as the same host.
fn hostid_for(hostnqn: &str) -> [u8; 16] {
    hostnqn
        .rsplit_once(":uuid:")
        .and_then(|(_, u)| Uuid::parse_str(u).ok())
        .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, hostnqn.as_bytes()))
        .into_bytes()
}

fn spec_of(p: Attach) -> Result<(AttachSpec, [u8; 16], Option<u64>), RpcError> {
    validate_name(&p.name).map_err(|e| bad(e.to_string()))?;
    let tt = parse_trtype(&p.trtype)
        .ok_or_else(|| bad(format!("trtype {:?}: known are TCP, RDMA, PCIe", p.trtype)))?;
    if p.num_io_queues.is_some_and(|n| n == 0 || n > 1024) {
        return Err(bad("num_io_queues must be 1-1024"));
    }
    check_resiliency(
        p.ctrlr_loss_timeout_sec,
        p.reconnect_delay_sec,
        p.fast_io_fail_timeout_sec,
    )?;
    let mut s = format!("trtype:{} traddr:{}", tt.as_str(), p.traddr);
    if p.traddr.is_empty() || p.traddr.contains(char::is_whitespace) {
        return Err(bad(format!("traddr {:?} is not an address", p.traddr)));
    }
    for (k, v) in [
        ("adrfam", p.adrfam.clone()),
        ("trsvcid", svcid(&p.trsvcid)?),
        ("subnqn", p.subnqn.clone()),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(bad(format!("{k} {v:?} is empty or has spaces")));
            }
            s.push_str(&format!(" {k}:{v}"));
        }
    }
    let trid = TransportId::from_str(&s).map_err(|e| bad(e.to_string()))?;
    if trid.is_discovery() {
        return Err(bad(
            "subnqn is the discovery NQN (or missing): name the subsystem to attach",
        ));
    }
    let hostnqn = match p.hostnqn {
        Some(h) if h.is_empty() || h.len() > 223 => return Err(bad("hostnqn must be 1-223 bytes")),
        Some(h) => h,
        None => CtrlrOpts::default().hostnqn,
    };
    let hostid = hostid_for(&hostnqn);
    let spec = AttachSpec {
        name: p.name,
        trid,
        hostnqn,
        hdgst: p.hdgst,
        ddgst: p.ddgst,
        num_io_queues: p.num_io_queues.map(|n| n as u16),
        ctrlr_loss_timeout_sec: p.ctrlr_loss_timeout_sec,
        reconnect_delay_sec: p.reconnect_delay_sec,
        fast_io_fail_timeout_sec: p.fast_io_fail_timeout_sec,
        hostid: [0; 16],
        connect_timeout_us: None,
    };
    Ok((spec, hostid, p.fabrics_connect_timeout_us))
}

pub fn register(m: &mut Methods) {
    m.add(
        "bdev_nvme_attach_controller",
        |app: Arc<App>, p: Attach| async move {
            let (mut spec, hostid, connect_us) = spec_of(p)?;
            spec.hostid = hostid;
            spec.connect_timeout_us = connect_us.filter(|&t| t > 0);
            let names = NvmeModule::attach(&app, spec).await?;
            Ok::<_, RpcError>(names)
        },
    );
    m.add(
        "bdev_nvme_reset_controller",
        |app: Arc<App>, p: ResetCtrlr| async move {
            NvmeModule::reset(&app, &p.name).await?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_nvme_detach_controller",
        |app: Arc<App>, p: Detach| async move {
            let c = app
                .nvme
                .get(&p.name)
                .ok_or_else(|| NvmeError::NotFound(p.name.clone()))?;
            let t = &c.spec.trid;
            // A path selector that does not match our only path names nothing to remove.
            let port = svcid(&p.trsvcid)?;
            let mismatch = p
                .trtype
                .as_deref()
                .is_some_and(|x| parse_trtype(x) != Some(t.trtype))
                || p.traddr.as_deref().is_some_and(|x| x != t.traddr)
                || p.adrfam
                    .as_deref()
                    .is_some_and(|x| !x.eq_ignore_ascii_case(t.adrfam.as_str()))
                || port.is_some_and(|x| x != t.trsvcid.to_string())
                || p.subnqn.as_deref().is_some_and(|x| x != t.subnqn)
                || p.hostaddr.is_some()
                || p.hostsvcid.is_some();
            if mismatch {
                return Err(RpcError::errno(
                    libc::ENODEV,
                    format!(
                        "controller {} has no path matching that transport ID",
                        p.name
                    ),
                ));
            }
            NvmeModule::detach(&app, &p.name).await?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_nvme_get_controllers",
        |app: Arc<App>, p: GetControllers| async move {
            let list = match p.name {
                Some(n) => vec![app.nvme.get(&n).ok_or(NvmeError::NotFound(n))?],
                None => app.nvme.list(),
            };
            Ok::<_, RpcError>(list.iter().map(|c| c.describe()).collect::<Vec<_>>())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resiliency_rules_are_spdks() {
        assert!(check_resiliency(0, 0, 0).is_ok());
        assert!(check_resiliency(-1, 1, 0).is_ok());
        assert!(check_resiliency(-1, 2, 5).is_ok());
        assert!(check_resiliency(30, 5, 10).is_ok());
        assert!(check_resiliency(-2, 1, 0).is_err());
        assert!(
            check_resiliency(0, 1, 0).is_err(),
            "delay without loss timeout"
        );
        assert!(
            check_resiliency(-1, 0, 0).is_err(),
            "retry forever without delay"
        );
        assert!(
            check_resiliency(5, 10, 0).is_err(),
            "delay beyond loss timeout"
        );
        assert!(
            check_resiliency(30, 5, 40).is_err(),
            "fast fail beyond loss timeout"
        );
        assert!(
            check_resiliency(30, 5, 2).is_err(),
            "fast fail before first retry"
        );
    }

    #[test]
    fn host_id_follows_the_host_nqn() {
        let u = "4a9c2c7e-1b2d-4e3f-8a5b-6c7d8e9f0a1b";
        let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{u}");
        assert_eq!(hostid_for(&nqn), *Uuid::parse_str(u).unwrap().as_bytes());
        assert_eq!(hostid_for("nqn.x:host"), hostid_for("nqn.x:host"));
        assert_ne!(hostid_for("nqn.x:host"), hostid_for("nqn.x:other"));
    }
}
