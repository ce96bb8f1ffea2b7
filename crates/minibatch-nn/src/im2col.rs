//! Host kernels shared by the convolution and pooling ops: `im2col` /
//! `col2im` for one image, per-thread scratch buffers, output buffers that
//! are written before they are read (no zero-fill), and the split of a batch
//! over threads.
//!
//! For one image `x` of shape `(C, H, W)` and a `kh x kw` kernel with stride
//! `s`, padding `p` and dilation `d`, the columns are the `(C·kh·kw, oh·ow)`
//! row-major matrix
//!
//! ```text
//! cols[(c·kh + i)·kw + j, oy·ow + ox] = x[c, oy·s + i·d - p, ox·s + j·d - p]   (0 outside x)
//! ```
//!
//! so that a convolution is `W (O, C·kh·kw) · cols` and its input gradient
//! is `col2im(Wᵀ · grad)`, `col2im` adding every column entry back onto the
//! pixel it was read from.

use std::cell::Cell;
use std::mem::MaybeUninit;

use candle_core::WithDType;

use crate::gemm::GemmFloat;

/// The float types of the convolution and pooling kernels (`f32`, `f64`).
pub(crate) trait ConvFloat:
    WithDType
    + GemmFloat
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn is_nan(self) -> bool;
    fn from_usize(n: usize) -> Self;
    /// Runs `f` with this thread's scratch buffer of at least `len` elements
    /// (its contents are whatever an earlier call left there). The buffer is
    /// taken out of the thread-local slot while `f` runs, so a nested call
    /// gets a fresh one instead of aliasing it.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

thread_local! {
    static SCRATCH_F32: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static SCRATCH_F64: Cell<Vec<f64>> = const { Cell::new(Vec::new()) };
}

fn with_slot<T: Copy + Default, R>(
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

impl ConvFloat for f32 {
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn from_usize(n: usize) -> Self {
        n as f32
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        with_slot(&SCRATCH_F32, len, f)
    }
}

impl ConvFloat for f64 {
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn from_usize(n: usize) -> Self {
        n as f64
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        with_slot(&SCRATCH_F64, len, f)
    }
}

/// The geometry of a 2-D convolution (or pooling window) over one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    /// Input channels (of the whole image, all groups).
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub dil: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geom {
    /// `oh·ow`: the columns of the im2col matrix.
    pub fn out_pixels(&self) -> usize {
        self.oh * self.ow
    }
    /// `C·kh·kw`: the rows of the im2col matrix.
    pub fn col_rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// A 1x1 kernel, stride 1, no padding: the columns are the image itself.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// The output positions `o` (along a dimension of `n` outputs) whose input
    /// `o·s + off` lies in `0..size`: a range `lo..hi`.
    fn valid(off: isize, s: usize, size: usize, n: usize) -> (usize, usize) {
        let s = s as isize;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi = if (size as isize) - off <= 0 {
            0
        } else {
            ((size as isize - 1 - off) / s + 1).min(n as isize)
        };
        let lo = (lo as usize).min(n);
        (lo, (hi as usize).max(lo))
    }
}

/// Fills `cols` (`col_rows() x out_pixels()`, row-major) from the image `x`
/// (`c·h·w`). Every element of `cols` is written.
pub(crate) fn im2col<T: ConvFloat>(x: &[T], g: &Geom, cols: &mut [T]) {
    let (p, ow) = (g.out_pixels(), g.ow);
    debug_assert_eq!(x.len(), g.c * g.h * g.w);
    debug_assert_eq!(cols.len(), g.col_rows() * p);
    let mut row = 0;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            let yoff = (i * g.dil) as isize - g.pad as isize;
            let (oy_lo, oy_hi) = Geom::valid(yoff, g.stride, g.h, g.oh);
            for j in 0..g.kw {
                let xoff = (j * g.dil) as isize - g.pad as isize;
                let (ox_lo, ox_hi) = Geom::valid(xoff, g.stride, g.w, g.ow);
                let dst = &mut cols[row * p..(row + 1) * p];
                dst[..oy_lo * ow].fill(T::ZERO);
                dst[oy_hi * ow..].fill(T::ZERO);
                if g.stride == 1 && ox_lo == 0 && ox_hi == ow && oy_lo < oy_hi {
                    // Whole output rows read whole runs of `ow` input
                    // elements, `w` apart: the common interior case.
                    let (iy0, first) = ((oy_lo as isize + yoff) as usize, xoff as usize);
                    let rows = oy_hi - oy_lo;
                    assert!((iy0 + rows - 1) * g.w + first + ow <= plane.len());
                    let dst = &mut dst[oy_lo * ow..oy_hi * ow];
                    // SAFETY: the last run read ends inside `plane` (checked
                    // above) and `dst` holds exactly `rows` runs of `ow`.
                    unsafe {
                        let mut s = plane.as_ptr().add(iy0 * g.w + first);
                        let mut d = dst.as_mut_ptr();
                        for _ in 0..rows {
                            copy_run(d, s, ow);
                            s = s.add(g.w);
                            d = d.add(ow);
                        }
                    }
                    row += 1;
                    continue;
                }
                for oy in oy_lo..oy_hi {
                    let iy = (oy * g.stride) as isize + yoff;
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let d = &mut dst[oy * ow..(oy + 1) * ow];
                    d[..ox_lo].fill(T::ZERO);
                    d[ox_hi..].fill(T::ZERO);
                    if ox_lo < ox_hi {
                        let first = (ox_lo * g.stride) as isize + xoff;
                        let first = first as usize;
                        if g.stride == 1 {
                            copy_short(&mut d[ox_lo..ox_hi], &src[first..first + ox_hi - ox_lo]);
                        } else {
                            for (k, v) in d[ox_lo..ox_hi].iter_mut().enumerate() {
                                *v = src[first + k * g.stride];
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Copies `n` elements from `s` to `d` in blocks of 8 (vector moves, no
/// `memmove` call: the runs are a few dozen elements).
///
/// # Safety
/// `s` and `d` must be valid for `n` elements and not overlap.
#[inline(always)]
unsafe fn copy_run<T: Copy>(d: *mut T, s: *const T, n: usize) {
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: k + 8 <= n.
        unsafe { std::ptr::copy_nonoverlapping(s.add(k), d.add(k), 8) };
        k += 8;
    }
    while k < n {
        // SAFETY: k < n.
        unsafe { *d.add(k) = *s.add(k) };
        k += 1;
    }
}

/// `d[k] += s[k]` for `k < n`, in blocks of 8.
///
/// # Safety
/// `s` and `d` must be valid for `n` elements and not overlap.
#[inline(always)]
unsafe fn add_run<T: ConvFloat>(d: *mut T, s: *const T, n: usize) {
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: k + 8 <= n; unaligned reads and writes of [T; 8].
        unsafe {
            let a = (d.add(k) as *const [T; 8]).read_unaligned();
            let b = (s.add(k) as *const [T; 8]).read_unaligned();
            let mut c = a;
            for l in 0..8 {
                c[l] = a[l] + b[l];
            }
            (d.add(k) as *mut [T; 8]).write_unaligned(c);
        }
        k += 8;
    }
    while k < n {
        // SAFETY: k < n.
        unsafe { *d.add(k) += *s.add(k) };
        k += 1;
    }
}

/// `d.copy_from_slice(s)` for the short rows of small images: fixed-size
/// blocks the compiler turns into vector moves, where `copy_from_slice`
/// would call `memmove` once per row (its call overhead dominates copies of
/// a few dozen elements).
#[inline(always)]
fn copy_short<T: Copy>(d: &mut [T], s: &[T]) {
    assert_eq!(d.len(), s.len());
    let mut dc = d.chunks_exact_mut(8);
    let mut sc = s.chunks_exact(8);
    for (a, b) in (&mut dc).zip(&mut sc) {
        let b: &[T; 8] = b.try_into().unwrap();
        let a: &mut [T; 8] = a.try_into().unwrap();
        *a = *b;
    }
    for (a, b) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *a = *b;
    }
}

/// `Σ xs` with eight independent partial sums (so the compiler can keep them
/// in vector registers), combined pairwise at the end.
#[inline]
pub(crate) fn sum<T: ConvFloat>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let mut tail = T::ZERO;
    for v in it.remainder() {
        tail += *v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Adds every entry of `cols` (`col_rows() x out_pixels()`) onto the pixel
/// of `dx` (`c·h·w`) that [`im2col`] read it from; entries that came from the
/// padding are dropped.
pub(crate) fn col2im_add<T: ConvFloat>(cols: &[T], g: &Geom, dx: &mut [T]) {
    let (p, ow) = (g.out_pixels(), g.ow);
    debug_assert_eq!(dx.len(), g.c * g.h * g.w);
    debug_assert_eq!(cols.len(), g.col_rows() * p);
    let mut row = 0;
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            let yoff = (i * g.dil) as isize - g.pad as isize;
            let (oy_lo, oy_hi) = Geom::valid(yoff, g.stride, g.h, g.oh);
            for j in 0..g.kw {
                let xoff = (j * g.dil) as isize - g.pad as isize;
                let (ox_lo, ox_hi) = Geom::valid(xoff, g.stride, g.w, g.ow);
                let src = &cols[row * p..(row + 1) * p];
                if g.stride == 1 && ox_lo == 0 && ox_hi == ow && oy_lo < oy_hi {
                    // The interior case of `im2col`, in reverse.
                    let (iy0, first) = ((oy_lo as isize + yoff) as usize, xoff as usize);
                    let rows = oy_hi - oy_lo;
                    assert!((iy0 + rows - 1) * g.w + first + ow <= plane.len());
                    let src = &src[oy_lo * ow..oy_hi * ow];
                    // SAFETY: the last run written ends inside `plane`
                    // (checked above) and `src` holds exactly `rows` runs.
                    unsafe {
                        let mut d = plane.as_mut_ptr().add(iy0 * g.w + first);
                        let mut s = src.as_ptr();
                        for _ in 0..rows {
                            add_run(d, s, ow);
                            d = d.add(g.w);
                            s = s.add(ow);
                        }
                    }
                    row += 1;
                    continue;
                }
                if ox_lo < ox_hi {
                    let first = ((ox_lo * g.stride) as isize + xoff) as usize;
                    for oy in oy_lo..oy_hi {
                        let iy = ((oy * g.stride) as isize + yoff) as usize;
                        let d = &mut plane[iy * g.w..(iy + 1) * g.w];
                        let s = &src[oy * ow + ox_lo..oy * ow + ox_hi];
                        if g.stride == 1 {
                            for (a, b) in d[first..first + s.len()].iter_mut().zip(s) {
                                *a += *b;
                            }
                        } else {
                            for (k, b) in s.iter().enumerate() {
                                d[first + k * g.stride] += *b;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(c: usize, h: usize, w: usize, k: (usize, usize), s: usize, p: usize, d: usize) -> Geom {
        let oh = (h + 2 * p - d * (k.0 - 1) - 1) / s + 1;
        let ow = (w + 2 * p - d * (k.1 - 1) - 1) / s + 1;
        Geom {
            c,
            h,
            w,
            kh: k.0,
            kw: k.1,
            stride: s,
            pad: p,
            dil: d,
            oh,
            ow,
        }
    }

    /// The definition, element by element.
    fn naive(x: &[f64], g: &Geom) -> Vec<f64> {
        let mut cols = vec![f64::NAN; g.col_rows() * g.out_pixels()];
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = (c * g.kh + i) * g.kw + j;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.stride + i * g.dil) as isize - g.pad as isize;
                            let ix = (ox * g.stride + j * g.dil) as isize - g.pad as isize;
                            let inside =
                                iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w;
                            cols[row * g.out_pixels() + oy * g.ow + ox] = if inside {
                                x[(c * g.h + iy as usize) * g.w + ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn im2col_and_col2im_match_the_definition() {
        for &(c, h, w, k, s, p, d) in &[
            (1, 5, 5, (3, 3), 1, 0, 1),
            (2, 6, 7, (3, 2), 2, 1, 1),
            (3, 7, 5, (2, 3), 1, 2, 2),
            (2, 4, 4, (3, 3), 3, 2, 1),
            (1, 3, 3, (3, 3), 1, 0, 1),
            (2, 9, 8, (2, 2), 2, 0, 3),
        ] {
            let g = geom(c, h, w, k, s, p, d);
            let x: Vec<f64> = (0..c * h * w).map(|i| i as f64 + 1.0).collect();
            let want = naive(&x, &g);
            let mut cols = vec![f64::NAN; want.len()];
            im2col(&x, &g, &mut cols);
            assert_eq!(cols, want, "{g:?}");
            // col2im is im2col's adjoint: <im2col(x), y> = <x, col2im(y)>.
            let y: Vec<f64> = (0..want.len()).map(|i| (i % 7) as f64 - 3.0).collect();
            let mut dx = vec![0f64; x.len()];
            col2im_add(&y, &g, &mut dx);
            let lhs: f64 = cols.iter().zip(&y).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert_eq!(lhs, rhs, "{g:?}");
        }
    }
}
