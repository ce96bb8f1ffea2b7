//! Metrics: a running mean, top-1 accuracy, and the [`Metric`] trait for your own.

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

/// A metric accumulated over the batches of an epoch (train or evaluation).
///
/// `update` sees the model output and the targets of each batch;
/// `value` is the epoch's figure so far. `state`/`load_state` let a checkpoint
/// taken mid-epoch restore the running figures (the defaults keep nothing).
pub trait Metric: Send {
    /// The name used in history columns (`train_<name>`, `val_<name>`).
    fn name(&self) -> &str;
    /// Forgets everything (called at the start of each epoch / evaluation).
    fn reset(&mut self);
    /// Adds one batch.
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()>;
    /// The value over the batches seen since the last reset (NaN when none).
    fn value(&self) -> f64;
    /// Whether larger values are better (used by the defaults of callbacks).
    fn higher_is_better(&self) -> bool {
        true
    }
    /// The running state, saved in checkpoints.
    fn state(&self) -> Value {
        Value::Null
    }
    /// Restores what [`Metric::state`] returned.
    fn load_state(&mut self, _state: &Value) {}
}

/// A numerically careful running mean (sum and count in f64).
///
/// ```
/// use minibatch_train::RunningMean;
/// let mut m = RunningMean::default();
/// m.add(1.0, 1);
/// m.add(2.0, 3); // a batch of 3 with mean 2
/// assert_eq!(m.mean(), 1.75);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunningMean {
    sum: f64,
    count: u64,
}

impl RunningMean {
    /// Adds `n` observations whose mean is `mean`.
    pub fn add(&mut self, mean: f64, n: u64) {
        self.sum += mean * n as f64;
        self.count += n;
    }
    /// The mean so far (NaN when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Forgets everything.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
    pub(crate) fn to_json(self) -> Value {
        json!({"sum": self.sum, "count": self.count})
    }
    pub(crate) fn from_json(v: &Value) -> Self {
        Self {
            sum: v.get("sum").and_then(Value::as_f64).unwrap_or(0.0),
            count: v.get("count").and_then(Value::as_u64).unwrap_or(0),
        }
    }
}

/// Top-1 accuracy for classification: `argmax(output, 1) == target`.
///
/// Outputs are `(batch, classes)` logits or probabilities; targets are class
/// indices of any integer dtype (`u32`, `i64`, `u8`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_train::{Accuracy, Metric};
/// let logits = Tensor::new(&[[0.1f32, 0.9], [0.8, 0.2], [0.3, 0.7]], &Device::Cpu)?;
/// let target = Tensor::new(&[1u32, 1, 1], &Device::Cpu)?;
/// let mut acc = Accuracy::default();
/// acc.update(&logits, &target)?;
/// assert!((acc.value() - 2.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Accuracy {
    correct: u64,
    total: u64,
}

impl Accuracy {
    fn update_host(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        let (b, c) = output.dims2()?;
        let logits = output
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let target = target.flatten_all()?;
        let labels: Vec<i64> = match target.dtype() {
            DType::I64 => target.to_vec1::<i64>()?,
            DType::U32 => target
                .to_vec1::<u32>()?
                .into_iter()
                .map(i64::from)
                .collect(),
            DType::U8 => target.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
            _ => target.to_dtype(DType::I64)?.to_vec1::<i64>()?,
        };
        if labels.len() != b || c == 0 {
            return Err(candle_core::Error::Msg(format!(
                "accuracy: {b} outputs of {c} classes but {} targets",
                labels.len()
            )));
        }
        for (row, &label) in logits.chunks_exact(c).zip(&labels) {
            let mut best = 0;
            for (j, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = j;
                }
            }
            self.correct += u64::from(best as i64 == label);
        }
        self.total += b as u64;
        Ok(())
    }
}

impl Metric for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn reset(&mut self) {
        self.correct = 0;
        self.total = 0;
    }
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        if output.device().is_cpu() && output.rank() == 2 {
            // CPU: one pass over the logits in place of five tensor ops
            return self.update_host(output, target);
        }
        let pred = output
            .argmax_keepdim(candle_core::D::Minus1)?
            .flatten_all()?;
        let target = target.flatten_all()?;
        let target = if target.dtype() == DType::U32 {
            target
        } else {
            target.to_dtype(DType::U32)?
        };
        let correct = pred
            .eq(&target)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        self.correct += u64::from(correct);
        self.total += target.elem_count() as u64;
        Ok(())
    }
    fn value(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    fn state(&self) -> Value {
        json!({"correct": self.correct, "total": self.total})
    }
    fn load_state(&mut self, state: &Value) {
        self.correct = state.get("correct").and_then(Value::as_u64).unwrap_or(0);
        self.total = state.get("total").and_then(Value::as_u64).unwrap_or(0);
    }
}

/// Mean absolute error, a regression metric (lower is better).
#[derive(Clone, Copy, Debug, Default)]
pub struct MeanAbsoluteError {
    inner: RunningMean,
}

impl Metric for MeanAbsoluteError {
    fn name(&self) -> &str {
        "mae"
    }
    fn reset(&mut self) {
        self.inner.reset();
    }
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        let target = target.to_dtype(output.dtype())?.reshape(output.shape())?;
        let n = output.elem_count() as u64;
        let mae = (output - target)?
            .abs()?
            .mean_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        self.inner.add(mae, n);
        Ok(())
    }
    fn value(&self) -> f64 {
        self.inner.mean()
    }
    fn higher_is_better(&self) -> bool {
        false
    }
    fn state(&self) -> Value {
        self.inner.to_json()
    }
    fn load_state(&mut self, state: &Value) {
        self.inner = RunningMean::from_json(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accuracy_accumulates_over_batches_and_accepts_i64_targets() {
        let dev = Device::Cpu;
        let mut acc = Accuracy::default();
        assert!(acc.value().is_nan());
        let l = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        acc.update(&l, &Tensor::new(&[0i64, 1], &dev).unwrap())
            .unwrap();
        acc.update(&l, &Tensor::new(&[0u32, 2], &dev).unwrap())
            .unwrap();
        assert_eq!(acc.value(), 0.75);
        let mut other = Accuracy::default();
        other.load_state(&acc.state());
        assert_eq!(other.value(), 0.75);
        acc.reset();
        assert!(acc.value().is_nan());
    }

    #[test]
    fn running_mean_weights_by_count() {
        let mut m = RunningMean::default();
        assert!(m.mean().is_nan());
        m.add(4.0, 1);
        m.add(1.0, 2);
        assert_eq!(m.mean(), 2.0);
        assert_eq!(RunningMean::from_json(&m.to_json()), m);
    }

    #[test]
    fn mae_is_mean_absolute_difference() {
        let dev = Device::Cpu;
        let mut m = MeanAbsoluteError::default();
        let o = Tensor::new(&[[1f32], [3.0]], &dev).unwrap();
        let t = Tensor::new(&[2f32, 0.0], &dev).unwrap();
        m.update(&o, &t).unwrap();
        assert_eq!(m.value(), 2.0);
        assert!(!m.higher_is_better());
    }
}
