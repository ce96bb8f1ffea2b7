use super::Sampler;

/// Yields `0, 1, ..., n - 1` every epoch (PyTorch's `SequentialSampler`).
///
/// ```
/// use minibatch_data::{Sampler, SequentialSampler};
/// assert_eq!(SequentialSampler::new(3).indices(7), vec![0, 1, 2]);
/// ```
#[derive(Debug, Clone)]
pub struct SequentialSampler {
    n: usize,
}

impl SequentialSampler {
    /// A sampler over `0..n`.
    pub fn new(n: usize) -> Self {
        Self { n }
    }
}

impl Sampler for SequentialSampler {
    fn len(&self) -> usize {
        self.n
    }
    fn indices(&self, _epoch: u64) -> Vec<usize> {
        (0..self.n).collect()
    }
}
