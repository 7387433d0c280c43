//! NVMe host driver: one controller / queue-pair model over several transports.
//!
//! The transports are NVMe/TCP (`tcp/`), NVMe/RDMA (`rdma/`, on the `rdma` crate) and PCIe
//! (through VFIO, `pcie/`), behind the same [`Controller`] and [`IoQpair`] types (see
//! [`transport`]).
//!
//! Threading model: nothing here owns a thread or a timer. A [`Controller`] is polled by whoever
//! owns it (keep-alive, asynchronous events, reconnects all happen inside
//! [`Controller::poll`]); each [`IoQpair`] is polled by its owner (a reactor, a benchmark
//! thread). They share only a few atomics, so queue pairs can live on other threads.

pub mod buf;
pub mod ctrlr;
pub mod discovery;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod histogram;
pub mod opts;
pub(crate) mod pcie;
pub mod qpair;
pub(crate) mod rdma;
pub(crate) mod slots;
pub(crate) mod tcp;
pub mod ticks;
pub mod transport;
pub mod trid;

pub use buf::IoBuf;
pub use ctrlr::{Controller, CtrlrEvent, CtrlrState, Digests, Namespace};
pub use error::{Error, IoError, Result, SubmitError, SubmitErrorKind};
pub use opts::CtrlrOpts;
pub use qpair::{IoCompletion, IoQpair};
pub use trid::{TrType, TransportId};
