//! Parameters that SPDK's JSON-RPC client (`spdk-rpc`, PyPI `spdk` 26.x) sends for the methods
//! we share with SPDK, but that name features plexd does not have: one table per method.
//!
//! `spdk-rpc` sends many of them on every call, at SPDK's defaults (`nvmf_create_transport -t TCP`
//! sends `no_srq: false`, `disable_adaptive_irq: false`, …), so a method must take them. Each
//! table says which values plexd accepts for each such parameter; an accepted one is removed
//! before the parameters are deserialized, so the method's own parameter struct only holds what
//! plexd implements and still refuses a misspelt name. Any other value is refused, naming the
//! parameter and the value, rather than silently ignored.
//!
//! A name `outer.inner` is a member of the object parameter `outer`.

use super::RpcError;
use serde_json::Value;

/// A JSON value a table may name (a `serde_json::Value` cannot be built in a static).
#[derive(Debug, Clone, Copy)]
pub enum Json {
    Bool(bool),
    Int(i64),
    Str(&'static str),
    /// `[]`.
    EmptyList,
    /// `{}`: what is left of an object parameter once its members' entries took them out.
    EmptyObject,
    /// A list holding exactly these strings, in any order.
    Strs(&'static [&'static str]),
}

impl Json {
    fn matches(self, v: &Value) -> bool {
        match self {
            Json::Bool(b) => v.as_bool() == Some(b),
            Json::Int(i) => v.as_i64() == Some(i),
            Json::Str(s) => v.as_str() == Some(s),
            Json::EmptyList => v.as_array().is_some_and(|a| a.is_empty()),
            Json::EmptyObject => v.as_object().is_some_and(|o| o.is_empty()),
            Json::Strs(want) => v.as_array().is_some_and(|a| {
                a.len() == want.len()
                    && want.iter().all(|w| a.iter().any(|x| x.as_str() == Some(w)))
            }),
        }
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Json::Bool(b) => write!(f, "{b}"),
            Json::Int(i) => write!(f, "{i}"),
            Json::Str(s) => write!(f, "{s:?}"),
            Json::EmptyList => write!(f, "[]"),
            Json::EmptyObject => write!(f, "{{}}"),
            Json::Strs(list) => write!(f, "{list:?}"),
        }
    }
}

/// Which values of a parameter plexd accepts. Absent and `null` are always accepted: SPDK's
/// client leaves out what it was not given.
#[derive(Debug, Clone, Copy)]
pub enum Accepts {
    /// Anything: an SPDK tuning knob with nothing to tune here, or one of another transport
    /// (RDMA, vfio-user) that SPDK's TCP transport ignores too.
    Any,
    /// Only these values (SPDK's default, and its equivalents); another asks for a feature
    /// plexd does not implement. An empty list: only absent.
    Only(&'static [Json]),
}

/// One parameter SPDK's client may send that plexd has no feature behind.
#[derive(Debug, Clone, Copy)]
pub struct Foreign {
    pub name: &'static str,
    pub accepts: Accepts,
}

pub(crate) const fn any(name: &'static str) -> Foreign {
    Foreign {
        name,
        accepts: Accepts::Any,
    }
}

pub(crate) const fn only(name: &'static str, values: &'static [Json]) -> Foreign {
    Foreign {
        name,
        accepts: Accepts::Only(values),
    }
}

pub(crate) const FALSE: &[Json] = &[Json::Bool(false)];
pub(crate) const ZERO: &[Json] = &[Json::Int(0)];
pub(crate) const ABSENT: &[Json] = &[];

const NVMF_CREATE_TRANSPORT: &[Foreign] = &[
    // SPDK's per-poll-group iobuf caches: plexd's buffers are its own.
    any("iobuf_small_cache_size"),
    any("iobuf_large_cache_size"),
    // RDMA tunables of SPDK's work-request batching, retry timer and pool, which plexd's RDMA
    // transport does not have (`num_cqe`, `max_srq_depth`, `no_srq`, `acceptor_backlog` are
    // the method's own).
    any("no_wr_batching"),
    any("ack_timeout"),
    any("data_wr_pool_size"),
    // vfio-user only.
    any("disable_mappable_bar0"),
    any("disable_adaptive_irq"),
    any("disable_shadow_doorbells"),
    // plexd never forwards unrecognized commands to a bdev, whichever is asked.
    any("disable_command_passthru"),
    // The keep-alive granularity plexd reports is its own; hosts' KATO is honoured either way.
    any("kas"),
    only("min_kato", &[Json::Int(10000)]),
    only("dif_insert_or_strip", FALSE),
    only("masked_oncs", &[Json::EmptyList]),
    only("masked_fuses", &[Json::EmptyList]),
];

const NVMF_CREATE_SUBSYSTEM: &[Foreign] = &[
    only("ana_reporting", FALSE),
    only("passthrough", FALSE),
    only("enable_nssr", FALSE),
    // Limits plexd derives from each bdev; SPDK's save_config writes its own computed values.
    any("dmrsl"),
    any("wzsl"),
    any("max_discard_size_kib"),
    any("max_write_zeroes_size_kib"),
    only("admin_label", ABSENT),
];

// `namespace.ptpl_file` is plexd's own parameter now (reservations persist there).
const NVMF_SUBSYSTEM_ADD_NS: &[Foreign] = &[only("namespace.no_auto_visible", FALSE)];

const NVMF_SUBSYSTEM_ADD_LISTENER: &[Foreign] = &[
    only("secure_channel", FALSE),
    // Without ANA reporting every path is optimized.
    only("ana_state", &[Json::Str("optimized")]),
    // plexd's sockets are plain kernel sockets, as SPDK's "posix".
    only("sock_impl", &[Json::Str("posix")]),
    only("numa_id", &[Json::Int(-1)]),
];

const NVMF_SUBSYSTEM_ADD_HOST: &[Foreign] = &[
    only("psk", ABSENT),
    only("dhchap_key", ABSENT),
    only("dhchap_ctrlr_key", ABSENT),
];

const NVMF_SUBSYSTEM_REMOVE_HOST: &[Foreign] = &[
    // plexd disconnects the host's controllers at once, without waiting for I/O.
    any("timeout_ms"),
];

const BDEV_NVME_ATTACH_CONTROLLER: &[Foreign] = &[
    only("hostaddr", ABSENT),
    only("hostsvcid", ABSENT),
    only("priority", &[Json::Int(0), Json::Str("0")]),
    only("prchk_reftag", FALSE),
    only("prchk_guard", FALSE),
    only("psk", ABSENT),
    only("dhchap_key", ABSENT),
    only("dhchap_ctrlr_key", ABSENT),
    // One path per controller.
    only("multipath", &[Json::Str("disable")]),
    only("multipath_opts", ABSENT),
    only("allow_unrecognized_csi", FALSE),
    only("disable_sq_flow_control", FALSE),
];

/// Metadata and protection information, which neither RAM bdev has.
const NO_METADATA: [Foreign; 5] = [
    only("md_size", ZERO),
    only("md_interleave", FALSE),
    only("dif_type", ZERO),
    only("dif_is_head_of_md", FALSE),
    only("dif_pi_format", ZERO),
];

const BDEV_MALLOC_CREATE: &[Foreign] = &[
    NO_METADATA[0],
    NO_METADATA[1],
    NO_METADATA[2],
    NO_METADATA[3],
    NO_METADATA[4],
    only("numa_id", &[Json::Int(-1)]),
];

const BDEV_NULL_CREATE: &[Foreign] = &[
    NO_METADATA[0],
    NO_METADATA[1],
    NO_METADATA[2],
    NO_METADATA[3],
    NO_METADATA[4],
    // Placement hints SPDK's null bdev reports; plexd's reports none.
    only("preferred_write_alignment", ZERO),
    only("preferred_write_granularity", ZERO),
    only("optimal_write_size", ZERO),
    only("preferred_unmap_alignment", ZERO),
    only("preferred_unmap_granularity", ZERO),
];

const BDEV_GET_IOSTAT: &[Foreign] = &[
    only("per_channel", FALSE),
    only("reset_mode", &[Json::Str("none")]),
];

// plexd sizes a store's metadata from the base and the cluster size (4 KiB pages always).
const BDEV_LVOL_CREATE_LVSTORE: &[Foreign] =
    &[any("num_md_pages_per_cluster_ratio"), any("md_page_size")];
// How SPDK clears an lvol's clusters when it is deleted: plexd fills every cluster (zeroes, or
// the parent's data) when it is handed out, which is at least as strong whatever is asked.
const BDEV_LVOL_CREATE: &[Foreign] = &[any("clear_method")];

/// Every method plexd shares with SPDK, with its table: a method missing here is a test failure,
/// so a new one gets its client's parameters checked.
const TABLES: &[(&str, &[Foreign])] = &[
    ("bdev_enable_histogram", &[]),
    ("bdev_get_bdevs", &[]),
    ("bdev_get_histogram", &[]),
    ("bdev_get_iostat", BDEV_GET_IOSTAT),
    ("bdev_lvol_check_lvstore", &[]),
    ("bdev_lvol_clone", &[]),
    ("bdev_lvol_create", BDEV_LVOL_CREATE),
    ("bdev_lvol_create_lvstore", BDEV_LVOL_CREATE_LVSTORE),
    ("bdev_lvol_decouple_parent", &[]),
    ("bdev_lvol_delete", &[]),
    ("bdev_lvol_delete_lvstore", &[]),
    ("bdev_lvol_get_lvols", &[]),
    ("bdev_lvol_get_lvstores", &[]),
    ("bdev_lvol_inflate", &[]),
    ("bdev_lvol_rename", &[]),
    ("bdev_lvol_rename_lvstore", &[]),
    ("bdev_lvol_resize", &[]),
    ("bdev_lvol_set_read_only", &[]),
    ("bdev_lvol_snapshot", &[]),
    ("bdev_malloc_create", BDEV_MALLOC_CREATE),
    ("bdev_malloc_delete", &[]),
    // plexd's own (SPDK has no mirror of this kind): nothing of SPDK's to take out.
    ("bdev_mirror_add_plex", &[]),
    ("bdev_mirror_create", &[]),
    ("bdev_mirror_delete", &[]),
    ("bdev_mirror_get_mirrors", &[]),
    ("bdev_mirror_remove_plex", &[]),
    ("bdev_mirror_quiesce", &[]),
    ("bdev_mirror_resize", &[]),
    ("bdev_mirror_resume", &[]),
    ("bdev_mirror_set_options", &[]),
    ("bdev_null_create", BDEV_NULL_CREATE),
    ("bdev_null_delete", &[]),
    ("bdev_nvme_attach_controller", BDEV_NVME_ATTACH_CONTROLLER),
    ("bdev_nvme_detach_controller", &[]),
    ("bdev_nvme_get_controllers", &[]),
    ("bdev_nvme_reset_controller", &[]),
    ("bdev_set_qos_limit", &[]),
    ("bdev_uring_create", &[]),
    ("bdev_uring_delete", &[]),
    ("framework_get_config", &[]),
    ("framework_get_reactors", &[]),
    ("framework_get_subsystems", &[]),
    ("nvmf_create_subsystem", NVMF_CREATE_SUBSYSTEM),
    ("nvmf_create_transport", NVMF_CREATE_TRANSPORT),
    ("nvmf_delete_subsystem", &[]),
    ("nvmf_get_stats", &[]),
    ("nvmf_get_subsystems", &[]),
    ("nvmf_get_transports", &[]),
    ("nvmf_subsystem_add_host", NVMF_SUBSYSTEM_ADD_HOST),
    ("nvmf_subsystem_add_listener", NVMF_SUBSYSTEM_ADD_LISTENER),
    ("nvmf_subsystem_add_ns", NVMF_SUBSYSTEM_ADD_NS),
    ("nvmf_subsystem_allow_any_host", &[]),
    ("nvmf_subsystem_get_controllers", &[]),
    ("nvmf_subsystem_get_qpairs", &[]),
    ("nvmf_subsystem_remove_host", NVMF_SUBSYSTEM_REMOVE_HOST),
    ("nvmf_subsystem_remove_listener", &[]),
    ("nvmf_subsystem_remove_ns", &[]),
    ("rpc_get_methods", &[]),
    ("save_config", &[]),
    ("spdk_get_version", &[]),
];

/// The table of `method`; `None` for a method SPDK does not have. The settings methods of
/// SPDK's subsystems that plexd lacks keep their tables in `spdk_settings`.
pub fn table(method: &str) -> Option<&'static [Foreign]> {
    TABLES
        .iter()
        .chain(super::spdk_settings::TABLES)
        .chain(super::spdk_settings::TEST_ONLY)
        .find(|(m, _)| *m == method)
        .map(|(_, t)| *t)
}

/// Removes from `params` each parameter of `method`'s table that carries an accepted value;
/// refuses the call if one carries another. Parameters not in the table are left for the
/// method's own parameter struct, which refuses names it does not know.
pub fn admit(method: &str, params: &mut Value) -> Result<(), RpcError> {
    let Some(table) = table(method) else {
        return Ok(());
    };
    for f in table {
        let (outer, name) = match f.name.split_once('.') {
            Some((outer, inner)) => (Some(outer), inner),
            None => (None, f.name),
        };
        let holder = match outer {
            Some(o) => params.get_mut(o),
            None => Some(&mut *params),
        };
        let Some(obj) = holder.and_then(Value::as_object_mut) else {
            continue;
        };
        let Some(value) = obj.get(name) else {
            continue;
        };
        if let Accepts::Only(values) = f.accepts {
            if !value.is_null() && !values.iter().any(|v| v.matches(value)) {
                return Err(refusal(method, f.name, values, value));
            }
        }
        obj.remove(name);
    }
    Ok(())
}

/// The error for `name=value`, where only `values` (SPDK's defaults) are accepted.
fn refusal(method: &str, name: &str, values: &[Json], value: &Value) -> RpcError {
    let accepted = if values.is_empty() {
        "leave it out".to_string()
    } else {
        let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        format!(
            "leave it out or pass {} (SPDK's default)",
            list.join(" or ")
        )
    };
    RpcError::invalid_params(format!(
        "{method}: {name}={value} is not supported by plexd; {accepted}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spdk_defaults_are_taken_out_silently() {
        // What `spdk-rpc nvmf_create_transport -t TCP` sends.
        let mut p = json!({"trtype": "TCP", "c2h_success": true, "dif_insert_or_strip": false,
            "disable_adaptive_irq": false, "disable_command_passthru": false,
            "disable_mappable_bar0": false, "disable_shadow_doorbells": false, "no_srq": false,
            "no_wr_batching": false, "zcopy": false});
        admit("nvmf_create_transport", &mut p).unwrap();
        assert_eq!(
            p,
            json!({"trtype": "TCP", "c2h_success": true, "no_srq": false, "zcopy": false})
        );
        // Nested, and null as absent.
        let mut p = json!({"nqn": "n", "namespace": {"bdev_name": "M0", "no_auto_visible": false,
            "ptpl_file": "/var/lib/ns1"}});
        admit("nvmf_subsystem_add_ns", &mut p).unwrap();
        assert_eq!(
            p,
            json!({"nqn": "n", "namespace": {"bdev_name": "M0", "ptpl_file": "/var/lib/ns1"}})
        );
        let mut p = json!({"nqn": "n", "admin_label": null});
        admit("nvmf_create_subsystem", &mut p).unwrap();
        assert_eq!(p, json!({"nqn": "n"}));
    }

    #[test]
    fn any_value_of_a_knob_without_meaning_here_is_taken() {
        let mut p = json!({"trtype": "TCP", "ack_timeout": 20, "iobuf_small_cache_size": 4294967295u64,
            "kas": 100});
        admit("nvmf_create_transport", &mut p).unwrap();
        assert_eq!(p, json!({"trtype": "TCP"}));
    }

    #[test]
    fn a_feature_asked_for_is_refused_by_name_and_value() {
        let mut p = json!({"trtype": "TCP", "dif_insert_or_strip": true});
        let e = admit("nvmf_create_transport", &mut p).unwrap_err();
        assert_eq!(e.code, super::super::INVALID_PARAMS);
        assert_eq!(
            e.message,
            "nvmf_create_transport: dif_insert_or_strip=true is not supported by plexd; \
             leave it out or pass false (SPDK's default)"
        );
        let mut p = json!({"name": "R", "psk": "key0"});
        let e = admit("bdev_nvme_attach_controller", &mut p).unwrap_err();
        assert_eq!(
            e.message,
            "bdev_nvme_attach_controller: psk=\"key0\" is not supported by plexd; leave it out"
        );
        let mut p = json!({"nqn": "n", "namespace": {"bdev_name": "M0", "no_auto_visible": true}});
        let e = admit("nvmf_subsystem_add_ns", &mut p).unwrap_err();
        assert!(
            e.message.contains("namespace.no_auto_visible=true"),
            "{}",
            e.message
        );
    }

    #[test]
    fn names_outside_the_table_are_left_for_the_method() {
        // A misspelt name is not the table's business: the method's struct refuses it.
        let mut p = json!({"trtype": "TCP", "no_sqr": false});
        admit("nvmf_create_transport", &mut p).unwrap();
        assert_eq!(p, json!({"trtype": "TCP", "no_sqr": false}));
    }

    #[test]
    fn every_method_plexd_serves_has_a_table() {
        for name in super::super::Methods::all().names() {
            assert!(
                table(name).is_some(),
                "{name} has no entry in spdk_params::TABLES"
            );
        }
    }
}
