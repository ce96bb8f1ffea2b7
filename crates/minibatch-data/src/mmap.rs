//! Memory-mapped files and the row gather shared by the file-backed datasets
//! ([`SafetensorsDataset`](crate::SafetensorsDataset), [`NpyDataset`](crate::NpyDataset),
//! [`TokenWindows`](crate::TokenWindows)).
//!
//! A batch is built by copying each requested row's bytes from the map
//! straight into the spare capacity of one fresh `Vec<T>`, which then becomes
//! the batch tensor's storage (`Tensor::from_vec` takes the vector without
//! copying): one copy per byte, no per-row buffer. Only the pages a batch
//! touches are read, and they live in the page cache (file-backed memory the
//! kernel can drop), not in the process's anonymous memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, WithDType};
use half::{bf16, f16};
use memmap2::Mmap;

use crate::batch::{Batch, Sample};
use crate::dataset::check_index;
use crate::error::{DataError, Result};

/// A read-only memory map of a whole file.
pub(crate) struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    /// Maps `path` read-only; I/O failures are [`DataError::Io`].
    pub(crate) fn open(path: &Path) -> Result<Arc<Self>> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Like every
        // memory-mapped reader (numpy's mmap_mode, safetensors' `load_file`),
        // it relies on nobody truncating or rewriting the file while it is
        // open: the datasets document that requirement.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            map,
        }))
    }
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

/// Plain numeric types whose every bit pattern is a valid value, so raw file
/// bytes may be copied into them.
///
/// # Safety
/// Implementors must be `Copy`, without padding, and valid for any bit pattern.
pub(crate) unsafe trait Plain: WithDType + Copy {
    /// The value with its bytes reversed (for files of the other endianness).
    fn swap_bytes(self) -> Self;
}

macro_rules! plain_int {
    ($($t:ty),*) => {$(
        // SAFETY: primitive integers have no padding and no invalid bit patterns.
        unsafe impl Plain for $t {
            fn swap_bytes(self) -> Self {
                <$t>::swap_bytes(self)
            }
        }
    )*};
}
plain_int!(u8, u32, i16, i32, i64);

macro_rules! plain_float {
    ($($t:ty),*) => {$(
        // SAFETY: IEEE floats (and half's f16/bf16, `repr(transparent)` over u16)
        // have no padding and every bit pattern is a value (possibly NaN).
        unsafe impl Plain for $t {
            fn swap_bytes(self) -> Self {
                <$t>::from_bits(self.to_bits().swap_bytes())
            }
        }
    )*};
}
plain_float!(f16, bf16, f32, f64);

/// Copies rows `ids` (each `row_bytes` long, row `i` at `src[i * row_bytes..]`)
/// into one new vector of `T`, byte-swapping when `swap`. The caller has
/// checked every id against the row count; an id past `src` panics on the
/// slice bound instead of reading out of bounds.
pub(crate) fn gather_rows<T: Plain>(
    src: &[u8],
    row_bytes: usize,
    ids: &[usize],
    swap: bool,
) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(row_bytes % size, 0);
    let total = ids.len() * row_bytes;
    let mut out: Vec<T> = Vec::with_capacity(total / size);
    let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
    for (k, &i) in ids.iter().enumerate() {
        let row = &src[i * row_bytes..(i + 1) * row_bytes];
        // SAFETY: `dst` points to `total` bytes of spare capacity and
        // `k * row_bytes + row_bytes <= total`; source and destination are
        // distinct allocations (the map and a fresh vector).
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(k * row_bytes), row_bytes) };
    }
    // SAFETY: every byte of the first `total` bytes was written above and any
    // bit pattern is a valid `T` (the `Plain` contract).
    unsafe { out.set_len(total / size) };
    if swap {
        for v in &mut out {
            *v = v.swap_bytes();
        }
    }
    out
}

/// One memory-mapped tensor: `shape[0]` rows of `shape[1..]` elements stored
/// contiguously (row-major) from byte `offset` of the file.
#[derive(Debug, Clone)]
pub(crate) struct MappedTensor {
    pub(crate) file: Arc<MappedFile>,
    pub(crate) name: String,
    pub(crate) offset: usize,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    /// Bytes stored in the other endianness than this machine's.
    pub(crate) swap: bool,
}

impl MappedTensor {
    pub(crate) fn rows(&self) -> usize {
        self.shape[0]
    }
    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<usize>() * self.dtype.size_in_bytes()
    }
    /// Rows `ids` (already range-checked) as a CPU tensor of shape `(ids.len(), shape[1..])`.
    pub(crate) fn gather(&self, ids: &[usize]) -> Result<Tensor> {
        let rb = self.row_bytes();
        let src = &self.file.bytes()[self.offset..self.offset + self.rows() * rb];
        let mut shape = self.shape.clone();
        shape[0] = ids.len();
        let dev = &Device::Cpu;
        macro_rules! go {
            ($t:ty) => {
                Tensor::from_vec(gather_rows::<$t>(src, rb, ids, self.swap), shape, dev)?
            };
        }
        Ok(match self.dtype {
            DType::U8 => go!(u8),
            DType::U32 => go!(u32),
            DType::I16 => go!(i16),
            DType::I32 => go!(i32),
            DType::I64 => go!(i64),
            DType::F16 => go!(f16),
            DType::BF16 => go!(bf16),
            DType::F32 => go!(f32),
            DType::F64 => go!(f64),
            other => {
                return Err(DataError::Structure(format!(
                    "tensor `{}` has dtype {other:?}, which has no memory-mapped gather",
                    self.name
                )))
            }
        })
    }
}

/// The tensors of a file-backed dataset: sample `i` is row `i` of each.
#[derive(Debug, Clone)]
pub(crate) struct MappedColumns {
    pub(crate) tensors: Vec<MappedTensor>,
    pub(crate) len: usize,
}

impl MappedColumns {
    /// The tensors' dtypes, in order.
    pub(crate) fn dtypes(&self) -> Vec<DType> {
        self.tensors.iter().map(|t| t.dtype).collect()
    }
    /// The tensors' full shapes (first dimension = `len`), in order.
    pub(crate) fn shapes(&self) -> Vec<&[usize]> {
        self.tensors.iter().map(|t| &t.shape[..]).collect()
    }
    /// Checks that every tensor has a first dimension and that they share it.
    pub(crate) fn new(tensors: Vec<MappedTensor>) -> Result<Self> {
        let Some(first) = tensors.first() else {
            return Err(DataError::EmptyDataset(
                "a memory-mapped dataset needs at least one tensor".into(),
            ));
        };
        for t in &tensors {
            if t.shape.is_empty() {
                return Err(DataError::ShapeMismatch(format!(
                    "tensor `{}` in {} is a scalar; it needs a first (sample) dimension",
                    t.name,
                    t.file.path().display()
                )));
            }
            if t.shape[0] != first.shape[0] {
                return Err(DataError::ShapeMismatch(format!(
                    "tensor `{}` has {} rows but `{}` has {} (shapes {:?} and {:?})",
                    first.name, first.shape[0], t.name, t.shape[0], first.shape, t.shape
                )));
            }
        }
        let len = first.rows();
        Ok(Self { tensors, len })
    }
    pub(crate) fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.len)?;
        let tensors = self
            .tensors
            .iter()
            .map(|t| Ok(t.gather(&[index])?.squeeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Sample::new(tensors))
    }
    pub(crate) fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        if indices.is_empty() {
            return Err(DataError::EmptyDataset(
                "get_batch called with no indices".into(),
            ));
        }
        for &i in indices {
            check_index(i, self.len)?;
        }
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.gather(indices))
            .collect::<Result<Vec<_>>>()?;
        Batch::new(tensors)
    }
}

/// A dtype's size in bytes and the candle dtype it maps to (`None`: no candle
/// equivalent), for the dtype names shared by safetensors and npy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileDType {
    /// Bits per element (sub-byte float formats exist in safetensors).
    pub(crate) bits: u64,
    pub(crate) candle: Option<DType>,
}

impl FileDType {
    /// The bytes `elements` values occupy.
    pub(crate) fn bytes_for(self, elements: u128) -> u128 {
        (elements * self.bits as u128).div_ceil(8)
    }
}

/// The product of `shape`, `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<u128> {
    shape
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
}
