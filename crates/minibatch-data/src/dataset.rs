//! The `Dataset` trait.

use std::any::Any;
use std::sync::Arc;

use crate::batch::{Batch, Sample};
use crate::collate::collate;
use crate::error::{DataError, Result};

/// A finite, indexable collection of samples (PyTorch's map-style `Dataset`).
///
/// Only [`len`](Dataset::len) and [`get`](Dataset::get) are required. Datasets
/// that can gather many rows at once (like [`TensorDataset`](crate::TensorDataset))
/// override [`get_batch`](Dataset::get_batch). The `*_in_epoch` variants are
/// what the [`DataLoader`](crate::DataLoader) calls: they tell epoch-aware
/// transforms (seeded augmentation, see [`Map`](crate::Map)) which epoch is
/// running; plain datasets leave their defaults, which ignore the epoch.
/// A dataset that overrides [`get_in_epoch`](Dataset::get_in_epoch) must also
/// override [`get_batch_in_epoch`](Dataset::get_batch_in_epoch) (e.g. by
/// collating `get_in_epoch` samples), since the default batch path goes through
/// [`get_batch`](Dataset::get_batch).
pub trait Dataset: Send + Sync {
    /// The number of samples.
    fn len(&self) -> usize;
    /// Whether the dataset has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The sample at `index`; `index >= len()` is [`DataError::IndexOutOfRange`].
    fn get(&self, index: usize) -> Result<Sample>;
    /// The samples at `indices`, collated into one batch. The default fetches
    /// each sample with [`get`](Dataset::get) and [`collate`]s them.
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        let samples = indices
            .iter()
            .map(|&i| self.get(i))
            .collect::<Result<Vec<_>>>()?;
        collate(&samples)
    }
    /// The sample at `index` as seen during `epoch` (default: [`get`](Dataset::get)).
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        let _ = epoch;
        self.get(index)
    }
    /// The batch at `indices` as seen during `epoch` (default: [`get_batch`](Dataset::get_batch)).
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        let _ = epoch;
        self.get_batch(indices)
    }
    /// Whether batches are cheap in-memory gathers. The [`DataLoader`](crate::DataLoader)
    /// builds such batches on the calling thread even when `num_workers > 0`,
    /// because handing them to worker threads costs more than it saves.
    fn is_in_memory(&self) -> bool {
        false
    }
    /// The stream behind this dataset, if it is one: the
    /// [`DataLoader`](crate::DataLoader) reads such a dataset in order
    /// (interleaving its shards through a shuffle buffer) instead of indexing
    /// it. Only [`StreamDataset`](crate::StreamDataset) (and `Arc`s of one)
    /// return `Some`, the stream itself; the default is `None`. The stream is
    /// type-erased so that this trait depends on no dataset of its own:
    /// `StreamDataset` implements `Dataset`, not the other way round.
    fn as_stream(&self) -> Option<&dyn Any> {
        None
    }
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn is_empty(&self) -> bool {
        (**self).is_empty()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        (**self).get_batch(indices)
    }
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        (**self).get_in_epoch(index, epoch)
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        (**self).get_batch_in_epoch(indices, epoch)
    }
    fn is_in_memory(&self) -> bool {
        (**self).is_in_memory()
    }
    fn as_stream(&self) -> Option<&dyn Any> {
        (**self).as_stream()
    }
}

/// `Ok(())` when `index < len`, else [`DataError::IndexOutOfRange`].
pub(crate) fn check_index(index: usize, len: usize) -> Result<()> {
    if index < len {
        Ok(())
    } else {
        Err(DataError::IndexOutOfRange { index, len })
    }
}
