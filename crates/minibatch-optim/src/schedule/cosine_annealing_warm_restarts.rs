use super::{Core, LrScheduler};
use crate::error::check_non_negative;
use crate::{OptimError, Optimizer, Result};

/// Cosine annealing with warm restarts, SGDR
/// (`torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`):
/// `lr = eta_min + (base − eta_min)(1 + cos(π T_cur / T_i)) / 2`, where
/// `T_cur` counts steps since the last restart and the period `T_i` starts at
/// `T_0` and is multiplied by `T_mult` at each restart.
///
/// SGDR: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
/// Restarts", ICLR 2017 (<https://arxiv.org/abs/1608.03983>).
#[derive(Debug, Clone)]
pub struct CosineAnnealingWarmRestarts {
    core: Core,
    t_0: u64,
    t_mult: u64,
    eta_min: f64,
    t_i: u64,
    t_cur: u64,
}

impl CosineAnnealingWarmRestarts {
    /// `CosineAnnealingWarmRestarts(optimizer, T_0, T_mult, eta_min)`
    /// (PyTorch defaults `T_mult = 1`, `eta_min = 0`).
    pub fn new(opt: &mut dyn Optimizer, t_0: u64, t_mult: u64, eta_min: f64) -> Result<Self> {
        if t_0 == 0 {
            return Err(OptimError::InvalidHyperparameter {
                name: "T_0",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        if t_mult == 0 {
            return Err(OptimError::InvalidHyperparameter {
                name: "T_mult",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        check_non_negative("eta_min", eta_min)?;
        let mut s = Self {
            core: Core::new(opt)?,
            t_0,
            t_mult,
            eta_min,
            t_i: t_0,
            t_cur: 0,
        };
        s.apply(opt)?;
        Ok(s)
    }

    fn apply(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let (eta, t_cur, t_i) = (self.eta_min, self.t_cur as f64, self.t_i as f64);
        self.core.apply(opt, |b, _| {
            eta + (b - eta) * (1.0 + (std::f64::consts::PI * t_cur / t_i).cos()) / 2.0
        })
    }
}

impl LrScheduler for CosineAnnealingWarmRestarts {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.core.last_epoch += 1;
        self.t_cur += 1;
        if self.t_cur >= self.t_i {
            self.t_cur -= self.t_i;
            self.t_i *= self.t_mult;
        }
        self.apply(opt)
    }
    fn last_lr(&self) -> Vec<f64> {
        self.core.last_lr.clone()
    }
    fn state(&self) -> serde_json::Value {
        let mut v = self.core.state();
        v["T_i"] = self.t_i.into();
        v["T_cur"] = self.t_cur.into();
        v
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let get = |k: &str| {
            state.get(k).and_then(|x| x.as_u64()).ok_or_else(|| {
                OptimError::CorruptState(format!("schedule state: bad or missing `{k}`"))
            })
        };
        let (t_i, t_cur) = (get("T_i")?, get("T_cur")?);
        self.core.load(state)?;
        self.t_i = t_i;
        self.t_cur = t_cur;
        Ok(())
    }
    fn restart(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        self.core.last_epoch = 0;
        self.t_cur = 0;
        self.t_i = self.t_0;
        self.apply(opt)
    }
}
