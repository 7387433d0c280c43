//! JSON-RPC methods of the bdev layer and its RAM modules, with SPDK's names and parameters.

use super::histogram::{encode_counts, HistShape, GRANULARITY_DEFAULT};
use super::malloc::MallocBdev;
use super::null::NullBdev;
use super::qos::QosLimits;
use super::uring::UringBdev;
use super::{Bdev, BdevEntry, IoType};
use crate::app::App;
use crate::rpc::{Methods, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<Uuid>,
    #[serde(default)]
    optimal_io_boundary: u32,
    #[serde(default)]
    physical_block_size: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<Uuid>,
    #[serde(default)]
    physical_block_size: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    filename: String,
    name: String,
    /// 0 or absent: the device's logical block size (512 for a file).
    block_size: Option<u32>,
    uuid: Option<Uuid>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ByName {
    pub name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // bdevs appear synchronously here; there is nothing to wait for
    timeout: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    name: Option<String>,
    /// SPDK's client asks by a list of names.
    names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableHistogram {
    name: String,
    enable: bool,
    /// One I/O type by SPDK's name (`read`, `write`, …); absent: all.
    opc: Option<String>,
    granularity: Option<u8>,
    min_nsec: Option<u64>,
    max_nsec: Option<u64>,
}

/// A physical block size other than the logical one would be a layout we do not keep.
/// (Metadata, PI and the other parameters SPDK's client sends are in `rpc::spdk_params`.)
fn same_physical_block_size(physical_block_size: u32, block_size: u32) -> Result<(), RpcError> {
    if physical_block_size != 0 && physical_block_size != block_size {
        return Err(RpcError::invalid_params(
            "physical_block_size different from block_size is not supported",
        ));
    }
    Ok(())
}

pub fn register(m: &mut Methods) {
    m.add(
        "bdev_malloc_create",
        |app: Arc<App>, p: MallocCreate| async move {
            same_physical_block_size(p.physical_block_size, p.block_size)?;
            let _ = p.optimal_io_boundary;
            let name = p.name.unwrap_or_else(|| app.bdevs.next_free_name("Malloc"));
            let uuid = p.uuid.unwrap_or_else(Uuid::new_v4);
            let bdev = MallocBdev::new(name.clone(), p.num_blocks, p.block_size, uuid)?;
            app.bdevs.register(Arc::new(bdev))?;
            tracing::info!("created malloc bdev {name}");
            Ok::<_, RpcError>(name)
        },
    );
    m.add(
        "bdev_malloc_delete",
        |app: Arc<App>, p: ByName| async move {
            app.bdevs.unregister(&p.name, "malloc")?;
            tracing::info!("deleted malloc bdev {}", p.name);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_null_create",
        |app: Arc<App>, p: NullCreate| async move {
            same_physical_block_size(p.physical_block_size, p.block_size)?;
            let uuid = p.uuid.unwrap_or_else(Uuid::new_v4);
            let bdev = NullBdev::new(p.name.clone(), p.num_blocks, p.block_size, uuid)?;
            app.bdevs.register(Arc::new(bdev))?;
            tracing::info!("created null bdev {}", p.name);
            Ok::<_, RpcError>(p.name)
        },
    );
    m.add("bdev_null_delete", |app: Arc<App>, p: ByName| async move {
        app.bdevs.unregister(&p.name, "null")?;
        tracing::info!("deleted null bdev {}", p.name);
        Ok::<_, RpcError>(true)
    });
    m.add(
        "bdev_uring_create",
        |app: Arc<App>, p: UringCreate| async move {
            let uuid = p.uuid.unwrap_or_else(Uuid::new_v4);
            let name = p.name.clone();
            super::validate_name(&name)?;
            if app.bdevs.get(&name).is_ok() {
                return Err(super::BdevError::Exists(name).into());
            }
            // open(2) and ioctls may block on a slow device: keep them off the runtime.
            let bdev = tokio::task::spawn_blocking(move || {
                UringBdev::open(
                    p.name,
                    std::path::Path::new(&p.filename),
                    p.block_size,
                    uuid,
                )
            })
            .await
            .map_err(|e| RpcError::internal(format!("bdev_uring_create: {e}")))??;
            let direct = bdev.is_direct();
            app.bdevs.register(Arc::new(bdev))?;
            tracing::info!(
                "created uring bdev {name}{}",
                if direct { "" } else { " (buffered I/O)" }
            );
            Ok::<_, RpcError>(name)
        },
    );
    m.add("bdev_uring_delete", |app: Arc<App>, p: ByName| async move {
        app.bdevs.unregister(&p.name, "uring")?;
        tracing::info!("deleted uring bdev {}", p.name);
        Ok::<_, RpcError>(true)
    });
    m.add(
        "bdev_set_qos_limit",
        |app: Arc<App>, p: SetQosLimit| async move {
            let entry = app.bdevs.get(&p.name)?;
            if p.rw_ios_per_sec.is_none()
                && p.rw_mbytes_per_sec.is_none()
                && p.r_mbytes_per_sec.is_none()
                && p.w_mbytes_per_sec.is_none()
            {
                return Err(RpcError::invalid_params(
                    "bdev_set_qos_limit: give at least one of rw_ios_per_sec, \
                     rw_mbytes_per_sec, r_mbytes_per_sec, w_mbytes_per_sec (0 = unlimited)",
                ));
            }
            // As SPDK: a limit not given keeps its current value.
            let cur = entry.qos.limits();
            let asked = QosLimits {
                rw_ios_per_sec: p.rw_ios_per_sec.unwrap_or(cur.rw_ios_per_sec),
                rw_mbytes_per_sec: p.rw_mbytes_per_sec.unwrap_or(cur.rw_mbytes_per_sec),
                r_mbytes_per_sec: p.r_mbytes_per_sec.unwrap_or(cur.r_mbytes_per_sec),
                w_mbytes_per_sec: p.w_mbytes_per_sec.unwrap_or(cur.w_mbytes_per_sec),
            };
            let limits = asked
                .normalized()
                .map_err(|e| RpcError::errno(libc::EINVAL, format!("bdev_set_qos_limit: {e}")))?;
            if limits.rw_ios_per_sec != asked.rw_ios_per_sec {
                tracing::warn!(
                    "bdev {}: rw_ios_per_sec {} is not a multiple of {}; rounded up to {}",
                    p.name,
                    asked.rw_ios_per_sec,
                    super::qos::MIN_IOS_PER_SEC,
                    limits.rw_ios_per_sec
                );
            }
            entry.qos.set_limits(limits, crate::reactor::now_ns());
            tracing::info!("bdev {}: QoS limits {limits:?}", p.name);
            Ok::<_, RpcError>(true)
        },
    );
    m.add(
        "bdev_enable_histogram",
        |app: Arc<App>, p: EnableHistogram| async move {
            let entry = app.bdevs.get(&p.name)?;
            if !p.enable {
                entry.histogram.disable();
                return Ok::<_, RpcError>(true);
            }
            let io_type = match &p.opc {
                None => None,
                Some(name) => Some(
                    IoType::ALL
                        .into_iter()
                        .find(|t| io_type_name(*t) == *name)
                        .ok_or_else(|| {
                            RpcError::errno(
                                libc::EINVAL,
                                format!(
                                    "bdev_enable_histogram: invalid I/O type {name:?} \
                                     (bdev_get_bdevs lists them under supported_io_types)"
                                ),
                            )
                        })?,
                ),
            };
            // plexd's tick is a nanosecond, so SPDK's nanosecond bounds are ticks already.
            let shape = HistShape::new(
                p.granularity.map_or(GRANULARITY_DEFAULT, u32::from),
                p.min_nsec.unwrap_or(0),
                p.max_nsec.unwrap_or(u64::MAX),
            )
            .map_err(|e| RpcError::errno(libc::EINVAL, format!("bdev_enable_histogram: {e}")))?;
            entry.histogram.enable(shape, io_type);
            Ok(true)
        },
    );
    m.add(
        "bdev_get_histogram",
        |app: Arc<App>, p: ByName| async move {
            let entry = app.bdevs.get(&p.name)?;
            let (shape, counts) = entry.histogram.snapshot().ok_or_else(|| {
                RpcError::errno(
                    libc::EFAULT,
                    format!(
                        "histogram of bdev {} is not enabled; call bdev_enable_histogram first",
                        p.name
                    ),
                )
            })?;
            Ok::<_, RpcError>(json!({
                "histogram": encode_counts(&counts),
                "granularity": shape.granularity,
                "min_range": shape.min_range,
                "max_range": shape.max_range,
                "tsc_rate": 1_000_000_000u64,
            }))
        },
    );
    m.add("bdev_get_bdevs", |app: Arc<App>, p: GetBdevs| async move {
        let list = match p.name {
            Some(n) => vec![app.bdevs.get(&n)?],
            None => app.bdevs.list(),
        };
        Ok::<_, RpcError>(list.iter().map(describe).collect::<Vec<_>>())
    });
    m.add(
        "bdev_get_iostat",
        |app: Arc<App>, p: GetIostat| async move {
            let mut wanted: Vec<String> = p.names.unwrap_or_default();
            wanted.extend(p.name);
            let list = if wanted.is_empty() {
                app.bdevs.list()
            } else {
                wanted
                    .iter()
                    .map(|n| app.bdevs.get(n))
                    .collect::<Result<Vec<_>, _>>()?
            };
            Ok(json!({
                "tick_rate": 1_000_000_000u64,
                "ticks": app.started.elapsed().as_nanos() as u64,
                "bdevs": list.iter().map(iostat).collect::<Vec<_>>(),
            }))
        },
    );
}

/// SPDK's name of an I/O type (`read`, `write_zeroes`, …).
fn io_type_name(t: IoType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The `bdev_set_qos_limit` call that restores `e`'s limits, for `save_config`; `None` when it
/// has none. Like SPDK, it names only the limits that are set.
pub fn qos_config(e: &Arc<BdevEntry>) -> Option<Value> {
    let l = e.qos.limits();
    if l.is_unlimited() {
        return None;
    }
    let mut params = serde_json::Map::new();
    params.insert("name".into(), json!(e.name()));
    for (k, v) in [
        ("rw_ios_per_sec", l.rw_ios_per_sec),
        ("rw_mbytes_per_sec", l.rw_mbytes_per_sec),
        ("r_mbytes_per_sec", l.r_mbytes_per_sec),
        ("w_mbytes_per_sec", l.w_mbytes_per_sec),
    ] {
        if v != 0 {
            params.insert(k.into(), json!(v));
        }
    }
    Some(json!({"method": "bdev_set_qos_limit", "params": params}))
}

/// One bdev as `bdev_get_bdevs` shows it (SPDK's field names).
pub fn describe(e: &Arc<BdevEntry>) -> Value {
    let info = e.info();
    let io_types: serde_json::Map<String, Value> = IoType::ALL
        .iter()
        .map(|t| (io_type_name(*t), Value::Bool(info.io_types.contains(*t))))
        .collect();
    let bdev: &Arc<dyn Bdev> = e.bdev();
    let mut driver = serde_json::Map::new();
    driver.insert(bdev.module().to_string(), bdev.driver_specific());
    json!({
        "name": info.name,
        "aliases": e.aliases(),
        "product_name": info.product_name,
        "block_size": info.block_size,
        "num_blocks": info.num_blocks(),
        "uuid": info.uuid,
        "claimed": e.claimed_by().is_some(),
        "claimed_by": e.claimed_by(),
        "zoned": false,
        "write_cache": info.write_cache,
        "required_alignment": info.required_alignment,
        "supported_io_types": io_types,
        "assigned_rate_limits": e.qos.limits(),
        "driver_specific": driver,
    })
}

fn iostat(e: &Arc<BdevEntry>) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = e.io_stats();
    json!({
        "name": e.name(),
        "bytes_read": s.bytes_read.load(Relaxed),
        "num_read_ops": s.num_read_ops.load(Relaxed),
        "bytes_written": s.bytes_written.load(Relaxed),
        "num_write_ops": s.num_write_ops.load(Relaxed),
        "bytes_unmapped": s.bytes_unmapped.load(Relaxed),
        "num_unmap_ops": s.num_unmap_ops.load(Relaxed),
        "num_write_zeroes_ops": s.num_write_zeroes_ops.load(Relaxed),
        "num_flush_ops": s.num_flush_ops.load(Relaxed),
        "read_latency_ticks": s.read_latency_ns.load(Relaxed),
        "write_latency_ticks": s.write_latency_ns.load(Relaxed),
        "unmap_latency_ticks": s.unmap_latency_ns.load(Relaxed),
        "io_error": s.num_io_errors.load(Relaxed),
    })
}
