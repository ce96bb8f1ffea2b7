//! The crate's error type.

/// Everything that can go wrong in a collective, a bucketer or a backend's setup.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A candle operation failed (reading or writing a tensor).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// `root` is not a rank of the group.
    #[error("root rank {root} is not in a world of {world_size} ranks")]
    InvalidRoot {
        /// The root asked for.
        root: usize,
        /// The group's size.
        world_size: usize,
    },
    /// Ranks disagree on something that must be the same everywhere (a
    /// length, a parameter count, a configuration), found by comparing all ranks.
    #[error("rank {rank} has {what} = {got} where rank 0 has {expected}: every rank must agree")]
    Mismatch {
        /// What was compared.
        what: String,
        /// The first rank that differs from rank 0.
        rank: usize,
        /// Rank 0's value.
        expected: u64,
        /// That rank's value.
        got: u64,
    },
    /// A tensor the collective cannot work on in place.
    #[error("tensor {shape:?} ({dtype:?} on {device}): {reason}")]
    UnsupportedTensor {
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype.
        dtype: candle_core::DType,
        /// Its device, in words.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A parameter's dtype the bucketer cannot reduce.
    #[error(
        "parameter {index} has dtype {dtype:?}: gradients are reduced in f32, f64 or bf16 only"
    )]
    UnsupportedDType {
        /// Its position in the parameter list.
        index: usize,
        /// Its dtype.
        dtype: candle_core::DType,
    },
    /// Setting up a backend failed (MPI already initialized, too low a thread level, NCCL).
    #[error("{backend}: {message}")]
    Backend {
        /// `"mpi"` or `"nccl"`.
        backend: &'static str,
        /// What happened.
        message: String,
    },
    /// A bad argument (an empty bucket size, a zero world size...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// `Result` with [`DistError`].
pub type Result<T> = std::result::Result<T, DistError>;
