use serde_json::{Map, Value};

use super::*;
use crate::{OptimError, Optimizer, Result};

/// Keyword arguments being consumed; leftovers are reported.
struct Kwargs<'a> {
    class: &'a str,
    map: Map<String, Value>,
}

impl Kwargs<'_> {
    fn bad(&self, key: &str, want: &str) -> OptimError {
        OptimError::InvalidSetup(format!(
            "{}: keyword argument `{key}` should be {want}",
            self.class
        ))
    }
    fn f64(&mut self, key: &str, default: Option<f64>) -> Result<f64> {
        match self.map.remove(key) {
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
            None => default.ok_or_else(|| {
                OptimError::InvalidSetup(format!(
                    "{}: missing keyword argument `{key}`",
                    self.class
                ))
            }),
        }
    }
    fn u64(&mut self, key: &str, default: Option<u64>) -> Result<u64> {
        match self.map.remove(key) {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.bad(key, "a non-negative integer")),
            None => default.ok_or_else(|| {
                OptimError::InvalidSetup(format!(
                    "{}: missing keyword argument `{key}`",
                    self.class
                ))
            }),
        }
    }
    fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.map.remove(key) {
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "a boolean")),
            None => Ok(default),
        }
    }
    fn string(&mut self, key: &str, default: &str) -> Result<String> {
        match self.map.remove(key) {
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.bad(key, "a string")),
            None => Ok(default.to_string()),
        }
    }
    fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            Some(k) => Err(OptimError::InvalidSetup(format!(
                "{}: unsupported keyword argument `{k}`",
                self.class
            ))),
            None => Ok(()),
        }
    }
}

/// Builds a schedule from a PyTorch class name and its keyword arguments as
/// JSON, e.g. `("StepLR", {"step_size": 3, "gamma": 0.5})`, with PyTorch's
/// defaults for the arguments left out. Unknown classes or keyword arguments
/// are errors naming them. Supported: StepLR, MultiStepLR, ExponentialLR,
/// CosineAnnealingLR, LinearLR, OneCycleLR, CosineAnnealingWarmRestarts,
/// ReduceLROnPlateau, SWALR (`torch.optim.swa_utils.SWALR`; `swa_lr` a
/// number or a list per group) (SequentialLR takes schedules: build it directly).
pub fn from_pytorch(
    opt: &mut dyn Optimizer,
    class: &str,
    kwargs: &Value,
) -> Result<Box<dyn LrScheduler>> {
    let map = match kwargs {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => {
            return Err(OptimError::InvalidSetup(format!(
                "{class}: keyword arguments must be a JSON object, got {other}"
            )))
        }
    };
    let mut k = Kwargs { class, map };
    let s: Box<dyn LrScheduler> = match class {
        "StepLR" => {
            let (step_size, gamma) = (k.u64("step_size", None)?, k.f64("gamma", Some(0.1))?);
            k.finish()?;
            Box::new(StepLR::new(opt, step_size, gamma)?)
        }
        "MultiStepLR" => {
            let milestones: Vec<u64> = match k.map.remove("milestones") {
                Some(v) => serde_json::from_value(v)
                    .map_err(|_| k.bad("milestones", "a list of integers"))?,
                None => {
                    return Err(OptimError::InvalidSetup(
                        "MultiStepLR: missing `milestones`".into(),
                    ))
                }
            };
            let gamma = k.f64("gamma", Some(0.1))?;
            k.finish()?;
            Box::new(MultiStepLR::new(opt, milestones, gamma)?)
        }
        "ExponentialLR" => {
            let gamma = k.f64("gamma", None)?;
            k.finish()?;
            Box::new(ExponentialLR::new(opt, gamma)?)
        }
        "CosineAnnealingLR" => {
            let (t, eta) = (k.u64("T_max", None)?, k.f64("eta_min", Some(0.0))?);
            k.finish()?;
            Box::new(CosineAnnealingLR::new(opt, t, eta)?)
        }
        "LinearLR" => {
            let s = k.f64("start_factor", Some(1.0 / 3.0))?;
            let e = k.f64("end_factor", Some(1.0))?;
            let t = k.u64("total_iters", Some(5))?;
            k.finish()?;
            Box::new(LinearLR::new(opt, s, e, t)?)
        }
        "OneCycleLR" => {
            let max_lr = k.f64("max_lr", None)?;
            let total = match k.map.get("total_steps") {
                Some(_) => k.u64("total_steps", None)?,
                None => k.u64("epochs", None)? * k.u64("steps_per_epoch", None)?,
            };
            let pct = k.f64("pct_start", Some(0.3))?;
            let anneal = match k.string("anneal_strategy", "cos")?.as_str() {
                "cos" => Anneal::Cos,
                "linear" => Anneal::Linear,
                other => {
                    return Err(OptimError::InvalidSetup(format!(
                        "OneCycleLR: unknown anneal_strategy `{other}`"
                    )))
                }
            };
            let div = k.f64("div_factor", Some(25.0))?;
            let fdiv = k.f64("final_div_factor", Some(1e4))?;
            let three_phase = k.bool("three_phase", false)?;
            let cycle_momentum = k.bool("cycle_momentum", true)?;
            let base_momentum = k.f64("base_momentum", Some(0.85))?;
            let max_momentum = k.f64("max_momentum", Some(0.95))?;
            k.finish()?;
            Box::new(OneCycleLR::with_options(
                opt,
                max_lr,
                total,
                OneCycleOptions {
                    pct_start: pct,
                    anneal,
                    div_factor: div,
                    final_div_factor: fdiv,
                    three_phase,
                    cycle_momentum,
                    base_momentum,
                    max_momentum,
                },
            )?)
        }
        "CosineAnnealingWarmRestarts" => {
            let t0 = k.u64("T_0", None)?;
            let tm = k.u64("T_mult", Some(1))?;
            let eta = k.f64("eta_min", Some(0.0))?;
            k.finish()?;
            Box::new(CosineAnnealingWarmRestarts::new(opt, t0, tm, eta)?)
        }
        "ReduceLROnPlateau" => {
            let mode = match k.string("mode", "min")?.as_str() {
                "min" => PlateauMode::Min,
                "max" => PlateauMode::Max,
                other => {
                    return Err(OptimError::InvalidSetup(format!(
                        "ReduceLROnPlateau: unknown mode `{other}`"
                    )))
                }
            };
            let factor = k.f64("factor", Some(0.1))?;
            let patience = k.u64("patience", Some(10))?;
            let threshold = k.f64("threshold", Some(1e-4))?;
            let tmode = match k.string("threshold_mode", "rel")?.as_str() {
                "rel" => ThresholdMode::Rel,
                "abs" => ThresholdMode::Abs,
                other => {
                    return Err(OptimError::InvalidSetup(format!(
                        "ReduceLROnPlateau: unknown threshold_mode `{other}`"
                    )))
                }
            };
            let cooldown = k.u64("cooldown", Some(0))?;
            let min_lr = k.f64("min_lr", Some(0.0))?;
            let eps = k.f64("eps", Some(1e-8))?;
            k.finish()?;
            Box::new(ReduceLROnPlateau::with_options(
                opt, mode, factor, patience, threshold, tmode, cooldown, min_lr, eps,
            )?)
        }
        "SWALR" => {
            let swa_lr: Vec<f64> = match k.map.remove("swa_lr") {
                Some(Value::Number(n)) => {
                    vec![n.as_f64().ok_or_else(|| k.bad("swa_lr", "a number"))?]
                }
                Some(v) => serde_json::from_value(v)
                    .map_err(|_| k.bad("swa_lr", "a number or a list of numbers"))?,
                None => return Err(OptimError::InvalidSetup("SWALR: missing `swa_lr`".into())),
            };
            let epochs = k.u64("anneal_epochs", Some(10))?;
            let anneal = match k.string("anneal_strategy", "cos")?.as_str() {
                "cos" => SwaAnneal::Cos,
                "linear" => SwaAnneal::Linear,
                other => {
                    return Err(OptimError::InvalidSetup(format!(
                        "SWALR: anneal_strategy must be `cos` or `linear`, got `{other}`"
                    )))
                }
            };
            k.finish()?;
            Box::new(SWALR::new(opt, &swa_lr, epochs, anneal)?)
        }
        other => {
            return Err(OptimError::InvalidSetup(format!(
                "unsupported schedule class `{other}`"
            )))
        }
    };
    Ok(s)
}
