//! `SafetensorsDataset`: rows of tensors in a memory-mapped `.safetensors` file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;

use crate::batch::{Batch, Sample};
use crate::dataset::Dataset;
use crate::error::{DataError, FileProblem, Result};
use crate::mmap::{element_count, FileDType, MappedColumns, MappedFile, MappedTensor};

/// The largest header accepted (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// A dataset over named tensors of a `.safetensors` file, memory-mapped
/// (sample `i` is row `i` of each named tensor, like [`TensorDataset`](crate::TensorDataset)).
///
/// Opening reads and validates only the header (`u64` little-endian length,
/// then JSON `{"name": {"dtype", "shape", "data_offsets": [begin, end]}}`):
/// every tensor's byte range must lie inside the file, not overlap another's,
/// and span exactly `product(shape) * size_of(dtype)` bytes. A batch copies its
/// rows from the map straight into the batch tensor's storage (one copy; pages
/// are read on demand and stay in the kernel's page cache), so files larger
/// than RAM work and a shuffled epoch over them keeps the process's
/// anonymous memory at a few batches. Dtypes are kept: u8, bool (as u8), i16,
/// i32, i64, u32, f16, bf16, f32, f64; other dtypes of a *named* tensor are
/// [`FileProblem::UnsupportedDtype`].
///
/// The file must not be modified or truncated while the dataset is open (as
/// with any memory map). PyTorch has no built-in equivalent; the usual
/// substitute is `safetensors.safe_open` inside a map-style `Dataset`, or
/// `numpy.load(mmap_mode="r")`.
///
/// ```
/// use minibatch_data::{Dataset, SafetensorsDataset};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("train.safetensors");
/// // Write a file with candle: x (6, 2) f32, y (6,) u32.
/// let dev = candle_core::Device::Cpu;
/// let x = candle_core::Tensor::arange(0f32, 12., &dev)?.reshape((6, 2))?;
/// let y = candle_core::Tensor::arange(0u32, 6, &dev)?;
/// candle_core::safetensors::save(&[("x", x), ("y", y)].into_iter().collect(), &path)?;
///
/// let ds = SafetensorsDataset::open(&path, &["x", "y"])?;
/// assert_eq!(ds.len(), 6);
/// let (bx, by) = ds.get_batch(&[4, 1])?.into_pair()?;
/// assert_eq!(bx.to_vec2::<f32>()?, vec![vec![8., 9.], vec![2., 3.]]);
/// assert_eq!(by.to_vec1::<u32>()?, vec![4, 1]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SafetensorsDataset {
    columns: MappedColumns,
}

impl SafetensorsDataset {
    /// Maps `path` and selects the tensors `names` (in that order), which must
    /// share their first dimension ([`DataError::ShapeMismatch`] otherwise).
    /// A name not in the file is [`DataError::MissingColumn`]; a malformed
    /// header is [`DataError::InvalidFile`].
    pub fn open(path: impl AsRef<Path>, names: &[&str]) -> Result<Self> {
        let path = path.as_ref();
        let file = MappedFile::open(path)?;
        let header = parse_header(file.bytes()).map_err(|problem| DataError::InvalidFile {
            path: path.to_path_buf(),
            format: "safetensors",
            problem: Box::new(problem),
        })?;
        if names.is_empty() {
            return Err(DataError::EmptyDataset(
                "SafetensorsDataset::open needs at least one tensor name".into(),
            ));
        }
        let mut tensors = Vec::with_capacity(names.len());
        for &name in names {
            let Some(info) = header.tensors.get(name) else {
                return Err(DataError::MissingColumn {
                    path: path.to_path_buf(),
                    what: "tensor",
                    name: name.into(),
                    available: header
                        .tensors
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let Some(dtype) = info.dtype.candle else {
                return Err(DataError::InvalidFile {
                    path: path.to_path_buf(),
                    format: "safetensors",
                    problem: Box::new(FileProblem::UnsupportedDtype {
                        tensor: name.into(),
                        dtype: info.dtype_name.clone(),
                    }),
                });
            };
            tensors.push(MappedTensor {
                file: Arc::clone(&file),
                name: name.into(),
                offset: header.data_start + info.begin,
                dtype,
                shape: info.shape.clone(),
                swap: cfg!(target_endian = "big"),
            });
        }
        Ok(Self {
            columns: MappedColumns::new(tensors)?,
        })
    }
    /// The selected tensors' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.columns
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }
    /// The selected tensors' dtypes, in order.
    pub fn dtypes(&self) -> Vec<DType> {
        self.columns.dtypes()
    }
    /// The selected tensors' full shapes (first dimension = `len()`), in order.
    pub fn shapes(&self) -> Vec<&[usize]> {
        self.columns.shapes()
    }
}

impl Dataset for SafetensorsDataset {
    fn len(&self) -> usize {
        self.columns.len
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.columns.get(index)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.columns.get_batch(indices)
    }
    /// `false`: rows may have to come from disk, so loader workers can overlap
    /// that wait with training (with `num_workers = 0` batches are gathered inline).
    fn is_in_memory(&self) -> bool {
        false
    }
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone)]
struct TensorInfo {
    dtype_name: String,
    dtype: FileDType,
    shape: Vec<usize>,
    begin: usize,
}

/// A validated header: where the data section starts and every tensor in it.
#[derive(Debug)]
struct Header {
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

/// The safetensors dtype names with their sizes and candle equivalents.
fn safetensors_dtype(name: &str) -> Option<FileDType> {
    let (bits, candle) = match name {
        "BOOL" | "U8" => (8, Some(DType::U8)),
        "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => (8, None),
        "I16" => (16, Some(DType::I16)),
        "U16" => (16, None),
        "F16" => (16, Some(DType::F16)),
        "BF16" => (16, Some(DType::BF16)),
        "I32" => (32, Some(DType::I32)),
        "U32" => (32, Some(DType::U32)),
        "F32" => (32, Some(DType::F32)),
        "I64" => (64, Some(DType::I64)),
        "U64" | "C64" => (64, None),
        "F64" => (64, Some(DType::F64)),
        "F4" => (4, None),
        "F6_E2M3" | "F6_E3M2" => (6, None),
        _ => return None,
    };
    Some(FileDType { bits, candle })
}

/// Parses and validates the header of the safetensors file `bytes`.
fn parse_header(bytes: &[u8]) -> std::result::Result<Header, FileProblem> {
    let actual = bytes.len() as u64;
    if actual < 8 {
        return Err(FileProblem::Truncated { needed: 8, actual });
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(FileProblem::Header(format!(
            "header length {n} exceeds the {MAX_HEADER}-byte limit"
        )));
    }
    if 8 + n > actual {
        return Err(FileProblem::Truncated {
            needed: 8 + n,
            actual,
        });
    }
    let data_start = 8 + n as usize;
    let data_len = actual - 8 - n;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| FileProblem::Header(format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(FileProblem::Header(
            "the header is not a JSON object".into(),
        ));
    };
    let mut tensors = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, String)> = Vec::with_capacity(entries.len());
    let mut needed = 0u128;
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| FileProblem::Header(format!("tensor `{name}`: {what}"));
        let dtype_name = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing or non-string \"dtype\""))?
            .to_string();
        let dtype = safetensors_dtype(&dtype_name)
            .ok_or_else(|| bad(&format!("unknown dtype {dtype_name:?}")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing or non-array \"shape\""))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("a dimension of \"shape\" is not a non-negative integer"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("\"data_offsets\" is not two non-negative integers"))?;
        let (begin, end) = offsets;
        if begin > end {
            return Err(FileProblem::OffsetsOutOfRange {
                tensor: name,
                begin,
                end,
                len: data_len,
            });
        }
        let elements =
            element_count(&shape).ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        let expected = dtype.bytes_for(elements);
        if expected != (end - begin) as u128 {
            return Err(FileProblem::SizeMismatch {
                tensor: name,
                dtype: dtype_name,
                shape,
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                actual: end - begin,
            });
        }
        needed = needed.max(end as u128);
        ranges.push((begin, end, name.clone()));
        tensors.insert(
            name,
            TensorInfo {
                dtype_name,
                dtype,
                shape,
                begin: begin as usize,
            },
        );
    }
    if needed > data_len as u128 {
        return Err(FileProblem::Truncated {
            needed: u64::try_from(needed + data_start as u128).unwrap_or(u64::MAX),
            actual,
        });
    }
    // Overlaps: sorted by start, each non-empty range must begin at or after
    // the furthest end seen so far among earlier non-empty ranges.
    ranges.retain(|r| r.0 < r.1);
    ranges.sort();
    let mut furthest: Option<(u64, &str)> = None;
    for (begin, end, name) in &ranges {
        if let Some((f_end, f_name)) = furthest {
            if *begin < f_end {
                return Err(FileProblem::Overlap {
                    first: f_name.to_string(),
                    second: name.clone(),
                });
            }
        }
        if furthest.is_none_or(|(f, _)| *end > f) {
            furthest = Some((*end, name));
        }
    }
    Ok(Header {
        data_start,
        tensors,
    })
}
