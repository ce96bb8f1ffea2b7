//! `FnDataset`: a dataset over a closure.

use crate::batch::Sample;
use crate::dataset::{check_index, Dataset};
use crate::error::Result;

/// A dataset of `len` samples produced by a closure `Fn(usize) -> Result<Sample>`
/// (for data that is not one tensor: files, generated data, ...). Batches are
/// assembled with [`collate`](crate::collate) by the default
/// [`Dataset::get_batch`]. Indices `>= len` are rejected before the closure runs.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{Dataset, FnDataset, Sample};
/// let ds = FnDataset::new(10, |i| {
///     Ok(Sample::pair(Tensor::new(&[i as f32; 3], &Device::Cpu)?, Tensor::new(i as u32, &Device::Cpu)?))
/// });
/// let b = ds.get_batch(&[1, 2]).unwrap();
/// assert_eq!(b.tensors()[0].dims(), &[2, 3]);
/// ```
pub struct FnDataset<F> {
    len: usize,
    f: F,
}

impl<F> FnDataset<F>
where
    F: Fn(usize) -> Result<Sample> + Send + Sync,
{
    /// A dataset of `len` samples, sample `i` being `f(i)`.
    pub fn new(len: usize, f: F) -> Self {
        Self { len, f }
    }
}

impl<F> Dataset for FnDataset<F>
where
    F: Fn(usize) -> Result<Sample> + Send + Sync,
{
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.len)?;
        (self.f)(index)
    }
}

impl<F> std::fmt::Debug for FnDataset<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnDataset")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
