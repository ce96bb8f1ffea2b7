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

use super::elementwise::{cpu_bwd, cpu_fwd, map};
use crate::dispatch::cpu_kernel;
use crate::float::{erf_f32, exp_f32, Float};
use crate::ops::simd::simd_dispatch;

/// The GELU of the tanh approximation, elementwise, with a fast backward
/// pass on the CPU:
///
/// ```text
/// y = ½ x (1 + tanh(u)),   u = √(2/π) · x · (1 + 0.044715 x²)
/// dy/dx = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²),   t = tanh(u)
/// ```
///
/// The forward pass is candle's `Tensor::gelu` expression; in f64 term for
/// term (bit-identical on the CPU), in f32 with `1 + tanh(u)` computed from
/// a vectorised `e^{−2|u|}` (several times faster than libm's `tanhf`,
/// within a few ulp of candle's values, and more precise in the left tail). PyTorch's equivalent is
/// `torch.nn.functional.gelu(x, approximate="tanh")`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::gelu;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = gelu(x.as_tensor())?;
/// let candle = x.as_tensor().gelu()?.to_vec1::<f32>()?;
/// for (a, b) in y.to_vec1::<f32>()?.iter().zip(&candle) {
///     assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3));
/// }
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
/// The forward pass is candle's `Tensor::gelu_erf` expression. In f64 it
/// uses the same `erf`, so its values are bit-identical on the CPU; in f32
/// the CPU kernel uses a branch-free rational `erf` (Eigen's and XLA's,
/// within 4.3e-7) and `exp`, so that both passes vectorise, and its values
/// are within a few ulp of candle's. PyTorch's equivalent is
/// `torch.nn.functional.gelu(x)`.
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

/// The exact GELU and its derivative per float type, `$erf` candle's `erf`.
macro_rules! gelu_erf_fns {
    ($t:ident, $gelu_erf:ident, $dgelu_erf:ident, $erf:path, $exp:path) => {
        /// candle-core 0.11.1's `GeluErf::f32`/`f64`, term for term (with
        /// `$erf` for its erf).
        #[inline(always)]
        fn $gelu_erf(v: $t) -> $t {
            ($erf(v * std::$t::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
        }
        #[inline(always)]
        fn $dgelu_erf(v: $t) -> $t {
            let cdf = 0.5 * ($erf(v * std::$t::consts::FRAC_1_SQRT_2) + 1.);
            let pdf = $exp(-0.5 * v * v) * FRAC_1_SQRT_2PI as $t;
            // The density underflows to 0 for large |x|: no `inf · 0`.
            cdf + if pdf == 0.0 { 0.0 } else { v * pdf }
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

/// f64: candle-core 0.11.1's `Gelu::f64`, term for term (bit-identical).
#[inline(always)]
fn gelu_f64(v: f64) -> f64 {
    0.5 * v * (1.0 + f64::tanh(SQRT_TWO_OVER_PI_F64 * v * (1.0 + 0.044715 * v * v)))
}

#[inline(always)]
fn dgelu_f64(v: f64) -> f64 {
    let s = SQRT_TWO_OVER_PI_F64;
    let t = f64::tanh(s * v * (1.0 + 0.044715 * v * v));
    let sech2 = 1.0 - t * t;
    // Where tanh saturates the second term is 0; dropping it also avoids
    // `inf · 0` for huge |x| (where x³ overflows).
    let curve = 0.5 * v * sech2 * s * (1.0 + 3.0 * 0.044715 * v * v);
    0.5 * (1.0 + t) + if sech2 == 0.0 { 0.0 } else { curve }
}

/// f32: `1 + tanh(u)` and `sech²(u) = 1 − tanh²(u)` from `e = e^{−2|u|}`
/// with the crate's branch-free, vectorisable `exp_f32` (libm's `tanhf` does
/// not vectorise, and was most of the gpt step's GELU time):
///
/// ```text
/// 1 + tanh(u) = 2/(1 + e)  (u ≥ 0),   2e/(1 + e)  (u < 0);   sech²(u) = 4e/(1 + e)²
/// ```
///
/// Neither cancels, so the left tail (where `1 + tanh(u)` is tiny) keeps
/// its relative precision. `e` underflows to 0 where tanh saturates; NaN
/// stays NaN. Returns `(1 + tanh(u), sech²(u))`.
#[inline(always)]
fn one_plus_tanh_f32(u: f32) -> (f32, f32) {
    let e = exp_f32(-2.0 * u.abs());
    let d = 1.0 / (1.0 + e);
    let one_plus_t = if u < 0.0 { 2.0 * e * d } else { 2.0 * d };
    (one_plus_t, 4.0 * e * d * d)
}

#[inline(always)]
fn gelu_f32(v: f32) -> f32 {
    let (one_plus_t, _) = one_plus_tanh_f32(SQRT_TWO_OVER_PI_F32 * v * (1.0 + 0.044715 * v * v));
    0.5 * v * one_plus_t
}

#[inline(always)]
fn dgelu_f32(v: f32) -> f32 {
    let s = SQRT_TWO_OVER_PI_F32;
    let (one_plus_t, sech2) = one_plus_tanh_f32(s * v * (1.0 + 0.044715 * v * v));
    // Computed, then selected: the loop stays branch-free (see dgelu_f64).
    let curve = 0.5 * v * sech2 * s * (1.0 + 3.0 * 0.044715 * v * v);
    0.5 * one_plus_t + if sech2 == 0.0 { 0.0 } else { curve }
}

// f32: a branch-free erf and exp, so the loops vectorise (within a few ulp
// of candle's libm-based `gelu_erf`).
gelu_erf_fns!(f32, gelu_erf_f32, dgelu_erf_f32, erf_f32, exp_f32);
gelu_erf_fns!(
    f64,
    gelu_erf_f64,
    dgelu_erf_f64,
    candle_core::cpu::erf::erf_f64,
    f64::exp
);

/// `out[i] = f(x[i])`.
#[inline(always)]
fn map_loop<T: Float>(x: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(T) -> T) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(f(v));
    }
}

/// `out[i] = g[i] · df(x[i])`.
#[inline(always)]
fn grad_loop<T: Float>(x: &[T], g: &[T], out: &mut [MaybeUninit<T>], df: impl Fn(T) -> T) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        o.write(g * df(x));
    }
}

// Compiled for AVX2 when the processor has it, so that `exp_f32` and
// `erf_f32` (in the GELUs' `f32` maths) run 8 lanes at a time.
simd_dispatch!(fn map_slice(x: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(T) -> T) => map_loop);
simd_dispatch!(fn grad_slice(x: &[T], g: &[T], out: &mut [MaybeUninit<T>], df: impl Fn(T) -> T) => grad_loop);

/// The forward pass, `gelu` and `gelu_erf` the scalar maths of `T`.
fn fwd<T: Float>(
    kind: Kind,
    x: &[T],
    gelu: impl Fn(T) -> T + Copy + Sync,
    gelu_erf: impl Fn(T) -> T + Copy + Sync,
) -> Vec<T> {
    // A tanh or erf costs tens of flops an element.
    map(x.len(), x.len().saturating_mul(8), |out, at| {
        let x = &x[at..at + out.len()];
        match kind {
            Kind::Tanh => map_slice(x, out, gelu),
            Kind::Erf => map_slice(x, out, gelu_erf),
        }
    })
}

/// The backward pass, `dgelu` and `dgelu_erf` the scalar derivatives of `T`.
fn bwd<T: Float>(
    kind: Kind,
    x: &[T],
    g: &[T],
    dgelu: impl Fn(T) -> T + Copy + Sync,
    dgelu_erf: impl Fn(T) -> T + Copy + Sync,
) -> Vec<T> {
    map(x.len(), x.len().saturating_mul(8), |out, at| {
        let (x, g) = (&x[at..at + out.len()], &g[at..at + out.len()]);
        match kind {
            Kind::Tanh => grad_slice(x, g, out, dgelu),
            Kind::Erf => grad_slice(x, g, out, dgelu_erf),
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
        let k = self.0;
        cpu_fwd(
            "gelu",
            s,
            l,
            |x| fwd(k, x, gelu_f32, gelu_erf_f32),
            |x| fwd(k, x, gelu_f64, gelu_erf_f64),
        )
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let k = self.0;
        cpu_bwd(
            "gelu",
            arg,
            grad,
            |x, g| bwd(k, x, g, dgelu_f32, dgelu_erf_f32),
            |x, g| bwd(k, x, g, dgelu_f64, dgelu_erf_f64),
        )
        .map(Some)
    }
}
