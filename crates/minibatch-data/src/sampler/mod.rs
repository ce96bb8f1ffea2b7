//! Samplers: the order in which a loader visits dataset indices.
//!
//! Every sampler's order is a pure function of its configuration and the
//! epoch; the random ones draw from [`crate::rng`] (ChaCha8 keyed by
//! `(seed, epoch)`), so orders are reproducible across runs, platforms and
//! `rand` releases.

mod batch_sampler;
mod distributed;
mod fixed_order;
mod random;
mod sequential;
mod subset_random;
mod weighted;

pub use batch_sampler::BatchSampler;
pub use distributed::DistributedSampler;
pub use fixed_order::FixedOrderSampler;
pub use random::RandomSampler;
pub use sequential::SequentialSampler;
pub use subset_random::SubsetRandomSampler;
pub use weighted::WeightedRandomSampler;

use std::sync::Arc;

/// An epoch-indexed source of dataset indices (PyTorch's `Sampler`).
pub trait Sampler: Send + Sync {
    /// The number of indices yielded per epoch.
    fn len(&self) -> usize;
    /// Whether an epoch yields no indices.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The indices of `epoch`, in order; a pure function of the sampler and `epoch`.
    fn indices(&self, epoch: u64) -> Vec<usize>;
}

impl<S: Sampler + ?Sized> Sampler for Arc<S> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        (**self).indices(epoch)
    }
}

impl<S: Sampler + ?Sized> Sampler for Box<S> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        (**self).indices(epoch)
    }
}
