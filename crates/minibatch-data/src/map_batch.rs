//! `MapBatch`: a whole-batch, epoch-aware transform.

use crate::batch::{Batch, Sample};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::map::TransformContext;

/// A dataset whose batches are `f(inner batch, context)`: the transform runs
/// once per batch on whole tensors (e.g. normalisation `(x - mean) / std`), so
/// the inner dataset keeps its fast batch path. `context.indices` lists the
/// dataset index of every row, in order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{Batch, Dataset, MapBatch, TensorDataset};
/// let ds = TensorDataset::new(vec![Tensor::ones((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap()]).unwrap();
/// let scaled = MapBatch::new(ds, |b: Batch, _ctx| Batch::new(vec![(&b.tensors()[0] * 2.0)?]));
/// let b = scaled.get_batch(&[0, 1]).unwrap();
/// assert_eq!(b.tensors()[0].to_vec2::<f32>().unwrap(), vec![vec![2., 2.], vec![2., 2.]]);
/// ```
pub struct MapBatch<D, F> {
    inner: D,
    f: F,
}

impl<D, F> MapBatch<D, F>
where
    D: Dataset,
    F: Fn(Batch, TransformContext<'_>) -> Result<Batch> + Send + Sync,
{
    /// Wraps `inner`, transforming each batch with `f`.
    pub fn new(inner: D, f: F) -> Self {
        Self { inner, f }
    }
    /// The wrapped dataset.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D, F> Dataset for MapBatch<D, F>
where
    D: Dataset,
    F: Fn(Batch, TransformContext<'_>) -> Result<Batch> + Send + Sync,
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
        let b = self.get_batch_in_epoch(std::slice::from_ref(&index), epoch)?;
        if b.len() != 1 {
            return Err(DataError::Structure(format!(
                "batch transform turned 1 row into {}",
                b.len()
            )));
        }
        let tensors = b
            .tensors()
            .iter()
            .map(|t| t.get(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Sample::new(tensors))
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        let b = self.inner.get_batch_in_epoch(indices, epoch)?;
        (self.f)(b, TransformContext { epoch, indices })
    }
    fn is_in_memory(&self) -> bool {
        self.inner.is_in_memory()
    }
}

impl<D, F> std::fmt::Debug for MapBatch<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapBatch").finish_non_exhaustive()
    }
}
