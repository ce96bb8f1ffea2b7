use super::{positive, Core, LrScheduler};
use crate::{OptimError, Optimizer, Result};

/// The annealing shape of [`OneCycleLR`] (PyTorch's `anneal_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anneal {
    /// `"cos"`.
    Cos,
    /// `"linear"`.
    Linear,
}

/// The 1cycle policy (`torch.optim.lr_scheduler.OneCycleLR`), stepped once
/// per batch: warm up from `max_lr / div_factor` to `max_lr` over
/// `pct_start · total_steps` steps, then anneal to
/// `max_lr / (div_factor · final_div_factor)` (with `three_phase`, go back down
/// to the initial lr first). The optimizer's own lr is ignored. Momentum
/// cycling (`cycle_momentum`) is not done: the [`Optimizer`] trait exposes only
/// learning rates. Stepping more than `total_steps` times is an error.
#[derive(Debug, Clone)]
pub struct OneCycleLR {
    core: Core,
    /// `(initial, max, min)` lr per group.
    lrs: Vec<(f64, f64, f64)>,
    total_steps: u64,
    pct_start: f64,
    anneal: Anneal,
    three_phase: bool,
}

impl OneCycleLR {
    /// `OneCycleLR(optimizer, max_lr, total_steps)` with PyTorch's defaults
    /// (pct_start 0.3, cos, div_factor 25, final_div_factor 1e4, two phases).
    pub fn new(opt: &mut dyn Optimizer, max_lr: f64, total_steps: u64) -> Result<Self> {
        Self::with_options(opt, max_lr, total_steps, 0.3, Anneal::Cos, 25.0, 1e4, false)
    }

    /// All of PyTorch's options but momentum cycling.
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        opt: &mut dyn Optimizer,
        max_lr: f64,
        total_steps: u64,
        pct_start: f64,
        anneal: Anneal,
        div_factor: f64,
        final_div_factor: f64,
        three_phase: bool,
    ) -> Result<Self> {
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
        let initial = max_lr / div_factor;
        let min = initial / final_div_factor;
        let groups = opt.param_groups_mut();
        for g in groups.iter_mut() {
            g.initial_lr = Some(initial);
        }
        let lrs = vec![(initial, max_lr, min); groups.len()];
        let mut s = Self {
            core: Core::new(opt),
            lrs,
            total_steps,
            pct_start,
            anneal,
            three_phase,
        };
        s.apply(opt)?;
        Ok(s)
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        match self.anneal {
            Anneal::Cos => end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }

    fn lr(&self, (initial, max, min): (f64, f64, f64), step: u64) -> f64 {
        let total = self.total_steps as f64;
        let phases: Vec<(f64, f64, f64)> = if self.three_phase {
            vec![
                (self.pct_start * total - 1.0, initial, max),
                (2.0 * self.pct_start * total - 2.0, max, initial),
                (total - 1.0, initial, min),
            ]
        } else {
            vec![
                (self.pct_start * total - 1.0, initial, max),
                (total - 1.0, max, min),
            ]
        };
        let step = step as f64;
        let mut start_step = 0.0;
        for (i, &(end_step, from, to)) in phases.iter().enumerate() {
            if step <= end_step || i == phases.len() - 1 {
                let pct = (step - start_step) / (end_step - start_step);
                return self.anneal(from, to, pct);
            }
            start_step = end_step;
        }
        unreachable!("the last phase always matches")
    }

    fn apply(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let this = self.clone();
        let groups = opt.param_groups_mut();
        if groups.len() != self.lrs.len() {
            return Err(OptimError::Schedule(format!(
                "the schedule was built for {} parameter groups, the optimizer has {}",
                self.lrs.len(),
                groups.len()
            )));
        }
        self.core.last_lr.clear();
        for (g, &l) in groups.iter_mut().zip(&this.lrs) {
            g.lr = this.lr(l, this.core.last_epoch);
            self.core.last_lr.push(g.lr);
        }
        Ok(())
    }
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
        self.core.state()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.core.load(state)
    }
    fn restart(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.core.last_epoch = 0;
        self.apply(opt)
    }
}
