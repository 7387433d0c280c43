//! Typed errors of the host driver.

use nvme_spec::Status;
use thiserror::Error;

/// Errors of controller bring-up, admin commands and the transport.
#[derive(Debug, Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("connection closed by the target")]
    Closed,
    /// The target broke the NVMe/TCP protocol; the connection was terminated.
    #[error("protocol error from target: {0}")]
    Protocol(String),
    /// A header or data digest did not match.
    #[error("{0} digest mismatch")]
    Digest(&'static str),
    /// The target terminated the connection (C2HTermReq).
    #[error("target terminated the connection: fatal error status {fes:#x}, field offset {fei}")]
    TermReq { fes: u16, fei: u32 },
    /// A command completed with an error status.
    #[error("{cmd} failed: {status}")]
    Nvme { cmd: &'static str, status: Status },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The target offers something we cannot use, or we were asked for something we lack.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The controller is failed (ctrlr_loss_timeout passed) or detached.
    #[error("controller failed")]
    Failed,
    /// The queue pair is not connected right now.
    #[error("queue pair not connected")]
    Disconnected,
    /// A PCIe device could not be opened or used through VFIO.
    #[error("{0}")]
    Device(#[from] vfio::Error),
    /// The RDMA connection could not be made: refused, unreachable, or no route.
    #[error("RDMA connect: {0}")]
    RdmaConnect(String),
    /// An RDMA call failed, or rdma-core is not installed.
    #[error("{0}")]
    Rdma(#[from] rdma::Error),
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How an I/O ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The controller completed the command with this (non-success) status.
    Nvme(Status),
    /// The path is down and `fast_io_fail_timeout_sec` passed, or the controller failed or was
    /// detached: the I/O was not (or not provably) executed.
    PathFailed,
    /// The command was aborted by the host after its timeout and the target confirmed it.
    TimedOut,
}

impl IoError {
    /// Whether a namespace reservation refused the command (another host holds it, or the
    /// key did not match): retrying will not help until the reservation changes.
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, IoError::Nvme(s) if s.same_code(Status::RESERVATION_CONFLICT))
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::Nvme(s) => write!(f, "{s}"),
            IoError::PathFailed => f.write_str("path failed"),
            IoError::TimedOut => f.write_str("timed out and aborted"),
        }
    }
}

impl std::error::Error for IoError {}

/// Why a submission was refused; the buffer comes back with it.
#[derive(Debug)]
pub struct SubmitError<B> {
    /// The reason.
    pub kind: SubmitErrorKind,
    /// The caller's buffer, untouched.
    pub buf: Option<B>,
}

/// Reasons a submission is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SubmitErrorKind {
    /// All command slots are in use: poll and try again.
    #[error("queue full")]
    QueueFull,
    /// The buffer is larger than the controller's maximum transfer size (MDTS) or not a whole
    /// number of blocks.
    #[error("invalid transfer length")]
    BadLength,
    /// A read into a buffer other views share, which must not be written.
    #[error("read into a read-only buffer")]
    ReadOnlyBuffer,
    /// The controller failed or the path failed (fast_io_fail): the I/O would not run.
    #[error("path failed")]
    PathFailed,
    /// The transport DMAs (PCIe) and the buffer is not DMA memory with a device address.
    #[error("buffer is not DMA memory the device can reach")]
    NotDmaMemory,
}
