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

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::dispatch::cpu_kernel;
use crate::im2col::{assume_init, parts, run_parts, uninit, ConvFloat};

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

/// The elements of a contiguous CPU storage, `T`-typed, from the layout's offset.
fn host<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("relu: the fused kernel needs a contiguous tensor"),
    }
}

/// `out = f(chunk of out, offset)` over `n` elements, split over threads
/// when large.
fn map<T: ConvFloat>(n: usize, f: impl Fn(&mut [MaybeUninit<T>], usize) + Sync) -> Vec<T> {
    let mut out = uninit::<T>(n);
    let per = n.div_ceil(parts(n, n / 4)).max(1);
    run_parts(out.chunks_mut(per).collect(), |k, chunk| f(chunk, k * per));
    // SAFETY: `f` writes every element of its chunk (below).
    unsafe { assume_init(out) }
}

fn fwd<T: ConvFloat>(x: &[T]) -> Vec<T> {
    map(x.len(), |out, at| {
        let x = &x[at..at + out.len()];
        for (o, &v) in out.iter_mut().zip(x) {
            // `v <= 0` is false for NaN, which stays.
            o.write(if v <= T::ZERO { T::ZERO } else { v });
        }
    })
}

fn bwd<T: ConvFloat>(y: &[T], g: &[T]) -> Vec<T> {
    map(y.len(), |out, at| {
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
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(host::<f32>(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(host::<f64>(s, l)?)),
            _ => candle_core::bail!("relu: the fused kernel runs on f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (ys, yl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (candle_core::Storage::Cpu(ys), candle_core::Storage::Cpu(gs)) = (&*ys, &*gs) else {
            candle_core::bail!("relu: the fused backward got a tensor off the CPU");
        };
        if yl.shape() != gl.shape() {
            candle_core::bail!(
                "relu: gradient of shape {:?} for an output of shape {:?}",
                gl.dims(),
                yl.dims()
            );
        }
        let dx = match ys {
            CpuStorage::F32(_) => Tensor::from_vec(
                bwd(host::<f32>(ys, yl)?, host::<f32>(gs, gl)?),
                res.shape(),
                res.device(),
            )?,
            CpuStorage::F64(_) => Tensor::from_vec(
                bwd(host::<f64>(ys, yl)?, host::<f64>(gs, gl)?),
                res.shape(),
                res.device(),
            )?,
            _ => candle_core::bail!("relu: the fused kernel runs on f32 or f64 only"),
        };
        Ok(Some(dx))
    }
}
