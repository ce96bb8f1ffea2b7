use super::LrScheduler;
use crate::{OptimError, Optimizer, Result};

/// Runs schedules one after the other, switching at the milestones
/// (`torch.optim.lr_scheduler.SequentialLR`): schedule `i + 1` is restarted
/// at epoch 0 when the step count reaches `milestones[i]`. Typical use:
/// a [`LinearLR`](super::LinearLR) warm-up then a
/// [`CosineAnnealingLR`](super::CosineAnnealingLR).
pub struct SequentialLR {
    schedulers: Vec<Box<dyn LrScheduler>>,
    milestones: Vec<u64>,
    last_epoch: u64,
    last_lr: Vec<f64>,
}

impl std::fmt::Debug for SequentialLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialLR")
            .field("milestones", &self.milestones)
            .field("last_epoch", &self.last_epoch)
            .finish_non_exhaustive()
    }
}

impl SequentialLR {
    /// `SequentialLR(optimizer, schedulers, milestones)`; needs
    /// `milestones.len() == schedulers.len() - 1`, increasing milestones.
    pub fn new(
        opt: &mut dyn Optimizer,
        mut schedulers: Vec<Box<dyn LrScheduler>>,
        milestones: Vec<u64>,
    ) -> Result<Self> {
        if schedulers.is_empty() || milestones.len() + 1 != schedulers.len() {
            return Err(OptimError::InvalidSetup(format!(
                "SequentialLR needs one milestone fewer than schedules, got {} schedules and {} milestones",
                schedulers.len(),
                milestones.len()
            )));
        }
        if milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(OptimError::InvalidSetup(
                "SequentialLR milestones must increase".into(),
            ));
        }
        for g in 0..opt.param_groups().len() {
            if let Some(l) = opt.param_groups()[g].initial_lr() {
                opt.set_group_lr(g, l)?;
            }
        }
        schedulers[0].restart(opt)?;
        let last_lr = schedulers[0].last_lr();
        Ok(Self {
            schedulers,
            milestones,
            last_epoch: 0,
            last_lr,
        })
    }
}

impl LrScheduler for SequentialLR {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.last_epoch += 1;
        let idx = self.milestones.partition_point(|&m| m <= self.last_epoch);
        if idx > 0 && self.milestones[idx - 1] == self.last_epoch {
            self.schedulers[idx].restart(opt)?;
        } else {
            self.schedulers[idx].step(opt)?;
        }
        self.last_lr = self.schedulers[idx].last_lr();
        Ok(())
    }

    fn last_lr(&self) -> Vec<f64> {
        self.last_lr.clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "last_epoch": self.last_epoch,
            "last_lr": self.last_lr,
            "schedulers": self.schedulers.iter().map(|s| s.state()).collect::<Vec<_>>(),
        })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad =
            |k: &str| OptimError::CorruptState(format!("schedule state: bad or missing `{k}`"));
        let subs = state
            .get("schedulers")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("schedulers"))?;
        if subs.len() != self.schedulers.len() {
            return Err(OptimError::StateMismatch(format!(
                "SequentialLR state has {} schedules, this one {}",
                subs.len(),
                self.schedulers.len()
            )));
        }
        let last_epoch = state
            .get("last_epoch")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("last_epoch"))?;
        let last_lr = state
            .get("last_lr")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("last_lr"))?;
        for (s, v) in self.schedulers.iter_mut().zip(subs) {
            s.load_state(v)?;
        }
        self.last_epoch = last_epoch;
        self.last_lr = last_lr;
        Ok(())
    }
}
