//! NVMe, NVMe over Fabrics and NVMe/TCP wire formats.
//!
//! Plain data with encode/decode and no I/O. Every on-the-wire structure is a
//! `#[repr(C)]` type made only of byte-aligned little-endian fields
//! ([`zerocopy::little_endian`]), so it can be viewed in place inside any
//! receive buffer at any offset (`Unaligned`) and its size is asserted at
//! compile time. Parsers take untrusted bytes and return typed errors; nothing
//! here indexes out of bounds or panics on malformed input.
//!
//! References: NVM Express Base Specification 2.0, NVM Command Set 1.0,
//! NVMe over Fabrics 1.1 (now part of Base 2.0 chapter "Fabrics"), NVMe/TCP
//! Transport Specification 1.0 (TP 8000).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cmd;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod opcode;
pub mod rdma;
pub mod regs;
pub mod resv;
pub mod status;
pub mod tcp;

mod util;

pub use cmd::{Command, Completion, DsmRange, SglDescriptor};

pub use fabrics::ConnectData;
pub use identify::{IdentifyController, IdentifyNamespace, LbaFormat};
pub use status::Status;
pub use tcp::{CommonHeader, PduError, PduHeader, PduType};

/// Little-endian integer types used in every structure of this crate.
pub use zerocopy::little_endian::{U128, U16, U32, U64};
/// Re-exported so users can view and build structures without naming zerocopy themselves.
pub use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};
