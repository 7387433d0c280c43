//! I/O buffers.
//!
//! A queue pair takes ownership of the caller's buffer at submission and hands it back in the
//! completion, so no buffer can be freed or touched while the transport still reads or writes
//! it, and no reference counting or allocation is needed per I/O. Any owned byte slice works:
//! `Vec<u8>`, `Box<[u8]>`, the `dma` crate's hugepage-backed `DmaBuf`, or [`AlignedBuf`].

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// An owned, stable-addressed byte buffer a queue pair can hold while an I/O is in flight.
///
/// Implemented for every owned `DerefMut<Target = [u8]>` type. The transport reads the buffer
/// for writes and fills it for reads; its length is the transfer length.
pub trait IoBuf: DerefMut<Target = [u8]> {}
impl<T: DerefMut<Target = [u8]>> IoBuf for T {}

/// Page size used for [`AlignedBuf`]; 4 KiB is what every target architecture and O_DIRECT need.
pub const PAGE_SIZE: usize = 4096;

/// A zeroed, page-aligned heap buffer: the stand-in for hugepage DMA memory where a transport
/// needs no device mapping (TCP). Switching to `dma::DmaBuf` changes no queue-pair code.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`PAGE_SIZE`] (at least one page is reserved so a
    /// zero-length buffer still has a valid pointer).
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least one page).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(PAGE_SIZE);
        // Cannot fail: PAGE_SIZE is a power of two and size is rounded to it.
        Layout::from_size_align(size, PAGE_SIZE).expect("page layout")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to at least len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes @ {:p})", self.len, self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192 + 5);
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(b.len(), 8197);
        assert!(b.iter().all(|&x| x == 0));
        b[8196] = 7;
        assert_eq!(b[8196], 7);
        let z = AlignedBuf::new(0);
        assert!(z.is_empty());
    }
}
