//! A global allocator that asks Linux for transparent huge pages on large blocks. Inference on
//! a batch of 1000 allocates activations of 50-150 MiB that glibc maps fresh each time; faulting
//! them in 4 KiB pages took ~40% of the baseline's inference time, 2 MiB pages take a fraction
//! of that. Everything else is the system allocator's; elsewhere than Linux it changes nothing.
//! The binary (and the benchmarks) install it with `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large get the advice (smaller ones come from malloc's reused heap).
const ADVISE_FROM: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

pub struct HugePageAlloc;

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged;
// `advise` only adds a hint on whole pages inside the block it was given.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        advise(System.alloc(layout), layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        advise(System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        advise(System.realloc(ptr, layout, new_size), new_size)
    }
}

/// MADV_HUGEPAGE on the 2 MiB-aligned interior of a large block; returns the block.
fn advise(block: *mut u8, size: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if size >= ADVISE_FROM && !block.is_null() {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        let start = (block as usize).next_multiple_of(HUGE_PAGE);
        let end = (block as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside the block just allocated; the advice changes
            // no contents and a failure (e.g. THP disabled) is harmless, so it is ignored.
            unsafe {
                madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE);
            }
        }
    }
    block
}
