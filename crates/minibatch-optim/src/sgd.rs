//! Stochastic gradient descent with momentum, dampening, Nesterov momentum,
//! weight decay and maximisation (`torch.optim.SGD`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::check_non_negative;
use crate::grad_term::{grad_term, GradTerm};
use crate::{Float, GenericOptimizer, OptimError, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`Sgd`] (PyTorch's `torch.optim.SGD` keyword names and
/// defaults; `lr` defaults to PyTorch's 1e-3).
///
/// With gradient `g`, parameter `θ`, momentum buffer `b`, at step `t`:
///
/// ```text
/// g ← −g                                   if maximize
/// g ← g + weight_decay · θ                 if weight_decay ≠ 0
/// b ← g                                     if b is new    (if momentum ≠ 0)
/// b ← momentum · b + (1 − dampening) · g    otherwise      (if momentum ≠ 0)
/// g ← g + momentum · b  if nesterov,  else g ← b           (if momentum ≠ 0)
/// θ ← θ − lr · g
/// ```
///
/// Nesterov momentum in this form: Sutskever, Martens, Dahl & Hinton, "On
/// the importance of initialization and momentum in deep learning", ICML
/// 2013 (PyTorch's formulation, with the look-ahead folded into `g`).
///
/// State: `momentum_buffer` (only when `momentum ≠ 0`). It is new on a
/// parameter's first step, and on the first step after momentum was switched
/// on through [`GenericOptimizer::update_rule`] or
/// [`Optimizer::set_momentum`](crate::Optimizer::set_momentum): PyTorch's
/// missing buffer, started from the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Dampening of the gradient added to the momentum buffer.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening = 0).
    pub nesterov: bool,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// SGD (`torch.optim.SGD`): see [`SgdConfig`] for the maths.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_optim::{Optimizer, Sgd, SgdConfig};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..Default::default() };
/// let mut opt = Sgd::new(vec![w.clone()], cfg)?;
/// for _ in 0..50 {
///     let loss = w.as_tensor().sqr()?.sum_all()?;
///     opt.backward_step(&loss)?;
/// }
/// assert!(w.as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()? < 1e-3);
/// # Ok(()) }
/// ```
pub type Sgd = GenericOptimizer<SgdConfig>;

impl Sgd {
    /// Plain mini-batch gradient descent: `θ ← θ − lr · g` (no momentum).
    pub fn minibatch_gd(vars: Vec<Var>, lr: f64) -> Result<Self> {
        Self::new(
            vars,
            SgdConfig {
                lr,
                ..Default::default()
            },
        )
    }
}

#[inline(always)]
fn sgd_momentum<F: Float, const NESTEROV: bool, const FIRST: bool>(
    c: &SgdConfig,
    param: &mut [F],
    grad: &[F],
    buf: &mut [F],
) {
    let neg_lr = F::from_f64(-c.lr);
    let mom = F::from_f64(c.momentum);
    let damp = F::from_f64(1.0 - c.dampening);
    let term = GradTerm::<F>::new(c.maximize, c.weight_decay);
    let n = param.len();
    let (param, grad, buf) = (&mut param[..n], &grad[..n], &mut buf[..n]);
    for j in 0..n {
        let d = term.apply(grad[j], param[j]);
        let b = if FIRST { d } else { buf[j] * mom + damp * d };
        buf[j] = b;
        let u = if NESTEROV { d + mom * b } else { b };
        param[j] += neg_lr * u;
    }
}

impl UpdateRule for SgdConfig {
    const KIND: &'static str = "SGD";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }

    /// `momentum`, cycled by `OneCycleLR`.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        Some(&mut self.momentum)
    }

    fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("momentum", self.momentum)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if !self.dampening.is_finite() {
            return Err(OptimError::InvalidHyperparameter {
                name: "dampening",
                value: self.dampening.to_string(),
                reason: "must be finite",
            });
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(OptimError::InvalidHyperparameter {
                name: "nesterov",
                value: "true".into(),
                reason: "Nesterov momentum requires a momentum > 0 and zero dampening",
            });
        }
        Ok(())
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        if self.momentum == 0.0 {
            let neg_lr = F::from_f64(-self.lr);
            let term = GradTerm::<F>::new(self.maximize, self.weight_decay);
            for (p, &g) in param.iter_mut().zip(grad) {
                *p += neg_lr * term.apply(g, *p);
            }
            return;
        }
        let buf = &mut *state[0];
        match (self.nesterov, step.is_new(0)) {
            (false, false) => sgd_momentum::<F, false, false>(self, param, grad, buf),
            (false, true) => sgd_momentum::<F, false, true>(self, param, grad, buf),
            (true, false) => sgd_momentum::<F, true, false>(self, param, grad, buf),
            (true, true) => sgd_momentum::<F, true, true>(self, param, grad, buf),
        }
    }

    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        let mut d = grad_term(grad, param, self.maximize, self.weight_decay)?;
        if self.momentum != 0.0 {
            let b = if step.is_new(0) {
                d.clone()
            } else {
                (state[0].affine(self.momentum, 0.0)? + d.affine(1.0 - self.dampening, 0.0)?)?
            };
            d = if self.nesterov {
                (d + b.affine(self.momentum, 0.0)?)?
            } else {
                b.clone()
            };
            state[0] = b;
        }
        Ok(Some((param + d.affine(-self.lr, 0.0)?)?))
    }
}
