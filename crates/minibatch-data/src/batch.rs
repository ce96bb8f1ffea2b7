//! Samples and batches: ordered lists of tensors.

use candle_core::{Device, Tensor};

use crate::error::{DataError, Result};

/// One sample: an ordered list of tensors (e.g. `[image, label]`), without a batch dimension.
#[derive(Debug, Clone)]
pub struct Sample {
    tensors: Vec<Tensor>,
}

impl Sample {
    /// A sample made of `tensors`.
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors }
    }
    /// A two-field sample, e.g. `(input, target)`.
    pub fn pair(x: Tensor, y: Tensor) -> Self {
        Self {
            tensors: vec![x, y],
        }
    }
    /// The fields of the sample.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// The fields of the sample, by value.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
    /// Splits a two-field sample into its fields; any other field count is a
    /// [`DataError::Structure`] error.
    pub fn into_pair(self) -> Result<(Tensor, Tensor)> {
        into_pair(self.tensors, "sample")
    }
}

impl From<Vec<Tensor>> for Sample {
    fn from(tensors: Vec<Tensor>) -> Self {
        Self::new(tensors)
    }
}

/// A batch: one tensor per field, each with the samples stacked along dim 0.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::Batch;
/// let x = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
/// let y = Tensor::zeros(4, candle_core::DType::U32, &Device::Cpu).unwrap();
/// let b = Batch::new(vec![x, y]).unwrap();
/// assert_eq!(b.len(), 4);
/// let (x, y) = b.into_pair().unwrap();
/// assert_eq!(x.dims(), &[4, 3]);
/// # let _ = y;
/// ```
#[derive(Debug, Clone)]
pub struct Batch {
    tensors: Vec<Tensor>,
    len: usize,
}

impl Batch {
    /// A batch of `tensors` that all share their first dimension (the batch size).
    /// Mismatched first dimensions or rank-0 tensors are a [`DataError::ShapeMismatch`].
    pub fn new(tensors: Vec<Tensor>) -> Result<Self> {
        let len = common_len(&tensors)?;
        Ok(Self { tensors, len })
    }
    /// Builds a batch without checking shapes; `len` must be the shared first dimension.
    pub(crate) fn from_parts(tensors: Vec<Tensor>, len: usize) -> Self {
        Self { tensors, len }
    }
    /// The number of samples in the batch.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the batch holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The per-field tensors.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// The per-field tensors, by value.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
    /// Splits a two-field batch into `(inputs, targets)`; any other field count
    /// is a [`DataError::Structure`] error.
    pub fn into_pair(self) -> Result<(Tensor, Tensor)> {
        into_pair(self.tensors, "batch")
    }
    /// Moves every field to `device` (no copy when already there).
    pub fn to_device(self, device: &Device) -> Result<Self> {
        if self.tensors.iter().all(|t| t.device().same_device(device)) {
            return Ok(self);
        }
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.to_device(device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            tensors,
            len: self.len,
        })
    }
}

fn into_pair(mut tensors: Vec<Tensor>, what: &str) -> Result<(Tensor, Tensor)> {
    if tensors.len() != 2 {
        return Err(DataError::Structure(format!(
            "into_pair needs a {what} with exactly 2 tensors, this one has {}",
            tensors.len()
        )));
    }
    let y = tensors.pop().expect("length checked");
    let x = tensors.pop().expect("length checked");
    Ok((x, y))
}

/// The shared first dimension of `tensors`, or an error naming the mismatch.
pub(crate) fn common_len(tensors: &[Tensor]) -> Result<usize> {
    let Some(first) = tensors.first() else {
        return Err(DataError::ShapeMismatch("need at least one tensor".into()));
    };
    let first_dim = |t: &Tensor, i: usize| -> Result<usize> {
        t.dims().first().copied().ok_or_else(|| {
            DataError::ShapeMismatch(format!(
                "tensor {i} is a scalar; it needs a first (sample) dimension"
            ))
        })
    };
    let n = first_dim(first, 0)?;
    for (i, t) in tensors.iter().enumerate().skip(1) {
        let m = first_dim(t, i)?;
        if m != n {
            return Err(DataError::ShapeMismatch(format!(
                "tensor 0 has {n} rows but tensor {i} has {m} (shapes {:?} and {:?})",
                first.dims(),
                t.dims()
            )));
        }
    }
    Ok(n)
}
