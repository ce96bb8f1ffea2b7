//! The [`Trainer`]: fit/evaluate with metrics, callbacks, progress and
//! bit-exact resumable checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::VarMap;
use minibatch_data::DataLoader;
use minibatch_optim::{GradAccumulator, LrScheduler, Norm, Optimizer, Reduction};
use serde_json::{json, Value};

use crate::callbacks::{Callback, Control, FnCallback, Mode, StepInfo};
use crate::checkpoint::{self, CheckpointState};
use crate::error::{Result, TrainError};
use crate::history::{EpochRecord, History, StepRecord};
use crate::metrics::{Accuracy, Metric, RunningMean};
use crate::model::Model;
use crate::progress::{self, EpochProgress, Live, ProgressMode};

/// A loss: `(model output, targets) -> scalar tensor` (mean over the batch).
pub type LossFn = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>>;

/// The default loss: mean cross-entropy of logits against class indices
/// (`candle_nn::loss::cross_entropy`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, targets)
}

/// Mean squared error; targets are reshaped to the output's shape.
pub fn mse(output: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let t = targets.to_dtype(output.dtype())?.reshape(output.shape())?;
    candle_nn::loss::mse(output, &t)
}

/// When the learning-rate schedule is stepped.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleEvery {
    /// After every optimizer step (OneCycleLR, warm-up schedules).
    Step,
    /// After every epoch (StepLR, CosineAnnealingLR, ...).
    Epoch,
    /// After every epoch with a monitored quantity (ReduceLROnPlateau), e.g. `"val_loss"`.
    EpochOnMetric(String),
}

/// Gradient clipping applied before each optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Rescale all gradients so their global norm is at most `max_norm`.
    Norm {
        /// The largest allowed norm.
        max_norm: f64,
        /// Which norm.
        norm: Norm,
    },
    /// Clamp every gradient element to `[-v, v]`.
    Value(f64),
}

/// Loss and metrics over a whole loader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the samples.
    pub loss: f64,
    /// Metrics by name.
    pub metrics: BTreeMap<String, f64>,
    /// Number of samples seen.
    pub samples: u64,
}

/// Evaluates `model` (with `train = false`) over every batch of `loader`:
/// the sample-weighted mean loss and `metrics` (reset first).
///
/// Usable from a hand-written loop as well as by [`Trainer::evaluate`].
pub fn evaluate<M: Model + ?Sized>(
    model: &M,
    loader: &DataLoader,
    loss: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    metrics: &mut [Box<dyn Metric>],
) -> Result<Evaluation> {
    for m in metrics.iter_mut() {
        m.reset();
    }
    let mut mean = RunningMean::default();
    for batch in loader.epoch(0) {
        let (x, y) = batch?.into_pair()?;
        let out = model.forward(&x, false)?.detach();
        let l = scalar(&loss(&out, &y)?)?;
        mean.add(l, x.dim(0)? as u64);
        for m in metrics.iter_mut() {
            m.update(&out, &y)?;
        }
    }
    Ok(Evaluation {
        loss: mean.mean(),
        metrics: metrics
            .iter()
            .map(|m| (m.name().to_string(), m.value()))
            .collect(),
        samples: mean.count(),
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    let t = if t.rank() == 0 {
        t.clone()
    } else {
        t.mean_all()?
    };
    Ok(match t.dtype() {
        DType::F64 => t.to_scalar::<f64>()?,
        DType::F32 => f64::from(t.to_scalar::<f32>()?),
        _ => t.to_dtype(DType::F64)?.to_scalar::<f64>()?,
    })
}

#[derive(Clone, Debug)]
struct CheckpointConfig {
    dir: PathBuf,
    every_steps: Option<u64>,
    every_epoch: bool,
    keep_last: usize,
    best: Option<(String, Mode)>,
}

/// Builds a [`Trainer`]; see [`Trainer::builder`].
pub struct TrainerBuilder<M> {
    model: M,
    varmap: VarMap,
    train: DataLoader,
    optimizer: Box<dyn Optimizer>,
    loss: Option<LossFn>,
    val: Option<DataLoader>,
    scheduler: Option<(Box<dyn LrScheduler>, ScheduleEvery)>,
    clip: Option<Clip>,
    accumulate: usize,
    metrics: Vec<Box<dyn Metric>>,
    default_metrics: bool,
    callbacks: Vec<Box<dyn Callback>>,
    epochs: u64,
    max_steps: Option<u64>,
    progress: ProgressMode,
    checkpoint: Option<CheckpointConfig>,
    out_dir: Option<PathBuf>,
    resume: Option<PathBuf>,
}

impl<M: Model> TrainerBuilder<M> {
    /// The loss (default: [`cross_entropy`], which also adds [`Accuracy`] as
    /// a default metric; a custom loss adds no default metric).
    pub fn loss(
        mut self,
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + 'static,
    ) -> Self {
        self.loss = Some(Box::new(f));
        self
    }
    /// A loader evaluated after every epoch (`val_loss`, `val_<metric>`).
    pub fn val_loader(mut self, loader: DataLoader) -> Self {
        self.val = Some(loader);
        self
    }
    /// A learning-rate schedule and when to step it.
    pub fn scheduler(
        mut self,
        scheduler: impl LrScheduler + 'static,
        every: ScheduleEvery,
    ) -> Self {
        self.scheduler = Some((Box::new(scheduler), every));
        self
    }
    /// A boxed learning-rate schedule and when to step it.
    pub fn boxed_scheduler(
        mut self,
        scheduler: Box<dyn LrScheduler>,
        every: ScheduleEvery,
    ) -> Self {
        self.scheduler = Some((scheduler, every));
        self
    }
    /// Gradient clipping before each step.
    pub fn clip(mut self, clip: Clip) -> Self {
        self.clip = Some(clip);
        self
    }
    /// Accumulates the gradients of `k` micro-batches (their mean) per
    /// optimizer step; a shorter remainder at the end of an epoch is stepped too.
    pub fn accumulate(mut self, k: usize) -> Self {
        self.accumulate = k;
        self
    }
    /// Adds a metric, computed on training batches and on the validation loader.
    pub fn metric(mut self, metric: impl Metric + 'static) -> Self {
        self.metrics.push(Box::new(metric));
        self
    }
    /// Drops the default metrics (accuracy with the default loss).
    pub fn no_default_metrics(mut self) -> Self {
        self.default_metrics = false;
        self
    }
    /// Adds a callback (for example [`EarlyStopping`](crate::EarlyStopping)).
    pub fn callback(mut self, callback: impl Callback + 'static) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }
    /// A hook after every optimizer step.
    pub fn on_step(self, f: impl FnMut(&StepInfo) -> Result<Control> + 'static) -> Self {
        self.callback(FnCallback::on_step(f))
    }
    /// A hook after every epoch, with the epoch's record.
    pub fn on_epoch(self, f: impl FnMut(&EpochRecord) -> Result<Control> + 'static) -> Self {
        self.callback(FnCallback::on_epoch(f))
    }
    /// Number of epochs to train (default 1). Counting includes epochs done before a resume.
    pub fn epochs(mut self, epochs: u64) -> Self {
        self.epochs = epochs;
        self
    }
    /// Stops after this many optimizer steps in total (mid-epoch if need be).
    pub fn max_steps(mut self, steps: u64) -> Self {
        self.max_steps = Some(steps);
        self
    }
    /// How progress is reported (default [`ProgressMode::Auto`]).
    pub fn progress(mut self, mode: ProgressMode) -> Self {
        self.progress = mode;
        self
    }
    /// Writes checkpoints under `dir` (by default after every epoch; see
    /// [`checkpoint_every_steps`](Self::checkpoint_every_steps)).
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        let cfg = self.checkpoint.get_or_insert(CheckpointConfig {
            dir: PathBuf::new(),
            every_steps: None,
            every_epoch: true,
            keep_last: 3,
            best: None,
        });
        cfg.dir = dir.into();
        self
    }
    /// Also checkpoints every `n` optimizer steps (needs `checkpoint_dir`).
    pub fn checkpoint_every_steps(mut self, n: u64) -> Self {
        if let Some(c) = &mut self.checkpoint {
            c.every_steps = Some(n);
        } else {
            self = self.checkpoint_dir("");
            return self.checkpoint_every_steps(n);
        }
        self
    }
    /// Whether to checkpoint at the end of each epoch (default true).
    pub fn checkpoint_every_epoch(mut self, on: bool) -> Self {
        if let Some(c) = &mut self.checkpoint {
            c.every_epoch = on;
        }
        self
    }
    /// How many `step-*` checkpoints to keep (default 3).
    pub fn keep_last(mut self, n: usize) -> Self {
        if let Some(c) = &mut self.checkpoint {
            c.keep_last = n;
        }
        self
    }
    /// Keeps the checkpoint with the best epoch value of `monitor` (e.g.
    /// `"val_accuracy"`, [`Mode::Max`]) as `best-step-*`, named by the `best` pointer.
    pub fn save_best(mut self, monitor: impl Into<String>, mode: Mode) -> Self {
        if let Some(c) = &mut self.checkpoint {
            c.best = Some((monitor.into(), mode));
        }
        self
    }
    /// Writes `history_epochs.csv`, `history_steps.csv`, `history.json` and
    /// `history.svg` into `dir` after every epoch.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }
    /// Resumes from a checkpoint (a checkpoint directory or a checkpoint
    /// root with a `latest` pointer) when built.
    pub fn resume_from(mut self, path: impl Into<PathBuf>) -> Self {
        self.resume = Some(path.into());
        self
    }

    /// Checks the settings and builds the trainer (loading the checkpoint if
    /// [`resume_from`](Self::resume_from) was given).
    pub fn build(self) -> Result<Trainer<M>> {
        if self.accumulate == 0 {
            return Err(TrainError::Config(
                "accumulate must be at least 1 micro-batch".into(),
            ));
        }
        if self.train.is_empty() {
            return Err(TrainError::Config(
                "the train loader yields no batch per epoch".into(),
            ));
        }
        if let Some(c) = &self.checkpoint {
            if c.dir.as_os_str().is_empty() {
                return Err(TrainError::Config(
                    "checkpoint settings given without checkpoint_dir".into(),
                ));
            }
            if c.every_steps == Some(0) {
                return Err(TrainError::Config(
                    "checkpoint_every_steps must be at least 1".into(),
                ));
            }
            if c.keep_last == 0 {
                return Err(TrainError::Config("keep_last must be at least 1".into()));
            }
        }
        match self.clip {
            Some(Clip::Norm { max_norm, .. }) if max_norm.is_nan() || max_norm <= 0.0 => {
                return Err(TrainError::Config(format!(
                    "clip max_norm must be > 0, got {max_norm}"
                )))
            }
            Some(Clip::Value(v)) if v.is_nan() || v <= 0.0 => {
                return Err(TrainError::Config(format!(
                    "clip value must be > 0, got {v}"
                )))
            }
            _ => {}
        }
        let default_loss = self.loss.is_none();
        let mut metrics = self.metrics;
        if default_loss && self.default_metrics {
            metrics.insert(0, Box::new(Accuracy::default()));
        }
        let vars: Vec<Var> = self.optimizer.vars();
        let accumulator = (self.accumulate > 1).then(|| GradAccumulator::new(vars.clone()));
        let mut t = Trainer {
            model: self.model,
            varmap: self.varmap,
            train: self.train,
            val: self.val,
            optimizer: self.optimizer,
            loss: self.loss.unwrap_or_else(|| Box::new(cross_entropy)),
            scheduler: self.scheduler,
            clip: self.clip,
            accumulate: self.accumulate,
            vars,
            accumulator,
            metrics,
            callbacks: self.callbacks,
            epochs: self.epochs,
            max_steps: self.max_steps,
            progress: self.progress,
            checkpoint: self.checkpoint,
            out_dir: self.out_dir,
            step: 0,
            epoch: 0,
            batch: 0,
            epoch_batches_done: false,
            history: History::default(),
            best: None,
            ep: EpochState::default(),
            pending_loss: RunningMean::default(),
            last_checkpoint: None,
        };
        if let Some(p) = self.resume {
            t.load_checkpoint(&p)?;
        }
        Ok(t)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct EpochState {
    loss: RunningMean,
    wait_s: f64,
    compute_s: f64,
}

/// Runs training: forward, loss, backward, optional clipping and gradient
/// accumulation, optimizer step, schedule step; evaluation, metrics,
/// callbacks, progress, history files and checkpoints around it.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, VarBuilder, VarMap};
/// use minibatch_data::{DataLoader, TensorDataset};
/// use minibatch_optim::{Sgd, SgdConfig};
/// use minibatch_train::{ProgressMode, Trainer};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // two separable classes in 2-D
/// let x = Tensor::new(&[[1f32, 1.], [2., 1.5], [-1., -1.], [-2., -0.5]], &dev)?;
/// let y = Tensor::new(&[0u32, 0, 1, 1], &dev)?;
/// let loader = DataLoader::builder(TensorDataset::new(vec![x, y])?).batch_size(2).shuffle(0).build()?;
/// let varmap = VarMap::new();
/// let model = linear(2, 2, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
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
    model: M,
    varmap: VarMap,
    train: DataLoader,
    val: Option<DataLoader>,
    optimizer: Box<dyn Optimizer>,
    loss: LossFn,
    scheduler: Option<(Box<dyn LrScheduler>, ScheduleEvery)>,
    clip: Option<Clip>,
    accumulate: usize,
    vars: Vec<Var>,
    accumulator: Option<GradAccumulator>,
    metrics: Vec<Box<dyn Metric>>,
    callbacks: Vec<Box<dyn Callback>>,
    epochs: u64,
    max_steps: Option<u64>,
    progress: ProgressMode,
    checkpoint: Option<CheckpointConfig>,
    out_dir: Option<PathBuf>,
    step: u64,
    epoch: u64,
    batch: u64,
    epoch_batches_done: bool,
    history: History,
    best: Option<f64>,
    ep: EpochState,
    pending_loss: RunningMean,
    last_checkpoint: Option<PathBuf>,
}

impl<M: Model> Trainer<M> {
    /// Starts a builder from the four things every run needs: the model, the
    /// `VarMap` holding its weights (saved in checkpoints), the training
    /// loader and the optimizer (any [`Optimizer`], boxed or not).
    pub fn builder(
        model: M,
        varmap: VarMap,
        train: DataLoader,
        optimizer: impl Optimizer + 'static,
    ) -> TrainerBuilder<M> {
        Self::builder_boxed(model, varmap, train, Box::new(optimizer))
    }

    /// [`Trainer::builder`] with an already boxed optimizer.
    pub fn builder_boxed(
        model: M,
        varmap: VarMap,
        train: DataLoader,
        optimizer: Box<dyn Optimizer>,
    ) -> TrainerBuilder<M> {
        TrainerBuilder {
            model,
            varmap,
            train,
            optimizer,
            loss: None,
            val: None,
            scheduler: None,
            clip: None,
            accumulate: 1,
            metrics: Vec::new(),
            default_metrics: true,
            callbacks: Vec::new(),
            epochs: 1,
            max_steps: None,
            progress: ProgressMode::Auto,
            checkpoint: None,
            out_dir: None,
            resume: None,
        }
    }

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
    /// The history so far.
    pub fn history(&self) -> &History {
        &self.history
    }
    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> u64 {
        self.step
    }
    /// The current epoch and the index of the next batch in it.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.batch)
    }
    /// The directory of the last checkpoint written or loaded.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }
    /// Sets the number of epochs (e.g. to train longer after a finished run).
    pub fn set_epochs(&mut self, epochs: u64) {
        self.epochs = epochs;
    }
    /// Sets (or clears) the total step limit.
    pub fn set_max_steps(&mut self, steps: Option<u64>) {
        self.max_steps = steps;
    }

    /// Evaluates the model on `loader` with the trainer's loss and metrics.
    pub fn evaluate(&mut self, loader: &DataLoader) -> Result<Evaluation> {
        evaluate(&self.model, loader, self.loss.as_ref(), &mut self.metrics)
    }

    /// One training micro-batch: forward (train mode), loss, NaN check,
    /// backward, and - when `accumulate` micro-batches are gathered - clip and
    /// step. Returns the loss of the optimizer step when one was taken.
    ///
    /// This is what [`fit`](Self::fit) calls per batch; it does not step the
    /// schedule, record history or run callbacks.
    pub fn train_batch(&mut self, x: &Tensor, y: &Tensor) -> Result<Option<f64>> {
        let out = self.model.forward(x, true)?;
        let loss_t = (self.loss)(&out, y)?;
        let loss = scalar(&loss_t)?;
        let n = x.dim(0)? as u64;
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: self.step,
                epoch: self.epoch,
                batch: self.batch,
                value: loss,
            });
        }
        if !self.metrics.is_empty() {
            let detached = out.detach();
            for m in self.metrics.iter_mut() {
                m.update(&detached, y)?;
            }
        }
        drop(out);
        self.ep.loss.add(loss, n);
        self.pending_loss.add(loss, 1);
        let grads = loss_t.backward()?;
        drop(loss_t);
        match &mut self.accumulator {
            None => {
                let mut grads = grads;
                self.apply(&mut grads)?;
                Ok(Some(self.take_pending_loss()))
            }
            Some(acc) => {
                acc.add(&grads)?;
                drop(grads);
                if acc.micro_batches() >= self.accumulate {
                    self.flush()
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn take_pending_loss(&mut self) -> f64 {
        let l = self.pending_loss.mean();
        self.pending_loss.reset();
        l
    }

    /// Steps with what the accumulator holds (if anything).
    fn flush(&mut self) -> Result<Option<f64>> {
        let Some(acc) = &mut self.accumulator else {
            return Ok(None);
        };
        if acc.micro_batches() == 0 {
            return Ok(None);
        }
        let mut grads = acc.finish(Reduction::Mean)?;
        self.apply(&mut grads)?;
        Ok(Some(self.take_pending_loss()))
    }

    fn apply(&mut self, grads: &mut GradStore) -> Result<()> {
        match self.clip {
            Some(Clip::Norm { max_norm, norm }) => {
                minibatch_optim::clip_grad_norm(grads, &self.vars, max_norm, norm)?;
            }
            Some(Clip::Value(v)) => minibatch_optim::clip_grad_value(grads, &self.vars, v)?,
            None => {}
        }
        self.optimizer.step(grads)?;
        Ok(())
    }

    /// After an optimizer step: history, step schedule, callbacks, periodic
    /// checkpoint. Returns whether to stop.
    fn after_step(&mut self, loss: f64, lr: f64, batch: u64) -> Result<bool> {
        let info = StepInfo {
            step: self.step,
            epoch: self.epoch,
            batch,
            loss,
            lr,
        };
        self.history.steps.push(StepRecord {
            step: self.step,
            epoch: self.epoch,
            batch,
            loss,
            lr,
        });
        self.step += 1;
        if let Some((s, ScheduleEvery::Step)) = &mut self.scheduler {
            s.step(self.optimizer.as_mut())?;
        }
        let mut stop = false;
        for cb in self.callbacks.iter_mut() {
            stop |= cb.on_step_end(&info)? == Control::Stop;
        }
        if let Some(n) = self.checkpoint.as_ref().and_then(|c| c.every_steps) {
            if self.step % n == 0 {
                self.save_checkpoint()?;
            }
        }
        if self.max_steps.is_some_and(|m| self.step >= m) {
            stop = true;
        }
        Ok(stop)
    }

    /// Trains until `epochs` are done (counting epochs finished before a
    /// resume), `max_steps` is reached, or a callback asks to stop. Returns
    /// the history. A non-finite loss ends it with
    /// [`TrainError::NonFiniteLoss`] before that update is applied; the
    /// checkpoints already written are left untouched.
    pub fn fit(&mut self) -> Result<&History> {
        let started = Instant::now();
        let (mut train_s, mut samples, mut epochs_run) = (0.0f64, 0u64, 0u64);
        let n_batches = self.train.len() as u64;
        let mut stop = self.max_steps.is_some_and(|m| self.step >= m);
        while !stop && self.epoch < self.epochs {
            if !self.epoch_batches_done {
                let mut bar = EpochProgress::start(
                    self.progress,
                    self.epoch,
                    self.epochs,
                    n_batches,
                    self.batch,
                );
                let mut iter = self.train.epoch(self.epoch).skip_to(self.batch as usize);
                let already =
                    std::time::Duration::from_secs_f64(self.ep.wait_s + self.ep.compute_s);
                let epoch_started = Instant::now()
                    .checked_sub(already)
                    .unwrap_or_else(Instant::now);
                loop {
                    let t0 = Instant::now();
                    let next = iter.next();
                    let t1 = Instant::now();
                    self.ep.wait_s += (t1 - t0).as_secs_f64();
                    let Some(batch) = next else { break };
                    let (x, y) = batch?.into_pair()?;
                    let batch_idx = self.batch;
                    let lr = self.optimizer.learning_rate();
                    let mut stepped = self.train_batch(&x, &y)?;
                    self.batch += 1;
                    if stepped.is_none() && self.batch == n_batches {
                        stepped = self.flush()?;
                    }
                    if let Some(loss) = stepped {
                        stop |= self.after_step(loss, lr, batch_idx)?;
                    }
                    self.ep.compute_s += t1.elapsed().as_secs_f64();
                    let el = epoch_started.elapsed().as_secs_f64();
                    bar.update(Live {
                        batch: batch_idx,
                        loss: self.ep.loss.mean(),
                        samples_per_s: self.ep.loss.count() as f64 / el.max(1e-9),
                        wait_share: self.ep.wait_s / el.max(1e-9),
                    });
                    if stop {
                        break;
                    }
                }
                if self.batch < n_batches {
                    // stopped mid-epoch (max_steps or a callback): leave the position as is.
                    if let Some(c) = &self.checkpoint {
                        if c.every_steps.is_none() || self.step % c.every_steps.unwrap_or(1) != 0 {
                            self.save_checkpoint()?;
                        }
                    }
                    bar.abandon();
                    train_s += self.ep.wait_s + self.ep.compute_s;
                    samples += self.ep.loss.count();
                    break;
                }
                self.epoch_batches_done = true;
                bar.finish_quiet();
                let s = self.ep.wait_s + self.ep.compute_s;
                train_s += s;
                samples += self.ep.loss.count();
            }
            stop |= self.end_epoch()?;
            epochs_run += 1;
        }
        if let Some(dir) = &self.out_dir {
            // also after a stop mid-epoch: the step records are new
            self.history.save(dir)?;
            crate::plot::plot_history(&self.history, &dir.join("history.svg"))?;
        }
        progress::summary(
            self.progress,
            epochs_run,
            self.step,
            samples,
            started,
            train_s,
        );
        Ok(&self.history)
    }

    fn end_epoch(&mut self) -> Result<bool> {
        let wall = self.ep.wait_s + self.ep.compute_s;
        let mut rec = EpochRecord {
            epoch: self.epoch,
            steps: self.step,
            train_loss: self.ep.loss.mean(),
            train_metrics: self
                .metrics
                .iter()
                .map(|m| (m.name().to_string(), m.value()))
                .collect(),
            lr: self.optimizer.learning_rate(),
            epoch_time_s: wall,
            samples_per_s: if wall > 0.0 {
                self.ep.loss.count() as f64 / wall
            } else {
                0.0
            },
            data_wait_share: if wall > 0.0 {
                self.ep.wait_s / wall
            } else {
                0.0
            },
            ..Default::default()
        };
        if let Some(val) = &self.val {
            let ev = evaluate(&self.model, val, self.loss.as_ref(), &mut self.metrics)?;
            rec.val_loss = Some(ev.loss);
            rec.val_metrics = ev.metrics;
        }
        let mut stop = false;
        match &mut self.scheduler {
            Some((s, ScheduleEvery::Epoch)) => s.step(self.optimizer.as_mut())?,
            Some((s, ScheduleEvery::EpochOnMetric(name))) => {
                let v = rec.get(name).ok_or_else(|| TrainError::UnknownMetric {
                    name: name.clone(),
                    available: rec.names().join(", "),
                })?;
                s.step_with_metric(self.optimizer.as_mut(), v)?;
            }
            _ => {}
        }
        for cb in self.callbacks.iter_mut() {
            stop |= cb.on_epoch_end(&rec)? == Control::Stop;
        }
        EpochProgress::report(self.progress, self.epochs, &rec);
        self.history.epochs.push(rec.clone());
        // move to the next epoch before checkpointing, so a resume starts there
        self.epoch += 1;
        self.batch = 0;
        self.epoch_batches_done = false;
        self.ep = EpochState::default();
        for m in self.metrics.iter_mut() {
            m.reset();
        }
        let mut saved = false;
        if let Some(c) = self.checkpoint.clone() {
            if let Some((monitor, mode)) = &c.best {
                let v = rec.get(monitor).ok_or_else(|| TrainError::UnknownMetric {
                    name: monitor.clone(),
                    available: rec.names().join(", "),
                })?;
                if mode.improves(v, self.best, 0.0) {
                    self.best = Some(v);
                    let name = format!("best-step-{:09}", self.step);
                    self.write_named(&c.dir, &name)?;
                    checkpoint::set_pointer(&c.dir, "best", &name)?;
                    checkpoint::prune(&c.dir, "best-step-", 1, &[&name])?;
                }
            }
            if c.every_epoch {
                self.save_checkpoint()?;
                saved = true;
            }
        }
        let _ = saved;
        if let Some(dir) = &self.out_dir {
            self.history.save(dir)?;
            crate::plot::plot_history(&self.history, &dir.join("history.svg"))?;
        }
        Ok(stop)
    }

    fn state(&self) -> Result<CheckpointState> {
        Ok(CheckpointState {
            step: self.step,
            epoch: self.epoch,
            batch: self.batch,
            epoch_batches_done: self.epoch_batches_done,
            batches_per_epoch: self.train.len() as u64,
            samples_per_epoch: self.train.num_samples() as u64,
            accumulate: self.accumulate as u64,
            optimizer: self.optimizer.name().to_string(),
            scheduler: self.scheduler.as_ref().map(|(s, _)| s.state()),
            callbacks: self
                .callbacks
                .iter()
                .map(|c| (c.name().to_string(), c.state()))
                .collect(),
            epoch_progress: json!({
                "loss": self.ep.loss.to_json(),
                "wait_s": self.ep.wait_s,
                "compute_s": self.ep.compute_s,
                "metrics": self.metrics.iter().map(|m| m.state()).collect::<Vec<_>>(),
            }),
            history: self.history.clone(),
            best: self.best,
            ..Default::default()
        })
    }

    fn write_named(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let mut st = self.state()?;
        let opt = self.optimizer.state_bytes()?;
        checkpoint::write_checkpoint(dir, name, &self.varmap, &opt, &mut st)
    }

    /// Writes a checkpoint of the current state now (into the configured
    /// checkpoint directory), moves the `latest` pointer and prunes old ones.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let c = self
            .checkpoint
            .clone()
            .ok_or_else(|| TrainError::Config("save_checkpoint needs checkpoint_dir".into()))?;
        let path = self.save_checkpoint_to(&c.dir)?;
        let best = checkpoint::read_pointer(&c.dir, "best")?;
        let latest = format!("step-{:09}", self.step);
        let mut protect = vec![latest.as_str()];
        if let Some(b) = &best {
            protect.push(b.as_str());
        }
        checkpoint::prune(&c.dir, "step-", c.keep_last, &protect)?;
        Ok(path)
    }

    /// Writes a checkpoint `step-<N>` under `dir` and points `dir/latest` at it.
    pub fn save_checkpoint_to(&mut self, dir: &Path) -> Result<PathBuf> {
        let name = format!("step-{:09}", self.step);
        let p = self.write_named(dir, &name)?;
        checkpoint::set_pointer(dir, "latest", &name)?;
        self.last_checkpoint = Some(p.clone());
        Ok(p)
    }

    /// Restores everything from a checkpoint (a checkpoint directory or a
    /// root with a `latest` pointer): weights (bit for bit), optimizer state,
    /// schedule, callbacks, metrics, history and the loader position.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ck = checkpoint::read_checkpoint(path)?;
        let st = &ck.state;
        let bad = |reason: String| TrainError::ckpt(&ck.path, reason);
        if st.optimizer != self.optimizer.name() {
            return Err(bad(format!(
                "written by optimizer {:?}, this trainer uses {:?}",
                st.optimizer,
                self.optimizer.name()
            )));
        }
        let (nb, ns) = (self.train.len() as u64, self.train.num_samples() as u64);
        if st.batches_per_epoch != nb || st.samples_per_epoch != ns {
            return Err(bad(format!(
                "written with {} batches / {} samples per epoch, this loader has {nb} / {ns} (different dataset or batch size?)",
                st.batches_per_epoch, st.samples_per_epoch
            )));
        }
        if st.accumulate != self.accumulate as u64 {
            return Err(bad(format!(
                "written with accumulate = {}, this trainer uses {}",
                st.accumulate, self.accumulate
            )));
        }
        if st.batch > nb {
            return Err(bad(format!(
                "batch position {} beyond {nb} batches",
                st.batch
            )));
        }
        match (&mut self.scheduler, &st.scheduler) {
            (Some((s, _)), Some(v)) => s.load_state(v)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(bad(
                    "has no schedule state but this trainer has a schedule".into()
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "has a schedule state but this trainer has no schedule".into()
                ))
            }
        }
        checkpoint::load_weights(&self.varmap, &ck.model, &ck.path)?;
        self.optimizer.load_state_bytes(&ck.optimizer)?;
        for cb in self.callbacks.iter_mut() {
            if let Some(v) = st.callbacks.get(cb.name()) {
                cb.load_state(v)?;
            }
        }
        let p = &st.epoch_progress;
        self.ep = EpochState {
            loss: RunningMean::from_json(p.get("loss").unwrap_or(&Value::Null)),
            wait_s: p.get("wait_s").and_then(Value::as_f64).unwrap_or(0.0),
            compute_s: p.get("compute_s").and_then(Value::as_f64).unwrap_or(0.0),
        };
        if let Some(ms) = p.get("metrics").and_then(Value::as_array) {
            for (m, s) in self.metrics.iter_mut().zip(ms) {
                m.load_state(s);
            }
        }
        if let Some(acc) = &mut self.accumulator {
            acc.reset();
        }
        self.pending_loss.reset();
        self.step = st.step;
        self.epoch = st.epoch;
        self.batch = st.batch;
        self.epoch_batches_done = st.epoch_batches_done;
        self.history = st.history.clone();
        self.best = st.best;
        self.last_checkpoint = Some(ck.path.clone());
        Ok(())
    }
}
