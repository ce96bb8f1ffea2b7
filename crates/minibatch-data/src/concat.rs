//! `ConcatDataset`: several datasets end to end.

use std::sync::Arc;

use candle_core::Tensor;

use crate::batch::{Batch, Sample};
use crate::dataset::{check_index, Dataset};
use crate::error::{DataError, Result};

/// The datasets `parts[0]`, `parts[1]`, ... end to end (PyTorch's `ConcatDataset`).
/// A batch is gathered as one batch per run of consecutive indices that fall in
/// the same part, then concatenated field by field.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{ConcatDataset, Dataset, TensorDataset};
/// let a = TensorDataset::new(vec![Tensor::arange(0u32, 3, &Device::Cpu).unwrap()]).unwrap();
/// let b = TensorDataset::new(vec![Tensor::arange(10u32, 12, &Device::Cpu).unwrap()]).unwrap();
/// let c = ConcatDataset::new(vec![Arc::new(a), Arc::new(b)]).unwrap();
/// assert_eq!(c.len(), 5);
/// let batch = c.get_batch(&[4, 0, 3]).unwrap();
/// assert_eq!(batch.tensors()[0].to_vec1::<u32>().unwrap(), vec![11, 0, 10]);
/// ```
#[derive(Clone)]
pub struct ConcatDataset {
    parts: Vec<Arc<dyn Dataset>>,
    /// `ends[k]` = total length of parts `0..=k`.
    ends: Vec<usize>,
}

impl ConcatDataset {
    /// Concatenates `parts`; an empty list is [`DataError::EmptyDataset`].
    pub fn new(parts: Vec<Arc<dyn Dataset>>) -> Result<Self> {
        if parts.is_empty() {
            return Err(DataError::EmptyDataset(
                "ConcatDataset::new needs at least one dataset".into(),
            ));
        }
        let mut ends = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for p in &parts {
            total += p.len();
            ends.push(total);
        }
        Ok(Self { parts, ends })
    }
    /// The concatenated datasets.
    pub fn parts(&self) -> &[Arc<dyn Dataset>] {
        &self.parts
    }
    /// `(part, index within part)` for a global index.
    fn locate(&self, index: usize) -> Result<(usize, usize)> {
        check_index(index, self.len())?;
        let part = self.ends.partition_point(|&e| e <= index);
        let start = if part == 0 { 0 } else { self.ends[part - 1] };
        Ok((part, index - start))
    }
    fn gather(&self, indices: &[usize], epoch: Option<u64>) -> Result<Batch> {
        if indices.is_empty() {
            return Err(DataError::EmptyDataset(
                "get_batch called with no indices".into(),
            ));
        }
        let mut pieces: Vec<Batch> = Vec::new();
        let mut run: Vec<usize> = Vec::with_capacity(indices.len());
        let mut run_part = usize::MAX;
        let fetch = |part: usize, run: &[usize]| match epoch {
            Some(e) => self.parts[part].get_batch_in_epoch(run, e),
            None => self.parts[part].get_batch(run),
        };
        for &i in indices {
            let (part, local) = self.locate(i)?;
            if part != run_part && !run.is_empty() {
                pieces.push(fetch(run_part, &run)?);
                run.clear();
            }
            run_part = part;
            run.push(local);
        }
        pieces.push(fetch(run_part, &run)?);
        if pieces.len() == 1 {
            return Ok(pieces.pop().expect("one piece"));
        }
        let fields = pieces[0].tensors().len();
        let mut out = Vec::with_capacity(fields);
        for f in 0..fields {
            let column = pieces
                .iter()
                .map(|b| {
                    b.tensors().get(f).ok_or_else(|| {
                        DataError::ShapeMismatch(format!(
                            "concatenated datasets disagree on the number of fields ({fields} vs {})",
                            b.tensors().len()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Tensor::cat(&column, 0)?);
        }
        Batch::new(out)
    }
}

impl Dataset for ConcatDataset {
    fn len(&self) -> usize {
        *self.ends.last().unwrap_or(&0)
    }
    fn get(&self, index: usize) -> Result<Sample> {
        let (p, i) = self.locate(index)?;
        self.parts[p].get(i)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.gather(indices, None)
    }
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        let (p, i) = self.locate(index)?;
        self.parts[p].get_in_epoch(i, epoch)
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        self.gather(indices, Some(epoch))
    }
    fn is_in_memory(&self) -> bool {
        self.parts.iter().all(|p| p.is_in_memory())
    }
}

impl std::fmt::Debug for ConcatDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcatDataset")
            .field("ends", &self.ends)
            .finish_non_exhaustive()
    }
}
