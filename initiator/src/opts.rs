//! Controller options, with SPDK's names and defaults where SPDK has them.

use std::time::Duration;

/// How a controller is attached and how it behaves on failure.
#[derive(Debug, Clone)]
pub struct CtrlrOpts {
    /// Host NQN presented in Connect.
    pub hostnqn: String,
    /// Host identifier (16 bytes) presented in Connect.
    pub hostid: [u8; 16],
    /// Request header digests.
    pub hdgst: bool,
    /// Request data digests.
    pub ddgst: bool,
    /// I/O queues to ask for in Set Features Number of Queues.
    pub num_io_queues: u16,
    /// When non-zero, ask instead for this many I/O queues per active namespace (counted at
    /// bring-up), for a host that opens its queues per namespace, as plexperf does.
    pub io_queues_per_namespace: u16,
    /// Entries per I/O queue (clamped to CAP.MQES + 1).
    pub io_queue_size: u16,
    /// Entries of the admin queue.
    pub admin_queue_size: u16,
    /// Keep-alive timeout sent in Connect (0 = no keep-alive). Keep-alives go out every KATO/2.
    pub keep_alive_timeout: Duration,
    /// TCP connect timeout (each attempt).
    pub connect_timeout: Duration,
    /// Timeout of a synchronous admin command during bring-up.
    pub admin_timeout: Duration,
    /// I/O timeout: an I/O older than this is aborted; if it still has not completed after a
    /// second period, the controller is reset. `None` disables it.
    pub io_timeout: Option<Duration>,
    /// SPDK `reconnect_delay_sec`: pause between reconnect attempts.
    pub reconnect_delay: Duration,
    /// SPDK `fast_io_fail_timeout_sec`: once the controller has been unreachable this long,
    /// pending and new I/O fail instead of waiting for a reconnect. `None` = never (SPDK's 0).
    pub fast_io_fail_timeout: Option<Duration>,
    /// SPDK `ctrlr_loss_timeout_sec`: give up reconnecting after this long and fail the
    /// controller. `None` = retry forever (SPDK's -1). `Some(0)` = no reconnect at all.
    pub ctrlr_loss_timeout: Option<Duration>,
    /// PCIe: describe a transfer that would need a PRP list with one SGL data block instead,
    /// where the controller supports SGLs for I/O. Off: PRPs for everything.
    pub pcie_sgl: bool,
}

/// The Linux kernel's default host NQN form for hosts without one configured.
pub fn default_hostnqn(hostid: &[u8; 16]) -> String {
    format!(
        "nqn.2014-08.org.nvmexpress:uuid:{}",
        uuid::Uuid::from_bytes(*hostid).hyphenated()
    )
}

impl Default for CtrlrOpts {
    fn default() -> Self {
        let hostid = *uuid::Uuid::new_v4().as_bytes();
        CtrlrOpts {
            hostnqn: default_hostnqn(&hostid),
            hostid,
            hdgst: false,
            ddgst: false,
            num_io_queues: 4,
            io_queues_per_namespace: 0,
            io_queue_size: 128,
            admin_queue_size: 32,
            // SPDK's default keep_alive_timeout_ms is 10000.
            keep_alive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            admin_timeout: Duration::from_secs(10),
            io_timeout: Some(Duration::from_secs(30)),
            // bdev_nvme defaults: reconnect_delay_sec 0 means "at once"; one second is gentler.
            reconnect_delay: Duration::from_secs(1),
            fast_io_fail_timeout: None,
            ctrlr_loss_timeout: Some(Duration::ZERO),
            pcie_sgl: true,
        }
    }
}
