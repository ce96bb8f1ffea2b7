//! [`RmsNorm`]: a drop-in for `candle_nn::RmsNorm` with a real backward pass.
//!
//! candle-nn's `RmsNorm::forward` runs a fused op without a backward pass for
//! a contiguous input, so nothing below the layer gets a gradient. This layer
//! runs [`ops::rms_norm`](crate::ops::rms_norm)'s fused op (forward and
//! backward) on the CPU, and candle-nn's tensor-op formula elsewhere.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layer_norm::{layer_norm, LayerNorm, LayerNormConfig};

/// RMS normalisation over the last dimension: `y = x / √(mean(x²) + ε) ⊙ w`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let norm = minibatch_nn::rms_norm(4, 1e-6, vb.pp("norm"))?;
/// let x = Var::new(&[[1f32, -1., 1., -1.]], &Device::Cpu)?;
/// let y = norm.forward(x.as_tensor())?;
/// assert!(y.to_vec2::<f32>()?[0].iter().all(|v| (v.abs() - 1.0).abs() < 1e-5));
/// let grads = (y * Tensor::new(&[[1f32, 0., 0., 0.]], &Device::Cpu)?)?
///     .sum_all()?
///     .backward()?;
/// assert!(grads.get(x.as_tensor()).is_some());
/// assert!(grads.get(norm.weight()).is_some());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RmsNorm(LayerNorm);

impl RmsNorm {
    /// An RMS norm over `weight` (shape `(n,)`).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self(LayerNorm::rms_norm(weight, eps))
    }

    /// The underlying [`LayerNorm`] (with `remove_mean = false`, no bias).
    pub fn into_inner(self) -> LayerNorm {
        self.0
    }

    /// The weight, shape `(n,)`.
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    /// `ε`, added to the mean square.
    pub fn eps(&self) -> f64 {
        self.0.eps()
    }

    /// The same as [`Module::forward`] (kept for candle-nn's API, where it
    /// names the differentiable path: here every path is).
    pub fn forward_diff(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward(xs)
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward(xs)
    }
}

/// The same layer over a `candle_nn::RmsNorm`'s weight and `ε`.
impl From<candle_nn::RmsNorm> for RmsNorm {
    fn from(l: candle_nn::RmsNorm) -> Self {
        Self::new(l.weight().clone(), l.eps())
    }
}

/// An [`RmsNorm`] over the last dimension of size `size`, as
/// `candle_nn::rms_norm`: the weight `weight` (or an existing `gamma`)
/// initialised to 1.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let config = LayerNormConfig {
        eps,
        remove_mean: false,
        affine: false,
    };
    Ok(RmsNorm(layer_norm(size, config, vb)?))
}
