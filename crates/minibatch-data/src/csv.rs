//! Numeric CSV tables as a [`TensorDataset`]: features `(N, F)` and a target `(N,)`.
//!
//! The equivalent of `pandas.read_csv` followed by `torch.tensor(df[features].values)`
//! and `TensorDataset(x, y)`, with the checks pandas leaves to you: every cell
//! of a selected column must be a finite number, and a missing or bad cell is
//! an error naming its line and column.
//!
//! ```
//! use minibatch_data::{csv, Dataset};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("t.csv");
//! std::fs::write(&path, "a,b,label,split\n1,2,0,train\n3,4.5,1,test\n5,6,1,train\n")?;
//! let opts = csv::CsvOptions::default()
//!     .target("label")
//!     .target_dtype(candle_core::DType::U32) // class ids
//!     .drop(&["split"])
//!     .rows_where("split", "train");
//! let train = csv::load(&path, &opts)?;
//! assert_eq!(train.len(), 2);
//! let [x, y] = train.tensors() else { unreachable!() };
//! assert_eq!(x.to_vec2::<f32>()?, vec![vec![1., 2.], vec![5., 6.]]);
//! assert_eq!(y.to_vec1::<u32>()?, vec![0, 1]);
//!
//! // A typo'd column name is an error naming it.
//! let err = csv::load(&path, &csv::CsvOptions::default().target("lable")).unwrap_err();
//! assert!(err.to_string().contains("lable"));
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{DataError, FileProblem, Result};
use crate::tensor_dataset::TensorDataset;

/// Which columns [`load`] reads and how (builder style; see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvOptions {
    features: Option<Vec<String>>,
    drop: Vec<String>,
    target: Option<String>,
    feature_dtype: DType,
    target_dtype: DType,
    delimiter: u8,
    rows_where: Vec<(String, String)>,
}

impl Default for CsvOptions {
    /// All columns as f32 features, no target, comma-delimited, every row.
    fn default() -> Self {
        Self {
            features: None,
            drop: Vec::new(),
            target: None,
            feature_dtype: DType::F32,
            target_dtype: DType::F32,
            delimiter: b',',
            rows_where: Vec::new(),
        }
    }
}

impl CsvOptions {
    /// Use exactly these feature columns, in this order (exclusive with [`drop`](Self::drop)).
    pub fn features(mut self, names: &[&str]) -> Self {
        self.features = Some(names.iter().map(|s| s.to_string()).collect());
        self
    }
    /// Use every column except the target and these (exclusive with [`features`](Self::features)).
    pub fn drop(mut self, names: &[&str]) -> Self {
        self.drop = names.iter().map(|s| s.to_string()).collect();
        self
    }
    /// The target column: the dataset's second tensor, `(N,)`. Without one the
    /// dataset holds only the features.
    pub fn target(mut self, name: &str) -> Self {
        self.target = Some(name.to_string());
        self
    }
    /// The features' dtype: `F32` (default), `F64`, `F16` or `BF16`.
    pub fn feature_dtype(mut self, dtype: DType) -> Self {
        self.feature_dtype = dtype;
        self
    }
    /// The target's dtype: `F32` (default, regression), `F64`, or `U32` for
    /// class ids (each cell a non-negative integer, `3` or `3.0`).
    pub fn target_dtype(mut self, dtype: DType) -> Self {
        self.target_dtype = dtype;
        self
    }
    /// The field delimiter (default `b','`; `b'\t'` for TSV).
    pub fn delimiter(mut self, delimiter: u8) -> Self {
        self.delimiter = delimiter;
        self
    }
    /// Keep only rows whose `column` equals `value` (after trimming spaces), e.g.
    /// `rows_where("split", "train")`. Several conditions must all hold. The
    /// column may be one that [`drop`](Self::drop) leaves out of the features.
    pub fn rows_where(mut self, column: &str, value: &str) -> Self {
        self.rows_where
            .push((column.to_string(), value.to_string()));
        self
    }
}

/// Reads the CSV file `path` (with a header row) into a [`TensorDataset`] of
/// features `(N, F)` and, when a target is set, the target `(N,)`, on the CPU
/// (move it with [`TensorDataset::to_device`]).
///
/// Errors: a column named in the options but absent from the header is
/// [`DataError::MissingColumn`]; an empty, non-numeric or non-finite cell of a
/// selected column is [`DataError::BadValue`] with its 1-based line (the
/// header is line 1) and column name; a row with the wrong number of fields is
/// [`DataError::InvalidFile`]; contradictory options are
/// [`DataError::InvalidConfig`]; no selected rows is [`DataError::EmptyDataset`].
pub fn load(path: impl AsRef<Path>, options: &CsvOptions) -> Result<TensorDataset> {
    let path = path.as_ref();
    if options.features.is_some() && !options.drop.is_empty() {
        return Err(DataError::InvalidConfig(
            "CsvOptions: features(..) and drop(..) are exclusive".into(),
        ));
    }
    if !matches!(
        options.feature_dtype,
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    ) {
        return Err(DataError::InvalidConfig(format!(
            "CsvOptions: feature dtype {:?} is not a float dtype",
            options.feature_dtype
        )));
    }
    if !matches!(options.target_dtype, DType::F32 | DType::F64 | DType::U32) {
        return Err(DataError::InvalidConfig(format!(
            "CsvOptions: target dtype {:?} is not F32, F64 or U32",
            options.target_dtype
        )));
    }
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(options.delimiter)
        .trim(::csv::Trim::All)
        .from_reader(std::io::BufReader::new(file));
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(str::to_string)
        .collect();
    let find = |name: &str| -> Result<usize> {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: path.to_path_buf(),
                what: "column",
                name: name.to_string(),
                available: header.join(", "),
            })
    };
    let target = options.target.as_deref().map(find).transpose()?;
    let features: Vec<usize> = match &options.features {
        Some(names) => names.iter().map(|n| find(n)).collect::<Result<_>>()?,
        None => {
            let dropped = options
                .drop
                .iter()
                .map(|n| find(n))
                .collect::<Result<Vec<_>>>()?;
            (0..header.len())
                .filter(|i| Some(*i) != target && !dropped.contains(i))
                .collect()
        }
    };
    if let Some(t) = target {
        if features.contains(&t) {
            return Err(DataError::InvalidConfig(format!(
                "CsvOptions: the target `{}` is also a feature",
                header[t]
            )));
        }
    }
    let filters = options
        .rows_where
        .iter()
        .map(|(c, v)| Ok((find(c)?, v.as_str())))
        .collect::<Result<Vec<_>>>()?;

    let f32_features = options.feature_dtype == DType::F32;
    let mut xs32: Vec<f32> = Vec::new();
    let mut xs64: Vec<f64> = Vec::new();
    let mut ys: Vec<f64> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut rows = 0usize;
    let mut record = ::csv::StringRecord::new();
    while reader
        .read_record(&mut record)
        .map_err(|e| csv_error(path, e))?
    {
        if !filters.iter().all(|&(c, v)| record.get(c) == Some(v)) {
            continue;
        }
        let line = record.position().map_or(0, |p| p.line());
        let bad = |col: usize, problem: String| DataError::BadValue {
            path: path.to_path_buf(),
            row_kind: "line",
            row: line,
            column: header[col].clone(),
            problem,
        };
        let cell = |col: usize| record.get(col).unwrap_or("");
        for &c in &features {
            if f32_features {
                xs32.push(parse_number::<f32>(cell(c)).map_err(|p| bad(c, p))?);
            } else {
                xs64.push(parse_number::<f64>(cell(c)).map_err(|p| bad(c, p))?);
            }
        }
        if let Some(t) = target {
            let v = parse_number::<f64>(cell(t)).map_err(|p| bad(t, p))?;
            if options.target_dtype == DType::U32 {
                if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
                    return Err(bad(
                        t,
                        format!("`{}` is not a class id (a non-negative integer)", cell(t)),
                    ));
                }
                ids.push(v as u32);
            } else if options.target_dtype == DType::F32 {
                // Parse as f32 directly so the value is the nearest f32 to the text.
                ys.push(parse_number::<f32>(cell(t)).map_err(|p| bad(t, p))? as f64);
            } else {
                ys.push(v);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(DataError::EmptyDataset(format!(
            "{} has no data rows{}",
            path.display(),
            if filters.is_empty() {
                String::new()
            } else {
                format!(" matching {:?}", options.rows_where)
            }
        )));
    }
    let dev = &Device::Cpu;
    let f = features.len();
    let x = if f32_features {
        Tensor::from_vec(xs32, (rows, f), dev)?
    } else {
        Tensor::from_vec(xs64, (rows, f), dev)?.to_dtype(options.feature_dtype)?
    };
    let mut tensors = vec![x];
    if target.is_some() {
        tensors.push(match options.target_dtype {
            DType::U32 => Tensor::from_vec(ids, rows, dev)?,
            DType::F32 => {
                Tensor::from_vec(ys.iter().map(|&v| v as f32).collect::<Vec<_>>(), rows, dev)?
            }
            _ => Tensor::from_vec(ys, rows, dev)?,
        });
    }
    TensorDataset::new(tensors)
}

/// Parses one cell; the error text says why it is not a finite number.
fn parse_number<T: std::str::FromStr + Into<f64> + Copy>(
    s: &str,
) -> std::result::Result<T, String> {
    if s.is_empty() {
        return Err("missing value".into());
    }
    let v: T = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.into().is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// A csv-crate error as a [`DataError`], naming the line where it has one.
fn csv_error(path: &Path, e: ::csv::Error) -> DataError {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        ::csv::ErrorKind::Io(source) => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
        kind => {
            let msg = match kind {
                ::csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => format!("{len} fields where the header has {expected_len}"),
                ::csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8: {err}"),
                other => format!("{other:?}"),
            };
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            DataError::InvalidFile {
                path: path.to_path_buf(),
                format: "CSV",
                problem: Box::new(FileProblem::Decode(format!("{at}{msg}"))),
            }
        }
    }
}
