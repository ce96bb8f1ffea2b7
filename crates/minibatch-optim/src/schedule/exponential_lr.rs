use super::{closed_form_scheduler, positive, Core};
use crate::{Optimizer, Result};

/// Multiplies the learning rate by `gamma` every step
/// (`torch.optim.lr_scheduler.ExponentialLR`): `lr(e) = base · gammaᵉ`.
#[derive(Debug, Clone)]
pub struct ExponentialLR {
    core: Core,
    gamma: f64,
}

impl ExponentialLR {
    /// `ExponentialLR(optimizer, gamma)`.
    pub fn new(opt: &mut dyn Optimizer, gamma: f64) -> Result<Self> {
        positive("gamma", gamma)?;
        let mut s = Self {
            core: Core::new(opt)?,
            gamma,
        };
        let this = s.clone();
        s.core.apply(opt, |b, e| this.lr(b, e))?;
        Ok(s)
    }

    fn lr(&self, base: f64, e: u64) -> f64 {
        base * self.gamma.powi(e as i32)
    }
}
closed_form_scheduler!(ExponentialLR);
