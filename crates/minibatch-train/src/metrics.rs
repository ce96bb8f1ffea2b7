//! Metrics: a running mean, top-1 accuracy, and the [`Metric`] trait for your own.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};

/// Parses a metric or callback state saved by `state()`, as a typed error.
pub(crate) fn parse_state<T: serde::de::DeserializeOwned>(what: &str, state: &Value) -> Result<T> {
    T::deserialize(state).map_err(|e| TrainError::json(format!("the saved state of {what}"), e))
}

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A metric accumulated over the batches of an epoch (train or evaluation).
///
/// `update` sees the model output and the targets of each batch (what the
/// training step returns for the metrics, see
/// [`StepOutput`](crate::StepOutput)); `value` is the epoch's figure so far.
/// `state`/`load_state` let a checkpoint taken mid-epoch restore the running
/// figures (the defaults keep nothing).
///
/// Whether a larger value is better is not the metric's to say: monitors
/// ([`EarlyStopping`](crate::EarlyStopping),
/// [`save_best`](crate::TrainerBuilder::save_best)) take an explicit
/// [`Mode`](crate::Mode).
pub trait Metric: Send {
    /// The name used in history columns (`train_<name>`, `val_<name>`).
    fn name(&self) -> &str;
    /// Forgets everything (called at the start of each epoch / evaluation).
    fn reset(&mut self);
    /// Adds one batch.
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()>;
    /// The value over the batches seen since the last reset (NaN when none).
    fn value(&self) -> f64;
    /// The running state, saved in checkpoints.
    fn state(&self) -> Value {
        Value::Null
    }
    /// Restores what [`Metric::state`] returned; a state of the wrong form is
    /// an error (the trainer reports it as a corrupt checkpoint).
    fn load_state(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default)]
pub struct Accuracy {
    correct: u64,
    total: u64,
    /// Off the CPU: the count of correct predictions not read back yet (a
    /// `u32` scalar on the device) and how many samples it covers.
    pending: Option<Tensor>,
    pending_total: u64,
}

#[derive(Serialize, Deserialize)]
struct AccuracyState {
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

    /// The tensor path (other devices, outputs of rank other than 2): the
    /// count stays on the device until [`Metric::value`] or
    /// [`Metric::state`] reads it, so training does not wait for the device
    /// at every batch.
    fn update_device(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        let pred = output
            .argmax_keepdim(candle_core::D::Minus1)?
            .flatten_all()?;
        let target = target.flatten_all()?;
        if pred.elem_count() != target.elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "accuracy: {} predictions (outputs {:?}) but {} targets",
                pred.elem_count(),
                output.dims(),
                target.elem_count()
            )));
        }
        let target = if target.dtype() == DType::U32 {
            target
        } else {
            target.to_dtype(DType::U32)?
        };
        let correct = pred.eq(&target)?.to_dtype(DType::U32)?.sum_all()?;
        self.pending = Some(match self.pending.take() {
            None => correct,
            Some(p) => (p + correct)?,
        });
        self.pending_total += target.elem_count() as u64;
        self.total += target.elem_count() as u64;
        if self.pending_total >= 1 << 31 {
            // keep the u32 sum far from overflowing
            self.correct += self.read_pending()?;
            self.pending = None;
            self.pending_total = 0;
        }
        Ok(())
    }

    fn read_pending(&self) -> candle_core::Result<u64> {
        match &self.pending {
            None => Ok(0),
            Some(p) => Ok(u64::from(p.to_scalar::<u32>()?)),
        }
    }

    /// Correct predictions so far (reads the device count, if any).
    fn correct_now(&self) -> u64 {
        // A failed read of a device scalar leaves only the host count; it
        // cannot happen for a tensor this metric made itself.
        self.correct + self.read_pending().unwrap_or(0)
    }
}

impl Metric for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        if output.device().is_cpu() && output.rank() == 2 {
            // CPU: one pass over the logits in place of five tensor ops
            return self.update_host(output, target);
        }
        self.update_device(output, target)
    }
    fn value(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.correct_now() as f64 / self.total as f64
        }
    }
    fn state(&self) -> Value {
        to_value(AccuracyState {
            correct: self.correct_now(),
            total: self.total,
        })
    }
    fn load_state(&mut self, state: &Value) -> Result<()> {
        let s: AccuracyState = parse_state("accuracy", state)?;
        *self = Self {
            correct: s.correct,
            total: s.total,
            ..Self::default()
        };
        Ok(())
    }
}

/// Mean absolute error, a regression metric (lower is better).
#[derive(Clone, Debug, Default)]
pub struct MeanAbsoluteError {
    inner: RunningMean,
    /// Off the CPU: `Σ batch mean × batch size` not read back yet (an `f64`
    /// scalar on the device) and the samples it covers.
    pending: Option<(Tensor, u64)>,
}

impl MeanAbsoluteError {
    fn now(&self) -> RunningMean {
        let mut m = self.inner;
        if let Some((sum, n)) = &self.pending {
            // added as one observation of mean sum/n and count n
            let sum = sum.to_scalar::<f64>().unwrap_or(f64::NAN);
            m.add(sum / *n as f64, *n);
        }
        m
    }
}

impl Metric for MeanAbsoluteError {
    fn name(&self) -> &str {
        "mae"
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        let target = target.to_dtype(output.dtype())?.reshape(output.shape())?;
        let n = output.elem_count() as u64;
        let mae = (output - target)?.abs()?.mean_all()?.to_dtype(DType::F64)?;
        if output.device().is_cpu() {
            self.inner.add(mae.to_scalar::<f64>()?, n);
            return Ok(());
        }
        self.add_on_device(&mae, n)
    }
    fn value(&self) -> f64 {
        self.now().mean()
    }
    fn state(&self) -> Value {
        to_value(self.now())
    }
    fn load_state(&mut self, state: &Value) -> Result<()> {
        *self = Self {
            inner: parse_state("mae", state)?,
            pending: None,
        };
        Ok(())
    }
}

impl MeanAbsoluteError {
    /// Off the CPU: adds a batch's mean (an `f64` device scalar) of `n`
    /// samples without reading it back.
    fn add_on_device(&mut self, mae: &Tensor, n: u64) -> candle_core::Result<()> {
        let weighted = mae.affine(n as f64, 0.0)?;
        self.pending = Some(match self.pending.take() {
            None => (weighted, n),
            Some((s, m)) => ((s + weighted)?, m + n),
        });
        Ok(())
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
        other.load_state(&acc.state()).unwrap();
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
        let back: RunningMean = serde_json::from_value(serde_json::to_value(m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn mae_is_mean_absolute_difference() {
        let dev = Device::Cpu;
        let mut m = MeanAbsoluteError::default();
        let o = Tensor::new(&[[1f32], [3.0]], &dev).unwrap();
        let t = Tensor::new(&[2f32, 0.0], &dev).unwrap();
        m.update(&o, &t).unwrap();
        assert_eq!(m.value(), 2.0);
        // the device path, forced on the CPU: batch means 2 (2 samples) and
        // 0.5 (4 samples) kept on the device, read at value()/state()
        let mut d = MeanAbsoluteError::default();
        for (mae, n) in [(2.0f64, 2u64), (0.5, 4)] {
            d.add_on_device(&Tensor::new(mae, &dev).unwrap(), n)
                .unwrap();
        }
        assert_eq!(d.value(), 1.0);
        let mut back = MeanAbsoluteError::default();
        back.load_state(&d.state()).unwrap();
        assert_eq!(back.value(), d.value());
        assert!(back.load_state(&Value::from(3)).is_err());
    }
}
