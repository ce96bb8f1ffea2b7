//! A reader for the IDX format (the format MNIST ships in).
//!
//! Layout: a 4-byte magic `0, 0, type, ndim`; `ndim` big-endian `u32`
//! dimensions; then the elements, big-endian, row-major. Type codes: `0x08`
//! u8, `0x09` i8, `0x0B` i16, `0x0C` i32, `0x0D` f32, `0x0E` f64.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// The element type of an IDX file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxType {
    /// Type code 0x08.
    U8,
    /// Type code 0x09.
    I8,
    /// Type code 0x0B.
    I16,
    /// Type code 0x0C.
    I32,
    /// Type code 0x0D.
    F32,
    /// Type code 0x0E.
    F64,
}

impl IdxType {
    /// The type for an IDX type code, if it is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x08 => Self::U8,
            0x09 => Self::I8,
            0x0B => Self::I16,
            0x0C => Self::I32,
            0x0D => Self::F32,
            0x0E => Self::F64,
            _ => return None,
        })
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// The elements of an IDX file, decoded to native values.
#[derive(Debug, Clone, PartialEq)]
pub enum IdxData {
    /// Unsigned bytes.
    U8(Vec<u8>),
    /// Signed bytes.
    I8(Vec<i8>),
    /// 16-bit integers.
    I16(Vec<i16>),
    /// 32-bit integers.
    I32(Vec<i32>),
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
}

/// A decoded IDX array: its dimensions and row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    dims: Vec<usize>,
    data: IdxData,
}

impl IdxArray {
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
    /// The elements.
    pub fn data(&self) -> &IdxData {
        &self.data
    }
    /// The elements, by value.
    pub fn into_data(self) -> IdxData {
        self.data
    }
    /// The element type.
    pub fn dtype(&self) -> IdxType {
        match self.data {
            IdxData::U8(_) => IdxType::U8,
            IdxData::I8(_) => IdxType::I8,
            IdxData::I16(_) => IdxType::I16,
            IdxData::I32(_) => IdxType::I32,
            IdxData::F32(_) => IdxType::F32,
            IdxData::F64(_) => IdxType::F64,
        }
    }
    /// The number of elements (the product of the dimensions).
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product()
    }
    /// The elements converted to `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I16(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::F32(v) => v.clone(),
            IdxData::F64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// Decodes an IDX file held in memory.
///
/// A magic that does not start with two zero bytes, an unknown type code,
/// a byte count that does not match the dimensions (truncated or trailing
/// data) or dimensions whose product overflows are [`DataError::InvalidIdx`].
///
/// ```
/// use minibatch_data::idx::{read_idx, IdxData};
/// let bytes = [0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6];
/// let a = read_idx(&bytes).unwrap();
/// assert_eq!(a.dims(), &[2, 3]);
/// assert_eq!(a.data(), &IdxData::U8(vec![1, 2, 3, 4, 5, 6]));
/// assert!(read_idx(&bytes[..10]).is_err());
/// ```
pub fn read_idx(bytes: &[u8]) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(DataError::InvalidIdx(format!(
            "{} bytes is too short for the 4-byte magic",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::InvalidIdx(format!(
            "wrong magic {:02x} {:02x} {:02x} {:02x}: an IDX file starts with 00 00 <type> <ndim> (is the file still gzipped?)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    let dtype = IdxType::from_code(bytes[2]).ok_or_else(|| {
        DataError::InvalidIdx(format!("unknown element type code 0x{:02x}", bytes[2]))
    })?;
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(DataError::InvalidIdx(format!(
            "truncated header: {ndim} dimensions need {header} bytes, got {}",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::InvalidIdx(format!("dimensions {dims:?} overflow")))?;
    let expected = count
        .checked_mul(dtype.size())
        .and_then(|b| b.checked_add(header))
        .ok_or_else(|| DataError::InvalidIdx(format!("dimensions {dims:?} overflow")))?;
    if bytes.len() != expected {
        return Err(DataError::InvalidIdx(format!(
            "dimensions {dims:?} of {dtype:?} need {expected} bytes but the data has {} ({})",
            bytes.len(),
            if bytes.len() < expected {
                "truncated"
            } else {
                "trailing bytes"
            }
        )));
    }
    let body = &bytes[header..];
    let data = match dtype {
        IdxType::U8 => IdxData::U8(body.to_vec()),
        IdxType::I8 => IdxData::I8(body.iter().map(|&b| b as i8).collect()),
        IdxType::I16 => IdxData::I16(
            body.chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        IdxType::I32 => IdxData::I32(
            body.chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F32 => IdxData::F32(
            body.chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F64 => IdxData::F64(
            body.chunks_exact(8)
                .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    };
    Ok(IdxArray { dims, data })
}

/// Reads and decodes an IDX file, gunzipping it first when it starts with
/// the gzip magic (`1f 8b`), whatever its name.
pub fn read_idx_file(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        read_idx(&out)
    } else {
        read_idx(&raw)
    }
}
