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
//! `(b, h, t, d)` is used as is, no copy). The forward pass computes each
//! row of `P` in a scratch row and never stores `P`; the backward pass
//! recomputes it from `q` and `k` (as FlashAttention does), so no
//! `b·h·tq·tk` tensor is kept between the passes. (batch, head) pairs are
//! split over candle's CPU thread pool when the work is large. Every other
//! device and dtype (and the CPU after
//! [`set_tensor_path(true)`](crate::set_tensor_path)) runs the same maths as
//! candle tensor ops, differentiated by candle's autograd.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

use super::simd::{dot, simd_dispatch};
use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::float::Float;
use crate::split::{parts, run_parts};

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
    let mask = match mask {
        Some(m) => Some(additive_mask(m, q, &g)?),
        None => None,
    };
    if cpu_kernel(q) && matches!(q.dtype(), DType::F32 | DType::F64) {
        return q.apply_op3(k, v, Sdpa { g, mask });
    }
    composed(q, k, v, mask.as_ref(), &g)
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
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        if qd[0] != kd[0] || kd[..2] != vd[..2] || kd[1] == 0 || qd[1] % kd[1] != 0 {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: batch and heads differ (the key/value heads must be equal and divide the query heads): q {qd:?}, k {kd:?}, v {vd:?}"
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
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, g: &Geom) -> Result<Tensor> {
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
    if mask.is_none() {
        return super::softmax_last_dim(&s)?.matmul(&v);
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
    ok.where_cond(&p, &zeros)?.matmul(&v)
}

/// The fused CPU op (the mask, if any, additive, of the inputs' dtype and
/// broadcast to `(b, h, tq, tk)`).
struct Sdpa {
    g: Geom,
    mask: Option<Tensor>,
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

/// One query row's probabilities: `p[j] = softmax_j(scale · q·k_j + m_j)`
/// for the `n` first keys (`p` has at least `n` elements; the rest is not
/// touched; `m` the mask row, if any). A row whose scores are all `-inf` is
/// all zeros.
#[inline(always)]
fn probs<T: Float>(qi: &[T], k: &[T], d: usize, n: usize, scale: T, m: Option<&[T]>, p: &mut [T]) {
    let mut mx = T::NEG_INFINITY;
    for (j, pj) in p[..n].iter_mut().enumerate() {
        let mut s = scale * dot(qi, &k[j * d..(j + 1) * d]);
        if let Some(m) = m {
            s += m[j];
        }
        *pj = s;
        if s > mx {
            mx = s;
        }
    }
    if mx == T::NEG_INFINITY {
        p[..n].iter_mut().for_each(|x| *x = T::ZERO);
        return;
    }
    let mut sum = T::ZERO;
    for pj in p[..n].iter_mut() {
        let e = (*pj - mx).exp_fast();
        *pj = e;
        sum += e;
    }
    let inv = T::ONE / sum;
    for pj in p[..n].iter_mut() {
        *pj *= inv;
    }
}

/// `y += a · x`.
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
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

/// The forward pass of one pair: `q (tq, d)`, `k (tk, d)`, `v (tk, dv)`
/// row-major; `o (tq, dv)` zeroed on entry; `p`, `ms` scratch rows of `tk`.
#[inline(always)]
fn head_fwd_body<T: Float>(
    [q, k, v]: [&[T]; 3],
    mask: &MaskRows<T>,
    g: &Geom,
    [p, ms]: [&mut [T]; 2],
    o: &mut [T],
) {
    let (d, dv) = (g.d, g.dv);
    let scale = T::from_f64(g.scale);
    for i in 0..g.tq {
        let n = g.keys(i);
        let m = mask.row(i, n, ms);
        probs(&q[i * d..(i + 1) * d], k, d, n, scale, m, p);
        let oi = &mut o[i * dv..(i + 1) * dv];
        for (j, &pj) in p[..n].iter().enumerate() {
            axpy(oi, pj, &v[j * dv..(j + 1) * dv]);
        }
    }
}

/// One pair's gradients, `(tq, d)`, `(tk, d)`, `(tk, dv)` row-major.
struct Grads<'a, T> {
    dq: &'a mut [T],
    dk: &'a mut [T],
    dv: &'a mut [T],
}

/// The backward pass of one pair: `q`, `k`, `v` as in [`head_fwd_body`],
/// `go (tq, dv)`; `dq` zeroed on entry, `dk` and `dv` accumulated into;
/// `p`, `dp`, `ms` scratch rows of `tk`.
#[inline(always)]
fn head_bwd_body<T: Float>(
    [q, k, v]: [&[T]; 3],
    go: &[T],
    mask: &MaskRows<T>,
    g: &Geom,
    [p, dp, ms]: [&mut [T]; 3],
    out: &mut Grads<T>,
) {
    let Grads { dq, dk, dv: dvs } = out;
    let (d, dv) = (g.d, g.dv);
    let scale = T::from_f64(g.scale);
    for i in 0..g.tq {
        let n = g.keys(i);
        let qi = &q[i * d..(i + 1) * d];
        let goi = &go[i * dv..(i + 1) * dv];
        let m = mask.row(i, n, ms);
        probs(qi, k, d, n, scale, m, p);
        // dV_j += P_ij dO_i; dP_ij = dO_i · V_j; r = Σ_j P_ij dP_ij.
        let mut r = T::ZERO;
        for j in 0..n {
            let vj = &v[j * dv..(j + 1) * dv];
            axpy(&mut dvs[j * dv..(j + 1) * dv], p[j], goi);
            let x = dot(goi, vj);
            dp[j] = x;
            r += p[j] * x;
        }
        // dS_ij (times the scale); dQ_i = Σ_j dS_ij K_j; dK_j += dS_ij Q_i.
        let dqi = &mut dq[i * d..(i + 1) * d];
        for j in 0..n {
            let ds = scale * p[j] * (dp[j] - r);
            axpy(dqi, ds, &k[j * d..(j + 1) * d]);
            axpy(&mut dk[j * d..(j + 1) * d], ds, qi);
        }
    }
}

simd_dispatch!(fn head_fwd(x: [&[T]; 3], mask: &MaskRows<T>, g: &Geom, s: [&mut [T]; 2], o: &mut [T]) => head_fwd_body);
simd_dispatch!(fn head_bwd(x: [&[T]; 3], go: &[T], mask: &MaskRows<T>, g: &Geom, s: [&mut [T]; 3], out: &mut Grads<T>) => head_bwd_body);

impl Sdpa {
    /// Each unit is one (batch, key head) pair and the `group` query heads
    /// that read it: K and V are gathered once per unit, and its `dK`, `dV`
    /// are summed over the group within one part (no two parts write the
    /// same rows).
    fn forward<T: Float>(
        &self,
        q: View<T>,
        k: View<T>,
        v: View<T>,
        mask: Option<View<T>>,
    ) -> Vec<T> {
        let g = &self.g;
        let (tq, tk, d, dv, grp) = (g.tq, g.tk, g.d, g.dv, g.group());
        // Zeroed by the allocator (calloc), accumulated into below.
        let mut out = vec![T::ZERO; g.b * g.h * tq * dv];
        let ranges = g.split();
        let items: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(cut(&mut out, &ranges, grp * tq * dv))
            .collect();
        let mask = mask.as_ref();
        run_parts(items, |_, (units, o)| {
            let mut qs = vec![T::ZERO; tq * d];
            let mut ks = vec![T::ZERO; tk * d];
            let mut vs = vec![T::ZERO; tk * dv];
            let mut p = vec![T::ZERO; tk];
            let mut ms = vec![T::ZERO; tk];
            for (u, o) in units.zip(o.chunks_exact_mut((grp * tq * dv).max(1))) {
                let (bi, kh) = (u / g.hk, u % g.hk);
                k.gather(bi, kh, tk, d, &mut ks);
                v.gather(bi, kh, tk, dv, &mut vs);
                for (gi, o) in o.chunks_exact_mut((tq * dv).max(1)).enumerate() {
                    let hi = kh * grp + gi;
                    q.gather(bi, hi, tq, d, &mut qs);
                    let m = MaskRows { view: mask, bi, hi };
                    head_fwd([&qs, &ks, &vs], &m, g, [&mut p, &mut ms], o);
                }
            }
        });
        out
    }

    fn backward<T: Float>(
        &self,
        [q, k, v, go]: [View<T>; 4],
        mask: Option<View<T>>,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let g = &self.g;
        let (tq, tk, d, dv, grp) = (g.tq, g.tk, g.d, g.dv, g.group());
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
            let mut p = vec![T::ZERO; tk];
            let mut dp = vec![T::ZERO; tk];
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
                    head_bwd(
                        [&qs, &ks, &vs],
                        &gs,
                        &m,
                        g,
                        [&mut p, &mut dp, &mut ms],
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
        if grad.dims() != [g.b, g.h, g.tq, g.dv] {
            candle_core::bail!(
                "scaled_dot_product_attention: gradient of shape {:?} for an output of shape {:?}",
                grad.dims(),
                [g.b, g.h, g.tq, g.dv]
            );
        }
        let mut tensors = vec![q, k, v, grad];
        if let Some(m) = &self.mask {
            tensors.push(m);
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let view = |i: usize| -> Result<View<T>> {
            let (s, l) = &guards[i];
            match &**s {
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
        let (dq, dk, dv) = self.backward([view(0)?, view(1)?, view(2)?, view(3)?], mask);
        let cpu = Device::Cpu;
        Ok((
            Tensor::from_vec(dq, q.shape(), &cpu)?,
            Tensor::from_vec(dk, k.shape(), &cpu)?,
            Tensor::from_vec(dv, v.shape(), &cpu)?,
        ))
    }

    /// The forward pass on CPU storage, with the mask's storage read here.
    fn cpu_forward<T: Float>(&self, [q, k, v]: [View<T>; 3]) -> Result<Vec<T>> {
        let Some(mask) = &self.mask else {
            return Ok(self.forward(q, k, v, None));
        };
        let (s, l) = mask.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("scaled_dot_product_attention: the mask is off the CPU");
        };
        Ok(self.forward(q, k, v, Some(View::new(s, l)?)))
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
        let shape = Shape::from((g.b, g.h, g.tq, g.dv));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.cpu_forward::<f32>([
                    View::new(s1, l1)?,
                    View::new(s2, l2)?,
                    View::new(s3, l3)?,
                ])?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.cpu_forward::<f64>([
                    View::new(s1, l1)?,
                    View::new(s2, l2)?,
                    View::new(s3, l3)?,
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
