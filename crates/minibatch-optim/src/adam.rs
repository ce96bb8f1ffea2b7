//! Adam (`torch.optim.Adam`), with optional AMSGrad, and the update shared
//! with AdamW.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{check_non_negative, check_unit};
use crate::grad_term::{grad_term, GradTerm};
use crate::{Float, GenericOptimizer, ParamStep, Result, UpdateRule};

/// Hyperparameters of [`Adam`] (`torch.optim.Adam` names and defaults).
///
/// Adam: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR
/// 2015 (<https://arxiv.org/abs/1412.6980>); AMSGrad: Reddi, Kale & Kumar,
/// "On the Convergence of Adam and Beyond", ICLR 2018.
///
/// With gradient `g`, parameter `θ`, moments `m`, `v`, at step `t`:
///
/// ```text
/// g ← −g                                  if maximize
/// g ← g + weight_decay · θ                if weight_decay ≠ 0 (L2, coupled)
/// m ← m + (1 − β₁)(g − m)                 (torch's lerp)
/// v ← β₂ v + (1 − β₂) g²
/// v̂ ← max(v̂, v) and use v̂ for v          if amsgrad
/// denom ← √v / √(1 − β₂ᵗ) + eps
/// θ ← θ − (lr / (1 − β₁ᵗ)) · m / denom
/// ```
///
/// State: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁, the first-moment decay (PyTorch `betas[0]`).
    pub beta1: f64,
    /// β₂, the second-moment decay (PyTorch `betas[1]`).
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// L2 penalty added to the gradient (coupled, unlike AdamW).
    pub weight_decay: f64,
    /// Use the AMSGrad variant.
    pub amsgrad: bool,
    /// Maximise the objective.
    pub maximize: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
        }
    }
}

/// Adam (`torch.optim.Adam`): see [`AdamConfig`] for the maths.
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{Adam, AdamConfig, Optimizer};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[3.0f64, -2.0], &Device::Cpu)?;
/// let mut opt = Adam::new(vec![w.clone()], AdamConfig { lr: 0.1, ..Default::default() })?;
/// for _ in 0..300 {
///     opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// }
/// assert!(w.as_tensor().abs()?.max_all()?.to_scalar::<f64>()? < 0.05);
/// # Ok(()) }
/// ```
pub type Adam = GenericOptimizer<AdamConfig>;

pub(crate) fn validate_adam(c: &AdamConfig) -> Result<()> {
    check_non_negative("lr", c.lr)?;
    check_non_negative("eps", c.eps)?;
    check_unit("betas[0]", c.beta1)?;
    check_unit("betas[1]", c.beta2)?;
    check_non_negative("weight_decay", c.weight_decay)
}

pub(crate) fn adam_state_names(c: &AdamConfig) -> &'static [&'static str] {
    if c.amsgrad {
        &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    } else {
        &["exp_avg", "exp_avg_sq"]
    }
}

/// torch's `lerp_(end, w)` on one element.
#[inline(always)]
pub(crate) fn lerp<F: Float>(s: F, end: F, w: F, w_small: bool, one_minus_w: F) -> F {
    if w_small {
        s + w * (end - s)
    } else {
        end - (end - s) * one_minus_w
    }
}

/// The Adam update over a chunk; `decoupled` selects AdamW's decay.
pub(crate) fn adam_update<F: Float>(
    c: &AdamConfig,
    decoupled: bool,
    step: u64,
    param: &mut [F],
    grad: &[F],
    state: &mut [&mut [F]],
) {
    let t = step as f64;
    let bc1 = 1.0 - c.beta1.powf(t);
    let bc2 = 1.0 - c.beta2.powf(t);
    let neg_step_size = F::from_f64(-(c.lr / bc1));
    let bc2_sqrt = F::from_f64(bc2.sqrt());
    let w1 = 1.0 - c.beta1;
    let (w1_small, w1f, w1c) = (w1 < 0.5, F::from_f64(w1), F::from_f64(1.0 - w1));
    let b2 = F::from_f64(c.beta2);
    let w2 = F::from_f64(1.0 - c.beta2);
    let eps = F::from_f64(c.eps);
    let wd = F::from_f64(c.weight_decay);
    let coupled = !decoupled && c.weight_decay != 0.0;
    let decay = F::from_f64(1.0 - c.lr * c.weight_decay);
    let decouple = decoupled && c.weight_decay != 0.0;
    let (m, rest) = state.split_at_mut(1);
    let m = &mut *m[0];
    let (v, rest) = rest.split_at_mut(1);
    let v = &mut *v[0];
    let k = AdamConsts {
        neg_step_size,
        bc2_sqrt,
        w1f,
        w1c,
        b2,
        w2,
        eps,
        wd,
        decay,
    };
    if !c.amsgrad && !c.maximize && w1_small {
        // The common case, without per-element branches (vectorises).
        match (coupled, decouple) {
            (false, false) => adam_fast::<F, 0>(&k, param, grad, m, v),
            (true, _) => adam_fast::<F, 1>(&k, param, grad, m, v),
            (false, true) => adam_fast::<F, 2>(&k, param, grad, m, v),
        }
        return;
    }
    let mut vmax = rest.first_mut().map(|s| &mut **s);
    let n = param.len();
    // The L2 term only without decoupled decay, which scales θ instead.
    let term = GradTerm::<F>::new(c.maximize, if coupled { c.weight_decay } else { 0.0 });
    for j in 0..n {
        if decouple {
            param[j] *= decay;
        }
        let g = term.apply(grad[j], param[j]);
        m[j] = lerp(m[j], g, w1f, w1_small, w1c);
        v[j] = v[j] * b2 + w2 * g * g;
        let vv = match vmax.as_deref_mut() {
            Some(vm) => {
                vm[j] = vm[j].max(v[j]);
                vm[j]
            }
            None => v[j],
        };
        let denom = vv.sqrt() / bc2_sqrt + eps;
        param[j] += neg_step_size * m[j] / denom;
    }
}

struct AdamConsts<F> {
    neg_step_size: F,
    bc2_sqrt: F,
    w1f: F,
    w1c: F,
    b2: F,
    w2: F,
    eps: F,
    wd: F,
    decay: F,
}

/// Adam without amsgrad/maximize, `1 − β₁ < 0.5`; `WD`: 0 none, 1 L2
/// (coupled), 2 decoupled (AdamW).
#[inline(always)]
fn adam_fast<F: Float, const WD: u8>(
    k: &AdamConsts<F>,
    param: &mut [F],
    grad: &[F],
    m: &mut [F],
    v: &mut [F],
) {
    let n = param.len();
    let (param, grad, m, v) = (&mut param[..n], &grad[..n], &mut m[..n], &mut v[..n]);
    let _ = k.w1c;
    for j in 0..n {
        let mut g = grad[j];
        let mut p = param[j];
        if WD == 2 {
            p *= k.decay;
        }
        if WD == 1 {
            g += k.wd * p;
        }
        let mj = m[j] + k.w1f * (g - m[j]);
        let vj = v[j] * k.b2 + k.w2 * g * g;
        m[j] = mj;
        v[j] = vj;
        let denom = vj.sqrt() / k.bc2_sqrt + k.eps;
        param[j] = p + k.neg_step_size * mj / denom;
    }
}

/// The Adam update with tensor ops.
pub(crate) fn adam_update_tensors(
    c: &AdamConfig,
    decoupled: bool,
    step: u64,
    param: &Tensor,
    grad: &Tensor,
    state: &mut [Tensor],
) -> Result<Tensor> {
    let t = step as f64;
    let bc1 = 1.0 - c.beta1.powf(t);
    let bc2 = 1.0 - c.beta2.powf(t);
    let mut p = param.clone();
    if decoupled && c.weight_decay != 0.0 {
        p = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
    }
    let l2 = if decoupled { 0.0 } else { c.weight_decay };
    let g = grad_term(grad, &p, c.maximize, l2)?;
    let m = (&state[0] + (&g - &state[0])?.affine(1.0 - c.beta1, 0.0)?)?;
    let v = (state[1].affine(c.beta2, 0.0)? + g.affine(1.0 - c.beta2, 0.0)?.mul(&g)?)?;
    let vv = if c.amsgrad {
        let vm = state[2].maximum(&v)?;
        state[2] = vm.clone();
        vm
    } else {
        v.clone()
    };
    let denom = vv.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
    let new = (p + m.affine(-(c.lr / bc1), 0.0)?.div(&denom)?)?;
    state[0] = m;
    state[1] = v;
    Ok(new)
}

impl UpdateRule for AdamConfig {
    const KIND: &'static str = "Adam";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }

    /// `beta1` (PyTorch `betas[0]`), cycled by `OneCycleLR`.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        Some(&mut self.beta1)
    }

    fn validate(&self) -> Result<()> {
        validate_adam(self)
    }

    fn state_names(&self) -> &'static [&'static str] {
        adam_state_names(self)
    }

    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    ) {
        adam_update(self, false, step.t, param, grad, state)
    }

    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        adam_update_tensors(self, false, step.t, param, grad, state).map(Some)
    }
}
