//! Our declarations of rdma-core's structures against its installed headers: a C program
//! prints each size and offset we depend on, and the test compares them with ours. A
//! mismatch would make every verb read or write the wrong bytes, silently.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use rdma::sys::*;

/// (C expression, our value)
fn ours() -> Vec<(&'static str, usize)> {
    vec![
        ("sizeof(struct ibv_sge)", size_of::<ibv_sge>()),
        ("sizeof(struct ibv_recv_wr)", size_of::<ibv_recv_wr>()),
        (
            "offsetof(struct ibv_recv_wr, num_sge)",
            offset_of!(ibv_recv_wr, num_sge),
        ),
        ("sizeof(struct ibv_send_wr)", size_of::<ibv_send_wr>()),
        (
            "offsetof(struct ibv_send_wr, opcode)",
            offset_of!(ibv_send_wr, opcode),
        ),
        (
            "offsetof(struct ibv_send_wr, send_flags)",
            offset_of!(ibv_send_wr, send_flags),
        ),
        (
            "offsetof(struct ibv_send_wr, invalidate_rkey)",
            offset_of!(ibv_send_wr, imm_or_invalidate),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.remote_addr)",
            offset_of!(ibv_send_wr, remote_addr),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.rkey)",
            offset_of!(ibv_send_wr, rkey),
        ),
        (
            "offsetof(struct ibv_send_wr, qp_type)",
            offset_of!(ibv_send_wr, _qp_type),
        ),
        (
            "offsetof(struct ibv_send_wr, bind_mw)",
            offset_of!(ibv_send_wr, _bind_mw_or_tso),
        ),
        ("sizeof(struct ibv_wc)", size_of::<ibv_wc>()),
        (
            "offsetof(struct ibv_wc, status)",
            offset_of!(ibv_wc, status),
        ),
        (
            "offsetof(struct ibv_wc, opcode)",
            offset_of!(ibv_wc, opcode),
        ),
        (
            "offsetof(struct ibv_wc, byte_len)",
            offset_of!(ibv_wc, byte_len),
        ),
        (
            "offsetof(struct ibv_wc, invalidated_rkey)",
            offset_of!(ibv_wc, imm_or_invalidated),
        ),
        (
            "offsetof(struct ibv_wc, qp_num)",
            offset_of!(ibv_wc, qp_num),
        ),
        (
            "offsetof(struct ibv_wc, wc_flags)",
            offset_of!(ibv_wc, wc_flags),
        ),
        (
            "offsetof(struct ibv_wc, dlid_path_bits)",
            offset_of!(ibv_wc, dlid_path_bits),
        ),
        (
            "sizeof(struct ibv_qp_init_attr)",
            size_of::<ibv_qp_init_attr>(),
        ),
        (
            "offsetof(struct ibv_qp_init_attr, cap)",
            offset_of!(ibv_qp_init_attr, cap),
        ),
        (
            "offsetof(struct ibv_qp_init_attr, qp_type)",
            offset_of!(ibv_qp_init_attr, qp_type),
        ),
        (
            "offsetof(struct ibv_qp_init_attr, sq_sig_all)",
            offset_of!(ibv_qp_init_attr, sq_sig_all),
        ),
        (
            "sizeof(struct ibv_srq_init_attr)",
            size_of::<ibv_srq_init_attr>(),
        ),
        (
            "sizeof(struct ibv_device_attr)",
            size_of::<ibv_device_attr>(),
        ),
        (
            "offsetof(struct ibv_device_attr, max_qp_wr)",
            offset_of!(ibv_device_attr, max_qp_wr),
        ),
        (
            "offsetof(struct ibv_device_attr, max_sge)",
            offset_of!(ibv_device_attr, max_sge),
        ),
        (
            "offsetof(struct ibv_device_attr, max_cqe)",
            offset_of!(ibv_device_attr, max_cqe),
        ),
        (
            "offsetof(struct ibv_device_attr, max_qp_rd_atom)",
            offset_of!(ibv_device_attr, max_qp_rd_atom),
        ),
        (
            "offsetof(struct ibv_device_attr, max_qp_init_rd_atom)",
            offset_of!(ibv_device_attr, max_qp_init_rd_atom),
        ),
        (
            "offsetof(struct ibv_device_attr, max_srq_wr)",
            offset_of!(ibv_device_attr, max_srq_wr),
        ),
        (
            "offsetof(struct ibv_device_attr, max_srq_sge)",
            offset_of!(ibv_device_attr, max_srq_sge),
        ),
        (
            "sizeof(struct ibv_context_ops)",
            size_of::<ibv_context_ops>(),
        ),
        (
            "offsetof(struct ibv_context_ops, poll_cq)",
            offset_of!(ibv_context_ops, poll_cq),
        ),
        (
            "offsetof(struct ibv_context_ops, req_notify_cq)",
            offset_of!(ibv_context_ops, req_notify_cq),
        ),
        (
            "offsetof(struct ibv_context_ops, post_srq_recv)",
            offset_of!(ibv_context_ops, post_srq_recv),
        ),
        (
            "offsetof(struct ibv_context_ops, post_send)",
            offset_of!(ibv_context_ops, post_send),
        ),
        (
            "offsetof(struct ibv_context_ops, post_recv)",
            offset_of!(ibv_context_ops, post_recv),
        ),
        (
            "offsetof(struct ibv_context, ops)",
            offset_of!(ibv_context, ops),
        ),
        (
            "offsetof(struct ibv_cq, context)",
            offset_of!(ibv_cq, context),
        ),
        (
            "offsetof(struct ibv_srq, context)",
            offset_of!(ibv_srq, context),
        ),
        (
            "offsetof(struct ibv_qp, context)",
            offset_of!(ibv_qp, context),
        ),
        (
            "offsetof(struct ibv_qp, qp_num)",
            offset_of!(ibv_qp, qp_num),
        ),
        ("offsetof(struct ibv_mr, lkey)", offset_of!(ibv_mr, lkey)),
        ("offsetof(struct ibv_mr, rkey)", offset_of!(ibv_mr, rkey)),
        (
            "offsetof(struct ibv_comp_channel, fd)",
            offset_of!(ibv_comp_channel, fd),
        ),
        (
            "offsetof(struct rdma_event_channel, fd)",
            offset_of!(rdma_event_channel, fd),
        ),
        ("sizeof(struct rdma_cm_id)", size_of::<rdma_cm_id>()),
        (
            "offsetof(struct rdma_cm_id, context)",
            offset_of!(rdma_cm_id, context),
        ),
        (
            "offsetof(struct rdma_cm_id, qp)",
            offset_of!(rdma_cm_id, qp),
        ),
        (
            "offsetof(struct rdma_cm_id, route.addr.src_addr)",
            offset_of!(rdma_cm_id, src_addr),
        ),
        (
            "offsetof(struct rdma_cm_id, route.addr.dst_addr)",
            offset_of!(rdma_cm_id, dst_addr),
        ),
        (
            "offsetof(struct rdma_cm_id, ps)",
            offset_of!(rdma_cm_id, ps),
        ),
        (
            "offsetof(struct rdma_cm_id, qp_type)",
            offset_of!(rdma_cm_id, qp_type),
        ),
        (
            "sizeof(struct rdma_conn_param)",
            size_of::<rdma_conn_param>(),
        ),
        (
            "offsetof(struct rdma_conn_param, private_data_len)",
            offset_of!(rdma_conn_param, private_data_len),
        ),
        (
            "offsetof(struct rdma_conn_param, srq)",
            offset_of!(rdma_conn_param, srq),
        ),
        (
            "offsetof(struct rdma_conn_param, qp_num)",
            offset_of!(rdma_conn_param, qp_num),
        ),
        ("sizeof(struct rdma_cm_event)", size_of::<rdma_cm_event>()),
        (
            "offsetof(struct rdma_cm_event, event)",
            offset_of!(rdma_cm_event, event),
        ),
        (
            "offsetof(struct rdma_cm_event, status)",
            offset_of!(rdma_cm_event, status),
        ),
        (
            "offsetof(struct rdma_cm_event, param.conn)",
            offset_of!(rdma_cm_event, conn),
        ),
        ("IBV_QPT_RC", IBV_QPT_RC as usize),
        ("RDMA_PS_TCP", RDMA_PS_TCP as usize),
        (
            "RDMA_OPTION_ID_REUSEADDR",
            RDMA_OPTION_ID_REUSEADDR as usize,
        ),
        ("IBV_ACCESS_REMOTE_READ", IBV_ACCESS_REMOTE_READ as usize),
        ("IBV_WR_RDMA_READ", IBV_WR_RDMA_READ as usize),
        ("IBV_WR_SEND_WITH_INV", IBV_WR_SEND_WITH_INV as usize),
        ("IBV_SEND_SIGNALED", IBV_SEND_SIGNALED as usize),
        ("IBV_WC_WITH_INV", IBV_WC_WITH_INV as usize),
        ("IBV_WC_RECV", 128),
        ("IBV_WC_WR_FLUSH_ERR", 5),
        ("RDMA_CM_EVENT_CONNECT_REQUEST", 4),
        ("RDMA_CM_EVENT_TIMEWAIT_EXIT", 15),
    ]
}

#[test]
fn our_declarations_match_rdma_core_headers() {
    let headers = [
        "/usr/include/infiniband/verbs.h",
        "/usr/include/rdma/rdma_cma.h",
    ];
    if let Some(missing) = headers.iter().find(|h| !Path::new(h).exists()) {
        // CI installs the headers (scripts/guest/prepare.sh); elsewhere say what is missing.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{missing} is missing under CI"
        );
        eprintln!("SKIP: {missing} is missing (Debian: libibverbs-dev librdmacm-dev)");
        return;
    }
    let ours = ours();
    let dir = std::env::temp_dir().join(format!("rdma-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <infiniband/verbs.h>\n\
         #include <rdma/rdma_cma.h>\nint main(void) {\n",
    );
    for (expr, _) in &ours {
        c += &format!("    printf(\"%zu\\n\", (size_t)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    std::fs::write(dir.join("layout.c"), c).unwrap();
    let exe = dir.join("layout");
    let cc = Command::new("cc")
        .arg(dir.join("layout.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let theirs: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(theirs.len(), ours.len());
    let wrong: Vec<String> = ours
        .iter()
        .zip(&theirs)
        .filter(|((_, mine), c)| mine != *c)
        .map(|((expr, mine), c)| format!("{expr}: ours {mine}, the header's {c}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "layout differs from rdma-core:\n{}",
        wrong.join("\n")
    );
}
