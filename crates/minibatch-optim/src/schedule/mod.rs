//! Learning-rate schedules (`torch.optim.lr_scheduler`).
//!
//! A schedule changes the learning rate of every parameter group of an
//! optimizer each time [`LrScheduler::step`] is called. *When* to call it is
//! the caller's choice: once per epoch (PyTorch's usual pattern, `step` after
//! the epoch's optimizer steps) or once per iteration (warm-up and
//! `OneCycleLR` are usually stepped per batch); the schedule only counts
//! calls. Constructing a schedule applies its epoch-0 learning rate, like
//! PyTorch.
//!
//! Per-group base learning rates work as in PyTorch: each group's base is its
//! `initial_lr` (set by the first schedule attached to the optimizer from the
//! group's lr at that time).

mod cosine_annealing_lr;
mod cosine_annealing_warm_restarts;
mod exponential_lr;
mod linear_lr;
mod multi_step_lr;
mod one_cycle_lr;
mod pytorch;
mod reduce_lr_on_plateau;
mod sequential_lr;
mod step_lr;
mod swalr;

pub use cosine_annealing_lr::{CosineAnnealing, CosineAnnealingLR};
pub use cosine_annealing_warm_restarts::CosineAnnealingWarmRestarts;
pub use exponential_lr::ExponentialLR;
pub use linear_lr::LinearLR;
pub use multi_step_lr::MultiStepLR;
pub use one_cycle_lr::{Anneal, OneCycleLR, OneCycleOptions};
pub use pytorch::from_pytorch;
pub use reduce_lr_on_plateau::{PlateauMode, ReduceLROnPlateau, ThresholdMode};
pub use sequential_lr::SequentialLR;
pub use step_lr::StepLR;
pub use swalr::{SwaAnneal, SWALR};

use crate::{check_non_negative, OptimError, Optimizer, Result};

/// A learning-rate schedule; object safe (`Box<dyn LrScheduler>`).
pub trait LrScheduler: Send {
    /// Advances the schedule by one epoch or iteration and sets the new
    /// learning rates on `opt`.
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()>;

    /// Advances with a monitored metric (validation loss...). Only
    /// [`ReduceLROnPlateau`] uses the metric; the others ignore it.
    fn step_with_metric(&mut self, opt: &mut dyn Optimizer, metric: f64) -> Result<()> {
        let _ = metric;
        self.step(opt)
    }

    /// The learning rates (per group) set by the latest step.
    fn last_lr(&self) -> Vec<f64>;

    /// The schedule's state (counters, bases) as JSON, for checkpoints.
    fn state(&self) -> serde_json::Value;

    /// Restores [`LrScheduler::state`]. Does not touch the optimizer (its
    /// learning rates are part of the optimizer's own state).
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()>;

    /// Restarts the schedule at epoch 0 and applies that learning rate (used
    /// by [`SequentialLR`] at its milestones). Not every schedule supports it.
    fn restart(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let _ = opt;
        Err(OptimError::Schedule(
            "this schedule cannot be restarted".into(),
        ))
    }
}

/// A boxed schedule is a schedule (every method forwarded), so functions
/// generic over `impl LrScheduler` also take a `Box<dyn LrScheduler>`.
impl<S: LrScheduler + ?Sized> LrScheduler for Box<S> {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        (**self).step(opt)
    }
    fn step_with_metric(&mut self, opt: &mut dyn Optimizer, metric: f64) -> Result<()> {
        (**self).step_with_metric(opt, metric)
    }
    fn last_lr(&self) -> Vec<f64> {
        (**self).last_lr()
    }
    fn state(&self) -> serde_json::Value {
        (**self).state()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        (**self).load_state(state)
    }
    fn restart(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        (**self).restart(opt)
    }
}

/// The shared part of the closed-form schedules: per-group bases, epoch
/// counter, latest lrs.
#[derive(Debug, Clone)]
pub(crate) struct Core {
    pub base_lrs: Vec<f64>,
    pub last_epoch: u64,
    pub last_lr: Vec<f64>,
}

impl Core {
    /// Reads the groups' `initial_lr`, recording the current lr as such where
    /// there is none yet (PyTorch's `group.setdefault("initial_lr", group["lr"])`).
    pub fn new(opt: &mut dyn Optimizer) -> Result<Self> {
        let mut base_lrs = Vec::with_capacity(opt.param_groups().len());
        for g in 0..opt.param_groups().len() {
            let base = match opt.param_groups()[g].initial_lr() {
                Some(lr) => lr,
                None => {
                    let lr = opt.group_lr(g).unwrap_or(0.0);
                    opt.set_initial_lr(g, lr)?;
                    lr
                }
            };
            base_lrs.push(base);
        }
        Ok(Self {
            base_lrs,
            last_epoch: 0,
            last_lr: Vec::new(),
        })
    }

    /// Sets `lr(base, epoch)` on every group.
    pub fn apply(&mut self, opt: &mut dyn Optimizer, lr: impl Fn(f64, u64) -> f64) -> Result<()> {
        self.last_lr.clear();
        let epoch = self.last_epoch;
        self.last_lr
            .extend(self.base_lrs.iter().map(|&base| lr(base, epoch)));
        set_group_lrs(opt, &self.last_lr)
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "base_lrs": self.base_lrs,
            "last_epoch": self.last_epoch,
            "last_lr": self.last_lr,
        })
    }

    pub fn load(&mut self, v: &serde_json::Value) -> Result<()> {
        let bad = |what: &str| {
            OptimError::CorruptState(format!("schedule state: bad or missing `{what}`"))
        };
        let base_lrs: Vec<f64> = v
            .get("base_lrs")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("base_lrs"))?;
        if base_lrs.len() != self.base_lrs.len() {
            return Err(OptimError::StateMismatch(format!(
                "schedule state has {} groups, this schedule {}",
                base_lrs.len(),
                self.base_lrs.len()
            )));
        }
        self.last_epoch = v
            .get("last_epoch")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("last_epoch"))?;
        self.last_lr = v
            .get("last_lr")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("last_lr"))?;
        self.base_lrs = base_lrs;
        Ok(())
    }
}

/// Implements [`LrScheduler`] for a schedule with a `core: Core` field and a
/// `fn lr(&self, base: f64, epoch: u64) -> f64` method.
macro_rules! closed_form_scheduler {
    ($t:ty) => {
        impl $crate::schedule::LrScheduler for $t {
            fn step(&mut self, opt: &mut dyn $crate::Optimizer) -> $crate::Result<()> {
                self.core.last_epoch += 1;
                let this = self.clone();
                self.core.apply(opt, |b, e| this.lr(b, e))
            }
            fn last_lr(&self) -> Vec<f64> {
                self.core.last_lr.clone()
            }
            fn state(&self) -> serde_json::Value {
                self.core.state()
            }
            fn load_state(&mut self, state: &serde_json::Value) -> $crate::Result<()> {
                self.core.load(state)
            }
            fn restart(&mut self, opt: &mut dyn $crate::Optimizer) -> $crate::Result<()> {
                self.core.last_epoch = 0;
                let this = self.clone();
                self.core.apply(opt, |b, e| this.lr(b, e))
            }
        }
    };
}
pub(crate) use closed_form_scheduler;

/// Sets one learning rate per group. A group count that does not match or a
/// negative or non-finite lr is an error before any group changes.
pub(crate) fn set_group_lrs(opt: &mut dyn Optimizer, lrs: &[f64]) -> Result<()> {
    let n = opt.param_groups().len();
    if n != lrs.len() {
        return Err(OptimError::Schedule(format!(
            "the schedule was built for {} parameter groups, the optimizer has {n}",
            lrs.len()
        )));
    }
    for &lr in lrs {
        check_non_negative("lr", lr)?;
    }
    for (g, &lr) in lrs.iter().enumerate() {
        opt.set_group_lr(g, lr)?;
    }
    Ok(())
}

pub(crate) fn positive(name: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(OptimError::InvalidHyperparameter {
            name,
            value: v.to_string(),
            reason: "must be finite and > 0",
        });
    }
    Ok(())
}
