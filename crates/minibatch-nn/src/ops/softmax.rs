//! Softmax and log-softmax along any dimension, with fused backward passes.
//!
//! With `x` viewed as `(outer, n, inner)` around the reduced dimension of
//! size `n`:
//!
//! * softmax: `y = e^(x - m) / Σ e^(x - m)` with `m = max x` (the shift only
//!   guards against overflow); backward `dx = y ⊙ (dy − Σ dy ⊙ y)`;
//! * log-softmax: `y = (x - m) − ln Σ e^(x - m)`; backward
//!   `dx = dy − e^y · Σ dy`.
//!
//! On the CPU (`f32`, `f64`) each is one candle custom op: the forward pass
//! reads `x` once and writes `y` once (a row stays in L1 between its passes);
//! the backward pass reads `y` and `dy` once and writes `dx`. Rows run in
//! parallel on candle's CPU pool when the tensor is large. `f32`'s exponential is
//! [a vectorised polynomial](crate::float::exp_f32) within 2 ulp of `expf`,
//! so outputs equal candle-nn's to within a few ulp rather than bit for bit.
//! Other devices and dtypes (and the CPU after
//! [`set_tensor_path(true)`](crate::set_tensor_path)) run the same formula as
//! candle tensor ops, differentiated by candle's autograd.

use candle_core::backend::BackendStorage as _;
use candle_core::shape::Dim;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::rows::{row_blocks, slice, tensor, with_slices};
use super::simd::{dot, max, simd_dispatch, sum_16_pairwise, LANES};
use crate::dispatch::cpu_kernel;
use crate::float::Float;

/// Softmax over the last dimension: `softmax(xs, D::Minus1)`, the name and
/// signature of `candle_nn::ops::softmax_last_dim`, whose CPU op has no
/// backward pass. This one has.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[[0f32, 1., 0., 1.], [-2., 2., 3., -3.]], &Device::Cpu)?;
/// let y = minibatch_nn::ops::softmax_last_dim(x.as_tensor())?;
/// let rows: Vec<f32> = y.sum(1)?.to_vec1()?;
/// assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-6));
/// // The gradient reaches x (candle-nn's op would leave it out).
/// let w = Tensor::new(&[[1f32, 0., 0., 0.], [0., 0., 1., 0.]], &Device::Cpu)?;
/// let grads = (y * w)?.sum_all()?.backward()?;
/// assert!(grads.get(x.as_tensor()).is_some());
/// # Ok(()) }
/// ```
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    softmax(xs, candle_core::D::Minus1)
}

/// Softmax along `dim`: `y_i = e^(x_i − m) / Σ_j e^(x_j − m)`, `m = max_j x_j`
/// (candle-nn's `ops::softmax`). Backward: `dx = y ⊙ (dy − Σ dy ⊙ y)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[[1f64, 2.], [3., 4.]], &Device::Cpu)?;
/// let y = minibatch_nn::ops::softmax(&x, 0)?;
/// let e = 1.0 / (1.0 + 2f64.exp());
/// assert!((y.to_vec2::<f64>()?[0][0] - e).abs() < 1e-15);
/// # Ok(()) }
/// ```
pub fn softmax<D: Dim>(xs: &Tensor, dim: D) -> Result<Tensor> {
    let dim = dim.to_index(xs.shape(), "softmax")?;
    if fused(xs) {
        return xs.contiguous()?.apply_op1(Softmax { dim, log: false });
    }
    // candle-nn's formula; the shift is detached (the result does not depend
    // on it, so its exact gradient is zero).
    let max = xs.max_keepdim(dim)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(dim)?;
    num.broadcast_div(&den)
}

/// Log-softmax along `d`: `y_i = (x_i − m) − ln Σ_j e^(x_j − m)` (candle-nn's
/// `ops::log_softmax`). Backward: `dx = dy − e^y · Σ dy`.
///
/// ```
/// use candle_core::{Device, Tensor, D};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[0f32, 0., 0., 0.], &Device::Cpu)?;
/// let y = minibatch_nn::ops::log_softmax(&x, D::Minus1)?;
/// assert!(y.to_vec1::<f32>()?.iter().all(|v| (v + 4f32.ln()).abs() < 1e-6));
/// # Ok(()) }
/// ```
pub fn log_softmax<D: Dim>(xs: &Tensor, d: D) -> Result<Tensor> {
    let dim = d.to_index(xs.shape(), "log-softmax")?;
    if fused(xs) {
        return xs.contiguous()?.apply_op1(Softmax { dim, log: true });
    }
    let max = xs.max_keepdim(dim)?.detach();
    let diff = xs.broadcast_sub(&max)?;
    let sum_exp = diff.exp()?.sum_keepdim(dim)?;
    diff.broadcast_sub(&sum_exp.log()?)
}

fn fused(xs: &Tensor) -> bool {
    cpu_kernel(xs) && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// The fused CPU op: `dim` is reduced, `log` picks log-softmax.
struct Softmax {
    dim: usize,
    log: bool,
}

/// `(outer, n, inner)` of `shape` around `dim`.
fn split(shape: &Shape, dim: usize) -> (usize, usize, usize) {
    let dims = shape.dims();
    let outer = dims[..dim].iter().product();
    let inner = dims[dim + 1..].iter().product();
    (outer, dims[dim], inner)
}

impl Softmax {
    fn forward<T: Float>(&self, x: &[T], shape: &Shape) -> Vec<T> {
        let (outer, n, inner) = split(shape, self.dim);
        let mut y = vec![T::ZERO; x.len()];
        let log = self.log;
        if y.is_empty() {
            return y;
        }
        if inner == 1 {
            row_blocks(outer, n, [(&mut y, n)], 0, |rows, [y], _| {
                let x = &x[rows.start * n..rows.end * n];
                if log {
                    log_softmax_rows::<T>(x, y, n)
                } else {
                    softmax_rows::<T>(x, y, n)
                }
            });
        } else {
            let block = n * inner;
            row_blocks(outer, block, [(&mut y, block)], 0, |rows, [y], _| {
                let x = &x[rows.start * block..rows.end * block];
                softmax_cols::<T>(x, y, n, inner, log)
            });
        }
        y
    }

    fn backward<T: Float>(&self, y: &[T], dy: &[T], shape: &Shape) -> Vec<T> {
        let (outer, n, inner) = split(shape, self.dim);
        let mut dx = vec![T::ZERO; y.len()];
        let log = self.log;
        if dx.is_empty() {
            return dx;
        }
        let block = n * inner;
        row_blocks(outer, block, [(&mut dx, block)], 0, |rows, [dx], _| {
            let r = rows.start * block..rows.end * block;
            let (y, dy) = (&y[r.clone()], &dy[r]);
            match (inner, log) {
                (1, false) => softmax_rows_bwd::<T>(y, dy, dx, n),
                (1, true) => log_softmax_rows_bwd::<T>(y, dy, dx, n),
                _ => softmax_cols_bwd::<T>(y, dy, dx, n, inner, log),
            }
        });
        dx
    }

    fn cpu<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(s, l, self.name())?;
        let y = self.forward(x, l.shape());
        Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
    }

    fn grad<T: Float>(&self, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let dx = with_slices::<T, _>(&[res, grad], self.name(), |s| {
            Ok(self.backward(s[0], s[1], res.shape()))
        })?;
        tensor(dx, res.shape().clone())
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.log {
            "minibatch-log-softmax"
        } else {
            "minibatch-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.cpu::<f32>(s, l),
            CpuStorage::F64(_) => self.cpu::<f64>(s, l),
            _ => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        }
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = match res.dtype() {
            DType::F32 => self.grad::<f32>(res, grad)?,
            DType::F64 => self.grad::<f64>(res, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok(Some(dx))
    }
}

simd_dispatch!(fn softmax_rows(x: &[T], y: &mut [T], n: usize) => softmax_rows_body);
simd_dispatch!(fn log_softmax_rows(x: &[T], y: &mut [T], n: usize) => log_softmax_rows_body);
simd_dispatch!(fn softmax_rows_bwd(y: &[T], dy: &[T], dx: &mut [T], n: usize) => softmax_rows_bwd_body);
simd_dispatch!(fn log_softmax_rows_bwd(y: &[T], dy: &[T], dx: &mut [T], n: usize) => log_softmax_rows_bwd_body);
simd_dispatch!(fn softmax_cols(x: &[T], y: &mut [T], n: usize, inner: usize, log: bool) => softmax_cols_body);
simd_dispatch!(fn softmax_cols_bwd(y: &[T], dy: &[T], dx: &mut [T], n: usize, inner: usize, log: bool) => softmax_cols_bwd_body);

/// `y = e^(x − m)` written to `y`, returning `Σ y` (lane-parallel).
#[inline(always)]
fn exp_shifted<T: Float>(x: &[T], y: &mut [T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut yc = y.chunks_exact_mut(LANES);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for i in 0..LANES {
            let e = (xs[i] - m).exp_fast();
            ys[i] = e;
            acc[i] += e;
        }
    }
    let mut tail = T::ZERO;
    for (x, y) in xc.remainder().iter().zip(yc.into_remainder()) {
        *y = (*x - m).exp_fast();
        tail += *y;
    }
    super::simd::fold(acc, std::iter::once(tail))
}

#[inline(always)]
fn softmax_rows_body<T: Float>(x: &[T], y: &mut [T], n: usize) {
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let m = max(x);
        let s = exp_shifted(x, y, m);
        let inv = T::ONE / s;
        for v in y.iter_mut() {
            *v *= inv;
        }
    }
}

#[inline(always)]
fn log_softmax_rows_body<T: Float>(x: &[T], y: &mut [T], n: usize) {
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let m = max(x);
        let lse = exp_shifted(x, y, m).ln();
        for (y, x) in y.iter_mut().zip(x) {
            *y = (*x - m) - lse;
        }
    }
}

#[inline(always)]
fn softmax_rows_bwd_body<T: Float>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    let rows = y.chunks_exact(n).zip(dy.chunks_exact(n));
    for ((y, dy), dx) in rows.zip(dx.chunks_exact_mut(n)) {
        let s = dot(dy, y);
        for ((dx, y), dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = *y * (*dy - s);
        }
    }
}

#[inline(always)]
fn log_softmax_rows_bwd_body<T: Float>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    let rows = y.chunks_exact(n).zip(dy.chunks_exact(n));
    for ((y, dy), dx) in rows.zip(dx.chunks_exact_mut(n)) {
        let s = sum_16_pairwise(dy);
        for ((dx, y), dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = *dy - y.exp_fast() * s;
        }
    }
}

/// The reduced dimension is not the last: each block is an `(n, inner)`
/// matrix reduced over its rows, vectorised along `inner`.
#[inline(always)]
fn softmax_cols_body<T: Float>(x: &[T], y: &mut [T], n: usize, inner: usize, log: bool) {
    let mut m = vec![T::NEG_INFINITY; inner];
    let mut s = vec![T::ZERO; inner];
    for (x, y) in x.chunks_exact(n * inner).zip(y.chunks_exact_mut(n * inner)) {
        m.fill(T::NEG_INFINITY);
        s.fill(T::ZERO);
        for xr in x.chunks_exact(inner) {
            for (m, v) in m.iter_mut().zip(xr) {
                *m = if *v > *m { *v } else { *m };
            }
        }
        for (xr, yr) in x.chunks_exact(inner).zip(y.chunks_exact_mut(inner)) {
            for (((y, x), m), s) in yr.iter_mut().zip(xr).zip(&m).zip(s.iter_mut()) {
                *y = (*x - *m).exp_fast();
                *s += *y;
            }
        }
        if log {
            for v in s.iter_mut() {
                *v = v.ln();
            }
            for (xr, yr) in x.chunks_exact(inner).zip(y.chunks_exact_mut(inner)) {
                for (((y, x), m), lse) in yr.iter_mut().zip(xr).zip(&m).zip(&s) {
                    *y = (*x - *m) - *lse;
                }
            }
        } else {
            for v in s.iter_mut() {
                *v = T::ONE / *v;
            }
            for yr in y.chunks_exact_mut(inner) {
                for (y, inv) in yr.iter_mut().zip(&s) {
                    *y *= *inv;
                }
            }
        }
    }
}

#[inline(always)]
fn softmax_cols_bwd_body<T: Float>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    n: usize,
    inner: usize,
    log: bool,
) {
    let mut s = vec![T::ZERO; inner];
    let blocks = y.chunks_exact(n * inner).zip(dy.chunks_exact(n * inner));
    for ((y, dy), dx) in blocks.zip(dx.chunks_exact_mut(n * inner)) {
        s.fill(T::ZERO);
        for (yr, gr) in y.chunks_exact(inner).zip(dy.chunks_exact(inner)) {
            for ((s, y), g) in s.iter_mut().zip(yr).zip(gr) {
                *s += if log { *g } else { *g * *y };
            }
        }
        let rows = y.chunks_exact(inner).zip(dy.chunks_exact(inner));
        for ((yr, gr), dr) in rows.zip(dx.chunks_exact_mut(inner)) {
            for (((d, y), g), s) in dr.iter_mut().zip(yr).zip(gr).zip(&s) {
                *d = if log {
                    *g - y.exp_fast() * *s
                } else {
                    *y * (*g - *s)
                };
            }
        }
    }
}
