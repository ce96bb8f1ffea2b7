//! The CPU fast path of `TensorDataset::get_batch`.
//!
//! candle's CPU `index_select` zero-fills its output before copying the rows
//! in, which costs one extra pass over every batch. For a contiguous CPU
//! tensor this gathers the rows straight into a fresh, uninitialised-then-
//! extended `Vec` (one allocation, one copy per row) that becomes the batch
//! tensor's storage without a further copy.

use candle_core::{CpuStorage, Storage, Tensor};

use crate::error::Result;

/// The rows `ids` (already range-checked) of a contiguous CPU tensor, or `None`
/// when the tensor is not on the CPU, not contiguous, or of an exotic dtype;
/// the caller then falls back to `index_select`.
pub(crate) fn gather_rows_cpu(t: &Tensor, ids: &[usize]) -> Result<Option<Tensor>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let dims = t.dims();
    if dims.is_empty() {
        return Ok(None);
    }
    let width: usize = dims[1..].iter().product();
    let mut shape = dims.to_vec();
    shape[0] = ids.len();
    let device = t.device();
    macro_rules! go {
        ($v:expr) => {
            Tensor::from_vec(gather(&$v[start..end], width, ids), shape, device)?
        };
    }
    let out = match cpu {
        CpuStorage::U8(v) => go!(v),
        CpuStorage::U32(v) => go!(v),
        CpuStorage::I64(v) => go!(v),
        CpuStorage::BF16(v) => go!(v),
        CpuStorage::F16(v) => go!(v),
        CpuStorage::F32(v) => go!(v),
        CpuStorage::F64(v) => go!(v),
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn gather<T: Copy>(src: &[T], width: usize, ids: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(ids.len() * width);
    for &i in ids {
        out.extend_from_slice(&src[i * width..(i + 1) * width]);
    }
    out
}
