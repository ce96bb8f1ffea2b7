//! The error type of the optimizer crate.

/// Everything that can go wrong while building, stepping, saving or loading an
/// optimizer, schedule or clipping helper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A hyperparameter is out of its valid range.
    #[error("invalid hyperparameter `{name}` = {value}: {reason}")]
    InvalidHyperparameter {
        /// The hyperparameter's name (PyTorch keyword name where there is one).
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Invalid construction arguments other than a single hyperparameter
    /// (duplicate parameter names, empty groups...).
    #[error("invalid optimizer setup: {0}")]
    InvalidSetup(String),
    /// A gradient does not fit its parameter (shape, dtype or device).
    #[error("gradient of parameter `{name}` does not match it: {reason}")]
    GradientMismatch {
        /// The parameter's name.
        name: String,
        /// What differs.
        reason: String,
    },
    /// The parameter's dtype is not supported by the optimizer.
    #[error(
        "parameter `{name}` has unsupported dtype {dtype:?} (f32, f64, bf16 and f16 are supported)"
    )]
    UnsupportedDtype {
        /// The parameter's name.
        name: String,
        /// Its dtype.
        dtype: candle_core::DType,
    },
    /// A saved state does not fit this optimizer or schedule (kind, names,
    /// shapes, dtypes, group count).
    #[error("optimizer state mismatch: {0}")]
    StateMismatch(String),
    /// A saved state is corrupt or truncated.
    #[error("corrupt optimizer state: {0}")]
    CorruptState(String),
    /// Reading or writing a state file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The total gradient norm is NaN or infinite.
    #[error("the total gradient norm is non-finite ({0}); pass error_if_nonfinite = false to clip anyway")]
    NonFiniteNorm(f64),
    /// A schedule was stepped in a way it does not support (for example
    /// `ReduceLROnPlateau` without a metric, or `OneCycleLR` past its total steps).
    #[error("schedule error: {0}")]
    Schedule(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, OptimError>;

/// Checks a finite, non-negative hyperparameter (a learning rate, a weight
/// decay...): the error names it. For [`UpdateRule::validate`](crate::UpdateRule::validate).
///
/// ```
/// assert!(minibatch_optim::check_non_negative("lr", 0.1).is_ok());
/// let e = minibatch_optim::check_non_negative("lr", -1.0).unwrap_err();
/// assert_eq!(e.to_string(), "invalid hyperparameter `lr` = -1: must be finite and >= 0");
/// ```
pub fn check_non_negative(name: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(OptimError::InvalidHyperparameter {
            name,
            value: value.to_string(),
            reason: "must be finite and >= 0",
        });
    }
    Ok(())
}

/// Checks a hyperparameter in `[0, 1)` (a decay rate such as Adam's betas):
/// the error names it. For [`UpdateRule::validate`](crate::UpdateRule::validate).
///
/// ```
/// assert!(minibatch_optim::check_unit("beta1", 0.9).is_ok());
/// assert!(minibatch_optim::check_unit("beta1", 1.0).is_err());
/// ```
pub fn check_unit(name: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || !(0.0..1.0).contains(&value) {
        return Err(OptimError::InvalidHyperparameter {
            name,
            value: value.to_string(),
            reason: "must be in [0, 1)",
        });
    }
    Ok(())
}
