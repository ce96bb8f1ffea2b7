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

use super::simd::{dot, simd_dispatch, Float};
use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::im2col::{parts, run_parts};

/// Attention of the queries `q` over the keys `k` and values `v`, as
/// PyTorch's `torch.nn.functional.scaled_dot_product_attention(q, k, v,
/// is_causal=is_causal, scale=scale)` (no mask, no dropout):
///
/// * `q`: `(b, h, tq, d)`, `k`: `(b, h, tk, d)`, `v`: `(b, h, tk, dv)`;
///   the result is `(b, h, tq, dv)`, contiguous;
/// * `S = scale · Q Kᵀ` per (batch, head), `scale` defaulting to `1/√d`;
/// * `is_causal`: query `i` attends to keys `j ≤ i` only (PyTorch's
///   top-left aligned `tril(ones(tq, tk))` mask; queries `i ≥ tk` see every
///   key);
/// * `P = softmax(S)` along the keys (shifted by the row maximum, so large
///   scores do not overflow), `O = P V`.
///
/// Backward, for the upstream gradient `dO`: `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`. On the CPU (`f32`, `f64`) forward and backward are
/// each one fused pass per (batch, head) that reads `q`, `k`, `v` through
/// any strides (no `.contiguous()` needed after a `transpose(1, 2)`) and
/// recomputes `P` in the backward pass instead of storing it. Elsewhere it is
/// candle's `matmul`, a `-inf` mask, [`softmax_last_dim`](super::softmax_last_dim)
/// and `matmul`.
///
/// Errors: tensors that are not of rank 4, shapes that disagree (batch,
/// heads, `d` of `q` and `k`, `tk` of `k` and `v`), no keys (`tk = 0`) or an
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
    let g = Geom::check(q, k, v, is_causal, scale)?;
    if cpu_kernel(q) && matches!(q.dtype(), DType::F32 | DType::F64) {
        return q.apply_op3(k, v, Sdpa(g));
    }
    composed(q, k, v, &g)
}

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
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
        if qd[..2] != kd[..2] || kd[..2] != vd[..2] {
            return Err(NnError::ShapeMismatch(format!(
                "{what}: batch and heads differ: q {qd:?}, k {kd:?}, v {vd:?}"
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
            tq: qd[2],
            tk: kd[2],
            d: qd[3],
            dv: vd[3],
            causal,
            scale,
        })
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

    /// The (batch, head) pairs of each part the work is split into.
    fn split(&self) -> Vec<Range<usize>> {
        let n = self.b * self.h;
        let work = n * self.tq * self.tk * (2 * self.d + 2 * self.dv);
        let per = n.div_ceil(parts(n, work)).max(1);
        (0..n)
            .step_by(per)
            .map(|lo| lo..(lo + per).min(n))
            .collect()
    }
}

/// The tensor-op path: `softmax(scale · q kᵀ + mask) v`.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, g: &Geom) -> Result<Tensor> {
    // candle's batched matmul needs collapsible batch strides.
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let s = (q.matmul(&k.t()?)? * g.scale)?;
    let s = if g.causal {
        let mask: Vec<f32> = (0..g.tq)
            .flat_map(|i| (0..g.tk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (g.tq, g.tk), s.device())?.to_dtype(s.dtype())?;
        s.broadcast_add(&mask)?
    } else {
        s
    };
    super::softmax_last_dim(&s)?.matmul(&v)
}

/// The fused CPU op.
struct Sdpa(Geom);

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

    /// Copies the `(rows, cols)` matrix of (batch, head) pair `bh` (`h`
    /// heads) into `out`, row-major.
    fn gather(&self, bh: usize, h: usize, rows: usize, cols: usize, out: &mut [T]) {
        let [s0, s1, s2, s3] = self.stride;
        let base = self.start + (bh / h) * s0 + (bh % h) * s1;
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
}

/// `buf` cut into the parts of `ranges` (in order), `per` elements per pair.
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

/// One query row's probabilities: `p[j] = softmax_j(scale · q·k_j)` for the
/// `n` first keys (`p` has at least `n` elements; the rest is not touched).
#[inline(always)]
fn probs<T: Float>(qi: &[T], k: &[T], d: usize, n: usize, scale: T, p: &mut [T]) {
    let mut m = T::NEG_INFINITY;
    for (j, pj) in p[..n].iter_mut().enumerate() {
        let s = scale * dot(qi, &k[j * d..(j + 1) * d]);
        *pj = s;
        if s > m {
            m = s;
        }
    }
    let mut sum = T::ZERO;
    for pj in p[..n].iter_mut() {
        let e = (*pj - m).exp_fast();
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

/// The forward pass of one pair: `q (tq, d)`, `k (tk, d)`, `v (tk, dv)`
/// row-major; `o (tq, dv)` zeroed on entry; `p` a scratch row of `tk`.
#[inline(always)]
fn head_fwd_body<T: Float>(q: &[T], k: &[T], v: &[T], g: &Geom, p: &mut [T], o: &mut [T]) {
    let (d, dv) = (g.d, g.dv);
    let scale = T::from_f64(g.scale);
    for i in 0..g.tq {
        let n = g.keys(i);
        probs(&q[i * d..(i + 1) * d], k, d, n, scale, p);
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
/// `go (tq, dv)`; the gradients in `out` zeroed on entry; `p`, `dp` scratch
/// rows of `tk`.
#[inline(always)]
fn head_bwd_body<T: Float>(
    [q, k, v]: [&[T]; 3],
    go: &[T],
    g: &Geom,
    p: &mut [T],
    dp: &mut [T],
    out: &mut Grads<T>,
) {
    let Grads { dq, dk, dv: dvs } = out;
    let (d, dv) = (g.d, g.dv);
    let scale = T::from_f64(g.scale);
    for i in 0..g.tq {
        let n = g.keys(i);
        let qi = &q[i * d..(i + 1) * d];
        let goi = &go[i * dv..(i + 1) * dv];
        probs(qi, k, d, n, scale, p);
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

simd_dispatch!(fn head_fwd(q: &[T], k: &[T], v: &[T], g: &Geom, p: &mut [T], o: &mut [T]) => head_fwd_body);
simd_dispatch!(fn head_bwd(x: [&[T]; 3], go: &[T], g: &Geom, p: &mut [T], dp: &mut [T], out: &mut Grads<T>) => head_bwd_body);

impl Sdpa {
    fn forward<T: Float>(&self, q: View<T>, k: View<T>, v: View<T>) -> Vec<T> {
        let g = &self.0;
        let (tq, tk, d, dv) = (g.tq, g.tk, g.d, g.dv);
        // Zeroed by the allocator (calloc), accumulated into below.
        let mut out = vec![T::ZERO; g.b * g.h * tq * dv];
        let ranges = g.split();
        let items: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(cut(&mut out, &ranges, tq * dv))
            .collect();
        run_parts(items, |_, (heads, o)| {
            let mut qs = vec![T::ZERO; tq * d];
            let mut ks = vec![T::ZERO; tk * d];
            let mut vs = vec![T::ZERO; tk * dv];
            let mut p = vec![T::ZERO; tk];
            for (bh, o) in heads.zip(o.chunks_exact_mut((tq * dv).max(1))) {
                q.gather(bh, g.h, tq, d, &mut qs);
                k.gather(bh, g.h, tk, d, &mut ks);
                v.gather(bh, g.h, tk, dv, &mut vs);
                head_fwd(&qs, &ks, &vs, g, &mut p, o);
            }
        });
        out
    }

    fn backward<T: Float>(
        &self,
        q: View<T>,
        k: View<T>,
        v: View<T>,
        go: View<T>,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let g = &self.0;
        let (tq, tk, d, dv) = (g.tq, g.tk, g.d, g.dv);
        let n = g.b * g.h;
        let mut dq = vec![T::ZERO; n * tq * d];
        let mut dk = vec![T::ZERO; n * tk * d];
        let mut dvs = vec![T::ZERO; n * tk * dv];
        let ranges = g.split();
        let items: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(cut(&mut dq, &ranges, tq * d))
            .zip(cut(&mut dk, &ranges, tk * d))
            .zip(cut(&mut dvs, &ranges, tk * dv))
            .collect();
        run_parts(items, |_, (((heads, dq), dk), dvs)| {
            let mut qs = vec![T::ZERO; tq * d];
            let mut ks = vec![T::ZERO; tk * d];
            let mut vs = vec![T::ZERO; tk * dv];
            let mut gs = vec![T::ZERO; tq * dv];
            let mut p = vec![T::ZERO; tk];
            let mut dp = vec![T::ZERO; tk];
            let lo = heads.start;
            for bh in heads {
                let at = bh - lo;
                q.gather(bh, g.h, tq, d, &mut qs);
                k.gather(bh, g.h, tk, d, &mut ks);
                v.gather(bh, g.h, tk, dv, &mut vs);
                go.gather(bh, g.h, tq, dv, &mut gs);
                let mut out = Grads {
                    dq: &mut dq[at * tq * d..(at + 1) * tq * d],
                    dk: &mut dk[at * tk * d..(at + 1) * tk * d],
                    dv: &mut dvs[at * tk * dv..(at + 1) * tk * dv],
                };
                head_bwd([&qs, &ks, &vs], &gs, g, &mut p, &mut dp, &mut out);
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
        let g = &self.0;
        if grad.dims() != [g.b, g.h, g.tq, g.dv] {
            candle_core::bail!(
                "scaled_dot_product_attention: gradient of shape {:?} for an output of shape {:?}",
                grad.dims(),
                [g.b, g.h, g.tq, g.dv]
            );
        }
        let guards = [q, k, v, grad].map(|t| t.storage_and_layout());
        let view = |i: usize| -> Result<View<T>> {
            let (s, l) = &guards[i];
            match &**s {
                Storage::Cpu(s) => View::new(s, l),
                _ => candle_core::bail!(
                    "scaled_dot_product_attention: the fused backward got a tensor off the CPU"
                ),
            }
        };
        let (dq, dk, dv) = self.backward(view(0)?, view(1)?, view(2)?, view(3)?);
        let cpu = Device::Cpu;
        Ok((
            Tensor::from_vec(dq, q.shape(), &cpu)?,
            Tensor::from_vec(dk, k.shape(), &cpu)?,
            Tensor::from_vec(dv, v.shape(), &cpu)?,
        ))
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
        let g = &self.0;
        let shape = Shape::from((g.b, g.h, g.tq, g.dv));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                self.forward::<f32>(View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?),
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                self.forward::<f64>(View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?),
            ),
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
