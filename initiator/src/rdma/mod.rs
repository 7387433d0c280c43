//! NVMe/RDMA: queues over a reliable RDMA connection (the `rdma` crate), per the NVMe over
//! Fabrics RDMA transport binding.
//!
//! - Connection: RDMA CM resolves the target's address and route, then connects carrying the
//!   NVMe/RDMA request private data (QID, queue sizes); the target answers with its receive
//!   queue size, or rejects with a reason. Fabrics Connect then runs as the first command.
//! - Commands: each 64-byte capsule goes out by SEND from the command's slot; each response
//!   (a 16-byte completion) arrives by SEND into one of the receives posted for every slot.
//! - Data: a write on an I/O queue that fits the controller's in-capsule size goes in the
//!   same SEND, after the capsule; any other data goes by a keyed SGL data block naming the
//!   command slot's region of this queue's registered memory, which the target moves with
//!   RDMA READ (writes) or RDMA WRITE (reads) before it sends the response. The caller's buffer is copied in or out of that
//!   region, so any [`crate::buf::IoBuf`] works and nothing is registered per I/O.

pub(crate) mod queue;

use std::net::SocketAddr;

/// Where an RDMA queue connects.
#[derive(Debug, Clone)]
pub(crate) struct RdmaEndpoint {
    pub addr: SocketAddr,
}

/// The largest transfer one command carries: the size of each slot's data region.
pub(crate) const MAX_TRANSFER: u32 = 128 << 10;
