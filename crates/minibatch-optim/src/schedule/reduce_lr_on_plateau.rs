use super::LrScheduler;
use crate::error::check_non_negative;
use crate::{OptimError, Optimizer, Result};

/// Whether a lower or a higher metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlateauMode {
    /// `"min"` (losses).
    Min,
    /// `"max"` (accuracies).
    Max,
}

/// How `threshold` is compared (PyTorch's `threshold_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdMode {
    /// `"rel"`: better than `best · (1 ∓ threshold)`.
    Rel,
    /// `"abs"`: better than `best ∓ threshold`.
    Abs,
}

/// Divides the learning rate when a metric stops improving
/// (`torch.optim.lr_scheduler.ReduceLROnPlateau`). Step it with
/// [`LrScheduler::step_with_metric`]; plain [`LrScheduler::step`] is an
/// error. After more than `patience` steps without improvement each group's
/// lr becomes `max(lr · factor, min_lr)` (if that changes it by more than
/// `eps`), followed by `cooldown` steps during which bad steps are not
/// counted.
#[derive(Debug, Clone)]
pub struct ReduceLROnPlateau {
    /// Lower or higher is better.
    pub mode: PlateauMode,
    /// Multiplier applied on a plateau (< 1).
    pub factor: f64,
    /// Bad steps tolerated before reducing.
    pub patience: u64,
    /// Minimal significant improvement.
    pub threshold: f64,
    /// How `threshold` is applied.
    pub threshold_mode: ThresholdMode,
    /// Steps to wait after a reduction.
    pub cooldown: u64,
    /// Lower bound of the learning rate (per group).
    pub min_lr: f64,
    /// Smallest change of lr that is applied.
    pub eps: f64,
    best: f64,
    num_bad_epochs: u64,
    cooldown_counter: u64,
    last_epoch: u64,
    last_lr: Vec<f64>,
}

impl ReduceLROnPlateau {
    /// PyTorch's defaults: min mode, factor 0.1, patience 10, threshold 1e-4
    /// relative, no cooldown, min_lr 0, eps 1e-8. Change the public fields or
    /// use [`ReduceLROnPlateau::with_options`].
    pub fn new(opt: &mut dyn Optimizer) -> Result<Self> {
        Self::with_options(
            opt,
            PlateauMode::Min,
            0.1,
            10,
            1e-4,
            ThresholdMode::Rel,
            0,
            0.0,
            1e-8,
        )
    }

    /// Every option of PyTorch's constructor (one `min_lr` for all groups).
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        opt: &mut dyn Optimizer,
        mode: PlateauMode,
        factor: f64,
        patience: u64,
        threshold: f64,
        threshold_mode: ThresholdMode,
        cooldown: u64,
        min_lr: f64,
        eps: f64,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&factor) {
            return Err(OptimError::InvalidHyperparameter {
                name: "factor",
                value: factor.to_string(),
                reason: "must be in [0, 1)",
            });
        }
        check_non_negative("threshold", threshold)?;
        check_non_negative("min_lr", min_lr)?;
        check_non_negative("eps", eps)?;
        Ok(Self {
            mode,
            factor,
            patience,
            threshold,
            threshold_mode,
            cooldown,
            min_lr,
            eps,
            best: Self::worst(mode),
            num_bad_epochs: 0,
            cooldown_counter: 0,
            last_epoch: 0,
            last_lr: group_lrs(opt),
        })
    }

    fn worst(mode: PlateauMode) -> f64 {
        match mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        }
    }

    fn is_better(&self, a: f64) -> bool {
        let (b, t) = (self.best, self.threshold);
        match (self.mode, self.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < b * (1.0 - t),
            (PlateauMode::Min, ThresholdMode::Abs) => a < b - t,
            (PlateauMode::Max, ThresholdMode::Rel) => a > b * (t + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > b + t,
        }
    }
}

/// Every group's learning rate.
fn group_lrs(opt: &dyn Optimizer) -> Vec<f64> {
    (0..opt.param_groups().len())
        .map(|g| opt.group_lr(g).unwrap_or(0.0))
        .collect()
}

impl LrScheduler for ReduceLROnPlateau {
    fn step(&mut self, _opt: &mut dyn Optimizer) -> Result<()> {
        Err(OptimError::Schedule(
            "ReduceLROnPlateau needs the monitored metric: call step_with_metric".into(),
        ))
    }

    fn step_with_metric(&mut self, opt: &mut dyn Optimizer, metric: f64) -> Result<()> {
        self.last_epoch += 1;
        if self.is_better(metric) {
            self.best = metric;
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.patience {
            for g in 0..opt.param_groups().len() {
                let lr = opt.group_lr(g).unwrap_or(0.0);
                let new = (lr * self.factor).max(self.min_lr);
                if lr - new > self.eps {
                    opt.set_group_lr(g, new)?;
                }
            }
            self.cooldown_counter = self.cooldown;
            self.num_bad_epochs = 0;
        }
        self.last_lr.clear();
        self.last_lr
            .extend((0..opt.param_groups().len()).map(|g| opt.group_lr(g).unwrap_or(0.0)));
        Ok(())
    }

    fn last_lr(&self) -> Vec<f64> {
        self.last_lr.clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "best": if self.best.is_finite() { serde_json::json!(self.best) } else { serde_json::Value::Null },
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "last_epoch": self.last_epoch,
            "last_lr": self.last_lr,
        })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad =
            |k: &str| OptimError::CorruptState(format!("schedule state: bad or missing `{k}`"));
        let u = |k: &str| state.get(k).and_then(|x| x.as_u64()).ok_or_else(|| bad(k));
        let best = match state.get("best") {
            Some(serde_json::Value::Null) => Self::worst(self.mode),
            Some(v) => v.as_f64().ok_or_else(|| bad("best"))?,
            None => return Err(bad("best")),
        };
        let last_lr = state
            .get("last_lr")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("last_lr"))?;
        self.num_bad_epochs = u("num_bad_epochs")?;
        self.cooldown_counter = u("cooldown_counter")?;
        self.last_epoch = u("last_epoch")?;
        self.best = best;
        self.last_lr = last_lr;
        Ok(())
    }
}
