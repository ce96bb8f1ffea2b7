//! `Map`: a per-sample, epoch-aware transform.

use crate::batch::{Batch, Sample};
use crate::collate::collate;
use crate::dataset::Dataset;
use crate::error::Result;

/// Where a transform is being applied: the epoch the loader is running and the
/// dataset index of the sample (for [`Map`]) or of each batch row (for
/// [`MapBatch`](crate::MapBatch)). Derive augmentation randomness from these
/// (e.g. with [`rng::derive_rng`](crate::rng::derive_rng)`(seed, epoch, index)`)
/// and it is reproducible and independent of worker count and resume point.
#[derive(Debug, Clone, Copy)]
pub struct TransformContext<'a> {
    /// The epoch passed to [`DataLoader::epoch`](crate::DataLoader::epoch)
    /// (0 when the dataset is accessed through plain [`Dataset::get`]).
    pub epoch: u64,
    /// The dataset indices of the rows being transformed.
    pub indices: &'a [usize],
}

/// A dataset whose samples are `f(inner sample, context)`.
///
/// The loader tells the transform the epoch through
/// [`Dataset::get_batch_in_epoch`]. Batches are built sample by sample and
/// collated; for whole-batch transforms (normalisation) prefer the faster
/// [`MapBatch`](crate::MapBatch).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{rng, Dataset, Map, Sample, TensorDataset};
/// let ds = TensorDataset::new(vec![Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap()]).unwrap();
/// // Add noise that depends only on (seed 5, epoch, index).
/// let noisy = Map::new(ds, |s: Sample, ctx| {
///     let mut r = rng::derive_rng(5, ctx.epoch, ctx.indices[0] as u64);
///     let shift = rng::unit_f64(&mut r);
///     Ok(Sample::new(vec![(&s.tensors()[0] + shift)?]))
/// });
/// let a = noisy.get_in_epoch(1, 3).unwrap().tensors()[0].to_vec1::<f32>().unwrap();
/// let b = noisy.get_in_epoch(1, 3).unwrap().tensors()[0].to_vec1::<f32>().unwrap();
/// assert_eq!(a, b);
/// ```
pub struct Map<D, F> {
    inner: D,
    f: F,
}

impl<D, F> Map<D, F>
where
    D: Dataset,
    F: Fn(Sample, TransformContext<'_>) -> Result<Sample> + Send + Sync,
{
    /// Wraps `inner`, transforming each sample with `f`.
    pub fn new(inner: D, f: F) -> Self {
        Self { inner, f }
    }
    /// The wrapped dataset.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D, F> Dataset for Map<D, F>
where
    D: Dataset,
    F: Fn(Sample, TransformContext<'_>) -> Result<Sample> + Send + Sync,
{
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.get_in_epoch(index, 0)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.get_batch_in_epoch(indices, 0)
    }
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        let s = self.inner.get_in_epoch(index, epoch)?;
        (self.f)(
            s,
            TransformContext {
                epoch,
                indices: std::slice::from_ref(&index),
            },
        )
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        let samples = indices
            .iter()
            .map(|&i| self.get_in_epoch(i, epoch))
            .collect::<Result<Vec<_>>>()?;
        collate(&samples)
    }
}

impl<D, F> std::fmt::Debug for Map<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").finish_non_exhaustive()
    }
}
