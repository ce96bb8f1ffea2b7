//! The MNIST handwritten digits, from the four IDX files.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{DataError, Result};
use crate::idx::{read_idx_file, IdxArray, IdxData};
use crate::tensor_dataset::TensorDataset;

/// The MNIST training-set pixel mean (of pixels scaled to `[0, 1]`), as used by the PyTorch examples.
pub const MEAN: f32 = 0.1307;
/// The MNIST training-set pixel standard deviation, as used by the PyTorch examples.
pub const STD: f32 = 0.3081;

/// How [`load_with`] shapes and scales the images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MnistOptions {
    /// After scaling to `[0, 1]`, apply `(x - MEAN) / STD` (torchvision's
    /// `Normalize((0.1307,), (0.3081,))`). Default: false.
    pub normalize: bool,
    /// Images as `(N, 784)` when true (default), `(N, 1, 28, 28)` when false.
    pub flatten: bool,
}

impl Default for MnistOptions {
    fn default() -> Self {
        Self {
            normalize: false,
            flatten: true,
        }
    }
}

impl MnistOptions {
    /// The default options with normalisation switched on or off.
    pub fn normalized(mut self, on: bool) -> Self {
        self.normalize = on;
        self
    }
    /// The default options with flattening switched on or off.
    pub fn flattened(mut self, on: bool) -> Self {
        self.flatten = on;
        self
    }
}

/// Loads `(train, test)` from `dir`: images `(N, 784)` f32 in `[0, 1]` and
/// labels `(N,)` u32, on `device`. Same as [`load_with`] with default options.
///
/// ```no_run
/// let (train, test) = minibatch_data::mnist::load("data/mnist", &candle_core::Device::Cpu).unwrap();
/// ```
pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(TensorDataset, TensorDataset)> {
    load_with(dir, &MnistOptions::default(), device)
}

/// Loads `(train, test)` from `dir` with `options`.
///
/// Each file is looked up as `train-images-idx3-ubyte` (and the `.idx3-ubyte`
/// spelling), with or without `.gz`, in `dir`, `dir/raw` and `dir/MNIST/raw`.
/// A missing directory or file is [`DataError::MissingData`] listing the paths
/// tried; malformed files are [`DataError::InvalidIdx`].
pub fn load_with(
    dir: impl AsRef<Path>,
    options: &MnistOptions,
    device: &Device,
) -> Result<(TensorDataset, TensorDataset)> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(DataError::MissingData {
            what: "directory".into(),
            looked_in: dir.display().to_string(),
        });
    }
    let train = load_split(dir, "train", options, device)?;
    let test = load_split(dir, "t10k", options, device)?;
    Ok((train, test))
}

fn load_split(
    dir: &Path,
    split: &str,
    options: &MnistOptions,
    device: &Device,
) -> Result<TensorDataset> {
    let images = read_idx_file(find(dir, &format!("{split}-images"), "idx3-ubyte")?)?;
    let labels = read_idx_file(find(dir, &format!("{split}-labels"), "idx1-ubyte")?)?;
    let (n, rows, cols, pixels) = match (images.dims(), images.data()) {
        ([n, r, c], IdxData::U8(p)) => (*n, *r, *c, p),
        (d, _) => {
            return Err(DataError::InvalidIdx(format!(
                "{split} images: expected a u8 array of 3 dimensions, got {:?} {d:?}",
                images.dtype()
            )))
        }
    };
    let label_values = labels_u32(&labels, split)?;
    if label_values.len() != n {
        return Err(DataError::ShapeMismatch(format!(
            "{split}: {n} images but {} labels",
            label_values.len()
        )));
    }
    let (scale, shift) = if options.normalize {
        (1.0 / (255.0 * STD), -MEAN / STD)
    } else {
        (1.0 / 255.0, 0.0)
    };
    let lut: Vec<f32> = (0..=255u8).map(|p| p as f32 * scale + shift).collect();
    let data: Vec<f32> = pixels.iter().map(|&p| lut[p as usize]).collect();
    let x = if options.flatten {
        Tensor::from_vec(data, (n, rows * cols), device)?
    } else {
        Tensor::from_vec(data, (n, 1, rows, cols), device)?
    };
    let y = Tensor::from_vec(label_values, n, device)?;
    TensorDataset::new(vec![x, y])
}

fn labels_u32(labels: &IdxArray, split: &str) -> Result<Vec<u32>> {
    match (labels.dims(), labels.data()) {
        ([_], IdxData::U8(v)) => Ok(v.iter().map(|&l| l as u32).collect()),
        (d, _) => Err(DataError::InvalidIdx(format!(
            "{split} labels: expected a u8 array of 1 dimension, got {:?} {d:?}",
            labels.dtype()
        ))),
    }
}

fn find(dir: &Path, stem: &str, kind: &str) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for sub in [
        dir.to_path_buf(),
        dir.join("raw"),
        dir.join("MNIST").join("raw"),
    ] {
        for sep in ["-", "."] {
            for ext in [".gz", ""] {
                let p = sub.join(format!("{stem}{sep}{kind}{ext}"));
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(p.display().to_string());
            }
        }
    }
    Err(DataError::MissingData {
        what: format!("file {stem}-{kind}[.gz]"),
        looked_in: tried.join(", "),
    })
}
