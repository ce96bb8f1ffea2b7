//! Parquet files (how Hugging Face datasets ship) as tensors, one row group at
//! a time. Needs the `parquet` cargo feature.
//!
//! Built on the `parquet` crate's low-level column readers (no Arrow), with
//! its pure-Rust snappy codec: files written by pyarrow/pandas/`datasets` with
//! their default compression (snappy) or none read as they are; other codecs
//! (zstd, gzip, brotli, lz4) are a [`DataError::InvalidFile`] naming the codec.
//!
//! Columns map to tensors by physical type: `BOOLEAN` → u8, `INT32` → i32
//! (u32 when annotated unsigned), `INT64` → i64, `FLOAT` → f32, `DOUBLE` → f64,
//! each `(rows,)`; a list column whose rows all have `k` elements becomes
//! `(rows, k)` (embeddings, fixed-length token ids). A null is a
//! [`DataError::BadValue`] naming its row and column; strings, binary and
//! nested lists are [`FileProblem::UnsupportedDtype`].
//!
//! Memory: [`ParquetFile::row_groups`] decodes one row group at a time (the
//! unit a writer flushes, typically 10^4–10^6 rows), so a file larger than RAM
//! can be streamed; [`load`] gathers every row group into one in-memory
//! [`TensorDataset`].
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use minibatch_data::parquet::{self, ParquetFile};
//! use minibatch_data::Dataset;
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("t.parquet");
//! # {
//! #     use ::parquet::{data_type::*, file::writer::SerializedFileWriter, schema::parser::parse_message_type};
//! #     let schema = std::sync::Arc::new(parse_message_type("message m { REQUIRED FLOAT x; REQUIRED INT64 label; }")?);
//! #     let mut w = SerializedFileWriter::new(std::fs::File::create(&path)?, schema, Default::default())?;
//! #     for rg in 0..2 {
//! #         let mut g = w.next_row_group()?;
//! #         let mut c = g.next_column()?.unwrap();
//! #         c.typed::<FloatType>().write_batch(&[rg as f32, 0.5], None, None)?;
//! #         c.close()?;
//! #         let mut c = g.next_column()?.unwrap();
//! #         c.typed::<Int64Type>().write_batch(&[1, 2], None, None)?;
//! #         c.close()?;
//! #         g.close()?;
//! #     }
//! #     w.close()?;
//! # }
//! // t.parquet: columns x (FLOAT) and label (INT64), two row groups of two rows.
//! let file = ParquetFile::open(&path)?;
//! assert_eq!((file.num_rows(), file.num_row_groups()), (4, 2));
//! for group in file.row_groups(&["x", "label"]) {
//!     let tensors = group?; // [x (2,) f32, label (2,) i64]: one row group in memory
//!     assert_eq!(tensors[0].dims(), &[2]);
//! }
//! let ds = parquet::load(&path, &["x", "label"])?; // the whole file
//! assert_eq!(ds.len(), 4);
//! assert_eq!(ds.tensors()[1].to_vec1::<i64>()?, vec![1, 2, 1, 2]);
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use ::parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use ::parquet::column::reader::{get_typed_column_reader, ColumnReader};
use ::parquet::data_type::{BoolType, DataType, DoubleType, FloatType, Int32Type, Int64Type};
use ::parquet::file::reader::{FileReader, RowGroupReader};
use ::parquet::file::serialized_reader::SerializedFileReader;
use ::parquet::schema::types::ColumnDescPtr;
use candle_core::{Device, Tensor};

use crate::error::{DataError, FileProblem, Result};
use crate::tensor_dataset::TensorDataset;

/// An open parquet file: its footer (schema, row groups) is read, its data is not.
pub struct ParquetFile {
    path: PathBuf,
    reader: SerializedFileReader<File>,
}

impl ParquetFile {
    /// Opens `path` and reads its footer. A file that is not parquet (bad
    /// magic, truncated, corrupt footer) is [`DataError::InvalidFile`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = guard(path, || {
            SerializedFileReader::new(file).map_err(|e| invalid(path, e))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
        })
    }
    /// Rows in the file.
    pub fn num_rows(&self) -> usize {
        self.reader.metadata().file_metadata().num_rows().max(0) as usize
    }
    /// Row groups in the file.
    pub fn num_row_groups(&self) -> usize {
        self.reader.num_row_groups()
    }
    /// The leaf columns' dotted paths (`label`, `embedding.list.element`).
    pub fn columns(&self) -> Vec<String> {
        self.schema_columns()
            .iter()
            .map(|c| c.path().string())
            .collect()
    }
    fn schema_columns(&self) -> Vec<ColumnDescPtr> {
        self.reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .columns()
            .to_vec()
    }
    /// The leaf column index of `name`: its full dotted path, or its top-level
    /// field name when that has a single leaf (a list column).
    fn find(&self, name: &str) -> Result<usize> {
        let cols = self.schema_columns();
        if let Some(i) = cols.iter().position(|c| c.path().string() == name) {
            return Ok(i);
        }
        let top: Vec<usize> = (0..cols.len())
            .filter(|&i| cols[i].path().parts().first().map(String::as_str) == Some(name))
            .collect();
        match top[..] {
            [i] => Ok(i),
            _ => Err(DataError::MissingColumn {
                path: self.path.clone(),
                what: "column",
                name: name.into(),
                available: self.columns().join(", "),
            }),
        }
    }
    /// Row group `index` as one tensor per column of `columns`, in order.
    pub fn read_row_group(&self, index: usize, columns: &[&str]) -> Result<Vec<Tensor>> {
        if index >= self.num_row_groups() {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.num_row_groups(),
            });
        }
        let ids = columns
            .iter()
            .map(|c| self.find(c))
            .collect::<Result<Vec<_>>>()?;
        guard(&self.path, || {
            let group = self
                .reader
                .get_row_group(index)
                .map_err(|e| invalid(&self.path, e))?;
            let first_row: i64 = (0..index)
                .map(|g| self.reader.metadata().row_group(g).num_rows())
                .sum();
            ids.iter()
                .map(|&i| self.read_column(&*group, i, first_row.max(0) as u64))
                .collect()
        })
    }
    /// The row groups in order, each as [`read_row_group`](Self::read_row_group)
    /// returns it; only one is decoded at a time.
    pub fn row_groups<'a>(
        &'a self,
        columns: &'a [&'a str],
    ) -> impl Iterator<Item = Result<Vec<Tensor>>> + 'a {
        (0..self.num_row_groups()).map(move |g| self.read_row_group(g, columns))
    }
    /// Every row of `columns` as a [`TensorDataset`] (row groups concatenated).
    pub fn load(&self, columns: &[&str]) -> Result<TensorDataset> {
        if columns.is_empty() {
            return Err(DataError::EmptyDataset(
                "parquet load needs at least one column".into(),
            ));
        }
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); columns.len()];
        for group in self.row_groups(columns) {
            for (p, t) in parts.iter_mut().zip(group?) {
                p.push(t);
            }
        }
        if parts[0].is_empty() {
            return Err(DataError::EmptyDataset(format!(
                "{} has no row groups",
                self.path.display()
            )));
        }
        let tensors = parts
            .iter()
            .map(|p| Tensor::cat(p, 0))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| match e {
                // Lists of different lengths in different row groups.
                candle_core::Error::ShapeMismatchCat { .. } => DataError::ShapeMismatch(format!(
                    "{}: a list column's length differs between row groups: {e}",
                    self.path.display()
                )),
                e => e.into(),
            })?;
        TensorDataset::new(tensors)
    }

    fn read_column(&self, group: &dyn RowGroupReader, i: usize, first_row: u64) -> Result<Tensor> {
        let descr = group.metadata().column(i).column_descr_ptr();
        let name = descr.path().string();
        let rows = group.metadata().num_rows().max(0) as usize;
        let unsupported = |what: String| DataError::InvalidFile {
            path: self.path.clone(),
            format: "parquet",
            problem: Box::new(FileProblem::UnsupportedDtype {
                tensor: name.clone(),
                dtype: what,
            }),
        };
        if descr.max_rep_level() > 1 {
            return Err(unsupported("nested list".into()));
        }
        let reader = group
            .get_column_reader(i)
            .map_err(|e| invalid(&self.path, e))?;
        let unsigned = matches!(
            descr.logical_type_ref(),
            Some(LogicalType::Integer(int)) if !int.is_signed
        ) || matches!(
            descr.converted_type(),
            ConvertedType::UINT_8 | ConvertedType::UINT_16 | ConvertedType::UINT_32
        );
        let cx = Column {
            path: &self.path,
            name: &name,
            descr: &descr,
            rows,
            first_row,
        };
        match (descr.physical_type(), reader) {
            (PhysicalType::BOOLEAN, r) => {
                cx.read::<BoolType, u8>(get_typed_column_reader(r), |b| b as u8)
            }
            (PhysicalType::INT32, r) if unsigned => {
                cx.read::<Int32Type, u32>(get_typed_column_reader(r), |v| v as u32)
            }
            (PhysicalType::INT32, r) => {
                cx.read::<Int32Type, i32>(get_typed_column_reader(r), |v| v)
            }
            (PhysicalType::INT64, r) => {
                cx.read::<Int64Type, i64>(get_typed_column_reader(r), |v| v)
            }
            (PhysicalType::FLOAT, r) => {
                cx.read::<FloatType, f32>(get_typed_column_reader(r), |v| v)
            }
            (PhysicalType::DOUBLE, r) => {
                cx.read::<DoubleType, f64>(get_typed_column_reader(r), |v| v)
            }
            (t, ColumnReader::ByteArrayColumnReader(_)) => {
                Err(unsupported(format!("{t} (strings or bytes)")))
            }
            (t, _) => Err(unsupported(t.to_string())),
        }
    }
}

impl std::fmt::Debug for ParquetFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetFile")
            .field("path", &self.path)
            .field("num_rows", &self.num_rows())
            .field("num_row_groups", &self.num_row_groups())
            .finish()
    }
}

/// Reads `columns` of the parquet file `path` into a [`TensorDataset`] (see the module docs).
pub fn load(path: impl AsRef<Path>, columns: &[&str]) -> Result<TensorDataset> {
    ParquetFile::open(path)?.load(columns)
}

/// Runs a parquet-crate call, turning a panic inside the decoder (possible on
/// corrupt data) into [`DataError::InvalidFile`] instead of unwinding into the caller.
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(DataError::InvalidFile {
            path: path.to_path_buf(),
            format: "parquet",
            problem: Box::new(FileProblem::Decode(
                "the parquet decoder panicked on this file (corrupt data)".into(),
            )),
        })
    })
}

fn invalid(path: &Path, e: ::parquet::errors::ParquetError) -> DataError {
    DataError::InvalidFile {
        path: path.to_path_buf(),
        format: "parquet",
        problem: Box::new(FileProblem::Decode(e.to_string())),
    }
}

/// One column chunk being decoded.
struct Column<'a> {
    path: &'a Path,
    name: &'a str,
    descr: &'a ColumnDescPtr,
    rows: usize,
    first_row: u64,
}

impl Column<'_> {
    fn read<T, O>(
        &self,
        mut reader: ::parquet::column::reader::ColumnReaderImpl<T>,
        convert: impl Fn(T::T) -> O,
    ) -> Result<Tensor>
    where
        T: DataType,
        O: candle_core::WithDType,
    {
        let max_def = self.descr.max_def_level();
        let repeated = self.descr.max_rep_level() > 0;
        let mut values: Vec<T::T> = Vec::with_capacity(self.rows);
        let mut defs: Vec<i16> = Vec::new();
        let mut reps: Vec<i16> = Vec::new();
        let mut records = 0;
        while records < self.rows {
            let (r, _, _) = reader
                .read_records(
                    self.rows - records,
                    (max_def > 0).then_some(&mut defs),
                    repeated.then_some(&mut reps),
                    &mut values,
                )
                .map_err(|e| invalid(self.path, e))?;
            if r == 0 {
                return Err(DataError::InvalidFile {
                    path: self.path.to_path_buf(),
                    format: "parquet",
                    problem: Box::new(FileProblem::Truncated {
                        needed: self.rows as u64,
                        actual: records as u64,
                    }),
                });
            }
            records += r;
        }
        // Row of each level (a new row starts at repetition level 0).
        let row_of = |level: usize| -> u64 {
            if repeated {
                reps[..=level].iter().filter(|&&r| r == 0).count() as u64 - 1
            } else {
                level as u64
            }
        };
        if max_def > 0 {
            if let Some(level) = defs.iter().position(|&d| d < max_def) {
                return Err(DataError::BadValue {
                    path: self.path.to_path_buf(),
                    row_kind: "row",
                    row: self.first_row + row_of(level),
                    column: self.name.to_string(),
                    problem: if repeated {
                        "null or empty list".into()
                    } else {
                        "missing value (null)".into()
                    },
                });
            }
        }
        let data: Vec<O> = values.into_iter().map(convert).collect();
        let dev = &Device::Cpu;
        if !repeated {
            return Ok(Tensor::from_vec(data, self.rows, dev)?);
        }
        // Every row must hold the same number of elements.
        let starts: Vec<usize> = (0..reps.len()).filter(|&l| reps[l] == 0).collect();
        let width = starts.get(1).copied().unwrap_or(reps.len());
        for (row, w) in starts.windows(2).enumerate() {
            if w[1] - w[0] != width {
                return Err(DataError::ShapeMismatch(format!(
                    "{}: list column `{}` has {width} elements in row {} but {} in row {}",
                    self.path.display(),
                    self.name,
                    self.first_row,
                    w[1] - w[0],
                    self.first_row + row as u64
                )));
            }
        }
        if let Some(&last) = starts.last() {
            if reps.len() - last != width {
                return Err(DataError::ShapeMismatch(format!(
                    "{}: list column `{}` has {width} elements in row {} but {} in row {}",
                    self.path.display(),
                    self.name,
                    self.first_row,
                    reps.len() - last,
                    self.first_row + starts.len() as u64 - 1
                )));
            }
        }
        Ok(Tensor::from_vec(data, (self.rows, width), dev)?)
    }
}
