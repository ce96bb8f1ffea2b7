//! Callbacks at step and epoch boundaries: early stopping and user hooks.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::history::{EpochRecord, StepRecord};
use crate::metrics::parse_state;

/// What a callback asks the trainer to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop after the current step / epoch (a final checkpoint is still written).
    Stop,
}

/// Whether a monitored quantity should go down or up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Smaller is better (losses).
    Min,
    /// Larger is better (accuracy).
    Max,
}

impl Mode {
    /// Whether `value` improves on `best` by more than `min_delta`.
    pub fn improves(self, value: f64, best: Option<f64>, min_delta: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        match (self, best) {
            (_, None) => true,
            (Mode::Min, Some(b)) => value < b - min_delta,
            (Mode::Max, Some(b)) => value > b + min_delta,
        }
    }
}

/// A hook called by the trainer at step and epoch boundaries.
///
/// Callbacks with state (such as [`EarlyStopping`]) return it from
/// [`Callback::state`] so that checkpoints restore it on resume.
pub trait Callback {
    /// A stable name. Checkpoints key a callback's state by its name and its
    /// rank among the trainer's callbacks of that name (`early_stopping#0`,
    /// `early_stopping#1`), so two callbacks of one kind keep their own state.
    fn name(&self) -> &str;
    /// After each optimizer step, with its record (the same one the history
    /// keeps). The trainer calls it when the step's loss has been read back
    /// from the device: after every step on the CPU, at logging points
    /// elsewhere (see `TrainerBuilder::log_every_steps`).
    fn on_step_end(&mut self, _info: &StepRecord) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// After each epoch (after evaluation), with the epoch's record.
    fn on_epoch_end(&mut self, _record: &EpochRecord) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// State saved in checkpoints.
    fn state(&self) -> Value {
        Value::Null
    }
    /// Restores what [`Callback::state`] returned.
    fn load_state(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
}

/// Stops training when a monitored epoch quantity stops improving.
///
/// ```
/// use minibatch_train::{Callback, Control, EarlyStopping, EpochRecord, Mode};
/// let mut es = EarlyStopping::new("val_loss", Mode::Min).patience(1).min_delta(0.0);
/// let rec = |l| EpochRecord { val_loss: Some(l), ..Default::default() };
/// assert_eq!(es.on_epoch_end(&rec(1.0))?, Control::Continue);
/// assert_eq!(es.on_epoch_end(&rec(1.1))?, Control::Continue); // 1 bad epoch
/// assert_eq!(es.on_epoch_end(&rec(1.2))?, Control::Stop);     // 2 > patience
/// # Ok::<(), minibatch_train::TrainError>(())
/// ```
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    monitor: String,
    mode: Mode,
    patience: u64,
    min_delta: f64,
    best: Option<f64>,
    wait: u64,
}

impl EarlyStopping {
    /// Monitors `monitor` (`val_loss`, `val_accuracy`, `train_loss`, ...),
    /// with patience 0 and min_delta 0.
    pub fn new(monitor: impl Into<String>, mode: Mode) -> Self {
        Self {
            monitor: monitor.into(),
            mode,
            patience: 0,
            min_delta: 0.0,
            best: None,
            wait: 0,
        }
    }
    /// Epochs without improvement tolerated before stopping.
    pub fn patience(mut self, patience: u64) -> Self {
        self.patience = patience;
        self
    }
    /// The smallest change that counts as an improvement (absolute).
    pub fn min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = min_delta.abs();
        self
    }
    /// The best value seen.
    pub fn best(&self) -> Option<f64> {
        self.best
    }
}

impl Callback for EarlyStopping {
    fn name(&self) -> &str {
        "early_stopping"
    }
    fn on_epoch_end(&mut self, record: &EpochRecord) -> Result<Control> {
        let value = record.require(&self.monitor)?;
        if self.mode.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.wait = 0;
            Ok(Control::Continue)
        } else {
            self.wait += 1;
            Ok(if self.wait > self.patience {
                Control::Stop
            } else {
                Control::Continue
            })
        }
    }
    fn state(&self) -> Value {
        serde_json::to_value(EarlyStoppingState {
            best: self.best,
            wait: self.wait,
        })
        .unwrap_or(Value::Null)
    }
    fn load_state(&mut self, state: &Value) -> Result<()> {
        let s: EarlyStoppingState = parse_state("early_stopping", state)?;
        self.best = s.best;
        self.wait = s.wait;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct EarlyStoppingState {
    best: Option<f64>,
    wait: u64,
}

type StepHook = Box<dyn FnMut(&StepRecord) -> Result<Control>>;
type EpochHook = Box<dyn FnMut(&EpochRecord) -> Result<Control>>;

/// A user hook made of closures (see `Trainer` builder's `on_step` / `on_epoch`).
pub struct FnCallback {
    name: String,
    step: Option<StepHook>,
    epoch: Option<EpochHook>,
}

impl FnCallback {
    /// A hook called after every optimizer step.
    pub fn on_step(f: impl FnMut(&StepRecord) -> Result<Control> + 'static) -> Self {
        Self {
            name: "step_hook".into(),
            step: Some(Box::new(f)),
            epoch: None,
        }
    }
    /// A hook called after every epoch.
    pub fn on_epoch(f: impl FnMut(&EpochRecord) -> Result<Control> + 'static) -> Self {
        Self {
            name: "epoch_hook".into(),
            step: None,
            epoch: Some(Box::new(f)),
        }
    }
}

impl Callback for FnCallback {
    fn name(&self) -> &str {
        &self.name
    }
    fn on_step_end(&mut self, info: &StepRecord) -> Result<Control> {
        match &mut self.step {
            Some(f) => f(info),
            None => Ok(Control::Continue),
        }
    }
    fn on_epoch_end(&mut self, record: &EpochRecord) -> Result<Control> {
        match &mut self.epoch {
            Some(f) => f(record),
            None => Ok(Control::Continue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(acc: f64) -> EpochRecord {
        let mut r = EpochRecord::default();
        r.val_metrics.insert("accuracy".into(), acc);
        r
    }

    #[test]
    fn early_stopping_max_mode_with_min_delta_and_state() {
        let mut es = EarlyStopping::new("val_accuracy", Mode::Max)
            .patience(1)
            .min_delta(0.01);
        assert_eq!(es.on_epoch_end(&rec(0.5)).unwrap(), Control::Continue);
        assert_eq!(es.on_epoch_end(&rec(0.505)).unwrap(), Control::Continue);
        let saved = es.state();
        let mut other = EarlyStopping::new("val_accuracy", Mode::Max)
            .patience(1)
            .min_delta(0.01);
        other.load_state(&saved).unwrap();
        assert_eq!(other.on_epoch_end(&rec(0.509)).unwrap(), Control::Stop);
        assert_eq!(es.on_epoch_end(&rec(0.6)).unwrap(), Control::Continue);
        assert_eq!(es.best(), Some(0.6));
    }

    #[test]
    fn unknown_monitor_is_an_error_naming_it() {
        let mut es = EarlyStopping::new("val_f1", Mode::Max);
        let err = es.on_epoch_end(&rec(0.5)).unwrap_err().to_string();
        assert!(
            err.contains("val_f1") && err.contains("val_accuracy"),
            "{err}"
        );
    }

    #[test]
    fn nan_never_improves() {
        assert!(!Mode::Min.improves(f64::NAN, None, 0.0));
        assert!(Mode::Min.improves(1.0, Some(2.0), 0.5));
        let mut es = EarlyStopping::new("val_loss", Mode::Min);
        let err = es
            .load_state(&serde_json::json!({"best": 1.0}))
            .unwrap_err();
        assert!(err.to_string().contains("wait"), "{err}");
        assert!(!Mode::Min.improves(1.6, Some(2.0), 0.5));
    }
}
