//! The gradient term PyTorch's update rules start from: `g ← −g` when
//! `maximize`, then `g ← g + weight_decay · θ` (L2 decay coupled to the
//! gradient) when `weight_decay ≠ 0`. Written once here for the slice
//! kernels ([`GradTerm`]) and once for the tensor path ([`grad_term`]).

use candle_core::Tensor;

use crate::{Float, Result};

/// [`GradTerm::apply`] on one element, for the slice kernels: the
/// hyperparameters are converted once, outside the element loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GradTerm<F> {
    maximize: bool,
    decay: bool,
    wd: F,
}

impl<F: Float> GradTerm<F> {
    /// `weight_decay = 0` adds no decay term (as PyTorch skips it).
    pub(crate) fn new(maximize: bool, weight_decay: f64) -> Self {
        Self {
            maximize,
            decay: weight_decay != 0.0,
            wd: F::from_f64(weight_decay),
        }
    }

    /// `−g` if maximize, then `+ weight_decay · θ` if decay is on.
    #[inline(always)]
    pub(crate) fn apply(&self, g: F, theta: F) -> F {
        let mut d = if self.maximize { -g } else { g };
        if self.decay {
            d += self.wd * theta;
        }
        d
    }
}

/// The tensor form of [`GradTerm::apply`]: `grad` negated if `maximize`,
/// then `+ weight_decay · param` if `weight_decay ≠ 0`.
pub(crate) fn grad_term(
    grad: &Tensor,
    param: &Tensor,
    maximize: bool,
    weight_decay: f64,
) -> Result<Tensor> {
    let mut g = if maximize { grad.neg()? } else { grad.clone() };
    if weight_decay != 0.0 {
        g = (g + param.affine(weight_decay, 0.0)?)?;
    }
    Ok(g)
}
