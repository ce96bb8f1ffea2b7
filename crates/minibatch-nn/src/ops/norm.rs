//! Layer and RMS normalisation over the last dimension, with fused backward
//! passes.
//!
//! Each row `x` of `n` elements becomes `y = x̂ ⊙ α (+ β)` with
//!
//! * layer norm: `μ = Σx / n`, `σ² = Σ(x − μ)² / n`, `x̂ = (x − μ) · r`;
//! * RMS norm: `μ = 0`, `σ² = Σx² / n`, `x̂ = x · r`;
//!
//! and `r = 1 / √(σ² + ε)`. The backward pass, with `g = dy ⊙ α`:
//!
//! * `dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))` (RMS norm: without `mean(g)`);
//! * `dα = Σ_rows dy ⊙ x̂`, `dβ = Σ_rows dy`.
//!
//! On the CPU (`f32`, `f64`) the forward pass is one candle custom op that
//! reads each row once (it stays in L1 for its second pass), writes `y`, and
//! keeps `μ` and `r` of every row for the backward pass; that pass reads
//! `x` and `dy` once and writes `dx`, with `dα` and `dβ` summed over fixed
//! blocks of rows (so the result does not depend on the thread count), and
//! computes only the gradients of the inputs that track one. The variance
//! is the two-pass `Σ(x − μ)²/n`, as in PyTorch and candle's tensor-op
//! formula; candle-nn's fused CPU op uses the one-pass `Σx²/n − μ²`, so
//! outputs agree with it to a few ulp rather than bit for bit (and stay
//! accurate for rows with a large mean). Other devices and dtypes (and the
//! CPU after [`set_tensor_path(true)`](crate::set_tensor_path)) run
//! candle-nn's formula as tensor ops, differentiated by candle's autograd.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::rows::{row_blocks, slice, tensor, with_slices};
use super::simd::{dot, simd_dispatch, sum_16_pairwise, LANES};
use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::float::Float;

/// Layer normalisation over the last dimension with weight `alpha` and bias
/// `beta` (both of shape `(n,)`): candle-nn's `ops::layer_norm`, whose fused
/// CPU op has no backward pass. This one has (see the [module docs](self)
/// for the maths).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Var::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?;
/// let (w, b) = (Var::new(&[1f32, 1., 1.], &dev)?, Var::new(&[0f32, 0., 0.], &dev)?);
/// let y = minibatch_nn::ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
/// let row: Vec<f32> = y.get(0)?.to_vec1()?;
/// assert!((row[0] + 1.2247).abs() < 1e-4 && row[1].abs() < 1e-6);
/// let grads = (y * Tensor::new(&[[1f32, 0., 0.], [0., 0., 2.]], &dev)?)?
///     .sum_all()?
///     .backward()?;
/// // Every input gets its gradient (candle-nn's op would give none).
/// assert!(grads.get(x.as_tensor()).is_some());
/// assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?, [1., 0., 2.]);
/// # Ok(()) }
/// ```
pub fn layer_norm(xs: &Tensor, alpha: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    normalize(xs, alpha, Some(beta), eps as f64, true)
}

/// RMS normalisation over the last dimension with weight `alpha` (shape
/// `(n,)`): `y = x / √(mean(x²) + ε) ⊙ α`, candle-nn's `ops::rms_norm`, whose
/// fused CPU op has no backward pass (and no `f64` kernel). This one has both.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[[3f64, 4.]], &Device::Cpu)?;
/// let w = Tensor::new(&[1f64, 2.], &Device::Cpu)?;
/// let y = minibatch_nn::ops::rms_norm(&x, &w, 0.0)?;
/// let rms = 12.5f64.sqrt();
/// assert_eq!(y.to_vec2::<f64>()?, [[3. / rms, 8. / rms]]);
/// # Ok(()) }
/// ```
pub fn rms_norm(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    normalize(xs, alpha, None, eps as f64, false)
}

/// The normalisation behind the functional ops and the layers: over the last
/// dimension of `x`, removing the mean or not, `y = x̂ ⊙ alpha (+ beta)`.
pub(crate) fn normalize(
    x: &Tensor,
    alpha: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
    remove_mean: bool,
) -> Result<Tensor> {
    let what = if remove_mean {
        "layer-norm"
    } else {
        "rms-norm"
    };
    let n = x.dim(D::Minus1)?;
    let fits = |t: &Tensor| t.dims() == [n];
    if !fits(alpha) || !beta.is_none_or(fits) {
        let beta = beta
            .map(|b| format!(" beta: {:?}", b.shape()))
            .unwrap_or_default();
        return Err(NnError::ShapeMismatch(format!(
            "{what}: x: {:?} alpha: {:?}{beta} (alpha and beta must be ({n},), the last dimension of x)",
            x.shape(),
            alpha.shape()
        ))
        .into());
    }
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if cpu_kernel(x)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && same(alpha)
        && beta.is_none_or(same)
    {
        let x = x.contiguous()?;
        let alpha = alpha.contiguous()?;
        let op = Norm {
            eps,
            remove_mean,
            stats: OnceLock::new(),
        };
        return match beta {
            Some(beta) => x.apply_op3(&alpha, &beta.contiguous()?, op),
            None => x.apply_op2(&alpha, op),
        };
    }
    // candle-nn's formula (its `LayerNorm::forward` without the fused op).
    let x_dtype = x.dtype();
    let internal = match x_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x = x.to_dtype(internal)?;
    let x = if remove_mean {
        let mean = (x.sum_keepdim(D::Minus1)? / n as f64)?;
        x.broadcast_sub(&mean)?
    } else {
        x
    };
    let norm_x = (x.sqr()?.sum_keepdim(D::Minus1)? / n as f64)?;
    let x_normed = x.broadcast_div(&(norm_x + eps)?.sqrt()?)?;
    let y = x_normed.to_dtype(x_dtype)?.broadcast_mul(alpha)?;
    match beta {
        Some(beta) => y.broadcast_add(beta),
        None => Ok(y),
    }
}

/// Per-row statistics the forward pass keeps for the backward pass:
/// `[μ, r]` for each row (layer norm) or `[r]` (RMS norm).
enum Stats {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

trait StatsOf: Float {
    fn wrap(v: Vec<Self>) -> Stats;
    fn get(s: &Stats) -> Option<&[Self]>;
}
impl StatsOf for f32 {
    fn wrap(v: Vec<Self>) -> Stats {
        Stats::F32(v)
    }
    fn get(s: &Stats) -> Option<&[Self]> {
        match s {
            Stats::F32(v) => Some(v),
            Stats::F64(_) => None,
        }
    }
}
impl StatsOf for f64 {
    fn wrap(v: Vec<Self>) -> Stats {
        Stats::F64(v)
    }
    fn get(s: &Stats) -> Option<&[Self]> {
        match s {
            Stats::F64(v) => Some(v),
            Stats::F32(_) => None,
        }
    }
}

/// The fused CPU op over `(x, alpha)` or `(x, alpha, beta)`; one instance per
/// forward pass, holding that pass's row statistics.
struct Norm {
    eps: f64,
    remove_mean: bool,
    stats: OnceLock<Stats>,
}

impl Norm {
    fn name(&self) -> &'static str {
        if self.remove_mean {
            "minibatch-layer-norm"
        } else {
            "minibatch-rms-norm"
        }
    }

    /// Values kept per row: `[μ, r]` or `[r]`.
    fn per_row(&self) -> usize {
        if self.remove_mean {
            2
        } else {
            1
        }
    }

    fn forward<T: StatsOf>(&self, x: &[T], alpha: &[T], beta: &[T], n: usize) -> Vec<T> {
        let mut y = vec![T::ZERO; x.len()];
        let rows = x.len().checked_div(n).unwrap_or(0);
        let k = self.per_row();
        let mut stats = vec![T::ZERO; rows * k];
        let (eps, rm) = (T::from_f64(self.eps), self.remove_mean);
        row_blocks(
            rows,
            n,
            [(&mut y, n), (&mut stats, k)],
            0,
            |r, [y, st], _| {
                let x = &x[r.start * n..r.end * n];
                norm_rows::<T>(x, alpha, beta, y, st, n, eps, rm)
            },
        );
        // A fresh op per forward pass: the cell is empty.
        let _ = self.stats.set(T::wrap(stats));
        y
    }

    fn cpu<T: StatsOf>(
        &self,
        s: [(&CpuStorage, &Layout); 3],
        has_beta: bool,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let x = slice::<T>(s[0].0, s[0].1, name)?;
        let alpha = slice::<T>(s[1].0, s[1].1, name)?;
        let beta = if has_beta {
            slice::<T>(s[2].0, s[2].1, name)?
        } else {
            &[]
        };
        let shape = s[0].1.shape();
        let n = shape.dims().last().copied().unwrap_or(1);
        if alpha.len() != n || (has_beta && beta.len() != n) {
            candle_core::bail!("{name}: alpha/beta do not match the last dimension {n}");
        }
        let y = self.forward(x, alpha, beta, n);
        Ok((T::to_cpu_storage_owned(y), shape.clone()))
    }

    fn fwd(&self, s: [(&CpuStorage, &Layout); 3], has_beta: bool) -> Result<(CpuStorage, Shape)> {
        match s[0].0 {
            CpuStorage::F32(_) => self.cpu::<f32>(s, has_beta),
            CpuStorage::F64(_) => self.cpu::<f64>(s, has_beta),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        }
    }

    /// `(dx, dalpha, dbeta)`, each only where its input tracks a gradient.
    fn grads<T: StatsOf>(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        beta: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let stats =
            self.stats.get().and_then(T::get).ok_or_else(|| {
                candle_core::Error::Msg(format!("{name}: backward before forward"))
            })?;
        let n = alpha.elem_count();
        let rows = x.elem_count().checked_div(n).unwrap_or(0);
        let need_dx = x.track_op();
        let need_da = alpha.track_op();
        let need_db = beta.is_some_and(Tensor::track_op);
        // Partial column sums: [dα | dβ].
        let m = match (need_da || need_db, beta.is_some()) {
            (false, _) => 0,
            (true, false) => n,
            (true, true) => 2 * n,
        };
        let (rm, k) = (self.remove_mean, self.per_row());
        let (dx, sums) = with_slices::<T, _>(&[x, grad, alpha], name, |s| {
            let (x, dy, alpha) = (s[0], s[1], s[2]);
            let mut dx = if need_dx {
                vec![T::ZERO; x.len()]
            } else {
                Vec::new()
            };
            let width = if need_dx { n } else { 0 };
            let sums = row_blocks(rows, n, [(&mut dx, width)], m, |r, [dx], partial| {
                let span = r.start * n..r.end * n;
                let st = &stats[r.start * k..r.end * k];
                norm_rows_bwd::<T>(&x[span.clone()], &dy[span], alpha, st, dx, partial, n, rm)
            });
            Ok((dx, sums))
        })?;
        let shape = x.shape().clone();
        let dx = if need_dx {
            Some(tensor(dx, shape)?)
        } else {
            None
        };
        let (da, db) = if m == 0 {
            (None, None)
        } else {
            let mut sums = sums;
            let db = sums.split_off(n);
            let da = need_da.then(|| tensor(sums, n)).transpose()?;
            let db = need_db.then(|| tensor(db, n)).transpose()?;
            (da, db)
        };
        Ok((dx, da, db))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        beta: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.grads::<f32>(x, alpha, beta, grad),
            DType::F64 => self.grads::<f64>(x, alpha, beta, grad),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        Norm::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd([(s1, l1), (s2, l2), (s2, l2)], false)
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, da, _) = Norm::bwd(self, x, alpha, None, grad)?;
        Ok((dx, da))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        Norm::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd([(s1, l1), (s2, l2), (s3, l3)], true)
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Norm::bwd(self, x, alpha, Some(beta), grad)
    }
}

simd_dispatch!(
    #[allow(clippy::too_many_arguments)]
    fn norm_rows(x: &[T], alpha: &[T], beta: &[T], y: &mut [T], stats: &mut [T], n: usize, eps: T, remove_mean: bool)
        => norm_rows_body
);
simd_dispatch!(
    #[allow(clippy::too_many_arguments)]
    fn norm_rows_bwd(x: &[T], dy: &[T], alpha: &[T], stats: &[T], dx: &mut [T], partial: &mut [T], n: usize, remove_mean: bool)
        => norm_rows_bwd_body
);

/// `Σ (x − μ)²` with lane-parallel partial sums.
#[inline(always)]
fn sum_sq_dev<T: Float>(x: &[T], mu: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - mu;
            acc[i] += d * d;
        }
    }
    let rest = chunks.remainder().iter().map(|v| (*v - mu) * (*v - mu));
    super::simd::fold(acc, rest)
}

/// Forward over whole rows: `y`, and `[μ, r]` (or `[r]`) per row in `stats`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn norm_rows_body<T: Float>(
    x: &[T],
    alpha: &[T],
    beta: &[T],
    y: &mut [T],
    stats: &mut [T],
    n: usize,
    eps: T,
    remove_mean: bool,
) {
    let nf = T::from_usize(n);
    let k = if remove_mean { 2 } else { 1 };
    let rows = x.chunks_exact(n).zip(y.chunks_exact_mut(n));
    for ((x, y), st) in rows.zip(stats.chunks_exact_mut(k)) {
        let (mu, var) = if remove_mean {
            let mu = sum_16_pairwise(x) / nf;
            (mu, sum_sq_dev(x, mu) / nf)
        } else {
            (T::ZERO, dot(x, x) / nf)
        };
        let r = T::ONE / (var + eps).sqrt();
        if beta.is_empty() {
            for ((y, x), a) in y.iter_mut().zip(x).zip(alpha) {
                *y = (*x - mu) * r * *a;
            }
        } else {
            for (((y, x), a), b) in y.iter_mut().zip(x).zip(alpha).zip(beta) {
                *y = (*x - mu) * r * *a + *b;
            }
        }
        if remove_mean {
            st[0] = mu;
            st[1] = r;
        } else {
            st[0] = r;
        }
    }
}

/// Backward over whole rows: `dx` (when not empty) and the column sums
/// `dα` (`partial[..n]`) and `dβ` (`partial[n..]`) when `partial` is not empty.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn norm_rows_bwd_body<T: Float>(
    x: &[T],
    dy: &[T],
    alpha: &[T],
    stats: &[T],
    dx: &mut [T],
    partial: &mut [T],
    n: usize,
    remove_mean: bool,
) {
    let nf = T::from_usize(n);
    let k = if remove_mean { 2 } else { 1 };
    let (da, db) = partial.split_at_mut(partial.len().min(n));
    for (row, ((x, dy), st)) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(stats.chunks_exact(k))
        .enumerate()
    {
        let (mu, r) = if remove_mean {
            (st[0], st[1])
        } else {
            (T::ZERO, st[0])
        };
        if !da.is_empty() {
            for ((da, x), dy) in da.iter_mut().zip(x).zip(dy) {
                *da += *dy * ((*x - mu) * r);
            }
        }
        if !db.is_empty() {
            for (db, dy) in db.iter_mut().zip(dy) {
                *db += *dy;
            }
        }
        if dx.is_empty() {
            continue;
        }
        // mean(g ⊙ x̂) and mean(g), g = dy ⊙ α.
        let mut acc_gx = [T::ZERO; LANES];
        let mut acc_g = [T::ZERO; LANES];
        let (mut xc, mut gc, mut ac) = (
            x.chunks_exact(LANES),
            dy.chunks_exact(LANES),
            alpha.chunks_exact(LANES),
        );
        for ((x, dy), a) in (&mut xc).zip(&mut gc).zip(&mut ac) {
            for i in 0..LANES {
                let g = dy[i] * a[i];
                acc_gx[i] += g * ((x[i] - mu) * r);
                acc_g[i] += g;
            }
        }
        let (mut tail_gx, mut tail_g) = (T::ZERO, T::ZERO);
        for ((x, dy), a) in xc
            .remainder()
            .iter()
            .zip(gc.remainder())
            .zip(ac.remainder())
        {
            let g = *dy * *a;
            tail_gx += g * ((*x - mu) * r);
            tail_g += g;
        }
        let mean_gx = super::simd::fold(acc_gx, std::iter::once(tail_gx)) / nf;
        let mean_g = if remove_mean {
            super::simd::fold(acc_g, std::iter::once(tail_g)) / nf
        } else {
            T::ZERO
        };
        let dx = &mut dx[row * n..(row + 1) * n];
        for (((dx, x), dy), a) in dx.iter_mut().zip(x).zip(dy).zip(alpha) {
            *dx = r * (*dy * *a - mean_g - (*x - mu) * r * mean_gx);
        }
    }
}
