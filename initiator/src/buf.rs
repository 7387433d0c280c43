//! I/O buffers.
//!
//! A queue pair takes ownership of the caller's buffer at submission and hands it back in the
//! completion, so no buffer can be freed or touched while the transport still reads or writes
//! it, and no reference counting or allocation is needed per I/O. `Vec<u8>`, `Box<[u8]>`, the
//! `dma` crate's hugepage-backed `DmaBuf` (what plexperf uses) and its `BufView` (what plexd's
//! bdevs pass, possibly a read-only view shared with other devices) all work.

use std::ops::Deref;

/// An owned, stable-addressed byte buffer a queue pair can hold while an I/O is in flight.
///
/// The transport reads the buffer for writes and fills it for reads; its length is the
/// transfer length. A buffer others share cannot be filled, so a read into it is refused at
/// submission ([`crate::SubmitErrorKind::ReadOnlyBuffer`]).
pub trait IoBuf: Deref<Target = [u8]> {
    /// The bytes a read fills, or `None` when the buffer may only be read.
    fn bytes_mut(&mut self) -> Option<&mut [u8]>;

    /// The device address of the first byte, for transports that DMA (PCIe). `None` for
    /// memory no device can reach, which such a transport refuses.
    fn iova(&self) -> Option<u64> {
        None
    }
}

impl IoBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Some(self)
    }
}

impl IoBuf for Box<[u8]> {
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Some(self)
    }
}

impl IoBuf for dma::DmaBuf {
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Some(self)
    }
    fn iova(&self) -> Option<u64> {
        dma::DmaBuf::iova(self)
    }
}

impl IoBuf for dma::BufView {
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        dma::BufView::bytes_mut(self)
    }
    fn iova(&self) -> Option<u64> {
        dma::BufView::iova(self)
    }
}
