//! JSON-RPC methods of the bdev layer and its RAM modules, with SPDK's names and parameters.

use super::malloc::MallocBdev;
use super::null::NullBdev;
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
    m.add("bdev_get_bdevs", |app: Arc<App>, p: GetBdevs| async move {
        let list = match p.name {
            Some(n) => vec![app.bdevs.get(&n)?],
            None => app.bdevs.list(),
        };
        Ok::<_, RpcError>(list.iter().map(|e| describe(e)).collect::<Vec<_>>())
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
                "bdevs": list.iter().map(|e| iostat(e)).collect::<Vec<_>>(),
            }))
        },
    );
}

/// One bdev as `bdev_get_bdevs` shows it (SPDK's field names).
pub fn describe(e: &Arc<BdevEntry>) -> Value {
    let info = e.info();
    let io_types: serde_json::Map<String, Value> = IoType::ALL
        .iter()
        .map(|t| {
            let name = serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(String::from));
            (
                name.unwrap_or_default(),
                Value::Bool(info.io_types.contains(*t)),
            )
        })
        .collect();
    let bdev: &Arc<dyn Bdev> = e.bdev();
    let mut driver = serde_json::Map::new();
    driver.insert(bdev.module().to_string(), bdev.driver_specific());
    json!({
        "name": info.name,
        "aliases": info.aliases,
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
