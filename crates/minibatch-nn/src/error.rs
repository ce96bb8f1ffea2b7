//! The error type of `minibatch-nn`.

/// What can go wrong building or running a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NnError {
    /// A layer or op was given an argument it cannot use (the message names it).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Shapes that do not fit together (the message names both).
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`NnError`].
pub type Result<T> = std::result::Result<T, NnError>;

impl From<NnError> for candle_core::Error {
    fn from(e: NnError) -> Self {
        match e {
            NnError::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
