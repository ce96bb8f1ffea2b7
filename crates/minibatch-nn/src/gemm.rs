//! Strided matrix products on host slices through the `gemm` crate (the
//! kernels candle's own CPU matmul runs), with bounds checked before the
//! unsafe call, so the fused CPU kernels of this crate can multiply straight
//! into preallocated buffers, accumulate (`C += A·B`) and read transposed
//! operands without copying them.

use gemm::Parallelism;

use crate::float::Float;
use crate::split::{assume_init, parts, run_parts, uninit};

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `(rows, cols)` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`) on one thread, `dst`
/// row-major `(a.rows, b.cols)` with row stride `dst_rs`: for kernels that
/// already split their work over threads (one product per image, say).
///
/// Panics if the shapes disagree or a view reaches past its slice: those are
/// bugs in this crate's kernels, never user input (callers check shapes and
/// return errors first).
pub(crate) fn matmul_seq<T: Float>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
) {
    matmul_with(dst, dst_rs, a, b, accumulate, Parallelism::None)
}

/// [`matmul_seq`] with the thread split given by the caller.
pub(crate) fn matmul_with<T: Float>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: operand view out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "gemm: destination too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::ZERO);
            }
        }
        return;
    }
    // SAFETY: every index the kernel touches was bounds-checked above
    // (strides are non-negative, so the largest offsets are the last row/col).
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, a, b, accumulate, par) }
}

/// The `gemm` crate's kernel, `dst (row stride dst_rs) = a · b` (`+=` with
/// `accumulate`), with this crate's conventions (α = β = 1, no conjugation).
///
/// # Safety
/// `a` and `b` fit their slices and agree on `k`, `dst` points at a buffer
/// with room for `(a.rows - 1) * dst_rs + b.cols` elements, and with
/// `accumulate` those elements are initialised.
unsafe fn gemm_raw<T: Float>(
    dst: *mut T,
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    par: Parallelism,
) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        par,
    )
}

/// `a · b` in a new row-major `(a.rows, b.cols)` buffer, written by the
/// kernel without zero-filling it first (one pass less than allocating
/// zeros and multiplying into them).
///
/// Products worth it are split by blocks of output rows over candle's own CPU
/// thread pool (each block one single-threaded gemm), the pool that candle's
/// element-wise ops and this crate's other kernels use: a second pool
/// (rayon's, which the `gemm` crate would use) would compete with candle's
/// spinning workers for the cores, which made small products slower.
pub(crate) fn matmul_new<T: Float>(a: Mat<T>, b: Mat<T>) -> Vec<T> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: operand view out of bounds");
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![T::ZERO; len];
    }
    let mut out = uninit::<T>(len);
    let per = m.div_ceil(parts(m, (m * n * k) >> 2)).max(1);
    run_parts(out.chunks_mut(per * n).collect(), |part, rows| {
        let r0 = part * per;
        let block = Mat {
            data: &a.data[r0 * a.rs..],
            rows: rows.len() / n,
            ..a
        };
        // SAFETY: `block` is rows r0.. of `a`, inside its (checked) view;
        // `rows` has room for `block.rows * n` elements. With `read_dst =
        // false` the kernel writes every element of the destination before
        // it reads any (it accumulates over k-blocks into what it wrote).
        unsafe {
            gemm_raw(
                rows.as_mut_ptr() as *mut T,
                n,
                block,
                b,
                false,
                Parallelism::None,
            )
        }
    });
    // SAFETY: every block of rows was written by its product above.
    unsafe { assume_init(out) }
}

/// `dst += a · b`, `dst` row-major `(a.rows, b.cols)`, split by blocks of
/// rows over candle's CPU pool as [`matmul_new`] splits. Each element gets
/// `dst + Σ` (the kernel's `1 · Σ + dst` fused multiply-add, exact for the
/// factor 1), the bits of computing the product apart and adding it.
pub(crate) fn matmul_add<T: Float>(dst: &mut [T], a: Mat<T>, b: Mat<T>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: operand view out of bounds");
    assert_eq!(dst.len(), m * n, "gemm: destination size");
    if k == 0 || m == 0 || n == 0 {
        return;
    }
    let per = m.div_ceil(parts(m, (m * n * k) >> 2)).max(1);
    run_parts(dst.chunks_mut(per * n).collect(), |part, rows| {
        let block = Mat {
            data: &a.data[part * per * a.rs..],
            rows: rows.len() / n,
            ..a
        };
        matmul_seq(rows, n, block, b, true);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_transposed_and_accumulated_products() {
        // a: 2x3, b: 3x2
        let a = [1f64, 2., 3., 4., 5., 6.];
        let b = [1f64, 0., 0., 1., 1., 1.];
        let mut c = [0f64; 4];
        matmul_seq(
            &mut c,
            2,
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&b, 3, 2),
            false,
        );
        assert_eq!(c, [4., 5., 10., 11.]);
        matmul_seq(
            &mut c,
            2,
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&b, 3, 2),
            true,
        );
        assert_eq!(c, [8., 10., 20., 22.]);
        // aᵀ·a: 3x3
        let mut d = [0f64; 9];
        let av = Mat::row_major(&a, 2, 3);
        matmul_seq(&mut d, 3, av.t(), av, false);
        assert_eq!(d, [17., 22., 27., 22., 29., 36., 27., 36., 45.]);
        assert_eq!(matmul_new(av.t(), av), d.to_vec());
        let empty: [f64; 0] = [];
        let (e1, e2) = (Mat::row_major(&empty, 3, 0), Mat::row_major(&empty, 0, 3));
        assert_eq!(matmul_new(e1, e2), vec![0.; 9]);
    }
}
