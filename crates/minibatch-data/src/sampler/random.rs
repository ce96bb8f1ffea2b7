use super::Sampler;
use crate::error::{DataError, Result};
use crate::rng::{below, derive_rng, permutation};

/// A fresh random order each epoch (PyTorch's `RandomSampler`): by default a
/// permutation of `0..n` (Fisher-Yates over ChaCha8 keyed by `(seed, epoch)`,
/// see [`crate::rng`]); with [`with_replacement`](Self::with_replacement),
/// `num_samples` independent uniform draws.
///
/// ```
/// use minibatch_data::{RandomSampler, Sampler};
/// let s = RandomSampler::new(5, 42);
/// let mut e0 = s.indices(0);
/// assert_ne!(e0, s.indices(1));
/// e0.sort();
/// assert_eq!(e0, vec![0, 1, 2, 3, 4]);
/// ```
#[derive(Debug, Clone)]
pub struct RandomSampler {
    n: usize,
    seed: u64,
    replacement: Option<usize>,
}

impl RandomSampler {
    /// A permutation sampler over `0..n`.
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            replacement: None,
        }
    }
    /// `num_samples` uniform draws from `0..n` with replacement per epoch.
    /// `n == 0` with `num_samples > 0` is [`DataError::EmptyDataset`].
    pub fn with_replacement(n: usize, num_samples: usize, seed: u64) -> Result<Self> {
        if n == 0 && num_samples > 0 {
            return Err(DataError::EmptyDataset(
                "RandomSampler::with_replacement cannot draw from 0 samples".into(),
            ));
        }
        Ok(Self {
            n,
            seed,
            replacement: Some(num_samples),
        })
    }
    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Sampler for RandomSampler {
    fn len(&self) -> usize {
        self.replacement.unwrap_or(self.n)
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        match self.replacement {
            None => permutation(self.n, self.seed, epoch),
            Some(k) => {
                let mut rng = derive_rng(self.seed, epoch, 0);
                (0..k)
                    .map(|_| below(&mut rng, self.n as u64) as usize)
                    .collect()
            }
        }
    }
}
