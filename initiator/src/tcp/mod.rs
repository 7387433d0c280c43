//! The NVMe/TCP transport (host side).

pub(crate) mod pdu;
pub(crate) mod queue;
