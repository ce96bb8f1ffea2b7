//! `TensorDataset`: rows of in-memory tensors.

use candle_core::{Device, Tensor};

use crate::batch::{common_len, Batch, Sample};
use crate::dataset::{check_index, Dataset};
use crate::error::{DataError, Result};
use crate::gather::gather_rows_cpu;

/// A dataset whose sample `i` is row `i` of each of its tensors (PyTorch's
/// `TensorDataset`). A batch is one `index_select` per tensor, with the index
/// tensor built directly on that tensor's device: no per-sample loop and no
/// host round trip for data that lives on a GPU. Contiguous CPU tensors take a
/// faster equivalent (one row copy per sample into the new batch's storage).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{Dataset, TensorDataset};
/// let x = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((6, 2)).unwrap();
/// let y = Tensor::arange(0u32, 6, &Device::Cpu).unwrap();
/// let ds = TensorDataset::new(vec![x, y]).unwrap();
/// assert_eq!(ds.len(), 6);
/// let (bx, by) = ds.get_batch(&[5, 0]).unwrap().into_pair().unwrap();
/// assert_eq!(by.to_vec1::<u32>().unwrap(), vec![5, 0]);
/// assert_eq!(bx.to_vec2::<f32>().unwrap(), vec![vec![10., 11.], vec![0., 1.]]);
/// ```
#[derive(Debug, Clone)]
pub struct TensorDataset {
    tensors: Vec<Tensor>,
    len: usize,
}

impl TensorDataset {
    /// A dataset over `tensors`, which must all have the same first dimension
    /// (else [`DataError::ShapeMismatch`]); an empty list is an error too.
    /// Non-contiguous tensors (e.g. transposed views) are copied to contiguous
    /// storage once, here; contiguous ones are shared, not copied.
    pub fn new(tensors: Vec<Tensor>) -> Result<Self> {
        if tensors.is_empty() {
            return Err(DataError::EmptyDataset(
                "TensorDataset::new needs at least one tensor".into(),
            ));
        }
        let len = common_len(&tensors)?;
        // Batches gather rows, which needs contiguous storage; copy strided views once here.
        let tensors = tensors
            .into_iter()
            .map(|t| t.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { tensors, len })
    }
    /// The underlying tensors (contiguous).
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// The underlying tensors, by value.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
    /// A copy of the dataset with every tensor on `device` (one bulk copy per tensor).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
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

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.len)?;
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.get(index))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Sample::new(tensors))
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        if indices.is_empty() {
            return Err(DataError::EmptyDataset(
                "get_batch called with no indices".into(),
            ));
        }
        for &i in indices {
            check_index(i, self.len)?;
        }
        let n = indices.len();
        let mut out = Vec::with_capacity(self.tensors.len());
        // The index tensor for devices without a fast path, built once on the
        // first such tensor's device (usually there is only one device).
        let mut index_tensor: Option<Tensor> = None;
        for t in &self.tensors {
            if let Some(rows) = gather_rows_cpu(t, indices)? {
                out.push(rows);
                continue;
            }
            let idx = match &index_tensor {
                Some(it) if it.device().same_device(t.device()) => it.clone(),
                _ => {
                    let ids: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
                    let it = Tensor::from_vec(ids, n, t.device())?;
                    index_tensor = Some(it.clone());
                    it
                }
            };
            out.push(t.index_select(&idx, 0)?);
        }
        Ok(Batch::from_parts(out, n))
    }
    fn is_in_memory(&self) -> bool {
        true
    }
}
