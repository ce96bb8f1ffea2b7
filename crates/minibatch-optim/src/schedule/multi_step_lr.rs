use super::{closed_form_scheduler, positive, Core};
use crate::{Optimizer, Result};

/// Multiplies the learning rate by `gamma` at each milestone
/// (`torch.optim.lr_scheduler.MultiStepLR`):
/// `lr(e) = base · gamma^(number of milestones ≤ e)`.
#[derive(Debug, Clone)]
pub struct MultiStepLR {
    core: Core,
    milestones: Vec<u64>,
    gamma: f64,
}

impl MultiStepLR {
    /// `MultiStepLR(optimizer, milestones, gamma)`; milestones are sorted.
    pub fn new(opt: &mut dyn Optimizer, mut milestones: Vec<u64>, gamma: f64) -> Result<Self> {
        positive("gamma", gamma)?;
        milestones.sort_unstable();
        let mut s = Self {
            core: Core::new(opt)?,
            milestones,
            gamma,
        };
        let this = s.clone();
        s.core.apply(opt, |b, e| this.lr(b, e))?;
        Ok(s)
    }

    fn lr(&self, base: f64, e: u64) -> f64 {
        let k = self.milestones.partition_point(|&m| m <= e);
        base * self.gamma.powi(k as i32)
    }
}
closed_form_scheduler!(MultiStepLR);
