//! Scaled dot-product attention with a fused CPU forward and backward pass.
//!
//! For one (batch, head) pair, with `Q (tq, d)`, `K (tk, d)`, `V (tk, dv)`
//! and the scale `s` (`1/√d` unless given):
//!
//! ```text
//! S = s · Q Kᵀ                      (tq, tk); causal: S_ij = −∞ for j > i
//! P = softmax_rows(S)               P_ij = e^(S_ij − m_i) / Σ_j e^(S_ij − m_i), m_i = max_j S_ij
//! O = P V                           (tq, dv)
//! ```
//!
//! and, for the upstream gradient `dO`,
//!
//! ```text
//! dV = Pᵀ dO      dP = dO Vᵀ      dS = P ⊙ (dP − rowsum(dP ⊙ P))
//! dQ = s · dS K   dK = s · dSᵀ Q
//! ```
//!
//! On the CPU (`f32`, `f64`) this is one candle custom op over `q`, `k`, `v`
//! read through their strides (a `(b, t, h, d)` tensor transposed to
//! `(b, h, t, d)` is used as is, no copy; [`multi_head_attention`] takes
//! token-major `(b, t, h, d)` or `(b, t, h·d)` tensors and writes its output
//! and gradients in that layout). Per (batch, head) pair it works on
//! blocks of up to 128 query rows: `S = Q_blk Kᵀ` by the `gemm` kernels into
//! a per-thread scratch block, the softmax (and the dropout, if any) in
//! place, then `O_blk = P V`; `P` is never stored, and the backward pass
//! recomputes it block by block from `q` and `k` (as FlashAttention does)
//! before its five products, so no `b·h·tq·tk` tensor is kept between the
//! passes (dropout keeps its mask as one bit per weight). Causal blocks
//! compute only the keys their last row sees. (batch, key head) units are
//! split over candle's CPU thread pool when the work is large. Every other
//! device and dtype (and the CPU after
//! [`set_tensor_path(true)`](crate::set_tensor_path)) runs the same maths as
//! candle tensor ops, differentiated by candle's autograd.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

use std::sync::OnceLock;

use super::simd::{dot, max, simd_dispatch, sum_16_pairwise};
use crate::dispatch::cpu_kernel;
use crate::dropout::{DropMask, KeepStream};
use crate::error::NnError;
use crate::float::Float;
use crate::gemm::{matmul_seq, Mat};
use crate::split::{parts, run_parts};
use crate::Dropout;

/// Attention of the queries `q` over the keys `k` and values `v`, as
/// PyTorch's `torch.nn.functional.scaled_dot_product_attention(q, k, v,
/// is_causal=is_causal, scale=scale, enable_gqa=True)` (no mask, no dropout):
///
/// * `q`: `(b, h, tq, d)`, `k`: `(b, hk, tk, d)`, `v`: `(b, hk, tk, dv)`;
///   the result is `(b, h, tq, dv)`, contiguous;
/// * grouped-query attention: `hk` may divide `h`, and query head `i` then
///   reads key/value head `i / (h / hk)` (PyTorch's `enable_gqa=True`,
///   `repeat_interleave` of K and V); the fused CPU kernel never
///   materialises the repeated K and V;
/// * `S = scale · Q Kᵀ` per (batch, head), `scale` defaulting to `1/√d`;
/// * `is_causal`: query `i` attends to keys `j ≤ i` only (PyTorch's
///   top-left aligned `tril(ones(tq, tk))` mask; queries `i ≥ tk` see every
///   key);
/// * `P = softmax(S)` along the keys (shifted by the row maximum, so large
///   scores do not overflow), `O = P V`.
///
/// Backward, for the upstream gradient `dO`: `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q` (summed over the query heads of a group). On the CPU (`f32`, `f64`) forward and backward are
/// each one fused pass per (batch, head) that reads `q`, `k`, `v` through
/// any strides (no `.contiguous()` needed after a `transpose(1, 2)`) and
/// recomputes `P` in the backward pass instead of storing it. Elsewhere it is
/// candle's `matmul`, a `-inf` mask, [`softmax_last_dim`](super::softmax_last_dim)
/// and `matmul`.
///
/// Errors: tensors that are not of rank 4, shapes that disagree (batch,
/// `d` of `q` and `k`, `tk` of `k` and `v`, heads of `k` and `v`, key heads
/// that do not divide the query heads), no keys (`tk = 0`) or an
/// empty head dimension (`d = 0`), a scale that is not finite, dtypes or
/// devices that differ.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::scaled_dot_product_attention;
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // One batch, one head, 2 queries and 2 keys of size 2, values of size 3.
/// let q = Var::new(&[[[[1f32, 0.], [0., 1.]]]], &dev)?;
/// let k = Var::new(&[[[[1f32, 0.], [0., 1.]]]], &dev)?;
/// let v = Var::new(&[[[[1f32, 2., 3.], [4., 5., 6.]]]], &dev)?;
/// let o = scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), true, None)?;
/// assert_eq!(o.dims(), [1, 1, 2, 3]);
/// let o4: Vec<Vec<f32>> = o.squeeze(0)?.squeeze(0)?.to_vec2()?;
/// // Causal: the first query sees only the first key.
/// assert_eq!(o4[0], [1., 2., 3.]);
/// // The second sees both, with weights softmax([0, 1/√2]).
/// let w = 1.0 / (1.0 + (-(0.5f32).sqrt()).exp());
/// assert!((o4[1][0] - (1.0 + 3.0 * w)).abs() < 1e-6);
/// // Gradients reach q, k and v.
/// let grads = o.sqr()?.sum_all()?.backward()?;
/// for x in [&q, &k, &v] {
///     assert!(grads.get(x.as_tensor()).is_some());
/// }
/// # Ok(()) }
/// ```
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    is_causal: bool,
    scale: Option<f64>,
) -> Result<Tensor> {
    scaled_dot_product_attention_masked(q, k, v, None, is_causal, scale)
}

/// [`scaled_dot_product_attention`] with an attention mask, as PyTorch's
/// `F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
/// is_causal=is_causal, scale=scale, enable_gqa=True)` (PyTorch itself
/// refuses a mask together with `is_causal`; here both apply):
///
/// * `mask` broadcasts to `(b, h, tq, tk)` (a key-padding mask is
///   `(b, 1, 1, tk)`);
/// * a float mask (any float dtype, cast to `q`'s) is added to the scores:
///   `S = scale · Q Kᵀ + mask` (`-inf`, or a large negative value such as
///   `f32::MIN` as transformers uses, hides a key);
/// * a `u8` mask is boolean as PyTorch's: non-zero means "attends", zero adds
///   `-inf`;
/// * a query row that sees no key at all (every score `-inf`) gets zero
///   output and zero gradients (PyTorch's math kernel gives NaN there);
/// * the mask is a constant: it gets no gradient.
///
/// On the CPU the mask is read through its (broadcast) strides inside the
/// fused kernel, one row per query; elsewhere it is added to the composed
/// scores.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_nn::ops::scaled_dot_product_attention_masked as sdpa;
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::new(&[[[[1f32, 0.]]]], &dev)?;
/// let k = Tensor::new(&[[[[1f32, 0.], [0., 1.], [5., 5.]]]], &dev)?;
/// let v = Tensor::new(&[[[[1f32], [3.], [100.]]]], &dev)?;
/// // The third key is padding.
/// let pad = Tensor::new(&[[1u8, 1, 0]], &dev)?.reshape((1, 1, 1, 3))?;
/// let o = sdpa(&q, &k, &v, Some(&pad), false, None)?;
/// let w = 1.0 / (1.0 + (-(0.5f32).sqrt()).exp());
/// let got = o.flatten_all()?.to_vec1::<f32>()?[0];
/// assert!((got - (3.0 - 2.0 * w)).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn scaled_dot_product_attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    scale: Option<f64>,
) -> Result<Tensor> {
    let g = Geom::check(q, k, v, is_causal, scale)?;
    attention(q, k, v, mask, g, None)
}

/// [`scaled_dot_product_attention_masked`] with dropout on the attention
/// weights, as PyTorch's `F.scaled_dot_product_attention(..., dropout_p=p)`
/// in training and transformers' eager attention (`softmax`, then dropout,
/// then `@ v`):
///
/// * `O = (P ⊙ D / (1 - p)) V`, `D` a random 0/1 mask over the weights
///   `(b, h, tq, tk)` with keep rate `1 - p`;
/// * `dropout` gives `p` and the seed, and its masks are
///   [`Dropout::forward`]'s: this call draws the layer's next call index
///   (see [`set_rng_step`](crate::set_rng_step)), and `D` is exactly the mask
///   `dropout.forward(&weights, true)` would apply to the weights tensor. A
///   resumed run (or a [`recompute`](crate::recompute) replay) draws the same
///   masks;
/// * with `train = false` or `p = 0` it is
///   [`scaled_dot_product_attention_masked`] and draws nothing.
///
/// On the CPU (`f32`, `f64`) the dropout happens inside the fused kernel,
/// which keeps the mask as one bit per weight for the backward pass instead
/// of any `(b, h, tq, tk)` tensor; elsewhere the mask is drawn on the host
/// and applied to the composed weights with tensor ops.
///
/// Errors: those of [`scaled_dot_product_attention_masked`], and a drop
/// probability outside `[0, 1)` in training.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use minibatch_nn::ops::scaled_dot_product_attention_dropout as sdpa;
/// use minibatch_nn::{set_rng_step, Dropout};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (2, 4, 8, 16), &dev)?;
/// let drop = Dropout::new(0.1);
/// set_rng_step(3);
/// let a = sdpa(&q, &q, &q, None, true, None, &drop, true)?;
/// set_rng_step(3);
/// let b = sdpa(&q, &q, &q, None, true, None, &drop, true)?;
/// // The same step draws the same mask.
/// assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
/// // Evaluation: no dropout.
/// let eval = sdpa(&q, &q, &q, None, true, None, &drop, false)?;
/// let plain = minibatch_nn::ops::scaled_dot_product_attention(&q, &q, &q, true, None)?;
/// assert_eq!(eval.flatten_all()?.to_vec1::<f32>()?, plain.flatten_all()?.to_vec1::<f32>()?);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn scaled_dot_product_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    scale: Option<f64>,
    dropout: &Dropout,
    train: bool,
) -> Result<Tensor> {
    let g = Geom::check(q, k, v, is_causal, scale)?;
    let drop = dropout.next_mask(train, true)?;
    attention(q, k, v, mask, g, drop)
}

/// [`scaled_dot_product_attention_dropout`] on tensors laid out token by
/// token, as the projections of a transformer give them (FlashAttention's
/// `(batch, tokens, heads, dim)` layout), so that no `transpose`, `reshape`
/// or copy stands between the projections and the attention, in either
/// pass:
///
/// * `q`: `(b, tq, heads, d)` or `(b, tq, heads · d)`; `k`: `(b, tk, hk, d)`
///   or `(b, tk, hk · d)`; `v`: `(b, tk, hk, dv)` or `(b, tk, hk · dv)`
///   (each of rank 4 or 3 on its own; a rank-3 `k` has `hk = k.dim(2) / d`,
///   a rank-3 `v` has `k`'s heads);
/// * the result has `q`'s layout: `(b, tq, heads, dv)`, or `(b, tq, heads ·
///   dv)` for a rank-3 `q`, contiguous;
/// * the maths, the mask (broadcast to `(b, heads, tq, tk)`), the causal
///   flag, grouped-query heads and the dropout (the mask
///   `Dropout::forward` would draw on the `(b, heads, tq, tk)` weights) are
///   those of [`scaled_dot_product_attention_dropout`] on
///   `q.transpose(1, 2)` and so on: the two give the same numbers.
///
/// On the CPU the fused kernel reads the tensors through their strides and
/// writes the output and the gradients straight into the token-major
/// layout; candle's autograd then has no view ops to differentiate (each of
/// which costs a zero-filled buffer and an addition in its backward pass).
///
/// Errors: those of [`scaled_dot_product_attention_dropout`], a tensor of
/// a rank other than 3 or 4, `heads` of 0 or not dividing `q`'s last
/// dimension (rank 3), `heads` unlike `q.dim(2)` (rank 4), and a rank-3
/// `k` or `v` whose last dimension is not a multiple of the head size.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_nn::ops::{multi_head_attention, scaled_dot_product_attention_dropout};
/// use minibatch_nn::Dropout;
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // Batch 2, 5 tokens, 4 heads of size 8, as a projection gives them.
/// let x = Tensor::randn(0f32, 1.0, (2, 5, 32), &dev)?;
/// let drop = Dropout::new(0.0);
/// let o = multi_head_attention(&x, &x, &x, 4, None, true, None, &drop, false)?;
/// assert_eq!(o.dims(), [2, 5, 32]);
/// // The same as the (batch, heads, tokens, dim) op on transposed views.
/// let h = x.reshape((2, 5, 4, 8))?.transpose(1, 2)?;
/// let r = scaled_dot_product_attention_dropout(&h, &h, &h, None, true, None, &drop, false)?;
/// let r = r.transpose(1, 2)?.reshape((2, 5, 32))?;
/// let diff = (o - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-6);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    is_causal: bool,
    scale: Option<f64>,
    dropout: &Dropout,
    train: bool,
) -> Result<Tensor> {
    let what = "multi_head_attention";
    let qd = token_dims(what, "q", q, Split::Heads(heads))?;
    let kd = token_dims(what, "k", k, Split::Dim(qd[3]))?;
    let vd = token_dims(what, "v", v, Split::Heads(kd[2]))?;
    // (b, t, h, d) -> (b, h, t, d)
    let heads_first = |d: [usize; 4]| [d[0], d[2], d[1], d[3]];
    let g = Geom::from_dims(
        what,
        [q, k, v],
        [heads_first(qd), heads_first(kd), heads_first(vd)],
        is_causal,
        scale,
    )?;
    let drop = dropout.next_mask(train, true)?;
    let order = Order::Tokens {
        ranks: [q.rank(), k.rank(), v.rank()],
    };
    let mask = match mask {
        Some(m) => Some(additive_mask(m, q, &g)?),
        None => None,
    };
    if cpu_kernel(q) && matches!(q.dtype(), DType::F32 | DType::F64) {
        return q.apply_op3(
            k,
            v,
            Sdpa {
                g,
                order,
                mask,
                drop,
                kept: OnceLock::new(),
            },
        );
    }
    let to_heads = |x: &Tensor, d: [usize; 4]| x.reshape(d.as_slice())?.transpose(1, 2);
    let o = composed(
        &to_heads(q, qd)?,
        &to_heads(k, kd)?,
        &to_heads(v, vd)?,
        mask.as_ref(),
        &g,
        drop,
    )?
    .transpose(1, 2)?;
    if q.rank() == 3 {
        o.reshape((g.b, g.tq, g.h * g.dv))
    } else {
        o.contiguous()
    }
}

/// How a rank-3 tensor's last dimension splits into heads.
#[derive(Clone, Copy)]
enum Split {
    /// Into this many heads.
    Heads(usize),
    /// Into heads of this size.
    Dim(usize),
}

/// The `(b, tokens, heads, dim)` sizes of a token-major tensor of rank 4,
/// or of rank 3 split as `split` says.
fn token_dims(
    what: &str,
    name: &str,
    t: &Tensor,
    split: Split,
) -> std::result::Result<[usize; 4], NnError> {
    let d = t.dims();
    match (d.len(), split) {
        (4, Split::Heads(h)) if h != d[2] && name == "q" => Err(NnError::ShapeMismatch(format!(
            "{what}: heads = {h} but q of shape {d:?} has {} heads (batch, tokens, heads, dim)",
            d[2]
        ))),
        (4, _) => Ok([d[0], d[1], d[2], d[3]]),
        (3, Split::Heads(h)) if h > 0 && d[2].is_multiple_of(h) => Ok([d[0], d[1], h, d[2] / h]),
        (3, Split::Dim(hd)) if hd > 0 && d[2].is_multiple_of(hd) => Ok([d[0], d[1], d[2] / hd, hd]),
        (3, Split::Heads(h)) => Err(NnError::ShapeMismatch(format!(
            "{what}: {name} of shape {d:?} does not split into {h} heads"
        ))),
        (3, Split::Dim(hd)) => Err(NnError::ShapeMismatch(format!(
            "{what}: {name} of shape {d:?} does not split into heads of size {hd} (q's head size)"
        ))),
        _ => Err(NnError::ShapeMismatch(format!(
            "{what}: {name} must be (batch, tokens, heads, dim) or (batch, tokens, heads * dim), got shape {d:?}"
        ))),
    }
}

/// The fused kernel or the tensor-op path, for checked sizes.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    g: Geom,
    drop: Option<DropMask>,
) -> Result<Tensor> {
    let mask = match mask {
        Some(m) => Some(additive_mask(m, q, &g)?),
        None => None,
    };
    if cpu_kernel(q) && matches!(q.dtype(), DType::F32 | DType::F64) {
        return q.apply_op3(
            k,
            v,
            Sdpa {
                g,
                order: Order::Heads,
                mask,
                drop,
                kept: OnceLock::new(),
            },
        );
    }
    composed(q, k, v, mask.as_ref(), &g, drop)
}

/// `mask` as an additive mask of `q`'s dtype broadcast to `(b, h, tq, tk)`,
/// detached.
fn additive_mask(mask: &Tensor, q: &Tensor, g: &Geom) -> Result<Tensor> {
    let what = "scaled_dot_product_attention";
    let target = [g.b, g.h, g.tq, g.tk];
    let dims = mask.dims();
    let fits = dims.len() <= 4
        && dims
            .iter()
            .rev()
            .zip(target.iter().rev())
            .all(|(&m, &t)| m == t || m == 1);
    if !fits {
        return Err(NnError::ShapeMismatch(format!(
            "{what}: the mask of shape {dims:?} does not broadcast to (batch, heads, queries, keys) = {target:?}"
        ))
        .into());
    }
    if !mask.device().same_device(q.device()) {
        return Err(NnError::InvalidArgument(format!(
            "{what}: q is on {:?} but the mask is on {:?}",
            q.device(),
            mask.device()
        ))
        .into());
    }
    let m = match mask.dtype() {
        DType::U8 => {
            let zero = Tensor::zeros(mask.shape(), q.dtype(), q.device())?;
            let ninf =
                Tensor::full(f32::NEG_INFINITY, mask.shape(), q.device())?.to_dtype(q.dtype())?;
            mask.where_cond(&zero, &ninf)?
        }
        dt if dt.is_float() => mask.to_dtype(q.dtype())?,
        dt => {
            return Err(NnError::InvalidArgument(format!(
                "{what}: the mask must be a float (additive) or u8 (boolean) tensor, got {dt:?}"
            ))
            .into())
        }
    };
    m.detach().broadcast_as(target.as_slice())
}

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
    /// Key/value heads (`h` is a multiple).
    hk: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    scale: f64,
}

impl Geom {
    fn check(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        scale: Option<f64>,
    ) -> std::result::Result<Self, NnError> {
        let what = "scaled_dot_product_attention";
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            if t.rank() != 4 {
                return Err(NnError::ShapeMismatch(format!(
                    "{what}: {name} must be (batch, heads, tokens, dim), got shape {:?}",
                    t.dims()
                )));
            }
        }
        let dims = |t: &Tensor| [t.dims()[0], t.dims()[1], t.dims()[2], t.dims()[3]];
        Self::from_dims(what, [q, k, v], [dims(q), dims(k), dims(v)], causal, scale)
    }

    /// The sizes from the `(b, heads, tokens, dim)` shapes `qd`, `kd`, `vd`
    /// of `q`, `k`, `v` (whose dtypes and devices are checked here).
    fn from_dims(
        what: &str,
        [q, k, v]: [&Tensor; 3],
        [qd, kd, vd]: [[usize; 4]; 3],
        causal: bool,
        scale: Option<f64>,
    ) -> std::result::Result<Self, NnError> {
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != q.dtype() {
                return Err(NnError::InvalidArgument(format!(
                    "{what}: q is {:?} but {name} is {:?}",
                    q.dtype(),
                    t.dtype()
                )));
            }
            if !t.device().same_device(q.device()) {
                return Err(NnError::InvalidArgument(format!(
                    "{what}: q is on {:?} but {name} is on {:?}",
                    q.device(),
                    t.device()
                )));
            }
        }
        if qd[0] != kd[0] || kd[..2] != vd[..2] || kd[1] == 0 || qd[1] % kd[1] != 0 {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: batch and heads differ (the key/value heads must be equal and divide the query heads): q {qd:?}, k {kd:?}, v {vd:?} as (batch, heads, tokens, dim)"
            )));
        }
        if qd[3] != kd[3] {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: q {qd:?} and k {kd:?} have different head dims"
            )));
        }
        if kd[2] != vd[2] {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: k {kd:?} and v {vd:?} have different numbers of keys"
            )));
        }
        if kd[2] == 0 || qd[3] == 0 {
            return Err(NnError::InvalidArgument(format!(
                "{what}: no keys or an empty head dim (q {qd:?}, k {kd:?})"
            )));
        }
        let scale = scale.unwrap_or(1.0 / (qd[3] as f64).sqrt());
        if !scale.is_finite() {
            return Err(NnError::InvalidArgument(format!(
                "{what}: scale {scale} is not finite"
            )));
        }
        Ok(Self {
            b: qd[0],
            h: qd[1],
            hk: kd[1],
            tq: qd[2],
            tk: kd[2],
            d: qd[3],
            dv: vd[3],
            causal,
            scale,
        })
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.hk
    }

    /// How many keys query `i` attends to (the first ones).
    #[inline(always)]
    fn keys(&self, i: usize) -> usize {
        if self.causal {
            (i + 1).min(self.tk)
        } else {
            self.tk
        }
    }

    /// Query rows per block of the fused kernel: a block's scores `(rows,
    /// tk)` sit in per-thread scratch (about 128 KiB of `f32` once `tk`
    /// passes 256; 32 rows at the least), and causal blocks are smaller so
    /// that fewer hidden scores are computed.
    fn block_rows(&self) -> usize {
        let cap = if self.causal { 64 } else { 128 };
        cap.min((32768 / self.tk).max(32))
    }

    /// The (batch, key head) units of each part the work is split into.
    fn split(&self) -> Vec<Range<usize>> {
        let n = self.b * self.hk;
        let work = n * self.group() * self.tq * self.tk * (2 * self.d + 2 * self.dv);
        let per = n.div_ceil(parts(n, work)).max(1);
        (0..n)
            .step_by(per)
            .map(|lo| lo..(lo + per).min(n))
            .collect()
    }
}

/// The tensor-op path: `softmax(scale · q kᵀ + mask) v`, with K and V
/// repeated over each group of query heads.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    g: &Geom,
    drop: Option<DropMask>,
) -> Result<Tensor> {
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if g.hk == g.h {
            return Ok(x.clone());
        }
        let (b, hk, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, hk, g.group(), t, d))?
            .reshape((b, g.h, t, d))
    };
    // candle's batched matmul needs collapsible batch strides.
    let (q, k, v) = (
        q.contiguous()?,
        repeat(k)?.contiguous()?,
        repeat(v)?.contiguous()?,
    );
    let mut s = (q.matmul(&k.t()?)? * g.scale)?;
    if g.causal {
        let mask: Vec<f32> = (0..g.tq)
            .flat_map(|i| (0..g.tk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (g.tq, g.tk), s.device())?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    if let Some(m) = mask {
        s = (s + m)?;
    }
    // Dropout on the weights: the mask Dropout draws for a (b, h, tq, tk) tensor.
    let dropped = |p: Tensor| -> Result<Tensor> {
        match drop {
            Some(dm) => p.broadcast_mul(&dm.multiplier(p.shape(), p.dtype(), p.device())?),
            None => Ok(p),
        }
    };
    if mask.is_none() {
        return dropped(super::softmax_last_dim(&s)?)?.matmul(&v);
    }
    // Rows that see no key get zero weights (the softmax of a row of -inf
    // is NaN): their scores are replaced before the softmax (so no NaN
    // reaches the backward pass either) and their weights after it.
    let ok = s
        .max_keepdim(3)?
        .ne(f64::NEG_INFINITY)?
        .broadcast_as(s.shape())?
        .contiguous()?;
    let zeros = s.zeros_like()?;
    let p = super::softmax_last_dim(&ok.where_cond(&s, &zeros)?)?;
    dropped(ok.where_cond(&p, &zeros)?)?.matmul(&v)
}

/// The fused CPU op (the mask, if any, additive, of the inputs' dtype and
/// broadcast to `(b, h, tq, tk)`).
struct Sdpa {
    g: Geom,
    /// The layout of `q`, `k`, `v`, the output and the gradients.
    order: Order,
    mask: Option<Tensor>,
    /// Dropout on the attention weights (training).
    drop: Option<DropMask>,
    /// The keep bits the forward pass drew (with `drop`), for the backward.
    kept: OnceLock<Vec<u64>>,
}

/// How the fused op's tensors are laid out.
#[derive(Clone, Copy, Debug)]
enum Order {
    /// `(b, heads, tokens, dim)`, the output contiguous so.
    Heads,
    /// `(b, tokens, heads, dim)` (rank 4) or `(b, tokens, heads · dim)`
    /// (rank 3), the ranks of `q`, `k`, `v`; the output and the gradient
    /// of the output have `q`'s.
    Tokens { ranks: [usize; 3] },
}

impl Order {
    /// The shape of a tensor of sizes `(b, h, t, d)` in this layout, with
    /// `rank` (token-major only).
    fn shape(&self, rank: usize, [b, h, t, d]: [usize; 4]) -> Shape {
        match (self, rank) {
            (Order::Heads, _) => Shape::from((b, h, t, d)),
            (Order::Tokens { .. }, 3) => Shape::from((b, t, h * d)),
            (Order::Tokens { .. }, _) => Shape::from((b, t, h, d)),
        }
    }

    /// `x`, contiguous `(b, h, t, d)`, in this layout (a copy for the
    /// token-major one).
    fn arrange<T: Copy>(&self, x: Vec<T>, [b, h, t, d]: [usize; 4]) -> Vec<T> {
        match self {
            Order::Heads => x,
            Order::Tokens { .. } => {
                let mut out = Vec::with_capacity(x.len());
                for bi in 0..b {
                    for ti in 0..t {
                        for hi in 0..h {
                            let at = ((bi * h + hi) * t + ti) * d;
                            out.extend_from_slice(&x[at..at + d]);
                        }
                    }
                }
                out
            }
        }
    }
}

/// A rank-4 CPU tensor read through its layout.
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    stride: [usize; 4],
}

impl<'a, T: Float> View<'a, T> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let st = l.stride();
        if st.len() != 4 {
            candle_core::bail!("scaled_dot_product_attention: expected a rank-4 layout");
        }
        Ok(Self {
            data: T::cpu_storage_as_slice(s)?,
            start: l.start_offset(),
            stride: [st[0], st[1], st[2], st[3]],
        })
    }

    /// A `q`, `k`, `v` (`which` 0, 1, 2) or output gradient (3) of the op,
    /// read as `(b, h, t, d)` whatever its `order`; `d` is its head size.
    fn ordered(
        s: &'a CpuStorage,
        l: &Layout,
        order: Order,
        which: usize,
        d: usize,
    ) -> Result<Self> {
        let rank = match order {
            Order::Heads => return Self::new(s, l),
            // The output gradient has q's layout.
            Order::Tokens { ranks } => ranks[if which == 3 { 0 } else { which }],
        };
        let st = l.stride();
        let stride = match (rank, st.len()) {
            (4, 4) => [st[0], st[2], st[1], st[3]],
            (3, 3) => [st[0], d * st[2], st[1], st[2]],
            _ => candle_core::bail!(
                "multi_head_attention: a layout of rank {} where rank {rank} was checked",
                st.len()
            ),
        };
        Ok(Self {
            data: T::cpu_storage_as_slice(s)?,
            start: l.start_offset(),
            stride,
        })
    }

    /// Copies the `(rows, cols)` matrix of batch `bi`, head `hi` into `out`,
    /// row-major.
    fn gather(&self, bi: usize, hi: usize, rows: usize, cols: usize, out: &mut [T]) {
        let [s0, s1, s2, s3] = self.stride;
        let base = self.start + bi * s0 + hi * s1;
        for (r, o) in out[..rows * cols].chunks_exact_mut(cols.max(1)).enumerate() {
            let at = base + r * s2;
            if s3 == 1 {
                o.copy_from_slice(&self.data[at..at + cols]);
            } else {
                for (c, o) in o.iter_mut().enumerate() {
                    *o = self.data[at + c * s3];
                }
            }
        }
    }

    /// Row `i` of the `(b, h, tq, tk)` mask for batch `bi`, head `hi`: a
    /// slice of the storage when its keys are contiguous, else copied to
    /// `scratch`.
    fn row<'s>(
        &'s self,
        bi: usize,
        hi: usize,
        i: usize,
        n: usize,
        scratch: &'s mut [T],
    ) -> &'s [T] {
        let [s0, s1, s2, s3] = self.stride;
        let at = self.start + bi * s0 + hi * s1 + i * s2;
        if s3 == 1 {
            return &self.data[at..at + n];
        }
        for (j, o) in scratch[..n].iter_mut().enumerate() {
            *o = self.data[at + j * s3];
        }
        &scratch[..n]
    }
}

/// `buf` cut into the parts of `ranges` (in order), `per` elements per unit.
fn cut<'a, T>(mut buf: &'a mut [T], ranges: &[Range<usize>], per: usize) -> Vec<&'a mut [T]> {
    ranges
        .iter()
        .map(|r| {
            let (part, rest) = std::mem::take(&mut buf).split_at_mut(r.len() * per);
            buf = rest;
            part
        })
        .collect()
}

/// The mask of one (batch, query head) pair, if any.
struct MaskRows<'a, T> {
    view: Option<&'a View<'a, T>>,
    bi: usize,
    hi: usize,
}

impl<T: Float> MaskRows<'_, T> {
    #[inline(always)]
    fn row<'s>(&'s self, i: usize, n: usize, scratch: &'s mut [T]) -> Option<&'s [T]> {
        self.view.map(|v| v.row(self.bi, self.hi, i, n, scratch))
    }
}

/// Turns a block's raw scores `s (rows, nb)` (`q_i · k_j` for the queries
/// `i0..`) into attention weights in place: `softmax_j(scale · s_ij + m_ij)`
/// over the keys query `i` sees, zero for the keys it does not see (and a
/// whole row of zeros for a query that sees none). `ms` is a scratch row.
/// Each step is its own pass over the row, so that every pass vectorizes
/// (the sums keep [`LANES`](super::simd::LANES) partial sums).
#[inline(always)]
fn weights<T: Float>(
    s: &mut [T],
    i0: usize,
    nb: usize,
    g: &Geom,
    mask: &MaskRows<T>,
    ms: &mut [T],
) {
    let scale = T::from_f64(g.scale);
    for (r, row) in s.chunks_exact_mut(nb.max(1)).enumerate() {
        let n = g.keys(i0 + r);
        let (live, dead) = row.split_at_mut(n);
        dead.fill(T::ZERO);
        match mask.row(i0 + r, n, ms) {
            Some(m) => live
                .iter_mut()
                .zip(m)
                .for_each(|(x, &mj)| *x = scale * *x + mj),
            None => live.iter_mut().for_each(|x| *x *= scale),
        }
        let mx = max(live);
        if mx == T::NEG_INFINITY {
            live.fill(T::ZERO);
            continue;
        }
        live.iter_mut().for_each(|x| *x = (*x - mx).exp_fast());
        let inv = T::ONE / sum_16_pairwise(live);
        live.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The dropout of one (batch, query head) pair in the forward pass: the
/// stream of its keep decisions (positioned at the pair's first weight),
/// the bits that record them (bit `i · tk + j`), `1/(1-p)`, and scratch
/// rows of `tk` stream words and multipliers.
struct PairDrop<'a, T> {
    stream: KeepStream,
    bits: &'a mut [u64],
    scale: T,
    words: &'a mut [u32],
    bytes: &'a mut [u8],
    mult: &'a mut [T],
}

/// A block of rows `i0..` of the pair's weights `s (rows, nb)` dropped in
/// place (kept: times `1/(1-p)`, else 0), drawing `tk` decisions a row.
#[inline(always)]
fn drop_block<T: Float>(s: &mut [T], i0: usize, nb: usize, tk: usize, d: &mut PairDrop<T>) {
    for (r, row) in s.chunks_exact_mut(nb.max(1)).enumerate() {
        let (words, at) = (&mut d.words[..tk], (i0 + r) * tk);
        d.stream.fill(words, d.bytes);
        set_bits(d.bits, at, words, &d.stream);
        // The multipliers from the bits, as the backward pass reads them.
        let mult = &mut d.mult[..tk];
        bits_to_mult(d.bits, at, d.scale, mult);
        // Dropout's values: x times (1 · scale) or times (0 · scale).
        row.iter_mut().zip(mult.iter()).for_each(|(x, m)| *x *= *m);
    }
}

/// Sets bit `at + j` of `bits` for every word `j` that `stream` keeps (the
/// bits are zero on entry).
#[inline(always)]
fn set_bits(bits: &mut [u64], at: usize, words: &[u32], stream: &KeepStream) {
    for (j, &w) in words.iter().enumerate() {
        let e = at + j;
        bits[e / 64] |= u64::from(stream.keeps(w)) << (e % 64);
    }
}

/// `mult[j] = scale` where bit `at + j` of `bits` is set, else 0.
#[inline(always)]
fn bits_to_mult<T: Float>(bits: &[u64], at: usize, scale: T, mult: &mut [T]) {
    for (j, m) in mult.iter_mut().enumerate() {
        let e = at + j;
        *m = if bits[e / 64] >> (e % 64) & 1 == 1 {
            scale
        } else {
            T::ZERO
        };
    }
}

/// Rows `i0..i0 + rows` of a row-major `(_, cols)` matrix.
#[inline(always)]
fn rows_of<T>(data: &[T], i0: usize, rows: usize, cols: usize) -> Mat<'_, T> {
    Mat::row_major(&data[i0 * cols..(i0 + rows) * cols], rows, cols)
}

/// The forward pass of one pair: `q (tq, d)`, `k (tk, d)`, `v (tk, dv)`
/// row-major; `o (tq, dv)` is written. Blocks of query rows: the scores
/// `Q_blk Kᵀ` (one matrix product into the scratch `s`), their softmax
/// (and dropout) in place, then `O_blk = P_blk V` (a second product).
#[inline(always)]
fn head_fwd_body<T: Float>(
    [q, k, v]: [&[T]; 3],
    mask: &MaskRows<T>,
    g: &Geom,
    mut drop: Option<&mut PairDrop<T>>,
    [s, ms]: [&mut [T]; 2],
    o: &mut [T],
) {
    let (d, dv, br) = (g.d, g.dv, g.block_rows());
    for i0 in (0..g.tq).step_by(br) {
        let rows = br.min(g.tq - i0);
        // Causal: the block's last query sees the most keys.
        let nb = g.keys(i0 + rows - 1);
        let s = &mut s[..rows * nb];
        let kt = Mat::row_major(&k[..nb * d], nb, d).t();
        matmul_seq(s, nb, rows_of(q, i0, rows, d), kt, false);
        weights(s, i0, nb, g, mask, ms);
        if let Some(dr) = drop.as_deref_mut() {
            drop_block(s, i0, nb, g.tk, dr);
        }
        let vb = Mat::row_major(&v[..nb * dv], nb, dv);
        let ob = &mut o[i0 * dv..(i0 + rows) * dv];
        matmul_seq(ob, dv, Mat::row_major(s, rows, nb), vb, false);
    }
}

/// One pair's gradients, `(tq, d)`, `(tk, d)`, `(tk, dv)` row-major.
struct Grads<'a, T> {
    dq: &'a mut [T],
    dk: &'a mut [T],
    dv: &'a mut [T],
}

/// The backward pass of one pair: `q`, `k`, `v` as in [`head_fwd_body`],
/// `go (tq, dv)`; `dq` is written, `dk` and `dv` accumulated into. `drop`:
/// the pair's keep bits from the forward pass and `1/(1-p)`. Per block of
/// query rows, with `P` recomputed from `q` and `k` and `P' = P ⊙ D` its
/// dropped weights: `dV += P'ᵀ dO`, `dP' = dO Vᵀ`, `dP = dP' ⊙ D`,
/// `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = dS K`, `dK += dSᵀ Q`:
/// five matrix products, and element-wise passes over the block.
#[inline(always)]
fn head_bwd_body<T: Float>(
    [q, k, v]: [&[T]; 3],
    go: &[T],
    mask: &MaskRows<T>,
    g: &Geom,
    drop: Option<(&[u64], T)>,
    [s, pd, dp, mult, ms]: [&mut [T]; 5],
    out: &mut Grads<T>,
) {
    let Grads { dq, dk, dv: dvs } = out;
    let (d, dv, tk, br) = (g.d, g.dv, g.tk, g.block_rows());
    let scale = T::from_f64(g.scale);
    for i0 in (0..g.tq).step_by(br) {
        let rows = br.min(g.tq - i0);
        let nb = g.keys(i0 + rows - 1);
        let (kb, vb) = (
            Mat::row_major(&k[..nb * d], nb, d),
            Mat::row_major(&v[..nb * dv], nb, dv),
        );
        let (qb, gob) = (rows_of(q, i0, rows, d), rows_of(go, i0, rows, dv));
        let s = &mut s[..rows * nb];
        matmul_seq(s, nb, qb, kb.t(), false);
        weights(s, i0, nb, g, mask, ms);
        let p: &[T] = s;
        let dropped: &[T] = match drop {
            Some((bits, ds)) => {
                // The multipliers of the block's rows, kept for dP below.
                let (pd, mb) = (&mut pd[..rows * nb], &mut mult[..rows * nb]);
                for (r, (pr, (dr, mr))) in p
                    .chunks_exact(nb)
                    .zip(pd.chunks_exact_mut(nb).zip(mb.chunks_exact_mut(nb)))
                    .enumerate()
                {
                    bits_to_mult(bits, (i0 + r) * tk, ds, mr);
                    for ((x, y), m) in pr.iter().zip(dr.iter_mut()).zip(mr.iter()) {
                        *y = *x * *m;
                    }
                }
                pd
            }
            None => p,
        };
        matmul_seq(
            &mut dvs[..nb * dv],
            dv,
            Mat::row_major(dropped, rows, nb).t(),
            gob,
            true,
        );
        let dp = &mut dp[..rows * nb];
        matmul_seq(dp, nb, gob, vb.t(), false);
        for (r, (pr, dr)) in p.chunks_exact(nb).zip(dp.chunks_exact_mut(nb)).enumerate() {
            let i = i0 + r;
            let n = g.keys(i);
            if drop.is_some() {
                let mr = &mult[r * nb..r * nb + n];
                dr[..n].iter_mut().zip(mr).for_each(|(y, m)| *y *= *m);
            }
            let rsum = dot(&pr[..n], &dr[..n]);
            for (x, y) in pr[..n].iter().zip(dr[..n].iter_mut()) {
                *y = scale * *x * (*y - rsum);
            }
            dr[n..].fill(T::ZERO);
        }
        let dsb = Mat::row_major(&*dp, rows, nb);
        matmul_seq(&mut dq[i0 * d..(i0 + rows) * d], d, dsb, kb, false);
        matmul_seq(&mut dk[..nb * d], d, dsb.t(), qb, true);
    }
}

simd_dispatch!(fn head_fwd(x: [&[T]; 3], mask: &MaskRows<T>, g: &Geom, drop: Option<&mut PairDrop<T>>, s: [&mut [T]; 2], o: &mut [T]) => head_fwd_body);
simd_dispatch!(fn head_bwd(x: [&[T]; 3], go: &[T], mask: &MaskRows<T>, g: &Geom, drop: Option<(&[u64], T)>, s: [&mut [T]; 5], out: &mut Grads<T>) => head_bwd_body);

impl Sdpa {
    /// 64-bit words of keep bits per (batch, query head) pair.
    fn words_per_pair(&self) -> usize {
        (self.g.tq * self.g.tk).div_ceil(64)
    }

    /// Each unit is one (batch, key head) pair and the `group` query heads
    /// that read it: K and V are gathered once per unit, and its `dK`, `dV`
    /// are summed over the group within one part (no two parts write the
    /// same rows). With dropout, also returns the keep bits of every pair.
    fn forward<T: Float>(
        &self,
        q: View<T>,
        k: View<T>,
        v: View<T>,
        mask: Option<View<T>>,
    ) -> (Vec<T>, Vec<u64>) {
        let g = &self.g;
        let (tq, tk, d, dv, grp) = (g.tq, g.tk, g.d, g.dv, g.group());
        let br = g.block_rows();
        let mut out = vec![T::ZERO; g.b * g.h * tq * dv];
        let wpp = if self.drop.is_some() {
            self.words_per_pair()
        } else {
            0
        };
        let mut bits = vec![0u64; g.b * g.h * wpp];
        let ranges = g.split();
        let items: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(cut(&mut out, &ranges, grp * tq * dv))
            .zip(cut(&mut bits, &ranges, grp * wpp))
            .collect();
        let mask = mask.as_ref();
        run_parts(items, |_, ((units, o), bits)| {
            let mut qs = vec![T::ZERO; tq * d];
            let mut ks = vec![T::ZERO; tk * d];
            let mut vs = vec![T::ZERO; tk * dv];
            let mut s = vec![T::ZERO; br * tk];
            let mut ms = vec![T::ZERO; tk];
            let (dn, mut words, mut mult) = match self.drop {
                Some(_) => (tk, vec![0u32; tk], vec![T::ZERO; tk]),
                None => (0, Vec::new(), Vec::new()),
            };
            let mut bytes = vec![0u8; 4 * dn];
            let lo = units.start;
            for (u, o) in units.zip(o.chunks_exact_mut((grp * tq * dv).max(1))) {
                let (bi, kh) = (u / g.hk, u % g.hk);
                k.gather(bi, kh, tk, d, &mut ks);
                v.gather(bi, kh, tk, dv, &mut vs);
                for (gi, o) in o.chunks_exact_mut((tq * dv).max(1)).enumerate() {
                    let hi = kh * grp + gi;
                    q.gather(bi, hi, tq, d, &mut qs);
                    let m = MaskRows { view: mask, bi, hi };
                    let at = ((u - lo) * grp + gi) * wpp;
                    let mut pd = self.drop.map(|dm| PairDrop {
                        stream: dm.stream_at(((bi * g.h + hi) * tq * tk) as u64),
                        bits: &mut bits[at..at + wpp],
                        scale: T::from_f64(dm.scale),
                        words: &mut words[..dn],
                        bytes: &mut bytes,
                        mult: &mut mult[..dn],
                    });
                    head_fwd([&qs, &ks, &vs], &m, g, pd.as_mut(), [&mut s, &mut ms], o);
                }
            }
        });
        (out, bits)
    }

    fn backward<T: Float>(
        &self,
        [q, k, v, go]: [View<T>; 4],
        mask: Option<View<T>>,
        bits: &[u64],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let g = &self.g;
        let (tq, tk, d, dv, grp) = (g.tq, g.tk, g.d, g.dv, g.group());
        let br = g.block_rows();
        let (wpp, ds) = match self.drop {
            Some(dm) => (self.words_per_pair(), T::from_f64(dm.scale)),
            None => (0, T::ONE),
        };
        let n = g.b * g.hk;
        let mut dq = vec![T::ZERO; n * grp * tq * d];
        let mut dk = vec![T::ZERO; n * tk * d];
        let mut dvs = vec![T::ZERO; n * tk * dv];
        let ranges = g.split();
        let items: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(cut(&mut dq, &ranges, grp * tq * d))
            .zip(cut(&mut dk, &ranges, tk * d))
            .zip(cut(&mut dvs, &ranges, tk * dv))
            .collect();
        let mask = mask.as_ref();
        run_parts(items, |_, (((units, dq), dk), dvs)| {
            let mut qs = vec![T::ZERO; tq * d];
            let mut ks = vec![T::ZERO; tk * d];
            let mut vs = vec![T::ZERO; tk * dv];
            let mut gs = vec![T::ZERO; tq * dv];
            let mut s = vec![T::ZERO; br * tk];
            let mut pd = vec![T::ZERO; if wpp > 0 { br * tk } else { 0 }];
            let mut dp = vec![T::ZERO; br * tk];
            let mut mult = vec![T::ZERO; if wpp > 0 { br * tk } else { 0 }];
            let mut ms = vec![T::ZERO; tk];
            let lo = units.start;
            for u in units {
                let at = u - lo;
                let (bi, kh) = (u / g.hk, u % g.hk);
                k.gather(bi, kh, tk, d, &mut ks);
                v.gather(bi, kh, tk, dv, &mut vs);
                let dk = &mut dk[at * tk * d..(at + 1) * tk * d];
                let dvs = &mut dvs[at * tk * dv..(at + 1) * tk * dv];
                for gi in 0..grp {
                    let hi = kh * grp + gi;
                    q.gather(bi, hi, tq, d, &mut qs);
                    go.gather(bi, hi, tq, dv, &mut gs);
                    let qa = (at * grp + gi) * tq * d;
                    let mut out = Grads {
                        dq: &mut dq[qa..qa + tq * d],
                        dk: &mut *dk,
                        dv: &mut *dvs,
                    };
                    let m = MaskRows { view: mask, bi, hi };
                    let pair = bi * g.h + hi;
                    let drop = (wpp > 0).then(|| (&bits[pair * wpp..(pair + 1) * wpp], ds));
                    head_bwd(
                        [&qs, &ks, &vs],
                        &gs,
                        &m,
                        g,
                        drop,
                        [&mut s, &mut pd, &mut dp, &mut mult, &mut ms],
                        &mut out,
                    );
                }
            }
        });
        (dq, dk, dvs)
    }

    fn grads<T: Float>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let g = &self.g;
        let out_shape = self.order.shape(q.rank(), [g.b, g.h, g.tq, g.dv]);
        if grad.shape() != &out_shape {
            candle_core::bail!(
                "scaled_dot_product_attention: gradient of shape {:?} for an output of shape {:?}",
                grad.dims(),
                out_shape
            );
        }
        let mut tensors = vec![q, k, v, grad];
        if let Some(m) = &self.mask {
            tensors.push(m);
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let dims = [g.d, g.d, g.dv, g.dv];
        let view = |i: usize| -> Result<View<T>> {
            let (s, l) = &guards[i];
            match &**s {
                Storage::Cpu(s) if i < 4 => View::ordered(s, l, self.order, i, dims[i]),
                Storage::Cpu(s) => View::new(s, l),
                _ => candle_core::bail!(
                    "scaled_dot_product_attention: the fused backward got a tensor off the CPU"
                ),
            }
        };
        let mask = if self.mask.is_some() {
            Some(view(4)?)
        } else {
            None
        };
        let bits: &[u64] = match (&self.drop, self.kept.get()) {
            (None, _) => &[],
            (Some(_), Some(b)) => b,
            (Some(_), None) => {
                candle_core::bail!("scaled_dot_product_attention: backward before forward")
            }
        };
        let (dq, dk, dv) = self.backward([view(0)?, view(1)?, view(2)?, view(3)?], mask, bits);
        let cpu = Device::Cpu;
        let o = self.order;
        Ok((
            Tensor::from_vec(o.arrange(dq, [g.b, g.h, g.tq, g.d]), q.shape(), &cpu)?,
            Tensor::from_vec(o.arrange(dk, [g.b, g.hk, g.tk, g.d]), k.shape(), &cpu)?,
            Tensor::from_vec(o.arrange(dv, [g.b, g.hk, g.tk, g.dv]), v.shape(), &cpu)?,
        ))
    }

    /// The forward pass on CPU storage, with the mask's storage read here.
    /// The keep bits of a dropout pass are kept for the backward pass.
    fn cpu_forward<T: Float>(&self, [q, k, v]: [View<T>; 3]) -> Result<Vec<T>> {
        let (out, bits) = match &self.mask {
            None => self.forward(q, k, v, None),
            Some(mask) => {
                let (s, l) = mask.storage_and_layout();
                let Storage::Cpu(s) = &*s else {
                    candle_core::bail!("scaled_dot_product_attention: the mask is off the CPU");
                };
                self.forward(q, k, v, Some(View::new(s, l)?))
            }
        };
        if self.drop.is_some() {
            let _ = self.kept.set(bits);
        }
        let g = &self.g;
        Ok(self.order.arrange(out, [g.b, g.h, g.tq, g.dv]))
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "minibatch-sdpa"
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
        let g = &self.g;
        let shape = self.order.shape(l1.dims().len(), [g.b, g.h, g.tq, g.dv]);
        let o = self.order;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.cpu_forward::<f32>([
                    View::ordered(s1, l1, o, 0, g.d)?,
                    View::ordered(s2, l2, o, 1, g.d)?,
                    View::ordered(s3, l3, o, 2, g.dv)?,
                ])?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.cpu_forward::<f64>([
                    View::ordered(s1, l1, o, 0, g.d)?,
                    View::ordered(s2, l2, o, 1, g.d)?,
                    View::ordered(s3, l3, o, 2, g.dv)?,
                ])?)
            }
            _ => candle_core::bail!(
                "scaled_dot_product_attention: the fused kernel needs q, k, v all f32 or all f64"
            ),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.grads::<f32>(q, k, v, grad)?,
            DType::F64 => self.grads::<f64>(q, k, v, grad)?,
            dt => candle_core::bail!("scaled_dot_product_attention: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
