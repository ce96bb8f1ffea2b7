//! The error type of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong while training, evaluating or checkpointing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A tensor operation failed (forward, loss, backward, metric).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The data loader failed to produce a batch (boxed: the data error is large).
    #[error("data error: {0}")]
    Data(Box<minibatch_data::DataError>),
    /// The optimizer, schedule or clipping failed.
    #[error("optimizer error: {0}")]
    Optim(#[from] minibatch_optim::OptimError),
    /// File-system error, with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory that could not be read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("JSON error in {context}: {source}")]
    Json {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The loss became NaN or infinite; training stopped before the update.
    #[error("non-finite loss {value} at step {step} (epoch {epoch}, batch {batch}); training stopped before applying this update")]
    NonFiniteLoss {
        /// The global optimizer step that would have been taken (0-based).
        step: u64,
        /// The epoch of the offending batch.
        epoch: u64,
        /// The index of the offending batch within its epoch.
        batch: u64,
        /// The loss value observed.
        value: f64,
    },
    /// Trained parameters received no gradient at the first optimizer step.
    #[error(
        "no gradient reached {params:?} at the first optimizer step, so they would never train. \
         candle-nn 0.11's fused LayerNorm/RmsNorm (layer_norm, rms_norm, ops::layer_norm, \
         ops::rms_norm), ops::softmax_last_dim and rotary_emb::rope/rope_i/rope_thd have no \
         backward and drop gradients silently: build those layers from minibatch::nn (same \
         names and signatures, real backward passes). If these parameters are unused on \
         purpose, call allow_unused_parameters() on the trainer builder"
    )]
    MissingGradients {
        /// The parameters without a gradient (their `VarMap` paths, sorted).
        params: Vec<String>,
    },
    /// A checkpoint is missing, corrupt, or does not match the model/trainer.
    #[error("invalid checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A trainer or regressor setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A metric named in a callback or schedule is not recorded.
    #[error("unknown metric {name:?}; available: {available}")]
    UnknownMetric {
        /// The requested metric name.
        name: String,
        /// The names that are recorded.
        available: String,
    },
    /// Plotting failed.
    #[error("plot error: {0}")]
    Plot(String),
}

/// Shorthand result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl From<minibatch_data::DataError> for TrainError {
    fn from(e: minibatch_data::DataError) -> Self {
        TrainError::Data(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        TrainError::Json {
            context: context.into(),
            source,
        }
    }
    pub(crate) fn ckpt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
