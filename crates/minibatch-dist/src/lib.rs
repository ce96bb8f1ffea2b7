//! # minibatch-dist
//!
//! Data-parallel training for candle models: N processes (ranks) each train
//! the same model on their shard of every batch and average their gradients
//! after backward, so together they take the steps one process would take
//! on the whole batch (PyTorch's `DistributedDataParallel`).
//!
//! - [`ProcessGroup`]: rank, world size, in-place all-reduce (sum, mean) of
//!   f32/f64/bf16 slices and candle tensors, broadcast, barrier, all-gather
//!   of small values, and [`ProcessGroupExt::fail`] to end the whole job
//!   (`MPI_Abort`) when one rank errs.
//! - Backends: [`Single`] (one process, the default, no dependency),
//!   `Mpi` (feature `mpi`: Open MPI or MPICH through rsmpi, for CPU
//!   clusters and `mpirun` on one machine) and `Nccl` (feature `nccl`:
//!   NCCL through candle's cudarc, one GPU a rank, its unique id broadcast
//!   over MPI as Horovod does).
//! - [`GradBuckets`]: the gradient average in ~25 MB flat buckets, one
//!   collective each, no allocation per step; [`broadcast_vars`] for the
//!   start, where every rank takes rank 0's weights.
//! - [`threads`]: each rank's share of the machine's cores, and CPU time.
//!
//! The crate knows nothing of datasets, optimizers or the trainer; the
//! trainer (`minibatch-train`'s `TrainerBuilder::distributed`) puts it
//! together with a sharded `DataLoader`.
//!
//! ```
//! use minibatch_dist::{launch, ProcessGroup, ProcessGroupExt};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `Single` unless started by mpirun/srun in a build with the `mpi` feature
//! let group = launch(false)?;
//! let mut loss = [0.25f64];
//! group.all_reduce_mean(&mut loss)?;
//! if group.rank() == 0 {
//!     println!("mean loss over {} ranks: {}", group.world_size(), loss[0]);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod bucket;
pub mod error;
mod group;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod single;
mod tensor;
pub mod threads;

use std::sync::Arc;

pub use bucket::{broadcast_vars, checksum, GradBuckets, ReduceStats, DEFAULT_BUCKET_BYTES};
pub use error::{DistError, Result};
pub use group::{Buffer, Element, Pod, ProcessGroup, ProcessGroupExt, ReduceOp};
#[cfg(feature = "mpi")]
pub use mpi::Mpi;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use single::Single;

/// Whether this process was started by an MPI launcher (`mpirun`,
/// `mpiexec`, `srun --mpi=pmix`), read from the variables they set.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// The process group of this run: with `distributed`, the MPI world
/// ([`Mpi::init`](crate::Mpi)); an error when the build lacks the `mpi`
/// feature. Without, [`Single`]. Examples call it with their
/// `--distributed` flag.
pub fn launch(distributed: bool) -> Result<Arc<dyn ProcessGroup>> {
    if !distributed {
        return Ok(Arc::new(Single));
    }
    #[cfg(feature = "mpi")]
    {
        let g: Arc<dyn ProcessGroup> = Mpi::init()?;
        Ok(g)
    }
    #[cfg(not(feature = "mpi"))]
    Err(DistError::Backend {
        backend: "mpi",
        message: "this build has no MPI: rebuild with `--features mpi` (Open MPI or MPICH \
                  and libclang installed) to train with --distributed"
            .into(),
    })
}
