use super::{closed_form_scheduler, Core};
use crate::{OptimError, Optimizer, Result};

/// Linear change of a multiplicative factor from `start_factor` to
/// `end_factor` over `total_iters` steps, then constant
/// (`torch.optim.lr_scheduler.LinearLR`, the usual warm-up):
/// `lr(e) = base · (start + (end − start) · min(e, total_iters) / total_iters)`.
#[derive(Debug, Clone)]
pub struct LinearLR {
    core: Core,
    start_factor: f64,
    end_factor: f64,
    total_iters: u64,
}

impl LinearLR {
    /// `LinearLR(optimizer, start_factor, end_factor, total_iters)`
    /// (PyTorch defaults: 1/3, 1.0, 5).
    pub fn new(
        opt: &mut dyn Optimizer,
        start_factor: f64,
        end_factor: f64,
        total_iters: u64,
    ) -> Result<Self> {
        if !(start_factor > 0.0 && start_factor <= 1.0) {
            return Err(OptimError::InvalidHyperparameter {
                name: "start_factor",
                value: start_factor.to_string(),
                reason: "must be in (0, 1]",
            });
        }
        if !(0.0..=1.0).contains(&end_factor) {
            return Err(OptimError::InvalidHyperparameter {
                name: "end_factor",
                value: end_factor.to_string(),
                reason: "must be in [0, 1]",
            });
        }
        let mut s = Self {
            core: Core::new(opt)?,
            start_factor,
            end_factor,
            total_iters,
        };
        let this = s.clone();
        s.core.apply(opt, |b, e| this.lr(b, e))?;
        Ok(s)
    }

    fn lr(&self, base: f64, e: u64) -> f64 {
        if self.total_iters == 0 {
            return base * self.end_factor;
        }
        let frac = e.min(self.total_iters) as f64 / self.total_iters as f64;
        base * (self.start_factor + (self.end_factor - self.start_factor) * frac)
    }
}
closed_form_scheduler!(LinearLR);
