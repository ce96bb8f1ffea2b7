//! Gradient clipping (`torch.nn.utils.clip_grad_norm_` / `clip_grad_value_`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{OptimError, Result};

/// The norm used by [`clip_grad_norm`] (PyTorch's `norm_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// Euclidean norm (`norm_type=2`).
    L2,
    /// Largest absolute value (`norm_type=inf`).
    Inf,
    /// `(Σ|g|ᵖ)^(1/p)` for a finite `p > 0`.
    P(f64),
}

/// Clips the gradients of `vars` in `grads` so that their total norm (over
/// all of them together) is at most `max_norm`, and returns the total norm
/// before clipping. Same maths as `torch.nn.utils.clip_grad_norm_`: every
/// gradient is multiplied by `min(1, max_norm / (total + 1e-6))`.
///
/// A NaN or infinite total norm is an error
/// ([`OptimError::NonFiniteNorm`]); use [`clip_grad_norm_with`] with
/// `error_if_nonfinite = false` to clip anyway. Variables without a gradient
/// are ignored.
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{clip_grad_norm, Norm};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[3.0f32, 4.0], &Device::Cpu)?;
/// let mut grads = w.as_tensor().sqr()?.sum_all()?.affine(0.5, 0.0)?.backward()?; // grad = w
/// let total = clip_grad_norm(&mut grads, &[w.clone()], 1.0, Norm::L2)?;
/// assert!((total - 5.0).abs() < 1e-5);
/// let g = grads.get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
/// # Ok(()) }
/// ```
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
    norm: Norm,
) -> Result<f64> {
    clip_grad_norm_with(grads, vars, max_norm, norm, true)
}

/// [`clip_grad_norm`] with PyTorch's `error_if_nonfinite` switch.
pub fn clip_grad_norm_with(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
    norm: Norm,
    error_if_nonfinite: bool,
) -> Result<f64> {
    if !max_norm.is_finite() || max_norm < 0.0 {
        return Err(OptimError::InvalidHyperparameter {
            name: "max_norm",
            value: max_norm.to_string(),
            reason: "must be finite and >= 0",
        });
    }
    let norm = match norm {
        Norm::P(2.0) => Norm::L2,
        Norm::P(f64::INFINITY) => Norm::Inf,
        Norm::P(p) if !(p.is_finite() && p > 0.0) => {
            return Err(OptimError::InvalidHyperparameter {
                name: "norm_type",
                value: p.to_string(),
                reason: "must be > 0 (finite) or infinity",
            })
        }
        n => n,
    };
    let mut parts = Vec::with_capacity(vars.len());
    for var in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let g = match g.dtype() {
            DType::BF16 | DType::F16 => g.to_dtype(DType::F32)?,
            _ => g.clone(),
        };
        let part = match norm {
            Norm::L2 => g.sqr()?.sum_all()?,
            Norm::Inf => g.abs()?.max_all()?,
            Norm::P(p) => g.abs()?.powf(p)?.sum_all()?,
        };
        parts.push(part.to_dtype(DType::F64)?);
    }
    if parts.is_empty() {
        return Ok(0.0);
    }
    let all = Tensor::stack(&parts, 0)?;
    let total = match norm {
        Norm::L2 => all.sum_all()?.sqrt()?,
        Norm::Inf => all.max_all()?,
        Norm::P(p) => all.sum_all()?.powf(1.0 / p)?,
    }
    .to_scalar::<f64>()?;
    if !total.is_finite() && error_if_nonfinite {
        return Err(OptimError::NonFiniteNorm(total));
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 || coef.is_nan() {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(total)
}

/// Clamps every gradient of `vars` into `[-clip, clip]`
/// (`torch.nn.utils.clip_grad_value_`).
pub fn clip_grad_value(grads: &mut GradStore, vars: &[Var], clip: f64) -> Result<()> {
    if !clip.is_finite() || clip < 0.0 {
        return Err(OptimError::InvalidHyperparameter {
            name: "clip_value",
            value: clip.to_string(),
            reason: "must be finite and >= 0",
        });
    }
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let c = g.clamp(-clip, clip)?;
            grads.insert(var.as_tensor(), c);
        }
    }
    Ok(())
}
