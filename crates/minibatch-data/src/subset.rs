//! `Subset`: a view of selected indices of another dataset.

use std::sync::Arc;

use crate::batch::{Batch, Sample};
use crate::dataset::{check_index, Dataset};
use crate::error::Result;

/// The samples of `inner` at `indices`, in that order (PyTorch's `Subset`).
/// Batches are forwarded to the inner dataset's (fast) batch path.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{Dataset, Subset, TensorDataset};
/// let ds = TensorDataset::new(vec![Tensor::arange(0u32, 10, &Device::Cpu).unwrap()]).unwrap();
/// let sub = Subset::new(ds, vec![9, 3]).unwrap();
/// let b = sub.get_batch(&[0, 1]).unwrap();
/// assert_eq!(b.tensors()[0].to_vec1::<u32>().unwrap(), vec![9, 3]);
/// ```
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// A subset of `inner` (any dataset, or an already shared `Arc<dyn Dataset>`);
    /// every index must be `< inner.len()`
    /// (else [`DataError::IndexOutOfRange`](crate::DataError::IndexOutOfRange)).
    pub fn new(inner: impl Dataset + 'static, indices: Vec<usize>) -> Result<Self> {
        Self::from_arc(Arc::new(inner), indices)
    }
    /// Like [`new`](Self::new) for a shared dataset, without another layer of `Arc`.
    pub fn from_arc(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        let n = inner.len();
        for &i in &indices {
            check_index(i, n)?;
        }
        Ok(Self { inner, indices })
    }
    /// The indices into the inner dataset.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
    /// The inner dataset.
    pub fn inner(&self) -> &Arc<dyn Dataset> {
        &self.inner
    }
    fn map(&self, indices: &[usize]) -> Result<Vec<usize>> {
        indices
            .iter()
            .map(|&i| {
                check_index(i, self.indices.len())?;
                Ok(self.indices[i])
            })
            .collect()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.indices.len())?;
        self.inner.get(self.indices[index])
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.inner.get_batch(&self.map(indices)?)
    }
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        check_index(index, self.indices.len())?;
        self.inner.get_in_epoch(self.indices[index], epoch)
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        self.inner.get_batch_in_epoch(&self.map(indices)?, epoch)
    }
    fn is_in_memory(&self) -> bool {
        self.inner.is_in_memory()
    }
}

impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subset")
            .field("len", &self.indices.len())
            .finish_non_exhaustive()
    }
}
