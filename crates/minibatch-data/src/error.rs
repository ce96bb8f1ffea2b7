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
    /// Random access (`get`, `get_batch`) on a dataset that can only be read
    /// in order, such as a [`StreamDataset`](crate::StreamDataset).
    #[error("not indexable: {0}")]
    NotIndexable(String),
    /// A [`StreamDataset`](crate::StreamDataset) shard yielded fewer or more
    /// items than its declared length.
    #[error("stream shard {shard} {}", stream_length_detail(*.declared, *.yielded, *.more))]
    StreamLength {
        /// The shard.
        shard: usize,
        /// Its declared (or counted) length.
        declared: usize,
        /// Items it yielded before the mismatch was seen (`declared + 1` when it had more).
        yielded: usize,
        /// Whether it had more items than declared (else it ended early).
        more: bool,
    },
    /// A stream epoch stopped at an earlier batch (a shard that failed to
    /// open, a length mismatch, a worker panic); this batch was not read.
    #[error("stream stopped: {0}")]
    StreamAborted(String),
    /// A malformed data file (safetensors, npy, token, CSV, parquet): its
    /// header or layout does not describe its bytes.
    #[error("invalid {format} file {path}: {problem}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// The format it was read as (`"safetensors"`, `"npy"`, ...).
        format: &'static str,
        /// What is wrong with it (boxed to keep `DataError` small).
        problem: Box<FileProblem>,
    },
    /// A tensor or column asked for by name is not in the file.
    #[error("{path} has no {what} `{name}`; it has: {available}")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// `"tensor"` or `"column"`.
        what: &'static str,
        /// The name asked for.
        name: String,
        /// The names the file does have, comma-separated.
        available: String,
    },
    /// A value in a table that is missing or not a number (CSV: 1-based line,
    /// counting the header; parquet: 0-based row).
    #[error("{path}: {row_kind} {row}, column `{column}`: {problem}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// `"line"` (CSV) or `"row"` (parquet).
        row_kind: &'static str,
        /// The line or row.
        row: u64,
        /// The column name.
        column: String,
        /// What is wrong (`missing value`, `` `abc` is not a number``).
        problem: String,
    },
    /// An image that could not be opened or decoded.
    #[error("cannot decode image {path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
}

/// What is wrong with a data file; carried by [`DataError::InvalidFile`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// The file ends before its header says it should.
    #[error("truncated: needs {needed} bytes, has {actual}")]
    Truncated {
        /// Bytes the header requires.
        needed: u64,
        /// Bytes present.
        actual: u64,
    },
    /// Bytes after the end of the data the header describes.
    #[error("{extra} trailing bytes after the data the header describes")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The file does not start with the format's magic bytes.
    #[error("wrong magic {found:02x?}, expected {expected}")]
    BadMagic {
        /// The magic of the format.
        expected: &'static str,
        /// The first bytes of the file.
        found: Vec<u8>,
    },
    /// A header that cannot be parsed or contradicts itself.
    #[error("malformed header: {0}")]
    Header(String),
    /// A tensor whose data offsets fall outside the data section.
    #[error("tensor `{tensor}`: data offsets {begin}..{end} out of range of the {len}-byte data section")]
    OffsetsOutOfRange {
        /// The tensor.
        tensor: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
        /// Length of the data section.
        len: u64,
    },
    /// Two tensors whose byte ranges overlap.
    #[error("tensors `{first}` and `{second}` overlap")]
    Overlap {
        /// One tensor.
        first: String,
        /// The other.
        second: String,
    },
    /// A tensor whose byte count is not its element count times its dtype size.
    #[error("tensor `{tensor}`: shape {shape:?} of {dtype} needs {expected} bytes but its data has {actual}")]
    SizeMismatch {
        /// The tensor.
        tensor: String,
        /// Its dtype, as the file spells it.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
        /// `product(shape) * size_of(dtype)`.
        expected: u64,
        /// The bytes its offsets span (or the file holds).
        actual: u64,
    },
    /// A dtype candle has no equivalent for.
    #[error("tensor `{tensor}`: dtype {dtype} is not supported (supported: u8, bool as u8, i16, i32, i64, u32, f16, bf16, f32, f64)")]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Its dtype, as the file spells it.
        dtype: String,
    },
    /// A decoder's error (CSV syntax, parquet pages).
    #[error("{0}")]
    Decode(String),
}

fn stream_length_detail(declared: usize, yielded: usize, more: bool) -> String {
    if more {
        format!("yielded more than its declared {declared} items")
    } else {
        format!("ended after {yielded} items, but its declared length is {declared}")
    }
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
