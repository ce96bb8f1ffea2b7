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

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::elementwise::{cpu_bwd, cpu_fwd, map};
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
