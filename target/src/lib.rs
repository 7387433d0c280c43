//! plexd: the plexstor node daemon.
//!
//! - [`reactor`]: polled-mode event loops pinned to cores, with an idle policy.
//! - [`bdev`]: the block device layer and its modules.
//! - [`nvmf`]: the NVMe-oF target (subsystems, controllers, discovery, NVMe/TCP).
//! - [`rpc`]: the JSON-RPC control socket.
//! - [`app`]: the daemon's shared state and configuration save/load.
//! - [`fatal`]: a panic anywhere ends the process, loudly, for its supervisor to restart.

pub mod app;
pub mod bdev;
pub mod fatal;
pub mod lograte;
pub mod nvmf;
pub mod reactor;
pub mod rpc;
