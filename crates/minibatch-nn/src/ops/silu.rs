//! `silu` (swish) with a one-pass backward.
//!
//! `y = x σ(x)`, `dy/dx = σ(x) (1 + x (1 − σ(x)))`. candle's own
//! `Tensor::silu` has a fast forward but builds its backward from six
//! elementwise tensor ops (a negation, an exponential, an addition, a
//! reciprocal, products), each a pass over memory and an allocation the
//! size of `x`. Here the backward is one pass over the saved input and the
//! incoming gradient, with a vectorised `exp`.
//!
//! On the CPU (`f32`/`f64`) this is a custom op; elsewhere (and with
//! [`crate::set_tensor_path`]) it is candle's `silu`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::cpu::contiguous;
use crate::error::NnError;

use super::elementwise::{cpu_bwd, cpu_fwd, map};
use super::rows::{tensor, with_slices};
use super::simd::simd_dispatch;
use crate::dispatch::cpu_kernel;
use crate::float::Float;

/// The sigmoid-weighted linear unit `x σ(x) = x / (1 + e^{−x})`
/// elementwise (PyTorch's `torch.nn.functional.silu`, transformers'
/// `silu`/`swish`), with a fast backward pass on the CPU.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::silu;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = silu(x.as_tensor())?;
/// let want = x.as_tensor().silu()?.to_vec1::<f32>()?;
/// for (a, b) in y.to_vec1::<f32>()?.iter().zip(&want) {
///     assert!((a - b).abs() <= 1e-6);
/// }
/// let g = y.sum_all()?.backward()?;
/// let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert_eq!(dx[1], 0.5); // σ(0) = ½
/// assert!((dx[2] - 1.0908).abs() < 1e-4);
/// # Ok(()) }
/// ```
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(SiluOp);
    }
    x.silu()
}

struct SiluOp;

#[inline(always)]
fn fwd_body<T: Float>(x: &[T], out: &mut [MaybeUninit<T>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(v / (T::ONE + (-v).exp_fast()));
    }
}

#[inline(always)]
fn bwd_body<T: Float>(x: &[T], g: &[T], out: &mut [MaybeUninit<T>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        let s = T::ONE / (T::ONE + (-v).exp_fast());
        o.write(g * s * (T::ONE + v * (T::ONE - s)));
    }
}

simd_dispatch!(fn fwd_rows(x: &[T], out: &mut [MaybeUninit<T>]) => fwd_body);
simd_dispatch!(fn bwd_rows(x: &[T], g: &[T], out: &mut [MaybeUninit<T>]) => bwd_body);

fn fwd<T: Float>(x: &[T]) -> Vec<T> {
    map(x.len(), x.len().saturating_mul(4), |out, at| {
        fwd_rows(&x[at..at + out.len()], out);
    })
}

fn bwd<T: Float>(x: &[T], g: &[T]) -> Vec<T> {
    map(x.len(), x.len().saturating_mul(4), |out, at| {
        bwd_rows(&x[at..at + out.len()], &g[at..at + out.len()], out);
    })
}

impl CustomOp1 for SiluOp {
    fn name(&self) -> &'static str {
        "minibatch-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_fwd("silu", s, l, fwd::<f32>, fwd::<f64>)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        cpu_bwd("silu", arg, grad, bwd::<f32>, bwd::<f64>).map(Some)
    }
}

/// `silu(gate) * up`, the gated unit of a SwiGLU MLP (Llama's
/// `act_fn(gate_proj(x)) * up_proj(x)`), with the values and gradients of
/// [`silu`] followed by a multiplication, bit for bit. On the CPU it is one
/// op: candle's autograd has no `silu(gate)` node to differentiate (a
/// zero-filled buffer and an addition the size of `gate` in its backward
/// pass), and the product is not a second pass over memory.
///
/// Errors: `gate` and `up` of different shapes, dtypes or devices.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_nn::ops::{silu, silu_mul};
///
/// # fn main() -> candle_core::Result<()> {
/// let g = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
/// let u = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
/// let fused = silu_mul(&g, &u)?.flatten_all()?.to_vec1::<f32>()?;
/// let two = (silu(&g)? * &u)?.flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(fused, two);
/// # Ok(()) }
/// ```
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.shape() != up.shape()
        || gate.dtype() != up.dtype()
        || !gate.device().same_device(up.device())
    {
        return Err(NnError::ShapeMismatch(format!(
            "silu_mul: gate {:?} {:?} and up {:?} {:?} must have one shape and dtype on one device",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        ))
        .into());
    }
    if cpu_kernel(gate) && matches!(gate.dtype(), DType::F32 | DType::F64) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMulOp);
    }
    silu(gate)? * up
}

struct SiluMulOp;

#[inline(always)]
fn mul_fwd_body<T: Float>(g: &[T], u: &[T], out: &mut [MaybeUninit<T>]) {
    for ((o, &v), &u) in out.iter_mut().zip(g).zip(u) {
        o.write(v / (T::ONE + (-v).exp_fast()) * u);
    }
}

/// `d gate = (dy · up) · silu'(gate)`, as silu's backward of mul's gradient.
#[inline(always)]
fn mul_dgate_body<T: Float>(g: &[T], u: &[T], dy: &[T], out: &mut [MaybeUninit<T>]) {
    for (((o, &v), &u), &d) in out.iter_mut().zip(g).zip(u).zip(dy) {
        let s = T::ONE / (T::ONE + (-v).exp_fast());
        o.write(d * u * s * (T::ONE + v * (T::ONE - s)));
    }
}

/// `d up = dy · silu(gate)`.
#[inline(always)]
fn mul_dup_body<T: Float>(g: &[T], dy: &[T], out: &mut [MaybeUninit<T>]) {
    for ((o, &v), &d) in out.iter_mut().zip(g).zip(dy) {
        o.write(d * (v / (T::ONE + (-v).exp_fast())));
    }
}

simd_dispatch!(fn mul_fwd_rows(g: &[T], u: &[T], out: &mut [MaybeUninit<T>]) => mul_fwd_body);
simd_dispatch!(fn mul_dgate_rows(g: &[T], u: &[T], dy: &[T], out: &mut [MaybeUninit<T>]) => mul_dgate_body);
simd_dispatch!(fn mul_dup_rows(g: &[T], dy: &[T], out: &mut [MaybeUninit<T>]) => mul_dup_body);

fn silu_mul_fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    map(g.len(), g.len().saturating_mul(4), |out, at| {
        let r = at..at + out.len();
        mul_fwd_rows(&g[r.clone()], &u[r], out);
    })
}

/// [`silu_mul_bwd`] on the CPU tensors `(gate, up, grad)`: `(d gate, d up)`.
fn silu_mul_bwd_tensors<T: Float>(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    with_slices::<T, _>(&[gate, up, grad], "silu_mul", |s| {
        let (dg, du) = silu_mul_bwd(s[0], s[1], s[2]);
        Ok((tensor(dg, gate.shape())?, tensor(du, gate.shape())?))
    })
}

fn silu_mul_bwd<T: Float>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let work = g.len().saturating_mul(4);
    let dg = map(g.len(), work, |out, at| {
        let r = at..at + out.len();
        mul_dgate_rows(&g[r.clone()], &u[r.clone()], &dy[r], out);
    });
    let du = map(g.len(), work, |out, at| {
        let r = at..at + out.len();
        mul_dup_rows(&g[r.clone()], &dy[r], out);
    });
    (dg, du)
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "minibatch-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "silu_mul";
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(silu_mul_fwd::<f32>(
                contiguous(s1, l1, what)?,
                contiguous(s2, l2, what)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(silu_mul_fwd::<f64>(
                contiguous(s1, l1, what)?,
                contiguous(s2, l2, what)?,
            )),
            _ => candle_core::bail!("{what}: the fused kernel runs on two f32 or two f64 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let what = "silu_mul";
        if grad.shape() != gate.shape() {
            candle_core::bail!(
                "{what}: gradient of shape {:?} for {:?}",
                grad.dims(),
                gate.dims()
            );
        }
        let (dg, du) = match gate.dtype() {
            DType::F32 => silu_mul_bwd_tensors::<f32>(gate, up, grad)?,
            DType::F64 => silu_mul_bwd_tensors::<f64>(gate, up, grad)?,
            _ => candle_core::bail!("{what}: the fused kernel runs on f32 or f64 only"),
        };
        Ok((Some(dg), Some(du)))
    }
}
