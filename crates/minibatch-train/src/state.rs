//! Where a run stands ([`RunState`]) and the checkpoints a resume passed
//! over ([`SkippedCheckpoint`]): plain data, saved by `checkpoint.rs`, kept
//! by the trainer, put back by `resume.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::history::{float, History};
use crate::metrics::RunningMean;

/// Everything about where a run stands that is not held by one of its parts
/// (weights, optimizer, schedule, metrics and callbacks save their own state):
/// the trainer keeps it in this one struct, a checkpoint saves it whole
/// (`trainer.json`, field `run`) and a resume puts it back whole. Every field
/// is required when read back: a missing or mistyped one is a
/// [`TrainError::Checkpoint`](crate::TrainError::Checkpoint).
///
/// It holds no wall-clock time, so two identical runs write byte-identical
/// checkpoints: the epoch in progress is timed by the trainer alone (after a
/// mid-epoch resume, its time counts from the resume), and the history saved
/// with it leaves out the epochs' timings (see [`History::without_timings`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch to continue in.
    pub epoch: u64,
    /// The index of the next batch of `epoch` to train on.
    pub batch: u64,
    /// `true` when all batches of `epoch` are done but its end-of-epoch work
    /// (evaluation, epoch schedule, callbacks) is not.
    pub epoch_batches_done: bool,
    /// Training micro-batches run so far: the step number that
    /// `minibatch_nn::set_rng_step` receives before each forward pass, so a
    /// resumed run draws the same dropout masks.
    pub micro_batches: u64,
    /// Running training loss of the current epoch (sample-weighted).
    pub epoch_loss: RunningMean,
    /// Best value of the monitored quantity for `save_best`.
    #[serde(with = "float::option")]
    pub best: Option<f64>,
    /// The run's history so far.
    pub history: History,
}

impl RunState {
    /// Moves to the start of the next epoch.
    pub(crate) fn next_epoch(&mut self) {
        self.epoch += 1;
        self.batch = 0;
        self.epoch_batches_done = false;
        self.epoch_loss.reset();
    }
}

/// A checkpoint that [`Trainer::load_latest_valid_checkpoint`](crate::Trainer::load_latest_valid_checkpoint) skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedCheckpoint {
    /// Its directory.
    pub path: PathBuf,
    /// Why it could not be used (the error reading it).
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn a_run_state_with_a_missing_or_mistyped_field_does_not_parse() {
        let st = RunState::default();
        let mut v = serde_json::to_value(&st).unwrap();
        assert_eq!(serde_json::from_value::<RunState>(v.clone()).unwrap(), st);
        v["micro_batches"] = Value::from("soon");
        assert!(serde_json::from_value::<RunState>(v.clone()).is_err());
        v.as_object_mut().unwrap().remove("micro_batches");
        let err = serde_json::from_value::<RunState>(v.clone()).unwrap_err();
        assert!(err.to_string().contains("micro_batches"), "{err}");
        let mut v = serde_json::to_value(&st).unwrap();
        v.as_object_mut().unwrap().remove("best");
        let err = serde_json::from_value::<RunState>(v).unwrap_err();
        assert!(err.to_string().contains("best"), "{err}");
    }
}
