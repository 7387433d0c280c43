//! The settings methods of SPDK subsystems plexd does not have (`sock`, `iobuf`, `accel`,
//! `scheduler`, the bdev layer's and `bdev_nvme`'s global options, the NVMe-oF target's global
//! options, …), so that a file SPDK's `save_config` wrote loads into plexd as it is, through
//! `plexd -c` or through `spdk-rpc load_config` (which calls every method of the file and so
//! needs each to exist).
//!
//! SPDK's `save_config` writes every option of these methods, at its defaults unless someone
//! changed them. Each method here is one table of `spdk_params` (the same mechanism as the
//! parameters of shared methods): a parameter at SPDK's default is taken silently; any other
//! value asks for a behaviour plexd does not have and is refused, naming the method, the
//! parameter and the value; a parameter the table does not know is refused by name too. Such a
//! call changes nothing, so accepting it is honest: plexd then behaves as SPDK does with those
//! options.
//!
//! The defaults are SPDK 26.x's, as an `nvmf_tgt` started with no options writes them
//! (`target/tests/data/spdk-save_config-nvmf_tgt.json`).

use super::spdk_params::{any, only, Foreign, Json, ABSENT, FALSE, ZERO};
use super::{Methods, RpcError};
use crate::app::App;
use serde::Deserialize;
use std::sync::Arc;

const TRUE: &[Json] = &[Json::Bool(true)];

const FRAMEWORK_SET_SCHEDULER: &[Foreign] = &[
    // plexd's reactors poll or sleep by their own idle policy (`--idle-poll-us`); SPDK's
    // "static" scheduler also leaves threads where they are.
    only("name", &[Json::Str("static")]),
    only("period", ABSENT),
];

const SOCK_SET_DEFAULT_IMPL: &[Foreign] = &[
    // plexd's sockets are plain kernel sockets, SPDK's "posix".
    only("impl_name", &[Json::Str("posix")]),
];

/// SPDK writes one call per socket implementation; the defaults of "posix" and "ssl" differ
/// only in their buffer sizes, so each accepts either implementation's default.
const SOCK_IMPL_SET_OPTIONS: &[Foreign] = &[
    only("impl_name", &[Json::Str("posix"), Json::Str("ssl")]),
    only("recv_buf_size", &[Json::Int(2097152), Json::Int(4096)]),
    only("send_buf_size", &[Json::Int(2097152), Json::Int(4096)]),
    only("enable_recv_pipe", TRUE),
    only("enable_quickack", FALSE),
    only("enable_placement_id", ZERO),
    only("enable_zerocopy_send_server", TRUE),
    only("enable_zerocopy_send_client", FALSE),
    only("zerocopy_threshold", ZERO),
    only("tls_version", ZERO),
    only("enable_ktls", FALSE),
    only("psk_key", ABSENT),
    only("psk_identity", ABSENT),
];

const IOBUF_SET_OPTIONS: &[Foreign] = &[
    // plexd's I/O buffers come from its own pools (`dma`), sized by `-s`.
    only("small_pool_count", &[Json::Int(8192)]),
    only("large_pool_count", &[Json::Int(1024)]),
    only("small_bufsize", &[Json::Int(8192)]),
    only("large_bufsize", &[Json::Int(135168)]),
    only("enable_numa", FALSE),
];

const ACCEL_SET_OPTIONS: &[Foreign] = &[
    only("small_cache_size", &[Json::Int(128)]),
    only("large_cache_size", &[Json::Int(16)]),
    only("task_count", &[Json::Int(2048)]),
    only("sequence_count", &[Json::Int(2048)]),
    only("buf_count", &[Json::Int(2048)]),
];

const BDEV_SET_OPTIONS: &[Foreign] = &[
    only("bdev_io_pool_size", &[Json::Int(65535)]),
    only("bdev_io_cache_size", &[Json::Int(256)]),
    // plexd has no examine step: every bdev is usable once created.
    only("bdev_auto_examine", TRUE),
    only("iobuf_small_cache_size", &[Json::Int(128)]),
    only("iobuf_large_cache_size", &[Json::Int(16)]),
];

const BDEV_RAID_SET_OPTIONS: &[Foreign] = &[
    only("process_window_size_kb", &[Json::Int(1024)]),
    only("process_max_bandwidth_mb_sec", ZERO),
];

const DHCHAP_DIGESTS: &[Json] = &[Json::Strs(&["sha256", "sha384", "sha512"])];
const DHCHAP_DHGROUPS: &[Json] = &[Json::Strs(&[
    "null",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
])];

/// Defaults for every later `bdev_nvme_attach_controller`. plexd's attach takes its own
/// timeouts per controller, so only SPDK's defaults are accepted here.
const BDEV_NVME_SET_OPTIONS: &[Foreign] = &[
    only("action_on_timeout", &[Json::Str("none")]),
    only("timeout_us", ZERO),
    only("timeout_admin_us", ZERO),
    only("keep_alive_timeout_ms", &[Json::Int(10000)]),
    only("arbitration_burst", ZERO),
    only("low_priority_weight", ZERO),
    only("medium_priority_weight", ZERO),
    only("high_priority_weight", ZERO),
    only("nvme_adminq_poll_period_us", &[Json::Int(10000)]),
    only("nvme_ioq_poll_period_us", ZERO),
    only("io_queue_requests", ZERO),
    only("delay_cmd_submit", TRUE),
    only("transport_retry_count", &[Json::Int(4)]),
    only("bdev_retry_count", &[Json::Int(3)]),
    only("transport_ack_timeout", ZERO),
    only("ctrlr_loss_timeout_sec", ZERO),
    only("reconnect_delay_sec", ZERO),
    only("fast_io_fail_timeout_sec", ZERO),
    only("disable_auto_failback", FALSE),
    only("generate_uuids", FALSE),
    only("transport_tos", ZERO),
    only("nvme_error_stat", FALSE),
    only("rdma_srq_size", ZERO),
    only("io_path_stat", FALSE),
    only("allow_accel_sequence", FALSE),
    only("rdma_max_cq_size", ZERO),
    only("rdma_cm_event_timeout_ms", ZERO),
    only("dhchap_digests", DHCHAP_DIGESTS),
    only("dhchap_dhgroups", DHCHAP_DHGROUPS),
    only("rdma_umr_per_io", FALSE),
    only("tcp_connect_timeout_ms", ZERO),
    only("enable_flush", FALSE),
    only("multipath_opts.policy", &[Json::Str("active_passive")]),
    // After its members: what is left of it must be empty.
    only("multipath_opts", &[Json::EmptyObject]),
];

const BDEV_NVME_SET_HOTPLUG: &[Foreign] = &[
    only("enable", FALSE),
    // The period of a hotplug poller that is off.
    any("period_us"),
];

const NVMF_SET_CONFIG: &[Foreign] = &[
    only("discovery_filter", &[Json::Str("match_any")]),
    only("admin_cmd_passthru.identify_ctrlr", FALSE),
    only("admin_cmd_passthru.identify_uuid_list", FALSE),
    only("admin_cmd_passthru.get_log_page", FALSE),
    only("admin_cmd_passthru.get_set_features", FALSE),
    only("admin_cmd_passthru.sanitize", FALSE),
    only("admin_cmd_passthru.security_send_recv", FALSE),
    only("admin_cmd_passthru.fw_update", FALSE),
    only("admin_cmd_passthru.nvme_mi", FALSE),
    only("admin_cmd_passthru.vendor_specific", FALSE),
    only("admin_cmd_passthru", &[Json::EmptyObject]),
    only("dhchap_digests", DHCHAP_DIGESTS),
    only("dhchap_dhgroups", DHCHAP_DHGROUPS),
    // A second connect with a host NQN and host ID already connected is let in, as SPDK does.
    only("dup_host_policy", &[Json::Str("allow")]),
    // plexd's poll groups are its reactors, every one of them.
    only("poll_groups_mask", ABSENT),
];

const NVMF_SET_MAX_SUBSYSTEMS: &[Foreign] = &[only("max_subsystems", &[Json::Int(1024)])];

/// Command Retry Delay Times: plexd never asks a host to delay a retry.
const NVMF_SET_CRDT: &[Foreign] = &[
    only("crdt1", ZERO),
    only("crdt2", ZERO),
    only("crdt3", ZERO),
];

/// The settings methods and their tables, looked up by `spdk_params::table`.
pub(crate) const TABLES: &[(&str, &[Foreign])] = &[
    ("accel_set_options", ACCEL_SET_OPTIONS),
    ("bdev_nvme_set_hotplug", BDEV_NVME_SET_HOTPLUG),
    ("bdev_nvme_set_options", BDEV_NVME_SET_OPTIONS),
    ("bdev_raid_set_options", BDEV_RAID_SET_OPTIONS),
    ("bdev_set_options", BDEV_SET_OPTIONS),
    // plexd has no examine step, so there is never anything to wait for.
    ("bdev_wait_for_examine", &[]),
    ("framework_set_scheduler", FRAMEWORK_SET_SCHEDULER),
    ("iobuf_set_options", IOBUF_SET_OPTIONS),
    ("nvmf_set_config", NVMF_SET_CONFIG),
    ("nvmf_set_crdt", NVMF_SET_CRDT),
    ("nvmf_set_max_subsystems", NVMF_SET_MAX_SUBSYSTEMS),
    ("sock_impl_set_options", SOCK_IMPL_SET_OPTIONS),
    ("sock_set_default_impl", SOCK_SET_DEFAULT_IMPL),
];

/// Methods of test builds only (cargo feature `fault-injection`), which take no SPDK
/// parameters.
#[cfg(feature = "fault-injection")]
pub(crate) const TEST_ONLY: &[(&str, &[Foreign])] = &[(crate::fatal::injection::METHOD, &[])];
#[cfg(not(feature = "fault-injection"))]
pub(crate) const TEST_ONLY: &[(&str, &[Foreign])] = &[];

/// What is left once the table took out every parameter it accepts: nothing. A name the table
/// does not know stays, and is refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

pub fn register(m: &mut Methods) {
    for (name, _) in TABLES {
        m.add(name, |_app: Arc<App>, _: Nothing| async {
            Ok::<_, RpcError>(true)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::spdk_params::admit;
    use serde_json::{json, Value};

    /// Every call of the sections of SPDK's own save_config that plexd has no subsystem for.
    fn spdk_calls() -> Vec<(String, Value)> {
        let text = include_str!("../../tests/data/spdk-save_config-nvmf_tgt.json");
        let saved: Value = serde_json::from_str(text).unwrap();
        let mut out = Vec::new();
        for sub in saved["subsystems"].as_array().unwrap() {
            for call in sub["config"].as_array().into_iter().flatten() {
                let method = call["method"].as_str().unwrap().to_string();
                if super::TABLES.iter().any(|(m, _)| *m == method) {
                    out.push((method, call.get("params").cloned().unwrap_or(json!({}))));
                }
            }
        }
        out
    }

    #[test]
    fn spdk_defaults_leave_nothing() {
        let calls = spdk_calls();
        assert!(calls.len() >= 12, "{calls:?}");
        for (method, mut params) in calls {
            admit(&method, &mut params).unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(params, json!({}), "{method} left {params}");
        }
    }

    #[test]
    fn a_changed_option_is_refused_by_method_and_name() {
        let mut p = json!({"small_pool_count": 16384, "large_pool_count": 1024});
        let e = admit("iobuf_set_options", &mut p).unwrap_err();
        assert_eq!(
            e.message,
            "iobuf_set_options: small_pool_count=16384 is not supported by plexd; \
             leave it out or pass 8192 (SPDK's default)"
        );
        let mut p = json!({"admin_cmd_passthru": {"identify_ctrlr": true}});
        let e = admit("nvmf_set_config", &mut p).unwrap_err();
        assert!(
            e.message
                .contains("nvmf_set_config: admin_cmd_passthru.identify_ctrlr=true"),
            "{}",
            e.message
        );
        // An unknown member of a nested object is named with its object.
        let mut p = json!({"multipath_opts": {"policy": "active_passive", "selector": "x"}});
        let e = admit("bdev_nvme_set_options", &mut p).unwrap_err();
        assert!(
            e.message.contains("multipath_opts={\"selector\":\"x\"}"),
            "{}",
            e.message
        );
        // Lists compare as sets.
        let mut p = json!({"dhchap_digests": ["sha512", "sha256", "sha384"]});
        admit("nvmf_set_config", &mut p).unwrap();
        let mut p = json!({"dhchap_digests": ["sha256"]});
        assert!(admit("nvmf_set_config", &mut p).is_err());
    }
}
