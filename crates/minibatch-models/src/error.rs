//! The error type of `minibatch-models`.

/// What can go wrong reading a configuration or checkpoint, or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelsError {
    /// A `config.json` value this crate does not implement (the message
    /// names the field and the value).
    #[error("unsupported config value: {0}")]
    Unsupported(String),
    /// A `config.json` that cannot be read or parsed, or whose values do not
    /// fit together (the message names them).
    #[error("bad config: {0}")]
    Config(String),
    /// Model inputs that the model cannot take (a token id at or above the
    /// vocabulary size, a sequence longer than the position table, shapes
    /// or dtypes that do not fit).
    #[error("bad input: {0}")]
    Input(String),
    /// A checkpoint that is missing, unreadable, or does not fit the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A LoRA configuration, adapter file or VarMap that cannot be used
    /// (the message names the field, key or shapes).
    #[error("lora: {0}")]
    Lora(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`ModelsError`].
pub type Result<T> = std::result::Result<T, ModelsError>;

impl From<ModelsError> for candle_core::Error {
    fn from(e: ModelsError) -> Self {
        match e {
            ModelsError::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
