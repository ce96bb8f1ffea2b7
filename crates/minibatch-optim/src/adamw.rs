//! AdamW: Adam with decoupled weight decay (`torch.optim.AdamW`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::adam::{adam_state_names, adam_update, adam_update_tensors, validate_adam};
use crate::{AdamConfig, Float, GenericOptimizer, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`AdamW`] (`torch.optim.AdamW` names and defaults:
/// note `weight_decay` defaults to 0.01): an [`AdamConfig`] whose
/// `weight_decay` is decoupled.
///
/// AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
/// ICLR 2019 (<https://arxiv.org/abs/1711.05101>). Each step first decays the parameter,
///
/// ```text
/// θ ← θ · (1 − lr · weight_decay)
/// ```
///
/// then applies the [`AdamConfig`] update without any L2 term.
///
/// State: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad).
///
/// Serialises as its `AdamConfig` (the same fields, so saved states keep
/// their format).
///
/// ```
/// use minibatch_optim::{AdamConfig, AdamWConfig};
/// let c = AdamWConfig { adam: AdamConfig { lr: 3e-4, ..AdamWConfig::default().adam } };
/// assert_eq!((c.adam.lr, c.adam.weight_decay), (3e-4, 0.01));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AdamWConfig {
    /// The Adam hyperparameters; `weight_decay` is the decoupled decay.
    pub adam: AdamConfig,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            adam: AdamConfig {
                weight_decay: 1e-2,
                ..AdamConfig::default()
            },
        }
    }
}

/// AdamW (`torch.optim.AdamW`): see [`AdamWConfig`].
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{AdamConfig, AdamW, AdamWConfig, Optimizer};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig { adam: AdamConfig { lr: 0.05, ..AdamWConfig::default().adam } })?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// assert_eq!(opt.name(), "AdamW");
/// # Ok(()) }
/// ```
pub type AdamW = GenericOptimizer<AdamWConfig>;

impl UpdateRule for AdamWConfig {
    const KIND: &'static str = "AdamW";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.adam.lr
    }

    /// `beta1` (PyTorch `betas[0]`), cycled by `OneCycleLR`.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        Some(&mut self.adam.beta1)
    }

    fn validate(&self) -> Result<()> {
        validate_adam(&self.adam)
    }

    fn state_names(&self) -> &'static [&'static str] {
        adam_state_names(&self.adam)
    }

    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        adam_update(&self.adam, true, step.t, param, grad, state)
    }

    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        adam_update_tensors(&self.adam, true, step.t, param, grad, state).map(Some)
    }
}
