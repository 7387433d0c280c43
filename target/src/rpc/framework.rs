//! Methods about plexd itself: version, method list, reactors, configuration.

use super::{Methods, RpcError};
use crate::app::App;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    #[serde(default)]
    #[allow(dead_code)] // every method is callable at any time: there is no startup state
    current: bool,
    #[serde(default)]
    #[allow(dead_code)] // we have no deprecated aliases
    include_aliases: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    /// Batches are an SPDK load-time optimisation; our configs are plain lists either way.
    #[serde(default)]
    #[allow(dead_code)]
    with_batches: bool,
}

pub fn register(m: &mut Methods) {
    m.add("spdk_get_version", |_app: Arc<App>, _: NoParams| async {
        Ok::<_, RpcError>(version())
    });
    m.add(
        "rpc_get_methods",
        |app: Arc<App>, _: GetMethods| async move {
            Ok::<_, RpcError>(app.methods.names().collect::<Vec<_>>())
        },
    );
    m.add(
        "framework_get_reactors",
        |app: Arc<App>, _: NoParams| async move {
            let reactors = app.reactors.info().await;
            Ok::<_, RpcError>(json!({
                "tick_rate": 1_000_000_000u64,
                "pid": std::process::id(),
                "idle_poll_us": app.reactors.config().idle_poll_us,
                "reactors": reactors,
            }))
        },
    );
    m.add("save_config", |app: Arc<App>, _: NoParams| async move {
        Ok::<_, RpcError>(app.save_config())
    });
    // SPDK's client builds `save_config` from these two calls rather than calling it.
    m.add(
        "framework_get_subsystems",
        |app: Arc<App>, _: NoParams| async move { Ok::<_, RpcError>(subsystems(&app.save_config())) },
    );
    m.add(
        "framework_get_config",
        |app: Arc<App>, p: GetConfig| async move {
            let saved = app.save_config();
            saved["subsystems"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["subsystem"] == p.name.as_str())
                .map(|s| s["config"].clone())
                .ok_or_else(|| {
                    RpcError::errno(
                        libc::ENOENT,
                        format!(
                            "no subsystem named {:?} (framework_get_subsystems lists them)",
                            p.name
                        ),
                    )
                })
        },
    );
}

/// The subsystems of a saved config, as `framework_get_subsystems` lists them. `save_config`
/// writes them in dependency order, so each is said to depend on those before it: a client that
/// sorts by `depends_on` keeps that order.
fn subsystems(saved: &Value) -> Value {
    let names: Vec<&str> = saved["subsystems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["subsystem"].as_str())
        .collect();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"subsystem": n, "depends_on": names[..i]}))
        .collect()
}

/// Our version in the shape of SPDK's answer, so its tools can parse it.
pub fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    json!({
        "version": format!("plexstor v{v}"),
        "fields": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "patch": parts.next().unwrap_or(0),
            "suffix": "",
        }
    })
}
