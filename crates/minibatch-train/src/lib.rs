//! # minibatch-train
//!
//! A training loop for candle models on top of `minibatch-data` and
//! `minibatch-optim`: [`Trainer`] runs fit/evaluate with metrics, callbacks,
//! progress reporting and checkpoints that resume to the bit.
//!
//! Every batch goes through a step ([`StepOutput`]): the supervised
//! `(inputs, targets)` + loss one by default, or your own over the whole
//! batch ([`TrainerBuilder::step`]) for masks, weights or several inputs.
//! At its first optimizer step the trainer checks that every parameter it
//! trains received a gradient ([`params_without_grad`] does the same for
//! hand-written loops).
//!
//! In a crate that depends on `minibatch`, these paths are
//! `minibatch::train::...` (and the common ones are in `minibatch::prelude`);
//! the examples here name this crate directly.
#![warn(missing_docs)]

mod averaged;
mod builder;
pub mod callbacks;
pub mod checkpoint;
mod distributed;
pub mod error;
mod evaluate;
mod guard;
pub mod history;
mod loss;
mod losslog;
mod mechanics;
pub mod metrics;
pub mod model;
mod options;
pub mod plot;
pub mod progress;
pub mod regressor;
mod resume;
mod state;
mod step;
mod trainer;

pub use averaged::AveragedWeights;
pub use builder::TrainerBuilder;
pub use callbacks::{Callback, Control, EarlyStopping, FnCallback, Mode};
pub use error::{Result, TrainError};
pub use evaluate::{evaluate, evaluate_step, Evaluation};
pub use guard::params_without_grad;
pub use history::{EpochRecord, History, StepRecord};
pub use loss::{cross_entropy, mse, nll};
pub use metrics::{Accuracy, MeanAbsoluteError, Metric, RunningMean};
pub use model::{model_fn, FnModel, Model};
pub use options::{Clip, ScheduleEvery};
pub use progress::ProgressMode;
pub use regressor::{r2_score, MiniBatchRegressor};
pub use state::{RunState, SkippedCheckpoint};
pub use step::{loss_step, LossFn, StepFn, StepOutput};
pub use trainer::Trainer;
