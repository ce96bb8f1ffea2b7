//! RMSprop (`torch.optim.RMSprop`), optionally centered and with momentum.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::adam::lerp;
use crate::error::check_non_negative;
use crate::grad_term::{grad_term, GradTerm};
use crate::{Float, GenericOptimizer, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`RmsProp`] (`torch.optim.RMSprop` names and defaults).
///
/// ```text
/// g ← −g                                   if maximize
/// g ← g + weight_decay · θ                 if weight_decay ≠ 0
/// s ← α s + (1 − α) g²
/// a ← a + (1 − α)(g − a);  d ← √(s − a²)   if centered
/// d ← √s                                    otherwise
/// d ← d + eps
/// b ← momentum · b + g / d;  θ ← θ − lr · b   if momentum > 0
/// θ ← θ − lr · g / d                           otherwise
/// ```
///
/// State: `square_avg`, then `momentum_buffer` (momentum > 0), then
/// `grad_avg` (centered).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RmsPropConfig {
    /// Learning rate.
    pub lr: f64,
    /// Smoothing constant α.
    pub alpha: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// Normalise by the estimated variance instead of the second moment.
    pub centered: bool,
    /// Maximise the objective.
    pub maximize: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
        }
    }
}

/// RMSprop (`torch.optim.RMSprop`): see [`RmsPropConfig`].
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{Optimizer, RmsProp, RmsPropConfig};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32, -1.0], &Device::Cpu)?;
/// let mut opt = RmsProp::new(vec![w.clone()], RmsPropConfig::default())?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// assert!(w.as_tensor().to_vec1::<f32>()?[0] < 1.0);
/// # Ok(()) }
/// ```
pub type RmsProp = GenericOptimizer<RmsPropConfig>;

impl UpdateRule for RmsPropConfig {
    const KIND: &'static str = "RMSprop";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }

    /// `momentum`, cycled by `OneCycleLR`.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        Some(&mut self.momentum)
    }

    fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("momentum", self.momentum)?;
        check_non_negative("alpha", self.alpha)?;
        check_non_negative("weight_decay", self.weight_decay)
    }

    fn state_names(&self) -> &'static [&'static str] {
        match (self.momentum > 0.0, self.centered) {
            (false, false) => &["square_avg"],
            (true, false) => &["square_avg", "momentum_buffer"],
            (false, true) => &["square_avg", "grad_avg"],
            (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
        }
    }

    fn update<F: Float>(
        &self,
        _step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        let neg_lr = F::from_f64(-self.lr);
        let alpha = F::from_f64(self.alpha);
        let w = 1.0 - self.alpha;
        let (w_small, wf, wc) = (w < 0.5, F::from_f64(w), F::from_f64(1.0 - w));
        let eps = F::from_f64(self.eps);
        let term = GradTerm::<F>::new(self.maximize, self.weight_decay);
        let mom = F::from_f64(self.momentum);
        let use_mom = self.momentum > 0.0;
        let (sq, rest) = state.split_at_mut(1);
        let sq = &mut *sq[0];
        let (mut buf, rest) = if use_mom {
            let (b, r) = rest.split_at_mut(1);
            (Some(&mut *b[0]), r)
        } else {
            (None, rest)
        };
        let mut gavg = if self.centered {
            Some(&mut *rest[0])
        } else {
            None
        };
        for j in 0..param.len() {
            let g = term.apply(grad[j], param[j]);
            sq[j] = sq[j] * alpha + wf * g * g;
            let avg = match gavg.as_deref_mut() {
                Some(ga) => {
                    ga[j] = lerp(ga[j], g, wf, w_small, wc);
                    (sq[j] + -F::ONE * ga[j] * ga[j]).sqrt()
                }
                None => sq[j].sqrt(),
            } + eps;
            match buf.as_deref_mut() {
                Some(b) => {
                    b[j] = b[j] * mom + g / avg;
                    param[j] += neg_lr * b[j];
                }
                None => param[j] += neg_lr * g / avg,
            }
        }
    }

    fn update_tensors(
        &self,
        _step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        let g = grad_term(grad, param, self.maximize, self.weight_decay)?;
        let w = 1.0 - self.alpha;
        let sq = (state[0].affine(self.alpha, 0.0)? + g.affine(w, 0.0)?.mul(&g)?)?;
        let mut k = 1;
        let mom_idx = if self.momentum > 0.0 {
            k += 1;
            Some(k - 1)
        } else {
            None
        };
        let avg = if self.centered {
            let ga = (&state[k] + (&g - &state[k])?.affine(w, 0.0)?)?;
            let avg = (&sq - ga.sqr()?)?.sqrt()?;
            state[k] = ga;
            avg
        } else {
            sq.sqrt()?
        }
        .affine(1.0, self.eps)?;
        state[0] = sq;
        let new = match mom_idx {
            Some(i) => {
                let b = (state[i].affine(self.momentum, 0.0)? + g.div(&avg)?)?;
                let new = (param + b.affine(-self.lr, 0.0)?)?;
                state[i] = b;
                new
            }
            None => (param + g.affine(-self.lr, 0.0)?.div(&avg)?)?,
        };
        Ok(Some(new))
    }
}
