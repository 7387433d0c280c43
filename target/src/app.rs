//! The node daemon's shared state: reactors, bdevs and the RPC method table, plus saving and
//! loading the configuration as SPDK's `save_config` / `--json` do.

use crate::bdev::BdevRegistry;
use crate::reactor::{ReactorConfig, Reactors};
use crate::rpc::{Methods, RpcError};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

pub struct App {
    pub reactors: Reactors,
    pub bdevs: BdevRegistry,
    pub methods: Methods,
    pub nvmf: Arc<crate::nvmf::NvmfTarget>,
    /// Remote NVMe-oF controllers attached as bdevs (`bdev_nvme_*`).
    pub nvme: crate::bdev::nvme::NvmeModule,
    /// Mirrors (`bdev_mirror_*`).
    pub mirror: crate::bdev::mirror::MirrorModule,
    /// Volume stores (`bdev_lvol_*`).
    pub lvol: crate::bdev::lvol::LvolModule,
    pub started: Instant,
}

impl App {
    pub fn start(reactor_config: ReactorConfig) -> Result<Arc<App>, crate::reactor::ReactorError> {
        // The NVMe host stamps commands in ticks; measure their rate (1 ms) before any
        // reactor would stop for it.
        initiator::ticks::calibrate();
        let reactors = Reactors::start(reactor_config)?;
        let app = Arc::new(App {
            reactors,
            bdevs: BdevRegistry::default(),
            methods: Methods::all(),
            nvmf: Arc::default(),
            nvme: Default::default(),
            mirror: Default::default(),
            lvol: Default::default(),
            started: Instant::now(),
        });
        // Modules' examine steps: a mirror takes back a plex whose bdev reappears; a bdev
        // that holds a volume store is loaded as one.
        let weak = Arc::downgrade(&app);
        app.bdevs.add_examiner(move |e| {
            if let Some(app) = weak.upgrade() {
                app.mirror.examine(&app, e);
                app.lvol.examine(&app, e);
            }
        });
        Ok(app)
    }

    /// The configuration as SPDK writes it: subsystems in dependency order, each a list of the
    /// RPC calls that recreate it.
    pub fn save_config(&self) -> Value {
        // NVMe controllers first: their attach recreates their namespaces' bdevs, on which
        // later bdevs may stack.
        let mut bdev: Vec<Value> = self.nvme.save_config();
        bdev.extend(
            self.bdevs
                .list()
                .iter()
                .filter_map(|e| e.bdev().config())
                .map(|(method, params)| json!({"method": method, "params": params})),
        );
        // Rate limits after every bdev exists, as SPDK writes them.
        bdev.extend(
            self.bdevs
                .list()
                .iter()
                .filter_map(crate::bdev::rpc::qos_config),
        );
        json!({"subsystems": [
            {"subsystem": "bdev", "config": bdev},
            {"subsystem": "nvmf", "config": self.nvmf.save_config()},
        ]})
    }

    /// Replays a saved configuration, ours or SPDK's. Stops at the first failing call and
    /// says which. A section's `"config"` is a list of calls, or `null` (SPDK writes that for a
    /// subsystem with nothing to save); anything else is an error naming the section, never a
    /// section skipped in silence.
    pub async fn load_config(self: &Arc<Self>, config: &Value) -> Result<(), RpcError> {
        let subsystems = config
            .get("subsystems")
            .and_then(Value::as_array)
            .ok_or_else(|| RpcError::invalid_params("config has no \"subsystems\" array"))?;
        for (s, sub) in subsystems.iter().enumerate() {
            let name = sub
                .get("subsystem")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    RpcError::invalid_params(format!(
                        "subsystems[{s}] has no \"subsystem\" name: {}",
                        brief(sub)
                    ))
                })?;
            let calls = match sub.get("config") {
                None | Some(Value::Null) => continue,
                Some(Value::Array(calls)) => calls,
                Some(other) => {
                    return Err(RpcError::invalid_params(format!(
                        "subsystem {name}: \"config\" must be a list of calls (or null), not {}",
                        brief(other)
                    )))
                }
            };
            for (i, call) in calls.iter().enumerate() {
                let method = call.get("method").and_then(Value::as_str).ok_or_else(|| {
                    RpcError::invalid_params(format!("subsystem {name} entry {i} has no method"))
                })?;
                let params = call.get("params").cloned().unwrap_or(Value::Null);
                self.methods
                    .call(self.clone(), method, params)
                    .await
                    .map_err(|e| {
                        RpcError::new(
                            e.code,
                            format!("subsystem {name} entry {i} ({method}): {}", e.message),
                        )
                    })?;
            }
        }
        Ok(())
    }
}

/// A JSON value for an error message, cut short.
fn brief(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 80 {
        let mut end = 77;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}
