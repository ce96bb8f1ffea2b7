//! The trainer's settings that are plain values: when the schedule steps,
//! gradient clipping, where and when checkpoints are written, where to
//! resume from, and the [`Config`] the trainer keeps after build.

use std::path::PathBuf;

use crate::callbacks::Mode;
use crate::error::{Result, TrainError};
use crate::progress::ProgressMode;

/// When the learning-rate schedule is stepped.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleEvery {
    /// After every optimizer step (OneCycleLR, warm-up schedules).
    Step,
    /// After every epoch (StepLR, CosineAnnealingLR, ...).
    Epoch,
    /// After every epoch with a monitored quantity (ReduceLROnPlateau), e.g. `"val_loss"`.
    EpochOnMetric(String),
}

/// Gradient clipping applied before each optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Rescale all gradients so their global norm is at most `max_norm`.
    Norm {
        /// The largest allowed norm.
        max_norm: f64,
        /// Which norm.
        norm: minibatch_optim::Norm,
    },
    /// Clamp every gradient element to `[-v, v]`.
    Value(f64),
}

impl Clip {
    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Clip::Norm { max_norm, .. } if max_norm.is_nan() || max_norm <= 0.0 => Err(
                TrainError::Config(format!("clip max_norm must be > 0, got {max_norm}")),
            ),
            Clip::Value(v) if v.is_nan() || v <= 0.0 => Err(TrainError::Config(format!(
                "clip value must be > 0, got {v}"
            ))),
            _ => Ok(()),
        }
    }
}

/// Where and when checkpoints are written (validated, complete).
#[derive(Clone, Debug)]
pub(crate) struct CheckpointOptions {
    pub dir: PathBuf,
    pub every_steps: Option<u64>,
    pub every_epoch: bool,
    pub keep_last: usize,
    pub best: Option<(String, Mode)>,
}

/// The checkpoint settings as the builder collects them, in any order;
/// [`CheckpointSettings::resolve`] checks them once, at build.
#[derive(Clone, Debug, Default)]
pub(crate) struct CheckpointSettings {
    pub dir: Option<PathBuf>,
    pub every_steps: Option<u64>,
    pub every_epoch: Option<bool>,
    pub keep_last: Option<usize>,
    pub best: Option<(String, Mode)>,
}

impl CheckpointSettings {
    pub fn resolve(self) -> Result<Option<CheckpointOptions>> {
        let Some(dir) = self.dir else {
            let mut given = Vec::new();
            if self.every_steps.is_some() {
                given.push("checkpoint_every_steps");
            }
            if self.every_epoch.is_some() {
                given.push("checkpoint_every_epoch");
            }
            if self.keep_last.is_some() {
                given.push("keep_last");
            }
            if self.best.is_some() {
                given.push("save_best");
            }
            return if given.is_empty() {
                Ok(None)
            } else {
                Err(TrainError::Config(format!(
                    "{} given without checkpoint_dir",
                    given.join(", ")
                )))
            };
        };
        if dir.as_os_str().is_empty() {
            return Err(TrainError::Config("checkpoint_dir is empty".into()));
        }
        if self.every_steps == Some(0) {
            return Err(TrainError::Config(
                "checkpoint_every_steps must be at least 1".into(),
            ));
        }
        let keep_last = self.keep_last.unwrap_or(3);
        if keep_last == 0 {
            return Err(TrainError::Config("keep_last must be at least 1".into()));
        }
        Ok(Some(CheckpointOptions {
            dir,
            every_steps: self.every_steps,
            every_epoch: self.every_epoch.unwrap_or(true),
            keep_last,
            best: self.best,
        }))
    }
}

/// The trainer's settings, fixed at build.
pub(crate) struct Config {
    pub clip: Option<Clip>,
    pub accumulate: usize,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub progress: ProgressMode,
    pub checkpoint: Option<CheckpointOptions>,
    pub out_dir: Option<PathBuf>,
    /// Optimizer steps between two reads of the losses from the device.
    pub log_every: u64,
    /// Whether the first optimizer step checks that every trained parameter has a gradient.
    pub check_grads: bool,
}

/// Where to resume from, as given to the builder.
pub(crate) enum Resume {
    From(PathBuf),
    LatestValid(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_resolve_in_any_order_and_need_a_dir() {
        let s = CheckpointSettings {
            keep_last: Some(5),
            best: Some(("val_loss".into(), Mode::Min)),
            ..Default::default()
        };
        let err = s.clone().resolve().unwrap_err().to_string();
        assert!(
            err.contains("keep_last, save_best given without checkpoint_dir"),
            "{err}"
        );
        let c = CheckpointSettings {
            dir: Some("ck".into()),
            ..s
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!((c.keep_last, c.every_epoch, c.every_steps), (5, true, None));
        assert!(CheckpointSettings::default().resolve().unwrap().is_none());
    }
}
