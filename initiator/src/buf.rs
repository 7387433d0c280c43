//! I/O buffers.
//!
//! A queue pair takes ownership of the caller's buffer at submission and hands it back in the
//! completion, so no buffer can be freed or touched while the transport still reads or writes
//! it, and no reference counting or allocation is needed per I/O. Any owned byte slice works:
//! `Vec<u8>`, `Box<[u8]>`, or the `dma` crate's hugepage-backed `DmaBuf` (what plexd and
//! plexperf use).

use std::ops::DerefMut;

/// An owned, stable-addressed byte buffer a queue pair can hold while an I/O is in flight.
///
/// Implemented for every owned `DerefMut<Target = [u8]>` type. The transport reads the buffer
/// for writes and fills it for reads; its length is the transfer length.
pub trait IoBuf: DerefMut<Target = [u8]> {}
impl<T: DerefMut<Target = [u8]>> IoBuf for T {}
