use super::Sampler;
use crate::error::{DataError, Result};
use crate::rng::{derive_rng, unit_f64};

/// Draws indices with probability proportional to `weights` (PyTorch's
/// `WeightedRandomSampler`).
///
/// With replacement each draw is an inverse-CDF lookup of a uniform float.
/// Without replacement it is the Efraimidis-Spirakis scheme: every index with
/// positive weight gets the key `ln(u) / w` and the `num_samples` largest keys
/// are taken, in descending key order.
///
/// ```
/// use minibatch_data::{Sampler, WeightedRandomSampler};
/// let s = WeightedRandomSampler::new(vec![0.0, 1.0, 3.0], 100, true, 9).unwrap();
/// assert!(s.indices(0).iter().all(|&i| i != 0));
/// assert!(WeightedRandomSampler::new(vec![-1.0], 1, true, 9).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct WeightedRandomSampler {
    weights: Vec<f64>,
    cumulative: Vec<f64>,
    num_samples: usize,
    replacement: bool,
    seed: u64,
}

impl WeightedRandomSampler {
    /// `num_samples` draws per epoch from `0..weights.len()`.
    ///
    /// Negative, NaN or infinite weights, all-zero weights, or (without
    /// replacement) more samples than positive weights are
    /// [`DataError::InvalidWeights`]; `num_samples == 0` is [`DataError::InvalidConfig`].
    pub fn new(
        weights: Vec<f64>,
        num_samples: usize,
        replacement: bool,
        seed: u64,
    ) -> Result<Self> {
        if num_samples == 0 {
            return Err(DataError::InvalidConfig(
                "WeightedRandomSampler needs num_samples >= 1".into(),
            ));
        }
        if let Some((i, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !w.is_finite() || **w < 0.0)
        {
            return Err(DataError::InvalidWeights(format!(
                "weight {i} is {w}; weights must be finite and non-negative"
            )));
        }
        let positive = weights.iter().filter(|w| **w > 0.0).count();
        if positive == 0 {
            return Err(DataError::InvalidWeights(format!(
                "all {} weights are zero (or there are none)",
                weights.len()
            )));
        }
        if !replacement && num_samples > positive {
            return Err(DataError::InvalidWeights(format!(
                "cannot draw {num_samples} samples without replacement: only {positive} weights are positive"
            )));
        }
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Ok(Self {
            weights,
            cumulative,
            num_samples,
            replacement,
            seed,
        })
    }
}

impl Sampler for WeightedRandomSampler {
    fn len(&self) -> usize {
        self.num_samples
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut rng = derive_rng(self.seed, epoch, 0);
        if self.replacement {
            let total = *self.cumulative.last().expect("weights checked non-empty");
            let last = self.weights.len() - 1;
            (0..self.num_samples)
                .map(|_| {
                    let u = unit_f64(&mut rng) * total;
                    // First index whose cumulative weight exceeds u (never a zero-weight one).
                    self.cumulative.partition_point(|&c| c <= u).min(last)
                })
                .map(|mut i| {
                    // Guard against rounding landing on a trailing zero weight.
                    while self.weights[i] == 0.0 && i > 0 {
                        i -= 1;
                    }
                    i
                })
                .collect()
        } else {
            let mut keyed: Vec<(f64, usize)> = self
                .weights
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let u = unit_f64(&mut rng);
                    let key = if w > 0.0 {
                        (1.0 - u).ln() / w
                    } else {
                        f64::NEG_INFINITY
                    };
                    (key, i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            keyed.truncate(self.num_samples);
            keyed.into_iter().map(|(_, i)| i).collect()
        }
    }
}
