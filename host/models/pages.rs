//! Read-only bytes on 2 MiB pages, for the weights the CPU kernels stream on every token.
//!
//! A one-row forward reads every weight byte once, so decoding runs at the memory's streaming
//! speed, and on 4 KiB pages that speed is bound by address translation: each page is a TLB
//! miss (and, in a VM, a nested page walk). Linux gives 2 MiB pages to memory that asks for them
//! (`madvise(MADV_HUGEPAGE)`, transparent huge pages, whose default mode is `madvise`) before
//! it is first written. On the 2-vCPU VM, reading 1 GiB with two threads ran at 30 GB/s on
//! 4 KiB pages and 60 GB/s on 2 MiB ones (session 25, BENCHMARKS.md).
//!
//! Where the kernel has no huge page to give, or on another OS, the bytes sit on ordinary pages:
//! only the speed differs.

use std::alloc::Layout;
use std::ptr::NonNull;

/// The huge page size the allocations are aligned to.
const HUGE_PAGE: usize = 2 << 20;

/// A byte buffer, aligned to [`HUGE_PAGE`] and advised onto huge pages where it is at least
/// one page long, immutable once built.
pub(crate) struct Pages {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the bytes are owned and never written after `copy_of` returns.
unsafe impl Send for Pages {}
unsafe impl Sync for Pages {}

impl Pages {
    /// A copy of `bytes`, asked onto huge pages before it is written.
    pub(crate) fn copy_of(bytes: &[u8]) -> Pages {
        let len = bytes.len();
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        // A slice's length is at most isize::MAX; rounding it to the alignment can overflow
        // only within one page of that, where no allocation would succeed anyway.
        let layout = Layout::from_size_align(len.max(1), align)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout's size is non-zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // Advice only: where it fails the bytes are on ordinary pages. The range starts on
            // a page boundary and lies inside the allocation.
            unsafe { libc::madvise(raw.cast(), len, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `ptr` holds `len` bytes, and does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), raw, len) };
        Pages { ptr, len, layout }
    }
}

impl std::ops::Deref for Pages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: allocated in `copy_of` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pages({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_holds_the_bytes_on_aligned_pages() {
        for len in [0, 1, 4095, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 17] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let p = Pages::copy_of(&bytes);
            assert_eq!(&p[..], &bytes[..], "{len} bytes");
            if len >= HUGE_PAGE {
                assert_eq!(p.as_ptr() as usize % HUGE_PAGE, 0, "{len} bytes");
            }
        }
    }
}
