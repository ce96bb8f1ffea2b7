//! Splitting a fused kernel's work over candle's CPU thread pool, and the
//! buffers its parts write: outputs that are written before they are read
//! (no zero-fill) and per-thread scratch buffers.

use std::cell::Cell;
use std::mem::MaybeUninit;

/// A buffer of `len` elements that the caller writes completely before
/// [`assume_init`] turns it into a `Vec<T>`: the kernels' outputs skip the
/// zero-fill a `vec![0; len]` would spend on memory that is overwritten.
pub(crate) fn uninit<T: Copy>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit<T>` needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// The `Vec<T>` of a buffer from [`uninit`] whose every element the caller
/// has written.
///
/// # Safety
/// Every element of `v` must have been initialised.
pub(crate) unsafe fn assume_init<T: Copy>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout and length; the caller initialised every element.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// Writes `value` into every element of `s` and returns it as initialised.
pub(crate) fn fill_uninit<T: Copy>(s: &mut [MaybeUninit<T>], value: T) -> &mut [T] {
    for e in s.iter_mut() {
        e.write(value);
    }
    // SAFETY: every element was just written.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// The threads of candle's CPU pool (its workers and the calling thread).
fn pool_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// How many contiguous parts to split `n` independent items into: one per
/// thread of candle's CPU pool when the work is worth a hand-off (`work`
/// multiply-adds or element visits in all), one otherwise.
pub(crate) fn parts(n: usize, work: usize) -> usize {
    if n <= 1 || work < 1 << 15 {
        1
    } else {
        pool_threads().min(n)
    }
}

thread_local! {
    /// Whether this thread is running a part of [`run_parts`].
    static IN_PART: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f(i, item)` for every item, the results in order. With more than one
/// item they run on candle's own CPU thread pool (item `i` on its thread
/// `i mod threads`), the pool candle's element-wise ops use: its worker
/// spins a while after each op, so it picks the next job up at once, and the
/// kernels of this crate do not add threads that compete with it for the
/// cores.
pub(crate) fn run_parts<I: Send, R: Send>(
    items: Vec<I>,
    f: impl Fn(usize, I) -> R + Sync,
) -> Vec<R> {
    let n = items.len();
    // Nested use (a kernel called from a part of another) would wait on the
    // pool's call lock that its caller holds: run such parts inline.
    if n <= 1 || IN_PART.with(|c| c.get()) {
        return items
            .into_iter()
            .enumerate()
            .map(|(i, it)| f(i, it))
            .collect();
    }
    let slots: Vec<std::sync::Mutex<(Option<I>, Option<R>)>> = items
        .into_iter()
        .map(|it| std::sync::Mutex::new((Some(it), None)))
        .collect();
    let threads = pool_threads();
    candle_core::utils::barrier_pool().execute(|tid| {
        let mut i = tid;
        while i < n {
            // Each slot is locked by its one thread only: no contention.
            let mut slot = slots[i].lock().unwrap_or_else(|e| e.into_inner());
            if let Some(it) = slot.0.take() {
                IN_PART.with(|c| c.set(true));
                slot.1 = Some(f(i, it));
                IN_PART.with(|c| c.set(false));
            }
            i += threads;
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .expect("every part ran")
        })
        .collect()
}

// The per-thread scratch buffers behind `Float::with_scratch`.
thread_local! {
    pub(crate) static SCRATCH_F32: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    pub(crate) static SCRATCH_F64: Cell<Vec<f64>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with the buffer of `slot`, grown to at least `len` elements.
pub(crate) fn with_slot<T: Copy + Default, R>(
    slot: &'static std::thread::LocalKey<Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buf = slot.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    slot.with(|c| c.set(buf));
    r
}
