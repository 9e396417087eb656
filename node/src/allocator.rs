//! Settings of the binaries' allocator (`civex-node` and `civex` both use
//! mimalloc as their global allocator).
//!
//! mimalloc returns freed memory to the OS after `purge_delay` (1 s by
//! default). sled allocates a fresh write buffer of about half a MiB for
//! each flush and frees it once written, so under steady writes the same
//! memory went back to the OS and was faulted in again, zeroed by the
//! kernel, over and over: measured, about 500,000 page faults and a tenth of
//! the CPU time of a catch-up of 1M entries, and 6% of a publish run. Kept
//! for 10 s, freed memory is reused while load goes on and still returned
//! 10 s after it stops.

/// How long freed memory is kept for reuse before it goes back to the OS.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t`. The numbering is
/// stable (retired options keep their place as `deprecated_*`), the same in
/// mimalloc 2 and 3; libmimalloc-sys names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the settings above. Call it first thing in `main`, before any
/// other thread exists (mimalloc's option setters are not thread safe).
#[allow(unsafe_code)]
pub fn tune() {
    // SAFETY: `mi_option_set` stores one option value; it is called before
    // the process starts any other thread, so nothing reads it concurrently.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) }
}
