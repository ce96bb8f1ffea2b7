//! `random_split`: disjoint random subsets.

use std::sync::Arc;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::rng::permutation;
use crate::subset::Subset;

/// How to size the parts of a [`random_split`].
#[derive(Debug, Clone, Copy)]
pub enum SplitSizes<'a> {
    /// Exact lengths, which must sum to the dataset length.
    Lengths(&'a [usize]),
    /// Fractions in `[0, 1]` summing to 1 (within 1e-6). As in PyTorch, each part
    /// gets `floor(fraction * len)` samples and the remainder is dealt one at a
    /// time to the parts in order.
    Fractions(&'a [f64]),
}

impl<'a> From<&'a [usize]> for SplitSizes<'a> {
    fn from(v: &'a [usize]) -> Self {
        SplitSizes::Lengths(v)
    }
}
impl<'a, const N: usize> From<&'a [usize; N]> for SplitSizes<'a> {
    fn from(v: &'a [usize; N]) -> Self {
        SplitSizes::Lengths(v)
    }
}
impl<'a> From<&'a [f64]> for SplitSizes<'a> {
    fn from(v: &'a [f64]) -> Self {
        SplitSizes::Fractions(v)
    }
}
impl<'a, const N: usize> From<&'a [f64; N]> for SplitSizes<'a> {
    fn from(v: &'a [f64; N]) -> Self {
        SplitSizes::Fractions(v)
    }
}

/// Splits `ds` into disjoint random [`Subset`]s (PyTorch's `random_split`).
/// The shuffle is [`permutation`]`(len, seed, 0)`; part `k` takes the next
/// `len_k` indices of it.
///
/// Lengths not summing to the dataset length, fractions outside `[0, 1]` or not
/// summing to 1, and an empty size list are [`DataError::InvalidSplit`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{random_split, Dataset, TensorDataset};
/// let ds = TensorDataset::new(vec![Tensor::arange(0u32, 10, &Device::Cpu).unwrap()]).unwrap();
/// let parts = random_split(ds, &[0.8, 0.2], 7).unwrap();
/// assert_eq!((parts[0].len(), parts[1].len()), (8, 2));
/// assert!(random_split(parts[0].clone(), &[0.5, 0.6], 7).is_err());
/// ```
pub fn random_split<'a, D: Dataset + 'static>(
    ds: D,
    sizes: impl Into<SplitSizes<'a>>,
    seed: u64,
) -> Result<Vec<Subset>> {
    let n = ds.len();
    let lengths = split_lengths(n, sizes.into())?;
    let perm = permutation(n, seed, 0);
    let inner: Arc<dyn Dataset> = Arc::new(ds);
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for len in lengths {
        out.push(Subset::from_arc(
            inner.clone(),
            perm[start..start + len].to_vec(),
        )?);
        start += len;
    }
    Ok(out)
}

/// The part lengths [`random_split`] uses for a dataset of `n` samples.
pub fn split_lengths(n: usize, sizes: SplitSizes<'_>) -> Result<Vec<usize>> {
    match sizes {
        SplitSizes::Lengths(l) => {
            if l.is_empty() {
                return Err(DataError::InvalidSplit("no lengths given".into()));
            }
            let sum: usize = l.iter().sum();
            if sum != n {
                return Err(DataError::InvalidSplit(format!(
                    "lengths {l:?} sum to {sum} but the dataset has {n} samples"
                )));
            }
            Ok(l.to_vec())
        }
        SplitSizes::Fractions(f) => {
            if f.is_empty() {
                return Err(DataError::InvalidSplit("no fractions given".into()));
            }
            if let Some(bad) = f.iter().find(|x| !(0.0..=1.0).contains(*x)) {
                return Err(DataError::InvalidSplit(format!(
                    "fraction {bad} is not in [0, 1] (fractions {f:?})"
                )));
            }
            let sum: f64 = f.iter().sum();
            if (sum - 1.0).abs() > 1e-6 {
                return Err(DataError::InvalidSplit(format!(
                    "fractions {f:?} sum to {sum}, not 1"
                )));
            }
            let mut l: Vec<usize> = f.iter().map(|x| (x * n as f64).floor() as usize).collect();
            let mut rem = n - l.iter().sum::<usize>().min(n);
            let k = l.len();
            let mut i = 0;
            while rem > 0 {
                l[i % k] += 1;
                rem -= 1;
                i += 1;
            }
            Ok(l)
        }
    }
}
