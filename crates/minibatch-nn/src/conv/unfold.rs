//! Unfolding one image into the columns of a convolution (`im2col`) and
//! folding columns back onto the image (`col2im`), with the geometry
//! ([`Geom`]) of a 2-D convolution.
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

use crate::float::Float;

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
pub(crate) fn im2col<T: Float>(x: &[T], g: &Geom, cols: &mut [T]) {
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
unsafe fn add_run<T: Float>(d: *mut T, s: *const T, n: usize) {
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

/// Adds every entry of `cols` (`col_rows() x out_pixels()`) onto the pixel
/// of `dx` (`c·h·w`) that [`im2col`] read it from; entries that came from the
/// padding are dropped.
pub(crate) fn col2im_add<T: Float>(cols: &[T], g: &Geom, dx: &mut [T]) {
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
