//! The [`Trainer`]: its parts, and the loop over epochs and batches.
//!
//! The step mechanics (forward, backward, accumulation, clipping, the
//! gradient guard, reading the losses back) are in `mechanics.rs`,
//! checkpoints and resume in `resume.rs`, where the run stands in
//! `state.rs`, the settings and their defaults in `builder.rs` and `options.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Var;
use candle_nn::VarMap;
use minibatch_data::DataLoader;
use minibatch_optim::{GradAccumulator, LrScheduler, Optimizer};

use crate::callbacks::{Callback, Control};
use crate::error::Result;
use crate::evaluate::{evaluate_step, Evaluation};
use crate::history::{EpochRecord, History};
use crate::losslog::LossLog;
use crate::metrics::Metric;
use crate::model::Model;
use crate::options::{Config, ScheduleEvery};
use crate::progress::{self, EpochProgress, Live};
use crate::state::{RunState, SkippedCheckpoint};
use crate::step::TrainStep;

fn eval<M: Model>(
    model: &M,
    step: &TrainStep<M>,
    loader: &DataLoader,
    metrics: &mut [Box<dyn Metric>],
) -> Result<Evaluation> {
    let run = |m: &M, b: &minibatch_data::Batch, train: bool| step.run(m, b, train);
    evaluate_step(model, loader, &run, metrics)
}

/// Wall-clock figures of the epoch in progress. Never checkpointed (so that
/// identical runs write identical checkpoints): after a mid-epoch resume they
/// count from the resume.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EpochClock {
    /// Seconds this epoch waited for the loader.
    pub wait_s: f64,
    /// Seconds this epoch spent computing.
    pub compute_s: f64,
    /// Training samples this epoch ran (in this process).
    pub samples: u64,
}

impl EpochClock {
    fn wall_s(&self) -> f64 {
        self.wait_s + self.compute_s
    }
}

/// Runs training: forward, loss, backward, optional clipping and gradient
/// accumulation, optimizer step, schedule step; evaluation, metrics,
/// callbacks, progress, history files and checkpoints around it.
///
/// Batches go through a step: by default the supervised one (batches of
/// `(inputs, targets)`, a loss of `(outputs, targets)`), or any step of
/// your own over the whole batch ([`TrainerBuilder::step`](crate::TrainerBuilder::step)).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, VarMap};
/// use minibatch_data::{DataLoader, TensorDataset};
/// use minibatch_nn::seeded_var_builder;
/// use minibatch_optim::{Sgd, SgdConfig};
/// use minibatch_train::{ProgressMode, Trainer};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // two separable classes in 2-D
/// let x = Tensor::new(&[[1f32, 1.], [2., 1.5], [-1., -1.], [-2., -0.5]], &dev)?;
/// let y = Tensor::new(&[0u32, 0, 1, 1], &dev)?;
/// let loader = DataLoader::builder(TensorDataset::new(vec![x, y])?).batch_size(2).shuffle(0).build()?;
/// let varmap = VarMap::new();
/// let model = linear(2, 2, seeded_var_builder(&varmap, 0, DType::F32, &dev))?;
/// let opt = Sgd::from_varmap(&varmap, SgdConfig { lr: 0.5, momentum: 0.9, ..Default::default() })?;
/// let mut trainer = Trainer::builder(model, varmap, loader, opt)
///     .epochs(20)
///     .progress(ProgressMode::Silent)
///     .build()?;
/// let history = trainer.fit()?;
/// assert_eq!(history.epochs.last().unwrap().train_metrics["accuracy"], 1.0);
/// # Ok(()) }
/// ```
pub struct Trainer<M> {
    // the parts
    pub(crate) model: M,
    pub(crate) varmap: VarMap,
    pub(crate) train: DataLoader,
    pub(crate) val: Option<DataLoader>,
    pub(crate) optimizer: Box<dyn Optimizer>,
    pub(crate) step: TrainStep<M>,
    pub(crate) scheduler: Option<(Box<dyn LrScheduler>, ScheduleEvery)>,
    pub(crate) metrics: Vec<Box<dyn Metric>>,
    pub(crate) callbacks: Vec<Box<dyn Callback>>,
    pub(crate) cfg: Config,
    // the step mechanics
    /// The optimizer's parameters and their `VarMap` names.
    pub(crate) vars: Vec<Var>,
    pub(crate) var_names: Vec<String>,
    pub(crate) accumulator: Option<GradAccumulator>,
    pub(crate) log: LossLog,
    pub(crate) grads_checked: bool,
    /// A step callback asked to stop (seen at the next batch boundary).
    pub(crate) stop_requested: bool,
    // where the run stands: everything a checkpoint restores
    pub(crate) run: RunState,
    pub(crate) clock: EpochClock,
    pub(crate) last_checkpoint: Option<PathBuf>,
    pub(crate) saved_at_step: Option<u64>,
    pub(crate) skipped: Vec<SkippedCheckpoint>,
    /// The line printed by the last resume.
    pub(crate) resume_note: Option<String>,
    /// The `VarMap` parameters the optimizer does not hold.
    pub(crate) frozen: Vec<String>,
    /// The group and gradient buckets of data-parallel training.
    pub(crate) dist: Option<crate::distributed::Distributed>,
}

impl<M: Model> Trainer<M> {
    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }
    /// The `VarMap` with the model's weights.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }
    /// The optimizer, mutably (e.g. to change the learning rate by hand).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }
    /// The history so far (steps up to the last logging point).
    pub fn history(&self) -> &History {
        &self.run.history
    }
    /// Where the run stands: counters, position, running epoch figures, history.
    pub fn run_state(&self) -> &RunState {
        &self.run
    }
    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> u64 {
        self.run.step
    }
    /// The current epoch and the index of the next batch in it.
    pub fn position(&self) -> (u64, u64) {
        (self.run.epoch, self.run.batch)
    }
    /// The directory of the last checkpoint written or loaded.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }
    /// The corrupt checkpoints skipped by the last
    /// [`load_latest_valid_checkpoint`](Self::load_latest_valid_checkpoint)
    /// (or [`TrainerBuilder::resume_from_latest_valid`](crate::TrainerBuilder::resume_from_latest_valid)), newest first.
    pub fn skipped_checkpoints(&self) -> &[SkippedCheckpoint] {
        &self.skipped
    }
    /// The `VarMap` names (sorted) of the parameters the optimizer does not
    /// hold: frozen, saved in checkpoints but never updated. The build names
    /// them once on stderr.
    pub fn frozen_parameters(&self) -> &[String] {
        &self.frozen
    }
    /// The line the last resume printed: where the run resumed and which
    /// settings came from the checkpoint (the optimizer's learning rate, and
    /// the one it was built with when they differ). `None` before a resume.
    pub fn resume_note(&self) -> Option<&str> {
        self.resume_note.as_deref()
    }
    /// Under [`distributed`](crate::TrainerBuilder::distributed): the time
    /// the gradient average took so far (inside the collectives, and packing
    /// the buckets), and the steps it ran for. `None` without `.distributed`.
    pub fn reduce_stats(&self) -> Option<minibatch_dist::ReduceStats> {
        self.dist.as_ref().map(|d| d.stats())
    }
    /// Sets the number of epochs (e.g. to train longer after a finished run).
    pub fn set_epochs(&mut self, epochs: u64) {
        self.cfg.epochs = epochs;
    }
    /// Sets (or clears) the total step limit.
    pub fn set_max_steps(&mut self, steps: Option<u64>) {
        self.cfg.max_steps = steps;
    }

    /// Evaluates the model on `loader` with the trainer's step (`train =
    /// false`) and metrics.
    pub fn evaluate(&mut self, loader: &DataLoader) -> Result<Evaluation> {
        eval(&self.model, &self.step, loader, &mut self.metrics)
    }

    fn max_steps_reached(&self) -> bool {
        self.cfg.max_steps.is_some_and(|m| self.run.step >= m)
    }

    /// Trains until `epochs` are done (counting epochs finished before a
    /// resume), `max_steps` is reached, or a callback asks to stop. Returns
    /// the history.
    ///
    /// A non-finite loss ends it with [`TrainError::NonFiniteLoss`](crate::TrainError::NonFiniteLoss):
    /// before that update is applied when the losses are read every step
    /// (the default on the CPU), at the next logging point otherwise (see
    /// [`TrainerBuilder::log_every_steps`](crate::TrainerBuilder::log_every_steps)). Checkpoints already written are
    /// left untouched, and none is written past a non-finite loss.
    pub fn fit(&mut self) -> Result<&History> {
        let started = Instant::now();
        let mut totals = progress::RunTotals::default();
        self.stop_requested = false;
        let mut stop = self.max_steps_reached();
        while !stop && self.run.epoch < self.cfg.epochs {
            // an epoch counts as full when this call ran all its batches
            let full = !self.run.epoch_batches_done && self.run.batch == 0;
            if !self.run.epoch_batches_done {
                let (wall0, samples0) = (self.clock.wall_s(), self.clock.samples);
                let finished = self.train_epoch_batches()?;
                self.log_point()?; // the epoch's (or the stop's) losses, for the counts below
                let wall = self.clock.wall_s() - wall0;
                totals.train_s += wall;
                totals.samples += self.clock.samples - samples0;
                if !finished {
                    totals.partial_epochs += 1;
                    // stopped mid-epoch (max_steps or a callback): leave the position as is
                    if self.cfg.checkpoint.is_some() && self.saved_at_step != Some(self.run.step) {
                        self.save_checkpoint()?;
                    }
                    break;
                }
                if full {
                    totals.full_train_s += wall;
                }
                self.run.epoch_batches_done = true;
            }
            stop = self.end_epoch()? || self.max_steps_reached();
            if full {
                totals.full_epochs += 1;
            } else {
                totals.partial_epochs += 1;
            }
        }
        self.log_point()?;
        self.write_outputs()?;
        totals.steps = self.run.step;
        progress::summary(self.cfg.progress, &totals, started);
        Ok(&self.run.history)
    }

    /// The batches of the current epoch from the saved position on. Returns
    /// whether they all ran (`false`: stopped mid-epoch).
    fn train_epoch_batches(&mut self) -> Result<bool> {
        let n_batches = self.train.len() as u64;
        let mut bar = EpochProgress::start(
            self.cfg.progress,
            self.run.epoch,
            self.cfg.epochs,
            n_batches,
            self.run.batch,
        );
        let mut iter = self
            .train
            .epoch(self.run.epoch)
            .skip_to(self.run.batch as usize);
        let already = Duration::from_secs_f64(self.clock.wall_s());
        let epoch_started = Instant::now()
            .checked_sub(already)
            .unwrap_or_else(Instant::now);
        loop {
            let t0 = Instant::now();
            let next = iter.next();
            let t1 = Instant::now();
            self.clock.wait_s += (t1 - t0).as_secs_f64();
            let Some(batch) = next else { break };
            let batch = batch?;
            self.clock.samples += batch.len() as u64;
            let batch_idx = self.run.batch;
            let last = batch_idx + 1 == n_batches;
            let stepped = self.train_micro_batch(&batch, last)?;
            self.run.batch += 1;
            let mut stop = false;
            if stepped {
                stop = self.after_step()?;
            }
            self.clock.compute_s += t1.elapsed().as_secs_f64();
            let el = epoch_started.elapsed().as_secs_f64().max(1e-9);
            bar.update(Live {
                batch: batch_idx,
                loss: self.run.epoch_loss.mean(),
                samples_per_s: self.clock.samples as f64 / el,
                wait_share: self.clock.wait_s / el,
            });
            if stop {
                break;
            }
        }
        if self.run.batch < n_batches {
            bar.abandon();
            return Ok(false);
        }
        bar.finish_quiet();
        Ok(true)
    }

    /// After an optimizer step: step schedule, logging point, periodic
    /// checkpoint. Returns whether to stop.
    fn after_step(&mut self) -> Result<bool> {
        self.run.step += 1;
        if let Some((s, ScheduleEvery::Step)) = &mut self.scheduler {
            s.step(self.optimizer.as_mut())?;
        }
        if self.run.step.is_multiple_of(self.cfg.log_every) {
            self.log_point()?;
        }
        if let Some(n) = self.cfg.checkpoint.as_ref().and_then(|c| c.every_steps) {
            if self.run.step.is_multiple_of(n) {
                self.save_checkpoint()?;
            }
        }
        if let Some(d) = &self.dist {
            self.stop_requested = d.any(self.stop_requested)?;
        }
        Ok(self.stop_requested || self.max_steps_reached())
    }

    fn end_epoch(&mut self) -> Result<bool> {
        self.log_point()?;
        let wall = self.clock.wall_s();
        let per_s = |x: f64| Some(if wall > 0.0 { x / wall } else { 0.0 });
        let mut rec = EpochRecord {
            epoch: self.run.epoch,
            steps: self.run.step,
            train_loss: self.run.epoch_loss.mean(),
            train_metrics: self
                .metrics
                .iter()
                .map(|m| (m.name().to_string(), m.value()))
                .collect(),
            lr: self.optimizer.learning_rate(),
            epoch_time_s: Some(wall),
            samples_per_s: per_s(self.clock.samples as f64),
            data_wait_share: per_s(self.clock.wait_s),
            ..Default::default()
        };
        if let Some(d) = &self.dist {
            d.combine_train(&mut rec, self.run.epoch_loss.count())?;
        }
        if let Some(val) = &self.val {
            let mut ev = eval(&self.model, &self.step, val, &mut self.metrics)?;
            if let Some(d) = &self.dist {
                d.combine_eval(&mut ev)?;
            }
            rec.val_loss = Some(ev.loss);
            rec.val_metrics = ev.metrics;
        }
        match &mut self.scheduler {
            Some((s, ScheduleEvery::Epoch)) => s.step(self.optimizer.as_mut())?,
            Some((s, ScheduleEvery::EpochOnMetric(name))) => {
                s.step_with_metric(self.optimizer.as_mut(), rec.require(name)?)?;
            }
            _ => {}
        }
        let mut stop = self.stop_requested;
        for cb in self.callbacks.iter_mut() {
            stop |= cb.on_epoch_end(&rec)? == Control::Stop;
        }
        if let Some(d) = &self.dist {
            stop = d.any(stop)?; // a stop on any rank stops all
        }
        EpochProgress::report(self.cfg.progress, self.cfg.epochs, &rec);
        self.run.history.epochs.push(rec);
        // move to the next epoch before checkpointing, so a resume starts there
        self.run.next_epoch();
        self.clock = EpochClock::default();
        for m in self.metrics.iter_mut() {
            m.reset();
        }
        self.save_best_checkpoint()?;
        if self.cfg.checkpoint.as_ref().is_some_and(|c| c.every_epoch) {
            self.save_checkpoint()?;
        }
        self.write_outputs()?;
        Ok(stop)
    }

    /// The history files and plot, when `out_dir` is set.
    fn write_outputs(&self) -> Result<()> {
        if let Some(dir) = &self.cfg.out_dir {
            self.run.history.save(dir)?;
            crate::plot::plot_history(&self.run.history, &dir.join("history.svg"))?;
        }
        Ok(())
    }
}
