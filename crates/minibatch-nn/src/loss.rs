//! Losses with `candle_nn::loss`'s signatures: [`cross_entropy`] (fused
//! log-softmax + negative log-likelihood), [`nll`] and [`mse`].
//!
//! All three reduce by the mean, as candle-nn's and PyTorch's defaults do.
//! Unlike candle-nn, class ids outside `0..classes` and an empty batch are
//! errors (candle-nn returns an index error on the CPU only, and `NaN` for an
//! empty batch).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use crate::cpu::{contiguous, with_cpu, ClassIds};
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::ids::{check_ids, check_index_dtype};
use crate::split::{assume_init, parts, run_parts, uninit};
use crate::NnError;

/// The cross-entropy loss of raw logits against class ids, averaged over the
/// batch: a drop-in for `candle_nn::loss::cross_entropy`
/// (and PyTorch's `F.cross_entropy` with the default mean reduction).
///
/// * `inp`: logits of shape `(batch, classes)`, `f32` or `f64` (any float
///   dtype on the tensor path);
/// * `target`: class ids of shape `(batch,)`, `u32`, `i64` or `u8`, each in
///   `0..classes`.
///
/// Logits of shape `(..., classes)` with targets of shape `(...)` are taken
/// too, every position one row: a language model's `(b, t, vocab)` logits
/// against its `(b, t)` next tokens give the mean over all `b · t`
/// positions, the same bits as flattening both to `(b · t, vocab)` and
/// `(b · t,)`, without the reshape node (on the CPU a zero-filled buffer and
/// an addition the size of the logits in the backward pass).
///
/// With `x` the logits of row `i`, `t` its class and `B` the batch size,
///
/// ```text
/// loss = -1/B Σᵢ log_softmax(xᵢ)[tᵢ],   log_softmax(x)ⱼ = xⱼ - m - log Σₖ exp(xₖ - m),  m = maxₖ xₖ
/// ∂loss/∂xᵢⱼ = (softmax(xᵢ)ⱼ - [j = tᵢ]) / B
/// ```
///
/// On the CPU (`f32`/`f64`) this is one fused op: a single pass over the
/// logits computes each row's maximum, log-sum-exp and picked log-probability
/// (no `(batch, classes)` intermediate tensors), keeps the two per-row
/// statistics for the backward pass, which writes `(softmax - onehot) · g / B`
/// in one more pass; large batches split their rows over candle's CPU
/// threads. The forward result is bit-identical to candle-nn's (the
/// same operations in the same order). On other devices, or after
/// [`set_tensor_path(true)`](crate::set_tensor_path), the same maths runs as
/// candle tensor ops.
///
/// Errors: `inp` of rank below 2, `target` not of `inp`'s leading shape
/// (rank 1 and the batch size for rank-2 logits), an empty batch or zero classes, non-integer ids, an id out of range.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let logits = Var::new(&[[2.0f32, 0.0, 0.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
/// let target = Tensor::new(&[0u32, 2], &Device::Cpu)?;
/// let loss = minibatch_nn::loss::cross_entropy(logits.as_tensor(), &target)?;
/// let want = candle_nn::loss::cross_entropy(logits.as_tensor(), &target)?;
/// assert_eq!(loss.to_scalar::<f32>()?, want.to_scalar::<f32>()?);
/// // d loss / d logits = (softmax - onehot) / batch
/// let g = loss.backward()?.get(logits.as_tensor()).unwrap().to_vec2::<f32>()?;
/// assert!((g[1][2] - (1.0 / 3.0 - 1.0) / 2.0).abs() < 1e-6);
/// // Out-of-range ids are an error, not a panic.
/// assert!(minibatch_nn::loss::cross_entropy(logits.as_tensor(), &Tensor::new(&[0u32, 3], &Device::Cpu)?).is_err());
/// # Ok(()) }
/// ```
pub fn cross_entropy(inp: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let fused = cpu_kernel(inp)
        && target.device().is_cpu()
        && matches!(inp.dtype(), DType::F32 | DType::F64);
    if inp.rank() > 2 {
        // (..., classes) with targets (...): the rows of the flattened
        // leading dimensions.
        let (lead, c) = inp.dims().split_at(inp.rank() - 1);
        if target.dims() != lead {
            return Err(NnError::ShapeMismatch(format!(
                "cross_entropy: the target must have shape {lead:?} to match the input {:?}, got {:?}",
                inp.dims(),
                target.dims()
            ))
            .into());
        }
        let (rows, c) = (lead.iter().product::<usize>(), c[0]);
        let (flat, flat_target) = (inp.reshape((rows, c))?, target.flatten_all()?);
        if !fused {
            return cross_entropy(&flat, &flat_target);
        }
        // The checks on the flat views; the op takes the tensor as it is,
        // so no reshape node stands between it and the logits.
        class_shapes("cross_entropy", &flat, &flat_target)?;
    } else {
        class_shapes("cross_entropy", inp, target)?;
    }
    if fused {
        let op: Arc<Box<dyn CustomOp2 + Send + Sync>> =
            Arc::new(Box::new(CrossEntropyOp::default()));
        inp.contiguous()?.apply_op2_arc(&target.contiguous()?, op)
    } else {
        check_ids("cross_entropy", target, inp.dim(1)?)?;
        nll_unchecked(&log_softmax_rows(inp)?, target, inp.dim(0)?)
    }
}

/// The negative log-likelihood loss, averaged over the batch: a drop-in for
/// `candle_nn::loss::nll` (PyTorch's `F.nll_loss`).
///
/// `inp` holds log-probabilities of shape `(batch, classes)`, `target` class
/// ids of shape `(batch,)` (`u32`, `i64` or `u8`, each in `0..classes`);
/// `loss = -1/B Σᵢ inpᵢ,ₜᵢ`, computed as candle-nn does (gather, sum, scale),
/// so its value and gradient (`-1/B` at each picked entry) are candle's.
///
/// Errors: as [`cross_entropy`]; `nll` takes rank-2 input only.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let logp = Tensor::new(&[[-0.5f32, -1.0], [-2.0, -0.25]], &Device::Cpu)?;
/// let loss = minibatch_nn::loss::nll(&logp, &Tensor::new(&[1u32, 0], &Device::Cpu)?)?;
/// assert_eq!(loss.to_scalar::<f32>()?, 1.5);
/// # Ok(()) }
/// ```
pub fn nll(inp: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = class_shapes("nll", inp, target)?;
    check_ids("nll", target, c)?;
    nll_unchecked(inp, target, b)
}

/// The mean squared error `1/N Σ (inp - target)²` over all `N` elements:
/// PyTorch's `F.mse_loss` (mean reduction) and a drop-in for
/// `candle_nn::loss::mse`, computed with the same candle ops (so the same
/// value and gradient `2 (inp - target) / N`).
///
/// One meaning wherever it is used (`minibatch::nn::loss::mse`,
/// `minibatch::train::mse`, the prelude's `mse`):
/// * the target is cast to the input's dtype (integer or `f64` targets
///   against `f32` outputs);
/// * its shape must be the input's up to size-1 dimensions, and the two are
///   compared element by element: `(batch, 1)` outputs against `(batch,)`
///   targets (or the other way round) is what a regression means. Any other
///   difference is an error naming both shapes. PyTorch broadcasts there
///   (`(32, 1)` against `(32,)` becomes a `(32, 32)` loss, with only a
///   warning) and trains on the wrong loss; candle-nn errors on any difference.
///
/// Errors: shapes that differ beyond size-1 dimensions, or empty tensors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
/// let b = Tensor::new(&[1.0f32, 0.0, 0.0], &Device::Cpu)?;
/// assert_eq!(minibatch_nn::loss::mse(&a, &b)?.to_scalar::<f32>()?, 13.0 / 3.0);
/// // (batch, 1) outputs against (batch,) f64 targets: element by element
/// let out = Tensor::new(&[[1f32], [3.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[1f64, 1.0], &Device::Cpu)?;
/// assert_eq!(minibatch_nn::loss::mse(&out, &y)?.to_scalar::<f32>()?, 2.0);
/// // (2, 2) against (2,) is an error, not a broadcast
/// assert!(minibatch_nn::loss::mse(&out.repeat((1, 2))?, &y).is_err());
/// # Ok(()) }
/// ```
pub fn mse(inp: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let without_ones = |d: &[usize]| d.iter().copied().filter(|&n| n != 1).collect::<Vec<_>>();
    if inp.dims() != target.dims() && without_ones(inp.dims()) != without_ones(target.dims()) {
        return Err(NnError::ShapeMismatch(format!(
            "mse: input {:?} and target {:?} differ beyond size-1 dimensions (mse compares \
             element by element and does not broadcast)",
            inp.dims(),
            target.dims()
        ))
        .into());
    }
    if inp.elem_count() == 0 {
        return Err(NnError::InvalidArgument("mse: empty input".into()).into());
    }
    let target = target.to_dtype(inp.dtype())?;
    let target = if target.dims() == inp.dims() {
        target
    } else {
        target.reshape(inp.shape())?
    };
    (inp - target)?.sqr()?.mean_all()
}

/// `(batch, classes)` of a `(batch, classes)` input and `(batch,)` target.
fn class_shapes(what: &str, inp: &Tensor, target: &Tensor) -> candle_core::Result<(usize, usize)> {
    let (b, c) = match *inp.dims() {
        [b, c] => (b, c),
        ref d => {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: the input must have shape (batch, classes), got {d:?}"
            ))
            .into())
        }
    };
    match *target.dims() {
        [bt] if bt == b => {}
        ref d => {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: the target must have shape ({b},) to match the input {:?}, got {d:?}",
                inp.dims()
            ))
            .into())
        }
    }
    if b == 0 || c == 0 {
        return Err(
            NnError::InvalidArgument(format!("{what}: empty input of shape ({b}, {c})")).into(),
        );
    }
    check_index_dtype(what, target)?;
    Ok((b, c))
}

/// `log_softmax(x, 1)` in candle ops, with the row maximum detached (the
/// result does not depend on it), forward identical to
/// `candle_nn::ops::log_softmax`.
fn log_softmax_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let log_sum = diff.exp()?.sum_keepdim(1)?.log()?;
    diff.broadcast_sub(&log_sum)
}

/// candle-nn's `nll` without its checks.
fn nll_unchecked(inp: &Tensor, target: &Tensor, b: usize) -> candle_core::Result<Tensor> {
    inp.gather(&target.unsqueeze(1)?, 1)?
        .sum_all()?
        .affine(-1f64 / b as f64, 0.)
}

/// The fused CPU cross-entropy. Each call gets its own op, which keeps its
/// forward's per-row `(max, log Σ exp(x - max))` for its backward.
#[derive(Default)]
struct CrossEntropyOp {
    saved: OnceLock<CpuStorage>,
}

/// Rows per part when `b` rows of `c` logits are split over candle's pool.
fn rows_per_part(b: usize, c: usize) -> usize {
    b.div_ceil(parts(b, b * c)).max(1)
}

/// Forward: the loss, and `[max, log_sum]` per row. Blocks of rows run on
/// candle's CPU pool; each row's figures do not depend on the split, and the
/// picked log-probabilities are summed in row order afterwards, so the bits
/// are those of one pass.
fn ce_forward<T: Float>(x: &[T], ids: &ClassIds, c: usize) -> candle_core::Result<(T, Vec<T>)> {
    let b = ids.len();
    ids.check(c, "cross_entropy")?;
    let per = rows_per_part(b, c);
    let blocks = run_parts(x.chunks(per * c).collect(), |blk, xs| {
        let mut stats = Vec::with_capacity(2 * per);
        let mut picked = Vec::with_capacity(per);
        let mut exps = vec![T::zero(); c];
        for (i, row) in xs.chunks_exact(c).enumerate() {
            let max = row[1..].iter().fold(row[0], |m, &v| m.max(v));
            for (e, &v) in exps.iter_mut().zip(row) {
                *e = (v - max).exp();
            }
            let log_sum = T::sum_candle_order(&exps).ln();
            picked.push((row[ids.get(blk * per + i) as usize] - max) - log_sum);
            stats.push(max);
            stats.push(log_sum);
        }
        (stats, picked)
    });
    let mut stats = Vec::with_capacity(2 * b);
    let mut picked = Vec::with_capacity(b);
    for (s, p) in blocks {
        stats.extend(s);
        picked.extend(p);
    }
    // candle-nn: gather, sum_all, affine(-1/B, 0).
    let loss = T::sum_candle_order(&picked) * T::from_f64(-1f64 / b as f64) + T::zero();
    Ok((loss, stats))
}

/// Backward: `(softmax - onehot) · g / B`, blocks of rows on candle's pool
/// (the bits of one pass: each row is computed alone).
fn ce_backward<T: Float>(x: &[T], ids: &ClassIds, stats: &[T], c: usize, g: T) -> Vec<T> {
    let b = ids.len();
    let scale = g / T::from_f64(b as f64);
    let per = rows_per_part(b, c);
    let mut out = uninit::<T>(b * c);
    run_parts(out.chunks_mut(per * c).collect(), |blk, o| {
        let rows = x[blk * per * c..].chunks_exact(c);
        for (i, (orow, row)) in o.chunks_exact_mut(c).zip(rows).enumerate() {
            let r = blk * per + i;
            let (max, log_sum) = (stats[2 * r], stats[2 * r + 1]);
            for (d, &v) in orow.iter_mut().zip(row) {
                d.write(((v - max) - log_sum).exp() * scale);
            }
            let t = ids.get(r) as usize;
            orow[t].write(((row[t] - max) - log_sum).exp() * scale - scale);
        }
    });
    // SAFETY: every row of every block was written above.
    unsafe { assume_init(out) }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "minibatch-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = lx.dims().last().copied().unwrap_or(0);
        let ids = ClassIds::new(t, lt, "cross_entropy")?;
        let (loss, stats) = match x {
            CpuStorage::F32(_) => {
                let (l, s) = ce_forward::<f32>(contiguous(x, lx, "cross_entropy")?, &ids, c)?;
                (CpuStorage::F32(vec![l]), CpuStorage::F32(s))
            }
            CpuStorage::F64(_) => {
                let (l, s) = ce_forward::<f64>(contiguous(x, lx, "cross_entropy")?, &ids, c)?;
                (CpuStorage::F64(vec![l]), CpuStorage::F64(s))
            }
            _ => candle_core::bail!("cross_entropy: the fused kernel takes f32 or f64 logits"),
        };
        // One op per call: the forward runs once.
        let _ = self.saved.set(stats);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("cross_entropy: backward before forward");
        };
        let (c, shape) = (x.dim(candle_core::D::Minus1)?, x.shape());
        let dx = with_cpu(x, |xs, lx| {
            with_cpu(target, |ts, lt| {
                let ids = ClassIds::new(ts, lt, "cross_entropy")?;
                Ok(match (xs, saved) {
                    (CpuStorage::F32(_), CpuStorage::F32(stats)) => {
                        let x = contiguous::<f32>(xs, lx, "cross_entropy")?;
                        let g = grad.to_scalar::<f32>()?;
                        Tensor::from_vec(ce_backward(x, &ids, stats, c, g), shape, &Device::Cpu)?
                    }
                    (CpuStorage::F64(_), CpuStorage::F64(stats)) => {
                        let x = contiguous::<f64>(xs, lx, "cross_entropy")?;
                        let g = grad.to_scalar::<f64>()?;
                        Tensor::from_vec(ce_backward(x, &ids, stats, c, g), shape, &Device::Cpu)?
                    }
                    _ => candle_core::bail!("cross_entropy: unexpected dtype in backward"),
                })
            })
        })?;
        Ok((Some(dx), None))
    }
}
