//! One micro-batch through the trainer: forward (the step), loss kept on the
//! device, backward, accumulation, the gradient guard, clipping and the
//! optimizer step; and the logging points where the losses are read back.

use candle_core::backprop::GradStore;
use minibatch_data::Batch;
use minibatch_optim::Reduction;

use crate::callbacks::Control;
use crate::error::{Result, TrainError};
use crate::guard::missing_grads;
use crate::history::StepRecord;
use crate::model::Model;
use crate::options::Clip;
use crate::step::{detached_scalar, update_metrics};
use crate::trainer::Trainer;

impl<M: Model> Trainer<M> {
    /// One training micro-batch outside [`fit`](Self::fit): the step (train
    /// mode), backward, and - when `accumulate` micro-batches are gathered -
    /// clip and optimizer step. Returns the loss of the optimizer step when
    /// one was taken (reading it back from the device).
    ///
    /// It does not step the schedule, count the step, record history or run
    /// callbacks; [`fit`](Self::fit) does all that around the same mechanics.
    pub fn train_batch(&mut self, batch: &Batch) -> Result<Option<f64>> {
        if !self.train_micro_batch(batch, false)? {
            return Ok(None);
        }
        self.log.read(&mut self.run.epoch_loss)?;
        let mut loss = None;
        self.log.take_ready(|r| {
            loss = Some(r.loss);
            Ok(())
        })?;
        Ok(loss)
    }

    /// Runs one micro-batch; steps the optimizer when `accumulate`
    /// micro-batches are gathered or `last_of_epoch`. Returns whether it
    /// stepped.
    pub(crate) fn train_micro_batch(&mut self, batch: &Batch, last_of_epoch: bool) -> Result<bool> {
        // Keys the masks of minibatch_nn::Dropout (and any layer that reads
        // it) by the global micro-batch index, which checkpoints restore: a
        // resumed run draws the same masks as an uninterrupted one.
        minibatch_nn::set_rng_step(self.run.micro_batches);
        let out = self.step.run(&self.model, batch, true)?;
        self.run.micro_batches += 1;
        self.log.push(
            detached_scalar(&out.loss)?,
            batch.len() as u64,
            self.run.step,
            self.run.epoch,
            self.run.batch,
        );
        if self.cfg.log_every == 1 {
            // read now: a non-finite loss stops before backward and update
            self.log.read(&mut self.run.epoch_loss)?;
        }
        update_metrics(&mut self.metrics, out.metrics)?;
        let grads = out.loss.backward()?;
        drop(out.loss);
        let grads = match &mut self.accumulator {
            None => Some(grads),
            Some(acc) => {
                acc.add(&grads)?;
                drop(grads);
                if acc.micro_batches() >= self.cfg.accumulate || last_of_epoch {
                    Some(acc.finish(Reduction::Mean)?)
                } else {
                    None
                }
            }
        };
        let Some(mut grads) = grads else {
            return Ok(false);
        };
        let lr = self.optimizer.learning_rate();
        self.apply(&mut grads)?;
        self.log.end_step(StepRecord {
            step: self.run.step,
            epoch: self.run.epoch,
            batch: self.run.batch,
            loss: f64::NAN, // filled in when read
            lr,
        });
        Ok(true)
    }

    /// The gradient guard (first step only), clipping, the optimizer step.
    fn apply(&mut self, grads: &mut GradStore) -> Result<()> {
        if self.cfg.check_grads && !self.grads_checked {
            let missing = missing_grads(&self.vars, &self.var_names, grads);
            if !missing.is_empty() {
                return Err(TrainError::MissingGradients { params: missing });
            }
            self.grads_checked = true;
        }
        if let Some(d) = &mut self.dist {
            // the mean over the ranks, before clipping: clipping sees what one process would
            d.reduce(grads)?;
        }
        match self.cfg.clip {
            Some(Clip::Norm { max_norm, norm }) => {
                minibatch_optim::clip_grad_norm(grads, &self.vars, max_norm, norm)?;
            }
            Some(Clip::Value(v)) => minibatch_optim::clip_grad_value(grads, &self.vars, v)?,
            None => {}
        }
        self.optimizer.step(grads)?;
        Ok(())
    }

    /// A logging point: reads the pending losses back (one transfer), then
    /// records the finished steps in the history and runs the step callbacks.
    pub(crate) fn log_point(&mut self) -> Result<()> {
        self.log.read(&mut self.run.epoch_loss)?;
        let (history, callbacks) = (&mut self.run.history, &mut self.callbacks);
        let mut stop = false;
        self.log.take_ready(|record| {
            history.steps.push(record);
            for cb in callbacks.iter_mut() {
                stop |= cb.on_step_end(&record)? == Control::Stop;
            }
            Ok(())
        })?;
        self.stop_requested |= stop;
        Ok(())
    }
}
