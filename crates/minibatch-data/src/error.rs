//! The error type of the data crate.

use std::path::PathBuf;

/// Everything that can go wrong while building datasets, samplers and loaders
/// or while reading data files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// An error raised by candle (tensor creation, `index_select`, device copies).
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O error while reading `path`.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `batch_size` was 0.
    #[error("batch size must be at least 1, got 0")]
    ZeroBatchSize,
    /// A dataset, sampler or split had no samples where at least one is needed.
    #[error("empty dataset: {0}")]
    EmptyDataset(String),
    /// The tensors of a `TensorDataset` (or the fields of samples being collated)
    /// disagree in their first dimension or layout.
    #[error("tensors have mismatched shapes: {0}")]
    ShapeMismatch(String),
    /// An index at or beyond the dataset length.
    #[error("index {index} out of range for a dataset of length {len}")]
    IndexOutOfRange {
        /// The offending index.
        index: usize,
        /// The dataset length.
        len: usize,
    },
    /// Split lengths or fractions that do not add up to the dataset.
    #[error("invalid split: {0}")]
    InvalidSplit(String),
    /// Sampler weights that are negative, NaN, infinite or all zero.
    #[error("invalid weights: {0}")]
    InvalidWeights(String),
    /// `rank >= world_size` or `world_size == 0` for a distributed sampler.
    #[error("invalid rank {rank} for world size {world_size}: need world_size >= 1 and rank < world_size")]
    InvalidRank {
        /// The requested rank.
        rank: usize,
        /// The requested world size.
        world_size: usize,
    },
    /// Contradictory or out-of-range loader/sampler configuration.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A malformed IDX file: wrong magic, unknown type code, truncated or too long.
    #[error("invalid IDX data: {0}")]
    InvalidIdx(String),
    /// The MNIST directory or one of its files is missing.
    #[error("MNIST {what} not found; looked for {looked_in}. The four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, gzipped or raw) ship in the repository's data/mnist directory; point the loader there or download them from the MNIST mirror")]
    MissingData {
        /// Which file or directory was missing.
        what: String,
        /// The paths that were tried.
        looked_in: String,
    },
    /// A sample or batch did not have the structure the caller expected.
    #[error("unexpected structure: {0}")]
    Structure(String),
    /// A device string that could not be parsed or a device that is not available.
    #[error("device error: {0}")]
    Device(String),
    /// A background worker thread panicked or vanished.
    #[error("data loader worker failed: {0}")]
    Worker(String),
}

/// The result type of the data crate.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// A [`DataError::Worker`] for a panic caught on a worker thread while
    /// doing `what`, carrying the panic's message.
    pub(crate) fn worker_panic(what: String, payload: &(dyn std::any::Any + Send)) -> Self {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        DataError::Worker(format!("{what}: {msg}"))
    }
}
