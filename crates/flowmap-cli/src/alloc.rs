//! The process's allocator: mimalloc, with a watch that the loader fuzzer turns on to measure how much a
//! load allocates and to refuse, instead of attempting, an allocation no input of that size justifies.
//! Off (the default) it costs one relaxed load per allocation.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::Relaxed};

pub struct Watched;

static WATCH: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed while watching (frees of older memory can take it below zero).
static NET: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// The largest single allocation allowed while watching (larger ones fail, and the process aborts).
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

// SAFETY: every call is forwarded to mimalloc unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        mimalloc::MiMalloc.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if WATCH.load(Relaxed) {
            NET.fetch_sub(layout.size() as isize, Relaxed);
        }
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size, layout.size()) {
            return std::ptr::null_mut();
        }
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

/// Whether a block of `size` bytes (replacing one of `old` bytes) may be allocated; while watching, counts
/// it and refuses one above the cap.
fn admit(size: usize, old: usize) -> bool {
    if !WATCH.load(Relaxed) {
        return true;
    }
    if size > CAP.load(Relaxed) {
        return false;
    }
    let delta = size as isize - old as isize;
    let now = NET.fetch_add(delta, Relaxed) + delta;
    PEAK.fetch_max(now, Relaxed);
    true
}

/// Runs `f` watched, no single allocation above `cap` bytes allowed; returns its result and the peak of
/// the bytes it held at once.
pub fn watch<T>(cap: usize, f: impl FnOnce() -> T) -> (T, usize) {
    NET.store(0, Relaxed);
    PEAK.store(0, Relaxed);
    CAP.store(cap, Relaxed);
    WATCH.store(true, Relaxed);
    let out = f();
    WATCH.store(false, Relaxed);
    CAP.store(usize::MAX, Relaxed);
    (out, PEAK.load(Relaxed).max(0) as usize)
}
