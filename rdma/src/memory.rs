//! Memory an RDMA device reads and writes: page-aligned, zeroed, owned by a queue for its
//! whole life, and reached from Rust only through copies at known moments (before posting the
//! work that names a range, after the work's completion).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

pub struct DeviceMemory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the memory is plain bytes owned by this value; it moves between threads with it.
unsafe impl Send for DeviceMemory {}
// SAFETY: through a shared reference the bytes are only copied out (`read`), each range by the
// one owner of the work that filled it, or their address taken; writing takes `&mut self`.
unsafe impl Sync for DeviceMemory {}

impl DeviceMemory {
    /// `len` zeroed bytes (at least one page).
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(4096), 4096).expect("a page-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        DeviceMemory { ptr, layout }
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[allow(clippy::len_without_is_empty)] // never empty: at least one page
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Copies `src` to `offset`. Panics if it does not fit (a caller's bug, not input's).
    ///
    /// The device may be writing other ranges at the same time; it never touches this one
    /// while the caller copies (no work naming it is outstanding).
    pub fn write(&mut self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len(), "write past device memory");
        // SAFETY: in bounds (checked); no posted work names this range, so nothing else
        // accesses these bytes now.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        }
    }

    /// Copies `dst.len()` bytes from `offset`. Panics if out of bounds.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len(), "read past device memory");
        // SAFETY: in bounds (checked); the work that wrote this range has completed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. Its owner drops every registration of
        // it, and the queue pair whose work names it, first.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
