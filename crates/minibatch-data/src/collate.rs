//! Collating single samples into a batch.

use candle_core::Tensor;

use crate::batch::{Batch, Sample};
use crate::error::{DataError, Result};

/// Stacks samples field by field along a new dim 0 (PyTorch's `default_collate`
/// for tensors). All samples need the same field count and per-field shapes;
/// otherwise a [`DataError::ShapeMismatch`] names the first offending sample.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{collate, Sample};
/// let s = |v: f32| Sample::pair(Tensor::new(&[v, v], &Device::Cpu).unwrap(), Tensor::new(1u32, &Device::Cpu).unwrap());
/// let b = collate(&[s(1.0), s(2.0), s(3.0)]).unwrap();
/// assert_eq!(b.len(), 3);
/// assert_eq!(b.tensors()[0].dims(), &[3, 2]);
/// ```
pub fn collate(samples: &[Sample]) -> Result<Batch> {
    let Some(first) = samples.first() else {
        return Err(DataError::EmptyDataset(
            "cannot collate zero samples".into(),
        ));
    };
    let fields = first.tensors().len();
    for (i, s) in samples.iter().enumerate() {
        if s.tensors().len() != fields {
            return Err(DataError::ShapeMismatch(format!(
                "sample 0 has {fields} fields but sample {i} has {}",
                s.tensors().len()
            )));
        }
        for (f, t) in s.tensors().iter().enumerate() {
            if t.dims() != first.tensors()[f].dims() || t.dtype() != first.tensors()[f].dtype() {
                return Err(DataError::ShapeMismatch(format!(
                    "field {f}: sample 0 is {:?} {:?} but sample {i} is {:?} {:?}",
                    first.tensors()[f].dtype(),
                    first.tensors()[f].dims(),
                    t.dtype(),
                    t.dims()
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(fields);
    let mut column = Vec::with_capacity(samples.len());
    for f in 0..fields {
        column.clear();
        column.extend(samples.iter().map(|s| &s.tensors()[f]));
        out.push(Tensor::stack(&column, 0)?);
    }
    Ok(Batch::from_parts(out, samples.len()))
}
