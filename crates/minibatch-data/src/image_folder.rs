//! `ImageFolder`: labelled images in `root/<class>/*.{png,jpg,jpeg}`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;

use crate::batch::{Batch, Sample};
use crate::dataset::{check_index, Dataset};
use crate::error::{DataError, Result};
use crate::rng::{below, derive_rng, unit_f64};

/// What [`ImageFolder`] does with an image it cannot decode (or that is
/// smaller than a crop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageErrorPolicy {
    /// The batch is an [`DataError::Image`] naming the file (default).
    #[default]
    Fail,
    /// The image is left out of its batch (which is one sample shorter) and its
    /// path recorded in [`ImageFolder::skipped`]. A batch whose images all
    /// fail is still an error: there is nothing to return.
    Skip,
}

/// The decoding and transforms of [`ImageFolder`], applied in this order
/// (torchvision's usual `Compose`): decode, convert to RGB (or grayscale),
/// [`resize`](Self::resize), [`center_crop`](Self::center_crop),
/// [`random_crop`](Self::random_crop), [`hflip`](Self::hflip), scale to
/// `[0, 1]`, [`normalize`](Self::normalize); output `(C, H, W)` f32.
///
/// The random ones draw from `rng::derive_rng(seed, epoch, index)` (crop
/// top, crop left, then the flip coin), so an image's augmentation depends
/// only on the seed, the epoch and its index: not on worker count, batch
/// composition or resume point.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    resize: Option<(u32, u32)>,
    center_crop: Option<u32>,
    random_crop: Option<u32>,
    hflip: f64,
    normalize: Option<(Vec<f32>, Vec<f32>)>,
    grayscale: bool,
    seed: u64,
    on_error: ImageErrorPolicy,
}

impl Default for ImageOptions {
    /// RGB, no resize, crop, flip or normalisation, seed 0, [`ImageErrorPolicy::Fail`].
    fn default() -> Self {
        Self {
            resize: None,
            center_crop: None,
            random_crop: None,
            hflip: 0.0,
            normalize: None,
            grayscale: false,
            seed: 0,
            on_error: ImageErrorPolicy::Fail,
        }
    }
}

impl ImageOptions {
    /// Resize every image to `height x width` with a triangle (bilinear,
    /// antialiased when shrinking) filter: torchvision's `Resize((h, w))`.
    pub fn resize(mut self, height: u32, width: u32) -> Self {
        self.resize = Some((height, width));
        self
    }
    /// Keep the central `size x size` square (`CenterCrop(size)`).
    pub fn center_crop(mut self, size: u32) -> Self {
        self.center_crop = Some(size);
        self
    }
    /// Keep a random `size x size` square (`RandomCrop(size)`).
    pub fn random_crop(mut self, size: u32) -> Self {
        self.random_crop = Some(size);
        self
    }
    /// Flip horizontally with probability `p` (`RandomHorizontalFlip(p)`).
    pub fn hflip(mut self, p: f64) -> Self {
        self.hflip = p;
        self
    }
    /// `(x - mean[c]) / std[c]` per channel after scaling to `[0, 1]`
    /// (`Normalize(mean, std)`); one value each for grayscale, three for RGB.
    pub fn normalize(mut self, mean: &[f32], std: &[f32]) -> Self {
        self.normalize = Some((mean.to_vec(), std.to_vec()));
        self
    }
    /// One luma channel instead of three RGB channels (`Grayscale()`).
    pub fn grayscale(mut self, on: bool) -> Self {
        self.grayscale = on;
        self
    }
    /// The seed of the random crop and flip (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// What to do with an unreadable image (default [`ImageErrorPolicy::Fail`]).
    pub fn on_error(mut self, policy: ImageErrorPolicy) -> Self {
        self.on_error = policy;
        self
    }
    fn channels(&self) -> usize {
        if self.grayscale {
            1
        } else {
            3
        }
    }
    /// Checks the options against each other; `Err` names the problem.
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::InvalidConfig(format!("ImageOptions: {m}")));
        if !(0.0..=1.0).contains(&self.hflip) {
            return bad(format!("hflip probability {} is not in [0, 1]", self.hflip));
        }
        if matches!(self.resize, Some((0, _) | (_, 0)))
            || self.center_crop == Some(0)
            || self.random_crop == Some(0)
        {
            return bad("resize and crop sizes must be at least 1".into());
        }
        if let Some((mean, std)) = &self.normalize {
            let c = self.channels();
            if mean.len() != c || std.len() != c {
                return bad(format!(
                    "normalize needs {c} means and stds, got {} and {}",
                    mean.len(),
                    std.len()
                ));
            }
            if std.iter().any(|&s| !(s.is_finite() && s > 0.0))
                || mean.iter().any(|m| !m.is_finite())
            {
                return bad(format!(
                    "normalize std must be finite and > 0, mean finite: {mean:?}, {std:?}"
                ));
            }
        }
        Ok(())
    }
}

/// Image classification data laid out as torchvision's `ImageFolder` and
/// burn's `ImageFolderDataset` expect: `root/<class>/**/*.{png,jpg,jpeg}`
/// (extensions in any case). Classes are the sub-directories of `root` in
/// sorted order, class `k` having label `k`; files are sorted by path.
///
/// Opening only lists the files. Images are decoded (pure-Rust PNG and JPEG
/// decoders of the `image` crate) and transformed when a batch is built, and
/// since the dataset is not in memory ([`Dataset::is_in_memory`] is false),
/// a loader with `num_workers(n)` builds `n` batches at once on its worker
/// threads, in the same order as with no workers. Sample `i` is the image
/// `(C, H, W)` f32 and its label (a `u32` scalar); a batch is `(B, C, H, W)`
/// and `(B,)`. Images of different sizes only batch after a
/// [`resize`](ImageOptions::resize) or a crop.
///
/// ```
/// use minibatch_data::{DataLoader, Dataset, ImageFolder, ImageOptions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// // root/cat/0.png, root/cat/1.png, root/dog/0.png: 40x40 RGB.
/// for (class, n) in [("cat", 2), ("dog", 1)] {
///     std::fs::create_dir(dir.path().join(class))?;
///     for i in 0..n {
///         image::RgbImage::from_pixel(40, 40, image::Rgb([200, 100, 0]))
///             .save(dir.path().join(class).join(format!("{i}.png")))?;
///     }
/// }
/// let opts = ImageOptions::default().resize(32, 32).random_crop(28).hflip(0.5).seed(1);
/// let ds = ImageFolder::open(dir.path(), opts)?;
/// assert_eq!(ds.classes(), ["cat", "dog"]);
/// let loader = DataLoader::builder(ds).batch_size(2).shuffle(0).num_workers(2).build()?;
/// for batch in loader.epoch(0) {
///     let (x, y) = batch?.into_pair()?;
///     assert_eq!(&x.dims()[1..], &[3, 28, 28]);
///     assert_eq!(x.dims()[0], y.dims()[0]);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, u32)>,
    options: ImageOptions,
    /// Per-channel lookup table: byte value -> scaled and normalised f32.
    lut: Vec<[f32; 256]>,
    skipped: Mutex<Vec<PathBuf>>,
}

impl ImageFolder {
    /// Lists `root/<class>/**` for images. A missing or unreadable directory
    /// is [`DataError::Io`]; no class directory, or a class without images, is
    /// [`DataError::EmptyDataset`]; inconsistent options are [`DataError::InvalidConfig`].
    pub fn open(root: impl AsRef<Path>, options: ImageOptions) -> Result<Self> {
        let root = root.as_ref();
        options.validate()?;
        let mut classes: Vec<String> = read_dir_sorted(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(DataError::EmptyDataset(format!(
                "{} has no class sub-directories",
                root.display()
            )));
        }
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut files = Vec::new();
            collect_images(&root.join(class), &mut files)?;
            if files.is_empty() {
                return Err(DataError::EmptyDataset(format!(
                    "class directory {} holds no .png/.jpg/.jpeg file",
                    root.join(class).display()
                )));
            }
            files.sort();
            samples.extend(files.into_iter().map(|f| (f, label as u32)));
        }
        let c = options.channels();
        let lut = (0..c)
            .map(|ch| {
                let (m, s) = options
                    .normalize
                    .as_ref()
                    .map_or((0.0, 1.0), |(m, s)| (m[ch], s[ch]));
                std::array::from_fn(|p| (p as f32 / 255.0 - m) / s)
            })
            .collect();
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
            options,
            lut,
            skipped: Mutex::new(Vec::new()),
        })
    }
    /// The class names (sub-directories of the root), sorted; label `k` is `classes()[k]`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// Every image's path and label, in dataset order.
    pub fn samples(&self) -> &[(PathBuf, u32)] {
        &self.samples
    }
    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The options the dataset was opened with.
    pub fn options(&self) -> &ImageOptions {
        &self.options
    }
    /// Images left out of batches so far under [`ImageErrorPolicy::Skip`] (each time it failed).
    pub fn skipped(&self) -> Vec<PathBuf> {
        self.skipped.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Decodes and transforms image `index` for `epoch`, appending its
    /// `(C, H, W)` values to `out`; returns `(H, W)`.
    fn load_into(&self, index: usize, epoch: u64, out: &mut Vec<f32>) -> Result<(usize, usize)> {
        let path = &self.samples[index].0;
        let err = |reason: String| DataError::Image {
            path: path.clone(),
            reason,
        };
        let img = image::ImageReader::open(path)
            .map_err(|e| err(e.to_string()))?
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))?
            .decode()
            .map_err(|e| err(e.to_string()))?;
        let o = &self.options;
        let c = o.channels();
        let (mut w, mut h, mut raw) = if o.grayscale {
            let g = img.to_luma8();
            (g.width(), g.height(), g.into_raw())
        } else {
            let g = img.to_rgb8();
            (g.width(), g.height(), g.into_raw())
        };
        if let Some((rh, rw)) = o.resize {
            if (rh, rw) != (h, w) {
                raw = if o.grayscale {
                    let g = image::GrayImage::from_raw(w, h, raw).expect("buffer size");
                    image::imageops::resize(&g, rw, rh, FilterType::Triangle).into_raw()
                } else {
                    let g = image::RgbImage::from_raw(w, h, raw).expect("buffer size");
                    image::imageops::resize(&g, rw, rh, FilterType::Triangle).into_raw()
                };
                (w, h) = (rw, rh);
            }
        }
        // The window (top, left, height, width) of the resized image to keep.
        let (mut top, mut left, mut ch, mut cw) = (0u32, 0u32, h, w);
        let crop_err = |size: u32| err(format!("is {w}x{h}, smaller than the {size}x{size} crop"));
        if let Some(s) = o.center_crop {
            if s > ch || s > cw {
                return Err(crop_err(s));
            }
            // torchvision rounds the offsets: int(round((h - s) / 2.0)).
            top += ((ch - s) as f64 / 2.0).round_ties_even() as u32;
            left += ((cw - s) as f64 / 2.0).round_ties_even() as u32;
            (ch, cw) = (s, s);
        }
        let mut rng = derive_rng(o.seed, epoch, index as u64);
        if let Some(s) = o.random_crop {
            if s > ch || s > cw {
                return Err(crop_err(s));
            }
            top += below(&mut rng, (ch - s + 1) as u64) as u32;
            left += below(&mut rng, (cw - s + 1) as u64) as u32;
            (ch, cw) = (s, s);
        }
        let flip = o.hflip > 0.0 && unit_f64(&mut rng) < o.hflip;
        let (w, top, left, ch, cw) = (
            w as usize,
            top as usize,
            left as usize,
            ch as usize,
            cw as usize,
        );
        out.reserve(c * ch * cw);
        for (k, lut) in self.lut.iter().enumerate() {
            for y in top..top + ch {
                let row = &raw[(y * w + left) * c..(y * w + left + cw) * c];
                if flip {
                    out.extend(row.chunks_exact(c).rev().map(|px| lut[px[k] as usize]));
                } else {
                    out.extend(row.chunks_exact(c).map(|px| lut[px[k] as usize]));
                }
            }
        }
        Ok((ch, cw))
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.get_in_epoch(index, 0)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.get_batch_in_epoch(indices, 0)
    }
    /// Image `index` with the augmentation of `epoch`. Under [`ImageErrorPolicy::Skip`]
    /// a single unreadable image is still an error (there is no sample to return).
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        check_index(index, self.len())?;
        let mut v = Vec::new();
        let (h, w) = self.load_into(index, epoch, &mut v)?;
        let c = self.options.channels();
        Ok(Sample::pair(
            Tensor::from_vec(v, (c, h, w), &Device::Cpu)?,
            Tensor::new(self.samples[index].1, &Device::Cpu)?,
        ))
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        if indices.is_empty() {
            return Err(DataError::EmptyDataset(
                "get_batch called with no indices".into(),
            ));
        }
        for &i in indices {
            check_index(i, self.len())?;
        }
        let c = self.options.channels();
        let mut pixels = Vec::new();
        let mut labels = Vec::with_capacity(indices.len());
        let mut size: Option<(usize, usize, usize)> = None; // (h, w, first index)
        let mut first_err = None;
        for &i in indices {
            let before = pixels.len();
            match self.load_into(i, epoch, &mut pixels) {
                Ok((h, w)) => {
                    match size {
                        None => {
                            pixels.reserve(indices.len() * c * h * w);
                            size = Some((h, w, i));
                        }
                        Some((h0, w0, i0)) if (h0, w0) != (h, w) => {
                            return Err(DataError::ShapeMismatch(format!(
                                "{} decodes to {h}x{w} but {} to {h0}x{w0}; add ImageOptions::resize or a crop",
                                self.samples[i].0.display(),
                                self.samples[i0].0.display()
                            )))
                        }
                        _ => {}
                    }
                    labels.push(self.samples[i].1);
                }
                Err(e) if self.options.on_error == ImageErrorPolicy::Skip => {
                    pixels.truncate(before);
                    if let Ok(mut s) = self.skipped.lock() {
                        s.push(self.samples[i].0.clone());
                    }
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((h, w, _)) = size else {
            return Err(first_err.expect("no image decoded, so one failed"));
        };
        let n = labels.len();
        let x = Tensor::from_vec(pixels, (n, c, h, w), &Device::Cpu)?;
        let y = Tensor::from_vec(labels, n, &Device::Cpu)?;
        Batch::new(vec![x, y])
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?;
    out.sort();
    Ok(out)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in read_dir_sorted(dir)? {
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}
