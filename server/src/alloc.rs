//! The binaries' global allocator: mimalloc, called the way its own
//! `malloc` would be for the alignments Rust asks for almost always.
//!
//! Why not `mimalloc::MiMalloc`: it passes every allocation through
//! `mi_malloc_aligned`, whose fast path only serves small blocks that
//! happen to sit at the right alignment; any block over 1 KiB (a request's
//! tensor, an answer's body) takes the generic aligned path, about 190
//! instructions where `mi_malloc` takes 100 (callgrind, `cargo bench
//! --bench hotpath`: eight such allocations per REST request). mimalloc
//! guarantees the alignment of a plain `mi_malloc` block up to 16 bytes
//! for any block at least as large as its alignment
//! (`mi_malloc_is_naturally_aligned`), which is what is checked here; any
//! other layout goes to the aligned calls as before.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use libmimalloc_sys as ffi;

/// mimalloc as the global allocator.
pub struct Mimalloc;

/// What every mimalloc block of at least this size is aligned to.
const NATURAL_ALIGN: usize = 16;

#[inline]
fn natural(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to `mi_free`; a
// block from `mi_malloc`/`mi_zalloc`/`mi_realloc` is only used for a
// layout whose alignment mimalloc guarantees for that size (see above),
// and any other goes through the aligned calls.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: plain FFI calls; Rust's allocator contract gives a
        // non-zero size and a power-of-two alignment.
        unsafe {
            if natural(align, size) {
                ffi::mi_malloc(size).cast()
            } else {
                ffi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(align, size) {
                ffi::mi_zalloc(size).cast()
            } else {
                ffi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator; the new block keeps the
        // layout's alignment by the same rule as `alloc`.
        unsafe {
            if natural(align, new_size) {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout, natural or not, comes back at its alignment, keeps
    /// its bytes through a reallocation, and zeroed when asked.
    #[test]
    fn blocks_are_aligned_for_every_layout_and_keep_their_bytes() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1usize, 3, 8, 15, 16, 24, 40, 1000, 1025, 3136, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a valid layout of non-zero size; every block is
                // freed with the layout it was made for.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xAB, size);
                    let grown = size * 3 + 1;
                    let q = a.realloc(p, layout, grown);
                    assert_eq!(
                        q as usize % align,
                        0,
                        "realloc {size}->{grown} align {align}"
                    );
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xAB));
                    a.dealloc(q, Layout::from_size_align(grown, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
