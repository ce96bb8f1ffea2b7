//! AdamW: Adam with decoupled weight decay (`torch.optim.AdamW`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::adam::{adam_state_names, adam_update, adam_update_tensors, validate_adam};
use crate::{AdamConfig, Float, GenericOptimizer, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`AdamW`] (`torch.optim.AdamW` names and defaults:
/// note `weight_decay` defaults to 0.01).
///
/// Each step first decays the parameter, `θ ← θ · (1 − lr · weight_decay)`,
/// then applies the [`AdamConfig`] update without any L2 term.
///
/// State: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁ (PyTorch `betas[0]`).
    pub beta1: f64,
    /// β₂ (PyTorch `betas[1]`).
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Use the AMSGrad variant.
    pub amsgrad: bool,
    /// Maximise the objective.
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            maximize: false,
        }
    }
}

impl AdamWConfig {
    fn as_adam(&self) -> AdamConfig {
        AdamConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            amsgrad: self.amsgrad,
            maximize: self.maximize,
        }
    }
}

/// AdamW (`torch.optim.AdamW`): see [`AdamWConfig`].
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{AdamW, AdamWConfig, Optimizer};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.05, ..Default::default() })?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// assert_eq!(opt.name(), "AdamW");
/// # Ok(()) }
/// ```
pub type AdamW = GenericOptimizer<AdamWConfig>;

impl UpdateRule for AdamWConfig {
    const KIND: &'static str = "AdamW";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }

    /// `beta1` (PyTorch `betas[0]`), cycled by `OneCycleLR`.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        Some(&mut self.beta1)
    }

    fn validate(&self) -> Result<()> {
        validate_adam(&self.as_adam())
    }

    fn state_names(&self) -> &'static [&'static str] {
        adam_state_names(&self.as_adam())
    }

    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        adam_update(&self.as_adam(), true, step.t, param, grad, state)
    }

    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        adam_update_tensors(&self.as_adam(), true, step.t, param, grad, state).map(Some)
    }
}
