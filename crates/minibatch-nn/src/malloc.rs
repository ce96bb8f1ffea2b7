//! [`keep_freed_memory`]: glibc's allocator told to keep freed tensor memory
//! for reuse instead of handing it back to the kernel after every op.
//!
//! Every candle op allocates its output, and a training step frees most of
//! them again: tens of MB a step for a transformer. With glibc's defaults a
//! buffer above the (dynamic) mmap threshold is a fresh `mmap` each time and
//! is unmapped when freed, and the heaps of candle's worker threads are
//! trimmed as soon as their top is free. Each new buffer is then touched page
//! by page: a page fault, the kernel zeroing a page, and TLB shoot-downs on
//! the other cores when it is unmapped. Measured on the all-MiniLM-L6-v2
//! fine-tuning step of `benches/models_step.rs` (2 cores): about a quarter of
//! the step's wall time went to the kernel.
//!
//! The setting is process-wide and lasts until exit, which is why it is a
//! call a program makes (a library should not change it behind a user's
//! back); it changes no result, only where memory comes from. The peak
//! resident memory stays about the same (it is the peak of what is live), but
//! freed memory is kept by the process for later steps rather than returned.

/// The mmap threshold set by [`keep_freed_memory`]: glibc's largest (32 MiB
/// on 64-bit), fixed, so that buffers up to it come from the heap.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// The trim threshold set by [`keep_freed_memory`]: 2 GiB − 1, the largest
/// value `mallopt` takes, so that free memory at the top of a heap is kept.
pub const TRIM_THRESHOLD: i32 = i32::MAX;

/// Sets glibc's `M_MMAP_THRESHOLD` to [`MMAP_THRESHOLD`] and `M_TRIM_THRESHOLD`
/// to [`TRIM_THRESHOLD`] (what
/// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647` in the
/// environment do), so freed
/// tensor buffers are reused by the next step instead of being unmapped and
/// faulted in again: see the [module docs](self). Returns whether the
/// setting took effect (`false` off glibc, e.g. on musl or macOS, where it
/// does nothing). Call it once, early in `main`.
///
/// ```
/// let kept = minibatch_nn::malloc::keep_freed_memory();
/// assert_eq!(kept, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters, and both values
        // are in its range (the mmap threshold at most 32 MiB on 64-bit).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
