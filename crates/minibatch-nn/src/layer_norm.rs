//! [`LayerNorm`]: a drop-in for `candle_nn::LayerNorm` with a real backward
//! pass.
//!
//! candle-nn's `LayerNorm::forward` runs a fused op without a backward pass
//! for a contiguous input with a bias, so nothing below the layer gets a
//! gradient. This layer runs [`ops::layer_norm`](crate::ops::layer_norm)'s
//! fused op (forward and backward) on the CPU in every configuration, and
//! candle-nn's tensor-op formula elsewhere.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// The configuration of [`layer_norm`]: candle-nn's own type (`eps`,
/// `remove_mean`, `affine`), so existing configs work unchanged.
pub use candle_nn::LayerNormConfig;

use crate::ops::normalize;

/// Normalisation over the last dimension: `y = (x − μ) / √(σ² + ε) ⊙ w + b`
/// (without `− μ` when `remove_mean` is false, which makes it an RMS norm;
/// without `+ b` when there is no bias). See [`crate::ops::layer_norm`] for
/// the backward pass.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let norm = minibatch_nn::layer_norm(3, 1e-5, vb.pp("ln"))?;
/// let x = Tensor::new(&[[[1f32, 2., 3.], [4., 5., 6.], [9., 8., 7.]]], &Device::Cpu)?;
/// let y = norm.forward(&x)?;
/// assert!((y.get(0)?.get(2)?.to_vec1::<f32>()?[0] - 1.2247).abs() < 1e-4);
/// // The layer's weight and bias live in the VarMap under candle-nn's names
/// // and receive gradients through the layer.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// let data = varmap.data().lock().unwrap();
/// assert!(grads.get(data["ln.weight"].as_tensor()).is_some());
/// assert!(grads.get(data["ln.bias"].as_tensor()).is_some());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    remove_mean: bool,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm with weight and bias (shape `(n,)` each) that removes the mean.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: Some(bias),
            remove_mean: true,
            eps,
        }
    }

    /// A layer norm with a weight and no bias that removes the mean.
    pub fn new_no_bias(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: None,
            remove_mean: true,
            eps,
        }
    }

    /// An RMS norm as a `LayerNorm` (no mean removal, no bias), as candle-nn's.
    pub fn rms_norm(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: None,
            remove_mean: false,
            eps,
        }
    }

    /// The weight, shape `(n,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shape `(n,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `ε`, added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Whether the mean is removed (false: an RMS norm).
    pub fn remove_mean(&self) -> bool {
        self.remove_mean
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        normalize(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.eps,
            self.remove_mean,
        )
    }
}

/// The same layer over a `candle_nn::LayerNorm`'s weight, bias and settings.
impl From<candle_nn::LayerNorm> for LayerNorm {
    fn from(l: candle_nn::LayerNorm) -> Self {
        Self {
            weight: l.weight().clone(),
            bias: l.bias().cloned(),
            remove_mean: l.remove_mean(),
            eps: l.eps(),
        }
    }
}

/// A [`LayerNorm`] over the last dimension of size `size`, as
/// `candle_nn::layer_norm`: the weight `weight` (or an existing `gamma`)
/// initialised to 1, and when `config.affine` the bias `bias` (or an existing
/// `beta`) initialised to 0; `config.remove_mean = false` makes it an RMS norm.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    let config = config.into();
    // candle-nn's names: PyTorch's old `gamma`/`beta` when a checkpoint has them.
    let weight_name = ["weight", "gamma"]
        .into_iter()
        .find(|name| vb.contains_tensor(name))
        .unwrap_or("weight");
    let weight = vb.get_with_hints(size, weight_name, Init::Const(1.))?;
    let bias = if config.affine {
        let bias_name = ["bias", "beta"]
            .into_iter()
            .find(|name| vb.contains_tensor(name))
            .unwrap_or("bias");
        Some(vb.get_with_hints(size, bias_name, Init::Const(0.))?)
    } else {
        None
    };
    Ok(LayerNorm {
        weight,
        bias,
        remove_mean: config.remove_mean,
        eps: config.eps,
    })
}

/// A [`LayerNorm`] without a bias, as `candle_nn::layer_norm_no_bias`.
pub fn layer_norm_no_bias(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let config = LayerNormConfig {
        eps,
        remove_mean: true,
        affine: false,
    };
    layer_norm(size, config, vb)
}
