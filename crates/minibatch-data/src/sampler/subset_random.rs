use super::Sampler;
use crate::rng::{derive_rng, fisher_yates};

/// A random permutation of a fixed list of indices each epoch (PyTorch's
/// `SubsetRandomSampler`).
///
/// ```
/// use minibatch_data::{Sampler, SubsetRandomSampler};
/// let mut v = SubsetRandomSampler::new(vec![3, 8, 9], 1).indices(0);
/// v.sort();
/// assert_eq!(v, vec![3, 8, 9]);
/// ```
#[derive(Debug, Clone)]
pub struct SubsetRandomSampler {
    indices: Vec<usize>,
    seed: u64,
}

impl SubsetRandomSampler {
    /// Shuffles `indices` with `seed` each epoch.
    pub fn new(indices: Vec<usize>, seed: u64) -> Self {
        Self { indices, seed }
    }
}

impl Sampler for SubsetRandomSampler {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut v = self.indices.clone();
        fisher_yates(&mut derive_rng(self.seed, epoch, 0), &mut v);
        v
    }
}
