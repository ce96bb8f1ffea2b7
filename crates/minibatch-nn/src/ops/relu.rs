//! `relu` with a one-pass backward.
//!
//! `y = max(x, 0)`, `dx = grad · [y > 0]` (PyTorch's rule: no gradient at
//! 0, and a NaN input stays NaN in the forward pass and passes no
//! gradient). candle's own `Tensor::relu` backward builds a zero tensor, a
//! `u8` comparison mask, its cast to floats and a product: four passes and
//! four allocations the size of `x` (and it passes the gradient at 0).
//!
//! On the CPU (`f32`/`f64`) this is a custom op whose backward is one pass
//! over the gradient and the output; elsewhere (and with
//! [`crate::set_tensor_path`]) it is candle's `relu`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::elementwise::{cpu_bwd, cpu_fwd, map};
use crate::dispatch::cpu_kernel;
use crate::float::Float;

/// The rectified linear unit `max(x, 0)`, elementwise, with a fast
/// backward pass on the CPU. Same values as candle's `Tensor::relu`
/// (except that a NaN stays NaN, as in PyTorch).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::relu;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = relu(x.as_tensor())?;
/// assert_eq!(y.to_vec1::<f32>()?, [0.0, 0.0, 2.0]);
/// let g = (&y * 3.0)?.sum_all()?.backward()?;
/// assert_eq!(g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [0.0, 0.0, 3.0]);
/// # Ok(()) }
/// ```
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(ReluOp);
    }
    x.relu()
}

struct ReluOp;

fn fwd<T: Float>(x: &[T]) -> Vec<T> {
    map(x.len(), x.len() / 4, |out, at| {
        let x = &x[at..at + out.len()];
        for (o, &v) in out.iter_mut().zip(x) {
            // `v <= 0` is false for NaN, which stays.
            o.write(if v <= T::ZERO { T::ZERO } else { v });
        }
    })
}

fn bwd<T: Float>(y: &[T], g: &[T]) -> Vec<T> {
    map(y.len(), y.len() / 4, |out, at| {
        let (y, g) = (&y[at..at + out.len()], &g[at..at + out.len()]);
        for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
            o.write(if y > T::ZERO { g } else { T::ZERO });
        }
    })
}

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "minibatch-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_fwd("relu", s, l, fwd::<f32>, fwd::<f64>)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        cpu_bwd("relu", res, grad, bwd::<f32>, bwd::<f64>).map(Some)
    }
}
