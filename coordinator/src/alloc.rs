//! The allocator both binaries run on: mimalloc, told to keep freed memory.
//!
//! Training frees and allocates activation-sized buffers all the time (a larger micro-batch
//! than any before, gradients, the optimizer's temporaries). glibc's malloc hands large ones
//! back to the kernel, so they come back as fresh pages that the kernel zeroes on first touch
//! (a fifth of CPU time on the demo); mimalloc does the same after its purge delay (1 s in
//! the v3 build that libmimalloc-sys compiles, `options.c`), which still cost the demo 15% of
//! its time in `clear_page`. With purging off, freed memory
//! is reused as it is; the peak resident set is what it was (measured by `bench`), only the
//! process no longer shrinks below it until it exits.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

extern "C" {
    // Linked in by libmimalloc-sys (the static mimalloc build behind `mimalloc`).
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Turns mimalloc's purging off, unless `MIMALLOC_PURGE_DELAY` says otherwise.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of an allocator option, valid at any time.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
