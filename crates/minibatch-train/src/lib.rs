//! # minibatch-train
//!
//! A training loop for candle models on top of `minibatch-data` and
//! `minibatch-optim`: [`Trainer`] runs fit/evaluate with metrics, callbacks,
//! progress reporting and checkpoints that resume to the bit.
#![warn(missing_docs)]

pub mod callbacks;
pub mod checkpoint;
pub mod error;
pub mod history;
pub mod linear;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod progress;
pub mod regressor;
pub mod trainer;

pub use callbacks::{Callback, Control, EarlyStopping, FnCallback, Mode, StepInfo};
pub use error::{Result, TrainError};
pub use history::{EpochRecord, History, StepRecord};
pub use linear::{linear, Linear};
pub use metrics::{Accuracy, MeanAbsoluteError, Metric, RunningMean};
pub use model::{model_fn, FnModel, Model};
pub use progress::ProgressMode;
pub use regressor::MiniBatchRegressor;
pub use trainer::{
    cross_entropy, evaluate, mse, Clip, Evaluation, LossFn, ScheduleEvery, Trainer, TrainerBuilder,
};
