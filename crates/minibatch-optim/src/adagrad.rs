//! Adagrad (`torch.optim.Adagrad`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::check_non_negative;
use crate::grad_term::{grad_term, GradTerm};
use crate::{Float, GenericOptimizer, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`Adagrad`] (`torch.optim.Adagrad` names and defaults).
///
/// ```text
/// g ← −g                                   if maximize
/// g ← g + weight_decay · θ                 if weight_decay ≠ 0
/// clr ← lr / (1 + (t − 1) · lr_decay)
/// s ← s + g²                               (s starts at initial_accumulator_value)
/// θ ← θ − clr · g / (√s + eps)
/// ```
///
/// State: `sum`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdagradConfig {
    /// Learning rate.
    pub lr: f64,
    /// Learning-rate decay per step.
    pub lr_decay: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// The starting value of the squared-gradient sum.
    pub initial_accumulator_value: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Maximise the objective.
    pub maximize: bool,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
            maximize: false,
        }
    }
}

/// Adagrad (`torch.optim.Adagrad`): see [`AdagradConfig`].
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{Adagrad, AdagradConfig, Optimizer};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f64], &Device::Cpu)?;
/// let mut opt = Adagrad::new(vec![w.clone()], AdagradConfig { lr: 0.1, ..Default::default() })?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// // first step: θ − lr · g / |g| = 1 − 0.1
/// assert!((w.as_tensor().to_vec1::<f64>()?[0] - 0.9).abs() < 1e-9);
/// # Ok(()) }
/// ```
pub type Adagrad = GenericOptimizer<AdagradConfig>;

impl UpdateRule for AdagradConfig {
    const KIND: &'static str = "Adagrad";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }

    fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("lr_decay", self.lr_decay)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        check_non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        check_non_negative("eps", self.eps)
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["sum"]
    }

    fn initial_state(&self, _index: usize) -> f64 {
        self.initial_accumulator_value
    }

    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        let clr = self.lr / (1.0 + (step.t as f64 - 1.0) * self.lr_decay);
        let neg_clr = F::from_f64(-clr);
        let eps = F::from_f64(self.eps);
        let term = GradTerm::<F>::new(self.maximize, self.weight_decay);
        let sum = &mut *state[0];
        for j in 0..param.len() {
            let g = term.apply(grad[j], param[j]);
            sum[j] += F::ONE * g * g;
            let std = sum[j].sqrt() + eps;
            param[j] += neg_clr * g / std;
        }
    }

    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        let clr = self.lr / (1.0 + (step.t as f64 - 1.0) * self.lr_decay);
        let g = grad_term(grad, param, self.maximize, self.weight_decay)?;
        let sum = (&state[0] + g.sqr()?)?;
        let std = sum.sqrt()?.affine(1.0, self.eps)?;
        let new = (param + g.affine(-clr, 0.0)?.div(&std)?)?;
        state[0] = sum;
        Ok(Some(new))
    }
}
