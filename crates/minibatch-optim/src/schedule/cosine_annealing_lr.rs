use super::{closed_form_scheduler, Core};
use crate::error::check_non_negative;
use crate::{OptimError, Optimizer, Result};

/// Cosine annealing from the base learning rate to `eta_min` over `t_max`
/// steps (`torch.optim.lr_scheduler.CosineAnnealingLR`):
/// `lr(e) = eta_min + (base − eta_min)(1 + cos(π e / t_max)) / 2`
/// (past `t_max` the cosine continues, rising again, as in PyTorch).
///
/// The cosine schedule of SGDR without its restarts: Loshchilov & Hutter,
/// "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017
/// (<https://arxiv.org/abs/1608.03983>).
#[derive(Debug, Clone)]
pub struct CosineAnnealingLR {
    core: Core,
    t_max: u64,
    eta_min: f64,
}

impl CosineAnnealingLR {
    /// `CosineAnnealingLR(optimizer, T_max, eta_min)`.
    pub fn new(opt: &mut dyn Optimizer, t_max: u64, eta_min: f64) -> Result<Self> {
        if t_max == 0 {
            return Err(OptimError::InvalidHyperparameter {
                name: "T_max",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        check_non_negative("eta_min", eta_min)?;
        let mut s = Self {
            core: Core::new(opt)?,
            t_max,
            eta_min,
        };
        let this = s.clone();
        s.core.apply(opt, |b, e| this.lr(b, e))?;
        Ok(s)
    }

    fn lr(&self, base: f64, e: u64) -> f64 {
        let c = (std::f64::consts::PI * e as f64 / self.t_max as f64).cos();
        self.eta_min + (base - self.eta_min) * (1.0 + c) / 2.0
    }
}
closed_form_scheduler!(CosineAnnealingLR);

/// Short name for [`CosineAnnealingLR`].
pub type CosineAnnealing = CosineAnnealingLR;
