//! Thin, safe bindings of rdma-core's libibverbs and librdmacm: what an NVMe/RDMA target and
//! host need, no more.
//!
//! - [`cm`]: connection management — an event channel, listening and connecting
//!   identifiers, accept and reject with private data, and each connection's queue pair.
//! - [`verbs`]: protection domains, memory regions registered once, completion queues polled
//!   by the caller, completion channels that let an idle poller sleep, and shared receive
//!   queues.
//!
//! All calls into C go through [`sys`], which loads the libraries with `dlopen` on first use:
//! a process that never asks for RDMA never needs rdma-core. Posting work that names memory
//! is `unsafe`, since the device reads or writes that memory until the work completes; the
//! rest is safe. Objects keep what they were made from alive (a region its PD, a PD its
//! device, a device the identifier it came from), so no drop order can free something the
//! library still uses.

pub mod cm;
mod memory;
pub mod sys;
pub mod verbs;

pub use cm::{CmEvent, CmEventKind, CmId, ConnParam, EventChannel};
pub use memory::DeviceMemory;
pub use verbs::{
    Access, CompletionChannel, CompletionQueue, Device, DeviceLimits, MemoryRegion,
    ProtectionDomain, QueueCaps, SendOp, Sge, SharedReceiveQueue, WorkCompletion,
};

/// What an RDMA call failed with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rdma-core's libraries are not installed (or lack a symbol we need).
    #[error("RDMA is unavailable: {0}")]
    Unavailable(String),
    /// A call returned an error; `errno` says which.
    #[error("{call}: {source}")]
    Os {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A request the library cannot express (too long, out of a region's bounds, …).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The errno that best says what happened, for callers that report one.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Unavailable(_) => libc::EOPNOTSUPP,
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Invalid(_) => libc::EINVAL,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The loaded libraries, or [`Error::Unavailable`].
pub(crate) fn libraries() -> Result<&'static sys::Libraries> {
    sys::libraries().map_err(Error::Unavailable)
}

/// Whether rdma-core's libraries can be loaded here.
pub fn available() -> Result<()> {
    libraries().map(|_| ())
}

/// An error from the C call named `call`, read from errno. librdmacm and libibverbs set
/// errno on failure (some verbs also return it; errno agrees).
pub(crate) fn os_error(call: &'static str) -> Error {
    Error::Os {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// An error from a verb that returns its errno instead of setting it.
pub(crate) fn returned_error(call: &'static str, code: i32) -> Error {
    Error::Os {
        call,
        source: std::io::Error::from_raw_os_error(code.abs()),
    }
}
