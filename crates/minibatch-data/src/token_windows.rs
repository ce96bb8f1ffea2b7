//! `TokenWindows`: language-model training windows over a flat token file.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::batch::{Batch, Sample};
use crate::dataset::{check_index, Dataset};
use crate::error::{DataError, FileProblem, Result};
use crate::mmap::MappedFile;
use crate::rng::{below, derive_rng};

/// The integer type of the tokens in a flat token file (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenDType {
    /// 2-byte tokens (vocabularies up to 65,536: GPT-2's 50,257 as nanoGPT writes them).
    U16,
    /// 4-byte tokens (larger vocabularies).
    U32,
}

impl TokenDType {
    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

/// The stream of [`derive_rng`] that draws a [`TokenWindows`] epoch offset
/// (per-sample augmentation uses the sample index as stream, so this one is
/// the far end of the range).
pub const OFFSET_STREAM: u64 = u64::MAX;

/// Next-token-prediction windows over a memory-mapped flat token file: the
/// nanoGPT / llama2.c `.bin` layout (`np.array(ids, dtype=np.uint16).tofile(path)`).
///
/// With `b = block_size` and `n` tokens, the dataset has `(n - 1) / b`
/// items; item `i` is `x = tokens[i*b .. i*b + b]` and `y = tokens[i*b + 1 ..
/// i*b + b + 1]` (the same window shifted by one), both `u32` of shape `(b,)`,
/// so a batch is `(B, b)` inputs and `(B, b)` targets. Windows do not overlap,
/// so a shuffled epoch sees every token once.
///
/// With [`epoch_offsets`](TokenWindows::epoch_offsets) every window of epoch
/// `e` starts `o(e)` tokens later, `o(e) = below(derive_rng(seed, e,
/// OFFSET_STREAM), b)` in `[0, b)` (see [`rng`](crate::rng)): window
/// boundaries move between epochs, so the model does not always see the same
/// token at position 0, while each epoch stays a pure function of
/// `(seed, epoch)`. The length then becomes `(n - b) / b`, leaving room for
/// the largest offset. nanoGPT draws independent random starts instead
/// (`torch.randint(len(data) - block_size, (batch_size,))`), which repeats
/// and skips tokens within an epoch; this keeps epochs exact.
///
/// ```
/// use minibatch_data::{Dataset, TokenDType, TokenWindows};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("train.bin");
/// // Tokens 0, 1, ..., 9 as little-endian u16.
/// let bytes: Vec<u8> = (0u16..10).flat_map(|t| t.to_le_bytes()).collect();
/// std::fs::write(&path, bytes)?;
///
/// let lm = TokenWindows::open(&path, TokenDType::U16, 4)?;
/// assert_eq!(lm.len(), 2); // (10 - 1) / 4
/// let (x, y) = lm.get(1)?.into_pair()?;
/// assert_eq!(x.to_vec1::<u32>()?, vec![4, 5, 6, 7]);
/// assert_eq!(y.to_vec1::<u32>()?, vec![5, 6, 7, 8]);
///
/// // Boundaries that move with the epoch: offset o in 0..4, same every run.
/// let lm = lm.epoch_offsets(7)?;
/// assert_eq!(lm.len(), 1); // (10 - 4) / 4
/// let (x, _) = lm.get_in_epoch(0, 3)?.into_pair()?;
/// let o = lm.offset(3) as u32;
/// assert_eq!(x.to_vec1::<u32>()?, vec![o, o + 1, o + 2, o + 3]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TokenWindows {
    file: Arc<MappedFile>,
    dtype: TokenDType,
    block_size: usize,
    n_tokens: usize,
    offset_seed: Option<u64>,
    len: usize,
}

impl TokenWindows {
    /// Maps the token file `path`. `block_size` 0 is
    /// [`DataError::InvalidConfig`]; a byte count that is not a multiple of
    /// the token size is [`DataError::InvalidFile`]; a file of fewer than
    /// `block_size + 1` tokens is [`DataError::EmptyDataset`].
    pub fn open(path: impl AsRef<Path>, dtype: TokenDType, block_size: usize) -> Result<Self> {
        let path = path.as_ref();
        if block_size == 0 {
            return Err(DataError::InvalidConfig(
                "TokenWindows block_size must be at least 1".into(),
            ));
        }
        let file = MappedFile::open(path)?;
        let bytes = file.bytes().len();
        if bytes % dtype.size() != 0 {
            return Err(DataError::InvalidFile {
                path: path.to_path_buf(),
                format: "token",
                problem: Box::new(FileProblem::TrailingBytes {
                    extra: (bytes % dtype.size()) as u64,
                }),
            });
        }
        let n_tokens = bytes / dtype.size();
        let len = n_tokens.saturating_sub(1) / block_size;
        if len == 0 {
            return Err(DataError::EmptyDataset(format!(
                "{} holds {n_tokens} {dtype:?} tokens; one window of block_size {block_size} needs {}",
                path.display(),
                block_size + 1
            )));
        }
        Ok(Self {
            file,
            dtype,
            block_size,
            n_tokens,
            offset_seed: None,
            len,
        })
    }
    /// Shifts every window of epoch `e` by `offset(e)` tokens, drawn from
    /// `(seed, e)` (see the type's docs). Fewer than `2 * block_size` tokens is
    /// [`DataError::EmptyDataset`].
    pub fn epoch_offsets(mut self, seed: u64) -> Result<Self> {
        let len = (self.n_tokens - self.block_size) / self.block_size;
        if len == 0 {
            return Err(DataError::EmptyDataset(format!(
                "{}: {} tokens leave no window of block_size {} with epoch offsets (need {})",
                self.file.path().display(),
                self.n_tokens,
                self.block_size,
                2 * self.block_size
            )));
        }
        self.offset_seed = Some(seed);
        self.len = len;
        Ok(self)
    }
    /// The first token of window 0 in `epoch` (0 without epoch offsets).
    pub fn offset(&self, epoch: u64) -> usize {
        match self.offset_seed {
            Some(seed) => below(
                &mut derive_rng(seed, epoch, OFFSET_STREAM),
                self.block_size as u64,
            ) as usize,
            None => 0,
        }
    }
    /// Tokens per window.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Tokens in the file.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    /// The token type.
    pub fn dtype(&self) -> TokenDType {
        self.dtype
    }

    /// Appends window `i` of `epoch` (range-checked) to `x` and `y`.
    fn push_window(&self, i: usize, offset: usize, x: &mut Vec<u32>, y: &mut Vec<u32>) {
        let b = self.block_size;
        let s = self.dtype.size();
        let start = (offset + i * b) * s;
        let win = &self.file.bytes()[start..start + (b + 1) * s];
        match self.dtype {
            TokenDType::U16 => {
                let tok = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]) as u32;
                x.extend(win[..b * s].chunks_exact(2).map(tok));
                y.extend(win[s..].chunks_exact(2).map(tok));
            }
            TokenDType::U32 => {
                let tok = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                x.extend(win[..b * s].chunks_exact(4).map(tok));
                y.extend(win[s..].chunks_exact(4).map(tok));
            }
        }
    }
}

impl Dataset for TokenWindows {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.get_in_epoch(index, 0)
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.get_batch_in_epoch(indices, 0)
    }
    fn get_in_epoch(&self, index: usize, epoch: u64) -> Result<Sample> {
        let (x, y) = self.get_batch_in_epoch(&[index], epoch)?.into_pair()?;
        Ok(Sample::pair(x.squeeze(0)?, y.squeeze(0)?))
    }
    fn get_batch_in_epoch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        if indices.is_empty() {
            return Err(DataError::EmptyDataset(
                "get_batch called with no indices".into(),
            ));
        }
        for &i in indices {
            check_index(i, self.len)?;
        }
        let b = self.block_size;
        let offset = self.offset(epoch);
        let mut x = Vec::with_capacity(indices.len() * b);
        let mut y = Vec::with_capacity(indices.len() * b);
        for &i in indices {
            self.push_window(i, offset, &mut x, &mut y);
        }
        let n = indices.len();
        let x = Tensor::from_vec(x, (n, b), &Device::Cpu)?;
        let y = Tensor::from_vec(y, (n, b), &Device::Cpu)?;
        Batch::new(vec![x, y])
    }
    /// `false`: windows may have to come from disk, so loader workers can
    /// overlap that with training.
    fn is_in_memory(&self) -> bool {
        false
    }
}
