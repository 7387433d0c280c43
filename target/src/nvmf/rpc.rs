//! JSON-RPC methods of the NVMe-oF target, with SPDK's names, parameters and output shapes.

use super::subsystem::{hex_upper, parse_hex, ListenAddr, Subsystem};
use super::{NvmfError, TransportOpts};
use crate::app::App;
use crate::rpc::{Methods, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTransport {
    trtype: String,
    tgt_name: Option<String>,
    max_queue_depth: Option<u16>,
    max_io_qpairs_per_ctrlr: Option<u16>,
    /// Deprecated in SPDK: counts the admin queue too.
    max_qpairs_per_ctrlr: Option<u16>,
    in_capsule_data_size: Option<u32>,
    max_io_size: Option<u32>,
    io_unit_size: Option<u32>,
    max_aq_depth: Option<u16>,
    num_shared_buffers: Option<u32>,
    buf_cache_size: Option<u32>,
    c2h_success: Option<bool>,
    sock_priority: Option<u32>,
    abort_timeout_sec: Option<u32>,
    zcopy: Option<bool>,
    /// plexd's own: see `TransportOpts`.
    connect_timeout_ms: Option<u32>,
    pdu_stall_timeout_ms: Option<u32>,
    data_timeout_ms: Option<u32>,
    acceptor_poll_rate: Option<u32>,
    control_msg_num: Option<u32>,
    /// RDMA's (a TCP transport keeps them, unused, as SPDK's does).
    max_srq_depth: Option<u32>,
    no_srq: Option<bool>,
    num_cqe: Option<u32>,
    acceptor_backlog: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetStats {
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTransports {
    trtype: Option<String>,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubsystem {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    max_namespaces: u32,
    tgt_name: Option<String>,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByNqn {
    nqn: String,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetSubsystems {
    nqn: Option<String>,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsParams {
    bdev_name: String,
    #[serde(default)]
    nsid: u32,
    uuid: Option<String>,
    nguid: Option<String>,
    eui64: Option<String>,
    anagrpid: Option<u32>,
    /// Where reservations persist (SPDK's JSON layout); reloaded when the namespace is added.
    ptpl_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listener {
    nqn: String,
    listen_address: ListenAddr,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Host {
    nqn: String,
    host: String,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowAnyHost {
    nqn: String,
    allow_any_host: bool,
    tgt_name: Option<String>,
}

/// We run one target: `tgt_name` may only name it by its default name.
fn one_target(name: &Option<String>) -> Result<(), RpcError> {
    match name.as_deref() {
        None | Some("nvmf_tgt") => Ok(()),
        Some(n) => Err(RpcError::errno(
            libc::ENODEV,
            format!("no target {n:?}: plexd runs one target, \"nvmf_tgt\""),
        )),
    }
}

fn unsupported(what: &str) -> RpcError {
    RpcError::invalid_params(format!("{what} is not supported"))
}

fn subsystem(app: &App, nqn: &str) -> Result<Arc<Subsystem>, RpcError> {
    app.nvmf
        .find(nqn)
        .ok_or_else(|| NvmfError::NoSubsystem(nqn.to_string()).into())
}

/// SPDK's shape of one transport.
pub fn transport_json(t: &TransportOpts) -> Value {
    json!({
        "trtype": t.trtype,
        "max_queue_depth": t.max_queue_depth,
        "max_io_qpairs_per_ctrlr": t.max_io_qpairs_per_ctrlr,
        "in_capsule_data_size": t.in_capsule_data_size,
        "max_io_size": t.max_io_size,
        "io_unit_size": t.io_unit_size,
        "max_aq_depth": t.max_aq_depth,
        "num_shared_buffers": t.num_shared_buffers,
        "buf_cache_size": t.buf_cache_size,
        "dif_insert_or_strip": t.dif_insert_or_strip,
        "c2h_success": t.c2h_success,
        "sock_priority": t.sock_priority,
        "abort_timeout_sec": t.abort_timeout_sec,
        "zcopy": t.zcopy,
        "connect_timeout_ms": t.connect_timeout_ms,
        "pdu_stall_timeout_ms": t.pdu_stall_timeout_ms,
        "data_timeout_ms": t.data_timeout_ms,
        "max_srq_depth": t.max_srq_depth,
        "no_srq": t.no_srq,
        "num_cqe": t.num_cqe,
        "acceptor_backlog": t.acceptor_backlog,
    })
}

pub fn register(m: &mut Methods) {
    m.add(
        "nvmf_create_transport",
        |app: Arc<App>, p: CreateTransport| async move {
            one_target(&p.tgt_name)?;
            let Some(mut t) = TransportOpts::defaults_for(&p.trtype) else {
                return Err(RpcError::invalid_params(format!(
                    "transport {:?} is not supported (TCP or RDMA)",
                    p.trtype
                )));
            };
            if let Some(v) = p.max_queue_depth {
                t.max_queue_depth = v;
            }
            if let Some(v) = p.max_qpairs_per_ctrlr {
                t.max_io_qpairs_per_ctrlr = v.saturating_sub(1);
            }
            if let Some(v) = p.max_io_qpairs_per_ctrlr {
                t.max_io_qpairs_per_ctrlr = v;
            }
            if let Some(v) = p.in_capsule_data_size {
                t.in_capsule_data_size = v;
            }
            if let Some(v) = p.max_io_size {
                t.max_io_size = v;
            }
            if let Some(v) = p.io_unit_size {
                t.io_unit_size = v;
            }
            if let Some(v) = p.max_aq_depth {
                t.max_aq_depth = v;
            }
            if let Some(v) = p.num_shared_buffers {
                t.num_shared_buffers = v;
            }
            if let Some(v) = p.buf_cache_size {
                t.buf_cache_size = v;
            }
            if let Some(v) = p.c2h_success {
                t.c2h_success = v;
            }
            if let Some(v) = p.sock_priority {
                t.sock_priority = v;
            }
            if let Some(v) = p.abort_timeout_sec {
                t.abort_timeout_sec = v;
            }
            if let Some(v) = p.zcopy {
                t.zcopy = v;
            }
            if let Some(v) = p.connect_timeout_ms {
                t.connect_timeout_ms = v;
            }
            if let Some(v) = p.pdu_stall_timeout_ms {
                t.pdu_stall_timeout_ms = v;
            }
            if let Some(v) = p.data_timeout_ms {
                t.data_timeout_ms = v;
            }
            if let Some(v) = p.max_srq_depth {
                t.max_srq_depth = v;
            }
            if let Some(v) = p.no_srq {
                t.no_srq = v;
            }
            if let Some(v) = p.num_cqe {
                t.num_cqe = v;
            }
            if let Some(v) = p.acceptor_backlog {
                t.acceptor_backlog = v;
            }
            // Polling tunables of SPDK's acceptor: our listeners wake on readiness instead.
            let _ = (p.acceptor_poll_rate, p.control_msg_num);
            let trtype = t.trtype.clone();
            app.nvmf.create_transport(t)?;
            tracing::info!("nvmf: {trtype} transport created");
            Ok::<_, RpcError>(true)
        },
    );
    m.add("nvmf_get_stats", |app: Arc<App>, p: GetStats| async move {
        one_target(&p.tgt_name)?;
        Ok::<_, RpcError>(get_stats(&app))
    });
    m.add(
        "nvmf_get_transports",
        |app: Arc<App>, p: GetTransports| async move {
            one_target(&p.tgt_name)?;
            let mut t = app.nvmf.transports();
            if let Some(want) = &p.trtype {
                t.retain(|t| t.trtype.eq_ignore_ascii_case(want));
                if t.is_empty() {
                    return Err(NvmfError::NoTransport(want.clone()).into());
                }
            }
            Ok::<_, RpcError>(t.iter().map(|t| transport_json(t)).collect::<Vec<_>>())
        },
    );
    m.add(
        "nvmf_create_subsystem",
        |app: Arc<App>, p: CreateSubsystem| async move {
            one_target(&p.tgt_name)?;
            let max_ns = if p.max_namespaces == 0 {
                32
            } else {
                p.max_namespaces
            };
            let s = Subsystem::new(
                p.nqn.clone(),
                p.serial_number,
                p.model_number,
                p.allow_any_host,
                max_ns,
                p.min_cntlid.unwrap_or(1),
                p.max_cntlid.unwrap_or(0xFFEF),
            )?;
            app.nvmf.add_subsystem(s)?;
            tracing::info!("nvmf: subsystem {} created", p.nqn);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_delete_subsystem",
        |app: Arc<App>, p: ByNqn| async move {
            one_target(&p.tgt_name)?;
            app.nvmf.delete_subsystem(&p.nqn)?;
            tracing::info!("nvmf: subsystem {} deleted", p.nqn);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_get_subsystems",
        |app: Arc<App>, p: GetSubsystems| async move {
            one_target(&p.tgt_name)?;
            let mut all = vec![app.nvmf.discovery.clone()];
            all.extend(app.nvmf.subsystems());
            if let Some(nqn) = &p.nqn {
                all.retain(|s| &s.nqn == nqn);
                if all.is_empty() {
                    return Err(NvmfError::NoSubsystem(nqn.clone()).into());
                }
            }
            Ok::<_, RpcError>(all.iter().map(|s| s.to_json()).collect::<Vec<_>>())
        },
    );
    m.add(
        "nvmf_subsystem_add_ns",
        |app: Arc<App>, p: AddNs| async move {
            one_target(&p.tgt_name)?;
            let s = subsystem(&app, &p.nqn)?;
            if s.subtype != super::SubType::Nvme {
                return Err(RpcError::invalid_params(
                    "the discovery subsystem has no namespaces",
                ));
            }
            let n = p.namespace;
            if n.anagrpid.is_some_and(|a| a > 1) {
                return Err(unsupported("anagrpid other than 1"));
            }
            let uuid = n
                .uuid
                .as_deref()
                .map(|u| {
                    Uuid::parse_str(u)
                        .map_err(|_| RpcError::invalid_params(format!("uuid {u:?} is not a UUID")))
                })
                .transpose()?;
            let nguid = n
                .nguid
                .as_deref()
                .map(|v| {
                    parse_hex::<16>(v).ok_or_else(|| {
                        RpcError::invalid_params(format!("nguid {v:?} is not 32 hex digits"))
                    })
                })
                .transpose()?;
            let eui64 = n
                .eui64
                .as_deref()
                .map(|v| {
                    parse_hex::<8>(v).ok_or_else(|| {
                        RpcError::invalid_params(format!("eui64 {v:?} is not 16 hex digits"))
                    })
                })
                .transpose()?;
            if n.ptpl_file.as_deref() == Some("") {
                return Err(RpcError::invalid_params("ptpl_file must name a file"));
            }
            let ptpl = n.ptpl_file.as_deref().map(std::path::Path::new);
            let bdev = app.bdevs.get(&n.bdev_name)?;
            let nsid = s.add_namespace(bdev, n.nsid, uuid, nguid, eui64, ptpl)?;
            tracing::info!("nvmf: {} namespace {nsid} = bdev {}", p.nqn, n.bdev_name);
            Ok::<_, RpcError>(nsid)
        },
    );
    m.add(
        "nvmf_subsystem_remove_ns",
        |app: Arc<App>, p: RemoveNs| async move {
            one_target(&p.tgt_name)?;
            subsystem(&app, &p.nqn)?.remove_namespace(p.nsid)?;
            tracing::info!("nvmf: {} namespace {} removed", p.nqn, p.nsid);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_add_listener",
        |app: Arc<App>, p: Listener| async move {
            one_target(&p.tgt_name)?;
            let addr = p.listen_address.normalized()?;
            app.nvmf.add_listener(&app, &p.nqn, addr)?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_remove_listener",
        |app: Arc<App>, p: Listener| async move {
            one_target(&p.tgt_name)?;
            let addr = p.listen_address.normalized()?;
            app.nvmf.remove_listener(&p.nqn, &addr)?;
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_add_host",
        |app: Arc<App>, p: Host| async move {
            one_target(&p.tgt_name)?;
            subsystem(&app, &p.nqn)?.add_host(&p.host)?;
            app.nvmf.bump_genctr();
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_remove_host",
        |app: Arc<App>, p: Host| async move {
            one_target(&p.tgt_name)?;
            subsystem(&app, &p.nqn)?.remove_host(&p.host)?;
            app.nvmf.bump_genctr();
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_allow_any_host",
        |app: Arc<App>, p: AllowAnyHost| async move {
            one_target(&p.tgt_name)?;
            subsystem(&app, &p.nqn)?.set_allow_any_host(p.allow_any_host);
            app.nvmf.bump_genctr();
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "nvmf_subsystem_get_controllers",
        |app: Arc<App>, p: ByNqn| async move {
            one_target(&p.tgt_name)?;
            let s = subsystem(&app, &p.nqn)?;
            let out: Vec<Value> = s
                .controllers()
                .iter()
                .filter(|c| !c.is_failed())
                .map(|c| {
                    json!({
                        "cntlid": c.cntlid,
                        "hostnqn": c.hostnqn,
                        "hostid": Uuid::from_bytes(c.hostid).to_string(),
                        "num_io_qpairs": c.num_io_qpairs(),
                    })
                })
                .collect();
            Ok::<_, RpcError>(out)
        },
    );
    m.add(
        "nvmf_subsystem_get_qpairs",
        |app: Arc<App>, p: ByNqn| async move {
            one_target(&p.tgt_name)?;
            let s = subsystem(&app, &p.nqn)?;
            let mut out = Vec::new();
            for c in s.controllers().iter().filter(|c| !c.is_failed()) {
                for q in c.lock().qpairs.iter() {
                    let (peer_addr, peer_port) = q
                        .peer
                        .rsplit_once(':')
                        .map(|(a, p)| (a.to_string(), p.to_string()))
                        .unwrap_or_else(|| (q.peer.clone(), String::new()));
                    out.push(json!({
                        "cntlid": c.cntlid,
                        "qid": q.qid,
                        "state": "active",
                        "thread": format!(
                            "nvmf_{}_poll_group_{:03}",
                            q.listen.trtype.to_ascii_lowercase(),
                            q.reactor
                        ),
                        "hostnqn": c.hostnqn,
                        "listen_address": q.listen,
                        "peer_address": {
                            "trtype": q.listen.trtype,
                            "adrfam": q.listen.adrfam,
                            "traddr": peer_addr,
                            "trsvcid": peer_port,
                        },
                        // SPDK's qpair dump has no digest fields; these carry the names of
                        // SPDK's host options (bdev_nvme_attach_controller hdgst/ddgst).
                        "hdgst": q.hdgst,
                        "ddgst": q.ddgst,
                    }));
                }
            }
            Ok::<_, RpcError>(out)
        },
    );
    let _ = hex_upper;
}

/// `nvmf_get_stats` in SPDK's shape: one poll group per reactor, named as SPDK names its
/// groups. What plexd does not have is reported as SPDK reports an idle group: the TCP
/// transport entry carries only `trtype` (plexd keeps no per-transport buffer pools), and an
/// RDMA entry lists per device only the counters plexd keeps (`rdma::DeviceStats`). One
/// poll group counter is plexd's own, `commands_past_queue_size`.
fn get_stats(app: &App) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let created = app.nvmf.transports();
    let groups: Vec<serde_json::Value> = (0..app.reactors.len())
        .map(|i| {
            let s = app.nvmf.poll_group_stats(i);
            let rdma_devices: Vec<serde_json::Value> = s
                .rdma_devices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "name": d.name,
                        "requests": d.requests.load(Relaxed),
                        "pending_free_request": d.pending_free_request.load(Relaxed),
                        "pending_rdma_read": d.pending_rdma_read.load(Relaxed),
                    })
                })
                .collect();
            let transports: Vec<serde_json::Value> = created
                .iter()
                .map(|t| {
                    if t.is_rdma() {
                        serde_json::json!({"trtype": t.trtype, "devices": rdma_devices})
                    } else {
                        serde_json::json!({"trtype": t.trtype})
                    }
                })
                .collect();
            serde_json::json!({
                "name": format!("nvmf_tgt_poll_group_{i:03}"),
                "admin_qpairs": s.admin_qpairs.load(Relaxed),
                "io_qpairs": s.io_qpairs.load(Relaxed),
                "current_admin_qpairs": s.current_admin_qpairs.load(Relaxed),
                "current_io_qpairs": s.current_io_qpairs.load(Relaxed),
                "pending_bdev_io": s.pending_bdev_io.load(Relaxed),
                "completed_nvme_io": s.completed_nvme_io.load(Relaxed),
                "commands_past_queue_size": s.commands_past_queue_size.load(Relaxed),
                "transports": transports,
            })
        })
        .collect();
    serde_json::json!({"tick_rate": 1_000_000_000u64, "poll_groups": groups})
}
