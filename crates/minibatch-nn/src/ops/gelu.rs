//! `gelu` (tanh approximation) and `gelu_erf` (exact) with a one-pass
//! backward.
//!
//! candle's own `Tensor::gelu` / `Tensor::gelu_erf` have a fast forward
//! but compose their backward from about ten elementwise tensor ops
//! (`powf`, `tanh`, `exp`, `erf`, products and sums), each a pass over
//! memory and an allocation the size of `x`. Here the backward is one pass
//! over the saved input and the incoming gradient.
//!
//! On the CPU (`f32`/`f64`) these are custom ops; elsewhere (and with
//! [`crate::set_tensor_path`]) they are candle's `gelu` / `gelu_erf`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::dispatch::cpu_kernel;
use crate::im2col::{assume_init, parts, run_parts, uninit};

/// The GELU of the tanh approximation, elementwise, with a fast backward
/// pass on the CPU:
///
/// ```text
/// y = ½ x (1 + tanh(u)),   u = √(2/π) · x · (1 + 0.044715 x²)
/// dy/dx = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²),   t = tanh(u)
/// ```
///
/// The forward pass is candle's `Tensor::gelu` expression, term for term,
/// so its values are bit-identical on the CPU; PyTorch's equivalent is
/// `torch.nn.functional.gelu(x, approximate="tanh")`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::gelu;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = gelu(x.as_tensor())?;
/// assert_eq!(y.to_vec1::<f32>()?, x.as_tensor().gelu()?.to_vec1::<f32>()?);
/// let g = y.sum_all()?.backward()?;
/// let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert_eq!(dx[1], 0.5); // dy/dx at 0 is ½
/// assert!((dx[2] - 1.0861).abs() < 1e-4);
/// # Ok(()) }
/// ```
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(GeluOp(Kind::Tanh));
    }
    x.gelu()
}

/// The exact GELU `x Φ(x)` (`Φ` the standard normal CDF), elementwise,
/// with a fast backward pass on the CPU:
///
/// ```text
/// y = ½ x (1 + erf(x / √2))
/// dy/dx = ½ (1 + erf(x / √2)) + x · exp(−x² / 2) / √(2π)
/// ```
///
/// The forward pass is candle's `Tensor::gelu_erf` expression (with the
/// same `erf`), so its values are bit-identical on the CPU; PyTorch's
/// equivalent is `torch.nn.functional.gelu(x)`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::gelu_erf;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f64, 0.0, 2.0], &Device::Cpu)?;
/// let y = gelu_erf(x.as_tensor())?;
/// assert_eq!(y.to_vec1::<f64>()?, x.as_tensor().gelu_erf()?.to_vec1::<f64>()?);
/// let g = y.sum_all()?.backward()?;
/// let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f64>()?;
/// assert_eq!(dx[1], 0.5);
/// assert!((dx[2] - 1.0852).abs() < 1e-4);
/// # Ok(()) }
/// ```
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(GeluOp(Kind::Erf));
    }
    x.gelu_erf()
}

#[derive(Clone, Copy)]
enum Kind {
    Tanh,
    Erf,
}

struct GeluOp(Kind);

/// The scalar maths of both GELUs and their derivatives, per float type.
trait GeluFloat: candle_core::WithDType + Send + Sync + std::ops::Mul<Output = Self> {
    fn gelu(x: Self) -> Self;
    fn dgelu(x: Self) -> Self;
    fn gelu_erf(x: Self) -> Self;
    fn dgelu_erf(x: Self) -> Self;
}

macro_rules! gelu_float {
    ($t:ident, $sqrt_two_over_pi:ident, $erf:path) => {
        impl GeluFloat for $t {
            #[inline(always)]
            fn gelu(v: $t) -> $t {
                // candle-core 0.11.1's `Gelu::f32`/`f64`, term for term.
                0.5 * v * (1.0 + $t::tanh($sqrt_two_over_pi * v * (1.0 + 0.044715 * v * v)))
            }
            #[inline(always)]
            fn dgelu(v: $t) -> $t {
                let s = $sqrt_two_over_pi;
                let t = $t::tanh(s * v * (1.0 + 0.044715 * v * v));
                let sech2 = 1.0 - t * t;
                // Where tanh saturates the second term is 0; skipping it
                // also avoids `inf · 0` for huge |x| (where x³ overflows).
                let curve = if sech2 == 0.0 {
                    0.0
                } else {
                    0.5 * v * sech2 * s * (1.0 + 3.0 * 0.044715 * v * v)
                };
                0.5 * (1.0 + t) + curve
            }
            #[inline(always)]
            fn gelu_erf(v: $t) -> $t {
                // candle-core 0.11.1's `GeluErf::f32`/`f64`, term for term.
                ($erf(v * std::$t::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
            }
            #[inline(always)]
            fn dgelu_erf(v: $t) -> $t {
                let cdf = 0.5 * ($erf(v * std::$t::consts::FRAC_1_SQRT_2) + 1.);
                let pdf = $t::exp(-0.5 * v * v) * FRAC_1_SQRT_2PI as $t;
                // The density underflows to 0 for large |x|: no `inf · 0`.
                cdf + if pdf == 0.0 { 0.0 } else { v * pdf }
            }
        }
    };
}

/// `√(2/π)`, candle's literal (rounded straight to f32 for f32, as candle does).
#[allow(clippy::excessive_precision)]
const SQRT_TWO_OVER_PI_F32: f32 = 0.79788456080286535587989211986876373;
#[allow(clippy::excessive_precision)]
const SQRT_TWO_OVER_PI_F64: f64 = 0.79788456080286535587989211986876373;
/// `1/√(2π)`.
#[allow(clippy::excessive_precision)]
const FRAC_1_SQRT_2PI: f64 = 0.39894228040143267793994605993438187;

gelu_float!(f32, SQRT_TWO_OVER_PI_F32, candle_core::cpu::erf::erf_f32);
gelu_float!(f64, SQRT_TWO_OVER_PI_F64, candle_core::cpu::erf::erf_f64);

/// The elements of a contiguous CPU storage, `T`-typed, from the layout's offset.
fn host<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("gelu: the fused kernel needs a contiguous tensor"),
    }
}

/// `out = f(chunk of out, offset)` over `n` elements, split over threads
/// when large (a `tanh` or `erf` costs tens of flops an element).
fn map<T: Copy + Send + Sync>(n: usize, f: impl Fn(&mut [MaybeUninit<T>], usize) + Sync) -> Vec<T> {
    let mut out = uninit::<T>(n);
    let per = n.div_ceil(parts(n, n.saturating_mul(8))).max(1);
    run_parts(out.chunks_mut(per).collect(), |k, chunk| f(chunk, k * per));
    // SAFETY: `f` writes every element of its chunk (below).
    unsafe { assume_init(out) }
}

fn fwd<T: GeluFloat>(kind: Kind, x: &[T]) -> Vec<T> {
    let y: fn(T) -> T = match kind {
        Kind::Tanh => T::gelu,
        Kind::Erf => T::gelu_erf,
    };
    map(x.len(), |out, at| {
        let x = &x[at..at + out.len()];
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(y(v));
        }
    })
}

fn bwd<T: GeluFloat>(kind: Kind, x: &[T], g: &[T]) -> Vec<T> {
    let dy: fn(T) -> T = match kind {
        Kind::Tanh => T::dgelu,
        Kind::Erf => T::dgelu_erf,
    };
    map(x.len(), |out, at| {
        let (x, g) = (&x[at..at + out.len()], &g[at..at + out.len()]);
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            o.write(g * dy(x));
        }
    })
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Tanh => "minibatch-gelu",
            Kind::Erf => "minibatch-gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(self.0, host::<f32>(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(self.0, host::<f64>(s, l)?)),
            _ => candle_core::bail!("gelu: the fused kernel runs on f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (xs, xl) = arg.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("gelu: the fused backward got a tensor off the CPU");
        };
        if xl.shape() != gl.shape() {
            candle_core::bail!(
                "gelu: gradient of shape {:?} for an input of shape {:?}",
                gl.dims(),
                xl.dims()
            );
        }
        let dx = match xs {
            CpuStorage::F32(_) => Tensor::from_vec(
                bwd(self.0, host::<f32>(xs, xl)?, host::<f32>(gs, gl)?),
                arg.shape(),
                arg.device(),
            )?,
            CpuStorage::F64(_) => Tensor::from_vec(
                bwd(self.0, host::<f64>(xs, xl)?, host::<f64>(gs, gl)?),
                arg.shape(),
                arg.device(),
            )?,
            _ => candle_core::bail!("gelu: the fused kernel runs on f32 or f64 only"),
        };
        Ok(Some(dx))
    }
}
