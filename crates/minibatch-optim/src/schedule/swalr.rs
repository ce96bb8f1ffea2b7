use super::{set_group_lrs, LrScheduler};
use crate::error::check_non_negative;
use crate::{OptimError, Optimizer, Result};

/// How [`SWALR`] moves from the learning rate in force to the SWA one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwaAnneal {
    /// `α(t) = (1 − cos(π t)) / 2` (PyTorch's default, `"cos"`).
    Cos,
    /// `α(t) = t` (`"linear"`).
    Linear,
}

impl SwaAnneal {
    fn alpha(self, t: f64) -> f64 {
        match self {
            SwaAnneal::Cos => (1.0 - (std::f64::consts::PI * t).cos()) / 2.0,
            SwaAnneal::Linear => t,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SwaAnneal::Cos => "cos",
            SwaAnneal::Linear => "linear",
        }
    }
}

/// The learning rate of stochastic weight averaging
/// (`torch.optim.swa_utils.SWALR`): over `anneal_epochs` steps it anneals
/// each group's learning rate from the one in force when it was built to
/// `swa_lr`, then holds `swa_lr`. Use it with an
/// [`AveragedModel`](crate::AveragedModel) once the SWA phase starts, in
/// place of the schedule used before.
///
/// Like PyTorch's, it is *chainable*: each step reads the group's current
/// learning rate, recovers the starting one from it,
/// `lr₀ = (lr − α(t−1)·swa_lr) / (1 − α(t−1))`, and sets
/// `swa_lr·α(t) + lr₀·(1 − α(t))` with `t = min(1, step / max(1, anneal_epochs))`,
/// operation for operation (so the rates agree with PyTorch's to the last bit).
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{LrScheduler, Optimizer, Sgd, SwaAnneal, SWALR};
/// # fn main() -> minibatch_optim::Result<()> {
/// let mut opt = Sgd::minibatch_gd(vec![Var::new(&[0f32], &Device::Cpu)?], 0.1)?;
/// let mut swa = SWALR::new(&mut opt, &[0.02], 2, SwaAnneal::Linear)?;
/// let mut lrs = vec![];
/// for _ in 0..4 { lrs.push(opt.learning_rate()); swa.step(&mut opt)?; }
/// // 0.1, halfway, then 0.02 (PyTorch's float rounding: 0.060000000000000005)
/// assert_eq!(lrs, [0.1, 0.02 * 0.5 + 0.1 * 0.5, 0.02, 0.02]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SWALR {
    swa_lrs: Vec<f64>,
    anneal_epochs: u64,
    anneal: SwaAnneal,
    /// PyTorch's `_step_count`: 1 after construction.
    step_count: u64,
    last_lr: Vec<f64>,
}

impl SWALR {
    /// `SWALR(optimizer, swa_lr, anneal_epochs, anneal_strategy)`: `swa_lr`
    /// holds one learning rate for every group, or one per group (PyTorch
    /// defaults: `anneal_epochs` 10, [`SwaAnneal::Cos`]).
    pub fn new(
        opt: &mut dyn Optimizer,
        swa_lr: &[f64],
        anneal_epochs: u64,
        anneal: SwaAnneal,
    ) -> Result<Self> {
        let groups = opt.param_groups().len();
        let swa_lrs = match swa_lr.len() {
            1 => vec![swa_lr[0]; groups],
            n if n == groups => swa_lr.to_vec(),
            n => {
                return Err(OptimError::InvalidSetup(format!(
                    "SWALR: {n} swa_lr values for {groups} parameter groups (give one, or one per group)"
                )))
            }
        };
        for &lr in &swa_lrs {
            check_non_negative("swa_lr", lr)?;
        }
        let mut s = Self {
            swa_lrs,
            anneal_epochs,
            anneal,
            step_count: 0,
            last_lr: Vec::new(),
        };
        s.advance(opt)?;
        Ok(s)
    }

    /// The SWA learning rate of each group.
    pub fn swa_lrs(&self) -> &[f64] {
        &self.swa_lrs
    }

    /// One step: PyTorch's `_step_count += 1` and `get_lr()`.
    fn advance(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let groups = opt.param_groups().len();
        if groups != self.swa_lrs.len() {
            return Err(OptimError::Schedule(format!(
                "SWALR was built for {} parameter groups, the optimizer has {groups}",
                self.swa_lrs.len()
            )));
        }
        let mut step = self.step_count as i64; // `_step_count - 1` after the increment
        if self.anneal_epochs == 0 {
            step = step.max(1);
        }
        let span = self.anneal_epochs.max(1) as f64;
        let prev_t = ((step - 1) as f64 / span).clamp(0.0, 1.0);
        let prev_alpha = self.anneal.alpha(prev_t);
        let t = (step as f64 / span).clamp(0.0, 1.0);
        let alpha = self.anneal.alpha(t);
        let mut lrs = Vec::with_capacity(groups);
        for (g, &swa_lr) in self.swa_lrs.iter().enumerate() {
            let lr = opt.group_lr(g).unwrap_or(0.0);
            let initial = if prev_alpha == 1.0 {
                swa_lr
            } else {
                (lr - prev_alpha * swa_lr) / (1.0 - prev_alpha)
            };
            lrs.push(swa_lr * alpha + initial * (1.0 - alpha));
        }
        set_group_lrs(opt, &lrs)?;
        self.step_count += 1;
        self.last_lr = lrs;
        Ok(())
    }
}

impl LrScheduler for SWALR {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.advance(opt)
    }

    fn last_lr(&self) -> Vec<f64> {
        self.last_lr.clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "swa_lrs": self.swa_lrs,
            "anneal_epochs": self.anneal_epochs,
            "anneal_strategy": self.anneal.label(),
            "step_count": self.step_count,
            "last_lr": self.last_lr,
        })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad =
            |what: &str| OptimError::CorruptState(format!("SWALR state: bad or missing `{what}`"));
        let swa_lrs: Vec<f64> = state
            .get("swa_lrs")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("swa_lrs"))?;
        let anneal_epochs = state
            .get("anneal_epochs")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("anneal_epochs"))?;
        let anneal = match state.get("anneal_strategy").and_then(|x| x.as_str()) {
            Some("cos") => SwaAnneal::Cos,
            Some("linear") => SwaAnneal::Linear,
            _ => return Err(bad("anneal_strategy")),
        };
        let step_count = state
            .get("step_count")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("step_count"))?;
        let last_lr: Vec<f64> = state
            .get("last_lr")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .ok_or_else(|| bad("last_lr"))?;
        if swa_lrs.len() != self.swa_lrs.len() {
            return Err(OptimError::StateMismatch(format!(
                "SWALR state has {} groups, this schedule {}",
                swa_lrs.len(),
                self.swa_lrs.len()
            )));
        }
        if anneal_epochs != self.anneal_epochs || anneal != self.anneal {
            return Err(OptimError::StateMismatch(format!(
                "SWALR state anneals over {anneal_epochs} steps ({}), this schedule over {} ({})",
                anneal.label(),
                self.anneal_epochs,
                self.anneal.label()
            )));
        }
        self.swa_lrs = swa_lrs;
        self.step_count = step_count;
        self.last_lr = last_lr;
        Ok(())
    }
}
