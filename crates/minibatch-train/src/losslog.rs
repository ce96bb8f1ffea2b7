//! The step losses on their way from the device to the history.
//!
//! Each micro-batch's loss is kept as a detached `f64` scalar on its device.
//! [`LossLog::read`] brings every pending one to the host in one transfer,
//! checks that they are finite and folds them into the epoch's running mean;
//! [`LossLog::take_ready`] then hands out the [`StepRecord`]s of the
//! optimizer steps whose micro-batch losses are all known.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::error::{Result, TrainError};
use crate::history::StepRecord;
use crate::metrics::RunningMean;
use crate::step::read_scalars;

/// Where a micro-batch was: for the error of a non-finite loss.
#[derive(Clone, Copy, Debug)]
struct At {
    step: u64,
    epoch: u64,
    batch: u64,
    samples: u64,
}

#[derive(Default)]
pub(crate) struct LossLog {
    /// Losses not read yet (device scalars) and where they came from.
    unread: Vec<Tensor>,
    unread_at: Vec<At>,
    /// Read losses of micro-batches whose step is not handed out yet.
    values: VecDeque<f64>,
    /// Finished optimizer steps (loss still unknown) and their micro-batch count.
    steps: VecDeque<(StepRecord, usize)>,
    /// Micro-batches pushed since the last finished step.
    open: usize,
}

impl LossLog {
    /// Adds a micro-batch loss (a detached `f64` scalar) of `samples` samples.
    pub fn push(&mut self, loss: Tensor, samples: u64, step: u64, epoch: u64, batch: u64) {
        self.unread.push(loss);
        self.unread_at.push(At {
            step,
            epoch,
            batch,
            samples,
        });
        self.open += 1;
    }

    /// Marks the end of an optimizer step made of the micro-batches pushed
    /// since the previous one; `record.loss` is filled in when they are read.
    pub fn end_step(&mut self, record: StepRecord) {
        self.steps.push_back((record, self.open));
        self.open = 0;
    }

    /// Reads every pending loss in one transfer, adds each to `epoch_loss`
    /// (weighted by its samples). A non-finite loss is a
    /// [`TrainError::NonFiniteLoss`] naming the first one.
    pub fn read(&mut self, epoch_loss: &mut RunningMean) -> Result<()> {
        if self.unread.is_empty() {
            return Ok(());
        }
        let values = read_scalars(&self.unread)?;
        for (&v, at) in values.iter().zip(&self.unread_at) {
            if !v.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: at.step,
                    epoch: at.epoch,
                    batch: at.batch,
                    value: v,
                });
            }
        }
        for (&v, at) in values.iter().zip(&self.unread_at) {
            epoch_loss.add(v, at.samples);
        }
        self.values.extend(values);
        self.unread.clear();
        self.unread_at.clear();
        Ok(())
    }

    /// Hands out, in order, the records of the finished steps whose losses
    /// are all read; a step's loss is the mean of its micro-batch losses.
    pub fn take_ready(&mut self, mut f: impl FnMut(StepRecord) -> Result<()>) -> Result<()> {
        while let Some((_, n)) = self.steps.front() {
            if *n > self.values.len() {
                break;
            }
            let (mut record, n) = self.steps.pop_front().expect("checked above");
            let mut mean = RunningMean::default();
            for v in self.values.drain(..n) {
                mean.add(v, 1);
            }
            record.loss = mean.mean();
            f(record)?;
        }
        Ok(())
    }

    /// Forgets everything (after loading a checkpoint).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(v: f64) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn ready(log: &mut LossLog) -> Vec<StepRecord> {
        let mut out = Vec::new();
        log.take_ready(|r| {
            out.push(r);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn steps_come_out_in_order_with_the_mean_of_their_micro_batches() {
        let mut log = LossLog::default();
        let mut epoch = RunningMean::default();
        log.push(scalar(1.0), 2, 0, 0, 0);
        log.push(scalar(3.0), 2, 0, 0, 1);
        log.end_step(StepRecord {
            step: 0,
            batch: 1,
            ..Default::default()
        });
        log.push(scalar(5.0), 1, 1, 0, 2);
        assert!(ready(&mut log).is_empty(), "nothing read yet");
        log.read(&mut epoch).unwrap();
        let out = ready(&mut log);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].step, out[0].loss), (0, 2.0));
        // the open step's loss is read but the step not finished
        assert!(ready(&mut log).is_empty());
        log.end_step(StepRecord {
            step: 1,
            ..Default::default()
        });
        let out = ready(&mut log);
        assert_eq!((out[0].step, out[0].loss), (1, 5.0));
        assert_eq!(epoch.mean(), (2.0 + 6.0 + 5.0) / 5.0);
    }

    #[test]
    fn a_non_finite_loss_names_its_micro_batch() {
        let mut log = LossLog::default();
        log.push(scalar(1.0), 1, 3, 1, 4);
        log.push(scalar(f64::NAN), 1, 4, 1, 5);
        let err = log.read(&mut RunningMean::default()).unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::NonFiniteLoss {
                    step: 4,
                    epoch: 1,
                    batch: 5,
                    ..
                }
            ),
            "{err}"
        );
    }
}
