use super::{closed_form_scheduler, positive, Core};
use crate::{OptimError, Optimizer, Result};

/// Multiplies the learning rate by `gamma` every `step_size` steps
/// (`torch.optim.lr_scheduler.StepLR`): `lr(e) = base · gamma^⌊e / step_size⌋`.
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{LrScheduler, Optimizer, Sgd, StepLR};
/// # fn main() -> minibatch_optim::Result<()> {
/// let mut opt = Sgd::minibatch_gd(vec![Var::new(&[0f32], &Device::Cpu)?], 0.1)?;
/// let mut sched = StepLR::new(&mut opt, 2, 0.5)?;
/// let mut lrs = vec![];
/// for _ in 0..5 { lrs.push(opt.learning_rate()); sched.step(&mut opt)?; }
/// assert_eq!(lrs, [0.1, 0.1, 0.05, 0.05, 0.025]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct StepLR {
    core: Core,
    step_size: u64,
    gamma: f64,
}

impl StepLR {
    /// `StepLR(optimizer, step_size, gamma)`.
    pub fn new(opt: &mut dyn Optimizer, step_size: u64, gamma: f64) -> Result<Self> {
        if step_size == 0 {
            return Err(OptimError::InvalidHyperparameter {
                name: "step_size",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        positive("gamma", gamma)?;
        let mut s = Self {
            core: Core::new(opt)?,
            step_size,
            gamma,
        };
        let this = s.clone();
        s.core.apply(opt, |b, e| this.lr(b, e))?;
        Ok(s)
    }

    fn lr(&self, base: f64, e: u64) -> f64 {
        base * self.gamma.powi((e / self.step_size) as i32)
    }
}
closed_form_scheduler!(StepLR);
