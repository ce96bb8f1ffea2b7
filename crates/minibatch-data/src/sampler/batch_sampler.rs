use super::Sampler;
use crate::error::{DataError, Result};
use std::sync::Arc;

/// Groups a sampler's indices into batches (PyTorch's `BatchSampler`): batch
/// `b` of an epoch is positions `b * batch_size ..` of the sampler's order; the
/// short tail batch is kept unless `drop_last`.
///
/// ```
/// use minibatch_data::{BatchSampler, SequentialSampler};
/// let bs = BatchSampler::new(SequentialSampler::new(5), 2, false).unwrap();
/// assert_eq!(bs.len(), 3);
/// assert_eq!(bs.batches(0), vec![vec![0, 1], vec![2, 3], vec![4]]);
/// let bs = BatchSampler::new(SequentialSampler::new(5), 2, true).unwrap();
/// assert_eq!(bs.len(), 2);
/// ```
#[derive(Clone)]
pub struct BatchSampler {
    sampler: Arc<dyn Sampler>,
    batch_size: usize,
    drop_last: bool,
}

impl BatchSampler {
    /// Batches of `batch_size` from `sampler`; `batch_size == 0` is [`DataError::ZeroBatchSize`].
    pub fn new(
        sampler: impl Sampler + 'static,
        batch_size: usize,
        drop_last: bool,
    ) -> Result<Self> {
        Self::from_arc(Arc::new(sampler), batch_size, drop_last)
    }
    /// Like [`new`](Self::new) for a shared sampler.
    pub fn from_arc(sampler: Arc<dyn Sampler>, batch_size: usize, drop_last: bool) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::ZeroBatchSize);
        }
        Ok(Self {
            sampler,
            batch_size,
            drop_last,
        })
    }
    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.sampler.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }
    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
    /// Whether the short tail batch is dropped.
    pub fn drop_last(&self) -> bool {
        self.drop_last
    }
    /// The underlying sampler.
    pub fn sampler(&self) -> &Arc<dyn Sampler> {
        &self.sampler
    }
    /// Samples per epoch: the sampler's length, minus the dropped tail when
    /// `drop_last` is set.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.len() * self.batch_size
        } else {
            self.sampler.len()
        }
    }
    /// The range of positions in `order` that batch `b` covers (`b < len()`).
    /// This is the one place where batch bounds are computed: the
    /// [`DataLoader`](crate::DataLoader) cuts every epoch with it.
    pub fn batch_range(&self, b: usize, order_len: usize) -> std::ops::Range<usize> {
        let start = (b * self.batch_size).min(order_len);
        start..(start + self.batch_size).min(order_len)
    }
    /// All batches of `epoch`.
    pub fn batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.sampler.indices(epoch);
        (0..self.len())
            .map(|b| order[self.batch_range(b, order.len())].to_vec())
            .collect()
    }
}

impl std::fmt::Debug for BatchSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSampler")
            .field("len", &self.sampler.len())
            .field("batch_size", &self.batch_size)
            .field("drop_last", &self.drop_last)
            .finish()
    }
}
