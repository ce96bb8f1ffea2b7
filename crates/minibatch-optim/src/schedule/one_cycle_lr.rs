use super::{positive, set_group_lrs, Core, LrScheduler};
use crate::{OptimError, Optimizer, Result};

/// The annealing shape of [`OneCycleLR`] (PyTorch's `anneal_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anneal {
    /// `"cos"`.
    Cos,
    /// `"linear"`.
    Linear,
}

/// The optional arguments of [`OneCycleLR`], PyTorch's keyword arguments;
/// [`Default`] gives PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneCycleOptions {
    /// Fraction of the steps spent increasing the lr (`pct_start`, 0.3).
    pub pct_start: f64,
    /// Annealing shape (`anneal_strategy`, cos).
    pub anneal: Anneal,
    /// `initial_lr = max_lr / div_factor` (25).
    pub div_factor: f64,
    /// `min_lr = initial_lr / final_div_factor` (1e4).
    pub final_div_factor: f64,
    /// Three phases instead of two (false).
    pub three_phase: bool,
    /// Cycle the momentum (or Adam's β₁) inversely to the lr (true). Needs an
    /// optimizer with a momentum: SGD, RMSprop, Adam, AdamW, not Adagrad.
    pub cycle_momentum: bool,
    /// Lowest momentum, reached when the lr peaks (0.85).
    pub base_momentum: f64,
    /// Highest momentum, at the start and the end of the cycle (0.95).
    pub max_momentum: f64,
}

impl Default for OneCycleOptions {
    fn default() -> Self {
        Self {
            pct_start: 0.3,
            anneal: Anneal::Cos,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }
}

/// The 1cycle policy (`torch.optim.lr_scheduler.OneCycleLR`) of Smith &
/// Topin, "Super-Convergence: Very Fast Training of Neural Networks Using
/// Large Learning Rates", 2019 (<https://arxiv.org/abs/1708.07120>), stepped
/// once per batch: warm up from `max_lr / div_factor` to `max_lr` over
/// `pct_start · total_steps` steps, then anneal to
/// `max_lr / (div_factor · final_div_factor)` (with `three_phase`, go back down
/// to the initial lr first). The optimizer's own lr is ignored. Stepping more
/// than `total_steps` times is an error; the `total_steps`-th step (after the
/// last batch) keeps the final lr and momentum, where PyTorch extrapolates
/// the last phase one step further (with linear annealing, to a negative lr,
/// which [`Optimizer::set_group_lr`] refuses).
///
/// **Momentum cycling** (`cycle_momentum`, on by default as in PyTorch): the
/// momentum (SGD, RMSprop) or β₁ (Adam, AdamW) of every group is set to
/// `max_momentum` at construction (even for an SGD built with momentum 0,
/// like PyTorch) and then moves inversely to the lr with the same annealing:
/// `max_momentum → base_momentum` while the lr rises, back to `max_momentum`
/// while it falls (three phases: max → base, base → max, then constant max).
/// An optimizer without momentum (Adagrad) is an error unless
/// `cycle_momentum` is false. SGD and RMSprop keep a momentum buffer only
/// while momentum > 0: an optimizer built with momentum 0 gets its buffers
/// when the schedule switches momentum on (before or after the first step,
/// started as PyTorch starts a missing buffer), and `base_momentum` must stay
/// above 0 for them (dropping a buffer after the first step is refused, see
/// [`Optimizer::set_momentum`]).
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{LrScheduler, OneCycleLR, Optimizer, Sgd, SgdConfig};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32], &Device::Cpu)?;
/// let mut opt = Sgd::new(vec![w], SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// let mut sched = OneCycleLR::new(&mut opt, 0.1, 20)?;
/// assert_eq!(opt.momentum(0), Some(0.95));
/// for _ in 0..5 {
///     sched.step(&mut opt)?;
/// }
/// // End of the warm-up: the lr peaks, the momentum bottoms out.
/// assert!((opt.learning_rate() - 0.1).abs() < 1e-12);
/// assert!((opt.momentum(0).unwrap() - 0.85).abs() < 1e-12);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct OneCycleLR {
    core: Core,
    /// `(initial, max, min)` lr per group.
    lrs: Vec<(f64, f64, f64)>,
    total_steps: u64,
    pct_start: f64,
    anneal: Anneal,
    three_phase: bool,
    cycle_momentum: bool,
    /// `(base, max)` momentum per group (empty without momentum cycling).
    momentums: Vec<(f64, f64)>,
    /// The momentum per group set by the latest step (empty without cycling).
    last_momentum: Vec<f64>,
}

impl OneCycleLR {
    /// `OneCycleLR(optimizer, max_lr, total_steps)` with PyTorch's defaults
    /// (pct_start 0.3, cos, div_factor 25, final_div_factor 1e4, two phases,
    /// momentum cycled between 0.85 and 0.95). Errors for an optimizer without
    /// momentum (Adagrad): use [`OneCycleLR::with_options`] with
    /// `cycle_momentum: false` there.
    pub fn new(opt: &mut dyn Optimizer, max_lr: f64, total_steps: u64) -> Result<Self> {
        Self::with_options(opt, max_lr, total_steps, OneCycleOptions::default())
    }

    /// All of PyTorch's options (see [`OneCycleOptions`]).
    pub fn with_options(
        opt: &mut dyn Optimizer,
        max_lr: f64,
        total_steps: u64,
        options: OneCycleOptions,
    ) -> Result<Self> {
        let OneCycleOptions {
            pct_start,
            anneal,
            div_factor,
            final_div_factor,
            three_phase,
            cycle_momentum,
            base_momentum,
            max_momentum,
        } = options;
        positive("max_lr", max_lr)?;
        positive("div_factor", div_factor)?;
        positive("final_div_factor", final_div_factor)?;
        if total_steps == 0 {
            return Err(OptimError::InvalidHyperparameter {
                name: "total_steps",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        if !(pct_start > 0.0 && pct_start < 1.0) {
            return Err(OptimError::InvalidHyperparameter {
                name: "pct_start",
                value: pct_start.to_string(),
                reason: "must be in (0, 1)",
            });
        }
        let n_groups = opt.param_groups().len();
        let momentums = if cycle_momentum {
            for (name, v) in [
                ("base_momentum", base_momentum),
                ("max_momentum", max_momentum),
            ] {
                if !v.is_finite() {
                    return Err(OptimError::InvalidHyperparameter {
                        name,
                        value: v.to_string(),
                        reason: "must be finite",
                    });
                }
            }
            if (0..n_groups).any(|g| opt.momentum(g).is_none()) {
                return Err(OptimError::InvalidSetup(format!(
                    "OneCycleLR: optimizer must support momentum or beta1 with `cycle_momentum` \
                     option enabled ({} has neither; pass cycle_momentum: false)",
                    opt.name()
                )));
            }
            init_momentum(opt, base_momentum, max_momentum)?;
            vec![(base_momentum, max_momentum); n_groups]
        } else {
            Vec::new()
        };
        let initial = max_lr / div_factor;
        let min = initial / final_div_factor;
        for g in 0..n_groups {
            opt.set_initial_lr(g, initial)?;
        }
        let lrs = vec![(initial, max_lr, min); n_groups];
        let mut s = Self {
            core: Core::new(opt)?,
            lrs,
            total_steps,
            pct_start,
            anneal,
            three_phase,
            cycle_momentum,
            momentums,
            last_momentum: Vec::new(),
        };
        s.apply(opt)?;
        Ok(s)
    }

    /// The momentum (or β₁) per group set by the latest step; empty when
    /// `cycle_momentum` is off.
    pub fn last_momentum(&self) -> Vec<f64> {
        self.last_momentum.clone()
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        match self.anneal {
            Anneal::Cos => end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }

    /// The lr and momentum of a group with lrs `(initial, max, min)` and
    /// momentums `(base, max)` at `step` (PyTorch's `_schedule_phases`).
    fn at(
        &self,
        (initial, max, min): (f64, f64, f64),
        (base_m, max_m): (f64, f64),
        step: u64,
    ) -> (f64, f64) {
        let total = self.total_steps as f64;
        // (end_step, start_lr, end_lr, start_momentum, end_momentum)
        let three = [
            (self.pct_start * total - 1.0, initial, max, max_m, base_m),
            (
                2.0 * self.pct_start * total - 2.0,
                max,
                initial,
                base_m,
                max_m,
            ),
            (total - 1.0, initial, min, max_m, max_m),
        ];
        let two = [
            (self.pct_start * total - 1.0, initial, max, max_m, base_m),
            (total - 1.0, max, min, base_m, max_m),
        ];
        let phases: &[(f64, f64, f64, f64, f64)] = if self.three_phase { &three } else { &two };
        // The final call (step == total_steps, after the last batch) keeps the
        // end values; PyTorch extrapolates the last phase there, which with
        // linear annealing gives a negative lr.
        let step = (step as f64).min(total - 1.0);
        let mut start_step = 0.0;
        for (i, &(end_step, from, to, m_from, m_to)) in phases.iter().enumerate() {
            if step <= end_step || i == phases.len() - 1 {
                let pct = (step - start_step) / (end_step - start_step);
                return (self.anneal(from, to, pct), self.anneal(m_from, m_to, pct));
            }
            start_step = end_step;
        }
        unreachable!("the last phase always matches")
    }

    fn apply(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let n = opt.param_groups().len();
        if n != self.lrs.len() {
            return Err(OptimError::Schedule(format!(
                "the schedule was built for {} parameter groups, the optimizer has {n}",
                self.lrs.len(),
            )));
        }
        // Per group (lr, momentum) now; pure arithmetic, so computed where used.
        let at = |this: &Self, g: usize| {
            let m = this.momentums.get(g).copied().unwrap_or((0.0, 0.0));
            this.at(this.lrs[g], m, this.core.last_epoch)
        };
        if self.cycle_momentum {
            // Every group's momentum first (a failure leaves the lrs as they were).
            self.last_momentum.clear();
            for g in 0..n {
                let (_, m) = at(self, g);
                opt.set_momentum(g, m)?;
                self.last_momentum.push(m);
            }
        }
        self.core.last_lr.clear();
        for g in 0..n {
            let (lr, _) = at(self, g);
            self.core.last_lr.push(lr);
        }
        set_group_lrs(opt, &self.core.last_lr)
    }
}

/// Sets every group's momentum to `max` (PyTorch does it at construction),
/// after checking that `base` is accepted too (every momentum of the cycle
/// lies between the two). On error the optimizer's momentums are restored.
fn init_momentum(opt: &mut dyn Optimizer, base: f64, max: f64) -> Result<()> {
    let old: Vec<Option<f64>> = (0..opt.param_groups().len())
        .map(|g| opt.momentum(g))
        .collect();
    let mut result = Ok(());
    'groups: for g in 0..old.len() {
        for m in [base, max] {
            if let Err(e) = opt.set_momentum(g, m) {
                result = Err(e);
                break 'groups;
            }
        }
    }
    if result.is_err() {
        for (g, m) in old.iter().enumerate() {
            if let Some(m) = m {
                let _ = opt.set_momentum(g, *m);
            }
        }
    }
    result
}

impl LrScheduler for OneCycleLR {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        if self.core.last_epoch + 1 > self.total_steps {
            return Err(OptimError::Schedule(format!(
                "OneCycleLR stepped {} times, more than total_steps = {}",
                self.core.last_epoch + 1,
                self.total_steps
            )));
        }
        self.core.last_epoch += 1;
        self.apply(opt)
    }
    fn last_lr(&self) -> Vec<f64> {
        self.core.last_lr.clone()
    }
    fn state(&self) -> serde_json::Value {
        let mut v = self.core.state();
        v["cycle_momentum"] = self.cycle_momentum.into();
        v["momentums"] = serde_json::json!(self.momentums);
        v["last_momentum"] = serde_json::json!(self.last_momentum);
        v
    }
    /// Restores [`LrScheduler::state`]; the optimizer's momentums, like its
    /// learning rates, come back with the optimizer's own state. A state
    /// saved before momentum cycling existed (no `cycle_momentum` key) loads
    /// too.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |what: &str| OptimError::CorruptState(format!("OneCycleLR state: bad `{what}`"));
        let mut momentums = self.momentums.clone();
        let mut last_momentum = self.last_momentum.clone();
        if let Some(c) = state.get("cycle_momentum") {
            let c = c.as_bool().ok_or_else(|| bad("cycle_momentum"))?;
            if c != self.cycle_momentum {
                return Err(OptimError::StateMismatch(format!(
                    "OneCycleLR state has cycle_momentum = {c}, this schedule {}",
                    self.cycle_momentum
                )));
            }
            momentums = state
                .get("momentums")
                .and_then(|x| serde_json::from_value(x.clone()).ok())
                .ok_or_else(|| bad("momentums"))?;
            last_momentum = state
                .get("last_momentum")
                .and_then(|x| serde_json::from_value(x.clone()).ok())
                .ok_or_else(|| bad("last_momentum"))?;
            if momentums.len() != self.momentums.len() {
                return Err(OptimError::StateMismatch(format!(
                    "OneCycleLR state has momentums for {} groups, this schedule {}",
                    momentums.len(),
                    self.momentums.len()
                )));
            }
        }
        self.core.load(state)?;
        self.momentums = momentums;
        self.last_momentum = last_momentum;
        Ok(())
    }
    fn restart(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.core.last_epoch = 0;
        self.apply(opt)
    }
}
