//! `NpyDataset`: rows of memory-mapped `.npy` arrays.

use std::path::Path;

use candle_core::DType;

use crate::batch::{Batch, Sample};
use crate::dataset::Dataset;
use crate::error::{DataError, FileProblem, Result};
use crate::mmap::{element_count, FileDType, MappedColumns, MappedFile, MappedTensor};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A dataset over `.npy` files, one tensor per file, memory-mapped (sample
/// `i` is row `i` of each array), like `numpy.load(path, mmap_mode="r")`
/// wrapped in PyTorch's `TensorDataset`.
///
/// Opening reads only each file's header (format versions 1, 2 and 3: the
/// magic `\x93NUMPY`, a version, a header length, and a Python dict literal
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (N, ...)}`) and checks
/// that the file holds exactly `product(shape) * itemsize` bytes after it.
/// A batch copies its rows from the map straight into the batch tensor
/// (one copy, byte-swapped in place for big-endian `>` arrays).
///
/// Dtypes are kept: `u1`, `b1` (as u8), `i2`, `i4`, `i8`, `u4`, `f2`, `f4`,
/// `f8`; others (`u2`, `u8`, `i1`, complex, strings, structured) are
/// [`FileProblem::UnsupportedDtype`]. Fortran-ordered arrays of more than one
/// dimension are a [`FileProblem::Header`] error (save them with
/// `np.ascontiguousarray`). The files must not change while the dataset is open.
///
/// ```
/// use minibatch_data::{Dataset, NpyDataset};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
/// // x.npy: (3, 2) f32 as numpy writes it; y.npy: (3,) i64 (numpy's default int).
/// let dev = candle_core::Device::Cpu;
/// candle_core::Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?.write_npy(&xp)?;
/// candle_core::Tensor::new(&[7i64, 8, 9], &dev)?.write_npy(&yp)?;
///
/// let ds = NpyDataset::open(&[&xp, &yp])?;
/// assert_eq!(ds.len(), 3);
/// let (x, y) = ds.get_batch(&[2, 0])?.into_pair()?;
/// assert_eq!(x.to_vec2::<f32>()?, vec![vec![5., 6.], vec![1., 2.]]);
/// assert_eq!(y.to_vec1::<i64>()?, vec![9, 7]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct NpyDataset {
    columns: MappedColumns,
}

impl NpyDataset {
    /// Maps each of `paths` (one tensor each, in that order); their first
    /// dimensions must agree ([`DataError::ShapeMismatch`]). A malformed file
    /// is [`DataError::InvalidFile`] naming it.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut tensors = Vec::with_capacity(paths.len());
        for p in paths {
            let path = p.as_ref();
            let file = MappedFile::open(path)?;
            let h = parse_header(file.bytes()).map_err(|problem| DataError::InvalidFile {
                path: path.to_path_buf(),
                format: "npy",
                problem: Box::new(problem),
            })?;
            tensors.push(MappedTensor {
                file,
                name: path.display().to_string(),
                offset: h.data_start,
                dtype: h.dtype,
                shape: h.shape,
                swap: h.big_endian != cfg!(target_endian = "big"),
            });
        }
        Ok(Self {
            columns: MappedColumns::new(tensors)?,
        })
    }
    /// The arrays' dtypes, in order.
    pub fn dtypes(&self) -> Vec<DType> {
        self.columns.dtypes()
    }
    /// The arrays' full shapes (first dimension = `len()`), in order.
    pub fn shapes(&self) -> Vec<&[usize]> {
        self.columns.shapes()
    }
}

impl Dataset for NpyDataset {
    fn len(&self) -> usize {
        self.columns.len
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.columns.get(index)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.columns.get_batch(indices)
    }
    /// `false`: rows may have to come from disk (see [`SafetensorsDataset`](crate::SafetensorsDataset)).
    fn is_in_memory(&self) -> bool {
        false
    }
}

/// A validated npy header.
#[derive(Debug)]
pub(crate) struct NpyHeader {
    pub(crate) data_start: usize,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) big_endian: bool,
}

/// A value of the header's dict literal.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// Parses and validates the npy file `bytes` (header and size).
pub(crate) fn parse_header(bytes: &[u8]) -> std::result::Result<NpyHeader, FileProblem> {
    let actual = bytes.len() as u64;
    if bytes.len() < 10 {
        return Err(FileProblem::Truncated { needed: 10, actual });
    }
    if &bytes[..6] != MAGIC {
        return Err(FileProblem::BadMagic {
            expected: "\\x93NUMPY",
            found: bytes[..6].to_vec(),
        });
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(FileProblem::Truncated { needed: 12, actual });
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(FileProblem::Header(format!(
                "unsupported format version {v}.{}",
                bytes[7]
            )))
        }
    };
    let data_start = start + len;
    if bytes.len() < data_start {
        return Err(FileProblem::Truncated {
            needed: data_start as u64,
            actual,
        });
    }
    let text = std::str::from_utf8(&bytes[start..data_start])
        .map_err(|_| FileProblem::Header("the header is not UTF-8 text".into()))?;
    let dict = parse_dict(text).map_err(FileProblem::Header)?;
    let get = |key: &str| {
        dict.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| FileProblem::Header(format!("no '{key}' key in {text:?}")))
    };
    let Value::Str(descr) = get("descr")? else {
        return Err(FileProblem::Header(
            "'descr' is not a string (structured dtypes are not supported)".into(),
        ));
    };
    let Value::Bool(fortran) = get("fortran_order")? else {
        return Err(FileProblem::Header("'fortran_order' is not a bool".into()));
    };
    let Value::Tuple(dims) = get("shape")? else {
        return Err(FileProblem::Header("'shape' is not a tuple".into()));
    };
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| FileProblem::Header(format!("shape {dims:?} does not fit in memory")))?;
    if *fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(FileProblem::Header(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let unsupported = || FileProblem::UnsupportedDtype {
        tensor: "array".into(),
        dtype: descr.clone(),
    };
    let (Some(order), Some(kind)) = (descr.get(..1), descr.get(1..)) else {
        return Err(FileProblem::Header(format!("bad descr {descr:?}")));
    };
    let big_endian = match order {
        "<" | "|" => false,
        ">" => true,
        "=" => cfg!(target_endian = "big"),
        _ => return Err(FileProblem::Header(format!("bad descr {descr:?}"))),
    };
    let dtype = match kind {
        "u1" | "b1" => DType::U8,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u4" => DType::U32,
        "f2" => DType::F16,
        "f4" => DType::F32,
        "f8" => DType::F64,
        _ => return Err(unsupported()),
    };
    let file_dtype = FileDType {
        bits: 8 * dtype.size_in_bytes() as u64,
        candle: Some(dtype),
    };
    let elements = element_count(&shape)
        .ok_or_else(|| FileProblem::Header(format!("shape {shape:?} overflows")))?;
    let expected = file_dtype.bytes_for(elements);
    let have = (bytes.len() - data_start) as u128;
    if have < expected {
        return Err(FileProblem::Truncated {
            needed: u64::try_from(expected + data_start as u128).unwrap_or(u64::MAX),
            actual,
        });
    }
    if have > expected {
        return Err(FileProblem::TrailingBytes {
            extra: (have - expected) as u64,
        });
    }
    Ok(NpyHeader {
        data_start,
        dtype,
        shape,
        big_endian,
    })
}

/// Parses the Python dict literal of an npy header: string keys; string,
/// `True`/`False` or integer-tuple values.
fn parse_dict(text: &str) -> std::result::Result<Vec<(String, Value)>, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        if p.eat(b'}') {
            break;
        }
        let Value::Str(key) = p.value()? else {
            return Err(format!("dict keys must be strings in {text:?}"));
        };
        p.expect(b':')?;
        let v = p.value()?;
        out.push((key, v));
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at byte {} of the header",
                c as char, self.i
            ))
        }
    }
    fn value(&mut self) -> std::result::Result<Value, String> {
        self.skip_ws();
        match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => {
                let start = self.i + 1;
                let len = self.s[start..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or("unterminated string in the header")?;
                self.i = start + len + 1;
                Ok(Value::Str(
                    String::from_utf8_lossy(&self.s[start..start + len]).into_owned(),
                ))
            }
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    self.skip_ws();
                    let start = self.i;
                    while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                        self.i += 1;
                    }
                    let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                    let d = digits
                        .parse::<u64>()
                        .map_err(|_| format!("bad dimension at byte {start} of the header"))?;
                    // Python writes a trailing `L` for longs in old files.
                    self.eat(b'L');
                    dims.push(d);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(Value::Tuple(dims))
            }
            _ => {
                for (word, v) in [("True", true), ("False", false)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(Value::Bool(v));
                    }
                }
                Err(format!("unexpected value at byte {} of the header", self.i))
            }
        }
    }
}
