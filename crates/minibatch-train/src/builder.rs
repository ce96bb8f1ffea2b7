//! [`TrainerBuilder`]: every setting of a [`Trainer`] and its default
//! ([`Trainer::builder`]), checked once at build.

use std::path::PathBuf;

use candle_core::Tensor;
use candle_nn::VarMap;
use minibatch_data::{Batch, DataLoader};
use minibatch_optim::{GradAccumulator, LrScheduler, Optimizer};

use crate::callbacks::{Callback, Control, FnCallback, Mode};
use crate::error::{Result, TrainError};
use crate::guard::{frozen_names, frozen_note, optimizer_var_names};
use crate::history::{EpochRecord, StepRecord};
use crate::metrics::{Accuracy, Metric};
use crate::model::Model;
use crate::options::{CheckpointSettings, Clip, Config, Resume, ScheduleEvery};
use crate::progress::ProgressMode;
use crate::state::RunState;
use crate::step::{LossFn, StepFn, StepOutput, TrainStep};
use crate::trainer::Trainer;

impl<M: Model> Trainer<M> {
    /// Starts a builder from the four things every run needs: the model, the
    /// `VarMap` holding its weights (saved in checkpoints), the training
    /// loader and the optimizer: any [`Optimizer`], a `Box<dyn Optimizer>`
    /// chosen at run time included. The optimizer's parameters must be in
    /// the `VarMap` (checked at build); parameters of the `VarMap` it does
    /// not hold are frozen.
    pub fn builder(
        model: M,
        varmap: VarMap,
        train: DataLoader,
        optimizer: impl Optimizer + 'static,
    ) -> TrainerBuilder<M> {
        TrainerBuilder {
            model,
            varmap,
            train,
            optimizer: Box::new(optimizer),
            loss: None,
            step: None,
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
            checkpoint: CheckpointSettings::default(),
            out_dir: None,
            resume: None,
            log_every: None,
            allow_unused_parameters: false,
            distributed: None,
        }
    }
}

/// Builds a [`Trainer`]; see [`Trainer::builder`].
///
/// Settings may be given in any order; [`build`](Self::build) checks them
/// together (for example `keep_last` without `checkpoint_dir` is an error,
/// not ignored).
pub struct TrainerBuilder<M> {
    pub(crate) model: M,
    pub(crate) varmap: VarMap,
    pub(crate) train: DataLoader,
    pub(crate) optimizer: Box<dyn Optimizer>,
    pub(crate) loss: Option<LossFn>,
    pub(crate) step: Option<StepFn<M>>,
    pub(crate) val: Option<DataLoader>,
    pub(crate) scheduler: Option<(Box<dyn LrScheduler>, ScheduleEvery)>,
    pub(crate) clip: Option<Clip>,
    pub(crate) accumulate: usize,
    pub(crate) metrics: Vec<Box<dyn Metric>>,
    pub(crate) default_metrics: bool,
    pub(crate) callbacks: Vec<Box<dyn Callback>>,
    pub(crate) epochs: u64,
    pub(crate) max_steps: Option<u64>,
    pub(crate) progress: ProgressMode,
    pub(crate) checkpoint: CheckpointSettings,
    pub(crate) out_dir: Option<PathBuf>,
    pub(crate) resume: Option<Resume>,
    pub(crate) log_every: Option<u64>,
    pub(crate) allow_unused_parameters: bool,
    pub(crate) distributed: Option<std::sync::Arc<dyn minibatch_dist::ProcessGroup>>,
}

impl<M: Model> TrainerBuilder<M> {
    /// The loss of the supervised step, for batches of `(inputs, targets)`:
    /// `loss(model(inputs), targets)` (default: [`cross_entropy`](crate::cross_entropy),
    /// which also adds [`Accuracy`] as a default metric; a custom loss adds no
    /// default metric). For regression pass [`mse`](crate::mse): with the
    /// default, float targets are an error that says so. For other batches,
    /// see [`step`](Self::step).
    pub fn loss(
        mut self,
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + 'static,
    ) -> Self {
        self.loss = Some(Box::new(f));
        self
    }

    /// A general step in place of the `(inputs, targets)` + loss one: it gets
    /// the model, the whole [`Batch`] (any number of tensors: a loss mask,
    /// sample weights, two inputs) and `train` (`true` in
    /// [`fit`](Trainer::fit), `false` in evaluation), and returns the loss
    /// and, for the metrics, outputs and targets ([`StepOutput`]). No default
    /// metric is added; metrics added with [`metric`](Self::metric) need the
    /// step to return `(outputs, targets)`. Cannot be combined with
    /// [`loss`](Self::loss).
    ///
    /// The running loss is weighted by the batch size (`Batch::len`), the
    /// step loss is the mean of its micro-batch losses, as for a loss.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{linear, VarMap};
    /// use minibatch_data::{Batch, DataLoader, TensorDataset};
    /// use minibatch_nn::seeded_var_builder;
    /// use minibatch_optim::{Sgd, SgdConfig};
    /// use minibatch_train::{Model, ProgressMode, StepOutput, Trainer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dev = Device::Cpu;
    /// // (x, y, mask): learn y = 2x on the samples whose mask is 1; the
    /// // others hold garbage targets that must not count.
    /// let x = Tensor::new(&[[1f32], [2.], [3.], [4.]], &dev)?;
    /// let y = Tensor::new(&[[2f32], [99.], [6.], [-99.]], &dev)?;
    /// let mask = Tensor::new(&[[1f32], [0.], [1.], [0.]], &dev)?;
    /// let loader = DataLoader::builder(TensorDataset::new(vec![x, y, mask])?).batch_size(4).build()?;
    /// let varmap = VarMap::new();
    /// let model = linear(1, 1, seeded_var_builder(&varmap, 0, DType::F32, &dev))?;
    /// let opt = Sgd::from_varmap(&varmap, SgdConfig { lr: 0.05, ..Default::default() })?;
    /// let mut trainer = Trainer::builder(model, varmap, loader, opt)
    ///     .step(|model, batch: &Batch, train| {
    ///         let [x, y, mask] = batch.tensors() else { candle_core::bail!("want 3 tensors") };
    ///         let err = (Model::forward(model, x, train)? - y)?.sqr()?;
    ///         let loss = ((err * mask)?.sum_all()? / mask.sum_all()?.to_scalar::<f32>()? as f64)?;
    ///         Ok(StepOutput::new(loss))
    ///     })
    ///     .epochs(300)
    ///     .progress(ProgressMode::Silent)
    ///     .build()?;
    /// let history = trainer.fit()?;
    /// assert!(history.epochs.last().unwrap().train_loss < 1e-3);
    /// # Ok(()) }
    /// ```
    pub fn step(
        mut self,
        f: impl Fn(&M, &Batch, bool) -> candle_core::Result<StepOutput> + 'static,
    ) -> Self {
        self.step = Some(Box::new(f));
        self
    }

    /// A loader evaluated after every epoch (`val_loss`, `val_<metric>`).
    pub fn val_loader(mut self, loader: DataLoader) -> Self {
        self.val = Some(loader);
        self
    }
    /// A learning-rate schedule (any [`LrScheduler`], a `Box<dyn LrScheduler>`
    /// included) and when to step it.
    pub fn scheduler(
        mut self,
        scheduler: impl LrScheduler + 'static,
        every: ScheduleEvery,
    ) -> Self {
        self.scheduler = Some((Box::new(scheduler), every));
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
    /// A hook after every optimizer step, with the step's record (called
    /// when the loss is read back; see [`log_every_steps`](Self::log_every_steps)).
    pub fn on_step(self, f: impl FnMut(&StepRecord) -> Result<Control> + 'static) -> Self {
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

    /// How many optimizer steps pass between two reads of the step losses
    /// from the device (at least 1). The losses stay on the device in
    /// between and are read in one transfer; the history and the `on_step`
    /// callbacks get every step's exact loss either way.
    ///
    /// Default: 1 when the parameters are on the CPU (reading is free there),
    /// 50 on other devices (a read waits for the device, so reading every
    /// step would stall its queue once per step).
    ///
    /// Non-finite losses are found at these reads. With 1, a NaN or infinite
    /// loss stops [`fit`](Trainer::fit) with
    /// [`TrainError::NonFiniteLoss`] *before* that update is applied. With
    /// `n > 1` it stops at the next logging point (every `n` steps, before a
    /// checkpoint is written, at the end of an epoch), naming the first bad
    /// micro-batch; the updates since the previous logging point are then
    /// applied, but no checkpoint holds them. Step callbacks run at the
    /// logging points.
    pub fn log_every_steps(mut self, n: u64) -> Self {
        self.log_every = Some(n);
        self
    }

    /// Trains data-parallel over `group` (PyTorch's DDP): every rank runs
    /// this same program; the loaders are sharded for this rank at build
    /// (the train loader as [`DataLoader::sharded`], the validation one
    /// uneven, so it covers the set once), so `batch_size` is per rank; the
    /// parameters are broadcast from rank 0; a resume takes rank 0's
    /// checkpoint on every rank (weights, optimizer state, run state: see
    /// [`Trainer::load_checkpoint`], which also refuses a checkpoint of
    /// another world size); after
    /// backward, at the accumulation boundary only, the gradients are averaged
    /// over the ranks in ~25 MB buckets, before clipping. Epoch figures are
    /// combined over the ranks (sample-weighted), so callbacks, plateau
    /// schedules and `save_best` decide alike everywhere, and a stop asked
    /// on any rank stops all. Only rank 0 prints, writes history, plots and
    /// checkpoints. With [`Single`](minibatch_dist::Single) it changes nothing.
    pub fn distributed(mut self, group: std::sync::Arc<dyn minibatch_dist::ProcessGroup>) -> Self {
        self.distributed = Some(group);
        self
    }

    /// Lets the first optimizer step go on when some trained parameters got
    /// no gradient (parameters unused on purpose, like PyTorch DDP's
    /// `find_unused_parameters`). By default such a step is a
    /// [`TrainError::MissingGradients`] naming them: candle-nn's fused norms,
    /// softmax and rope drop gradients silently.
    pub fn allow_unused_parameters(mut self) -> Self {
        self.allow_unused_parameters = true;
        self
    }

    /// Writes checkpoints under `dir` (by default after every epoch; see
    /// [`checkpoint_every_steps`](Self::checkpoint_every_steps)).
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint.dir = Some(dir.into());
        self
    }
    /// Also checkpoints every `n` optimizer steps (needs `checkpoint_dir`).
    pub fn checkpoint_every_steps(mut self, n: u64) -> Self {
        self.checkpoint.every_steps = Some(n);
        self
    }
    /// Whether to checkpoint at the end of each epoch (default true; needs `checkpoint_dir`).
    pub fn checkpoint_every_epoch(mut self, on: bool) -> Self {
        self.checkpoint.every_epoch = Some(on);
        self
    }
    /// How many `step-*` checkpoints to keep (default 3; needs `checkpoint_dir`).
    pub fn keep_last(mut self, n: usize) -> Self {
        self.checkpoint.keep_last = Some(n);
        self
    }
    /// Keeps the checkpoint with the best epoch value of `monitor` (e.g.
    /// `"val_accuracy"`, [`Mode::Max`]) as `best-step-*`, named by the `best`
    /// pointer (needs `checkpoint_dir`).
    pub fn save_best(mut self, monitor: impl Into<String>, mode: Mode) -> Self {
        self.checkpoint.best = Some((monitor.into(), mode));
        self
    }
    /// Writes `history_epochs.csv`, `history_steps.csv`, `history.json` and
    /// `history.svg` into `dir` after every epoch.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }
    /// Resumes from a checkpoint (a checkpoint directory or a checkpoint
    /// root with a `latest` pointer) when built; a corrupt one is an error.
    pub fn resume_from(mut self, path: impl Into<PathBuf>) -> Self {
        self.resume = Some(Resume::From(path.into()));
        self
    }
    /// Resumes from the newest checkpoint under the checkpoint root `root`
    /// that reads back intact, when built. Corrupt ones (a truncated file, a
    /// hash mismatch, unreadable `trainer.json`) are skipped with a warning
    /// on stderr naming each one and why, and listed by
    /// [`Trainer::skipped_checkpoints`]; the `latest` pointer is moved to the
    /// checkpoint resumed from. A checkpoint that reads back intact but does
    /// not fit this trainer (another model or loader) is an error, as with
    /// [`resume_from`](Self::resume_from). See
    /// [`Trainer::load_latest_valid_checkpoint`].
    pub fn resume_from_latest_valid(mut self, root: impl Into<PathBuf>) -> Self {
        self.resume = Some(Resume::LatestValid(root.into()));
        self
    }

    /// Checks the settings and builds the trainer (loading the checkpoint if
    /// [`resume_from`](Self::resume_from) was given).
    ///
    /// Errors: `accumulate` 0, an empty train loader, checkpoint settings
    /// without `checkpoint_dir`, `keep_last` or `checkpoint_every_steps` 0,
    /// `log_every_steps` 0, a clip bound that is not > 0, both `loss` and
    /// `step`, an optimizer that holds no parameter (usually built before
    /// the model created its weights), an optimizer parameter that is not in
    /// the `VarMap`, and every checkpoint problem when resuming.
    ///
    /// Parameters of the `VarMap` that the optimizer does not hold stay
    /// frozen; the build says so once on stderr (unless
    /// [`ProgressMode::Silent`]), naming them, and
    /// [`Trainer::frozen_parameters`] lists them.
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
        if self.log_every == Some(0) {
            return Err(TrainError::Config(
                "log_every_steps must be at least 1".into(),
            ));
        }
        if let Some(clip) = &self.clip {
            clip.validate()?;
        }
        let checkpoint = self.checkpoint.resolve()?;
        let (vars, var_names) = optimizer_var_names(&self.varmap, self.optimizer.as_ref())?;
        let frozen = frozen_names(&self.varmap, &var_names)?;
        if !frozen.is_empty() && self.progress != ProgressMode::Silent {
            eprintln!("{}", frozen_note(&frozen, frozen.len() + vars.len()));
        }
        let on_cpu = vars.first().is_none_or(|v| v.device().is_cpu());
        let default_loss = self.loss.is_none() && self.step.is_none();
        let step = match (self.loss, self.step) {
            (Some(_), Some(_)) => {
                return Err(TrainError::Config(
                    "both loss and step are set: a step computes its own loss".into(),
                ))
            }
            (Some(loss), None) => TrainStep::Loss(loss),
            (None, Some(step)) => TrainStep::Custom(step),
            (None, None) => TrainStep::Loss(Box::new(crate::loss::default_loss)),
        };
        let mut metrics = self.metrics;
        if default_loss && self.default_metrics {
            metrics.insert(0, Box::new(Accuracy::default()));
        }
        let accumulator = (self.accumulate > 1).then(|| GradAccumulator::new(vars.clone()));
        let (mut train, mut val, mut progress, mut out_dir) =
            (self.train, self.val, self.progress, self.out_dir);
        let dist = match self.distributed {
            Some(group) => {
                let d = crate::distributed::Distributed::setup(group, &mut train, &mut val, &vars)?;
                if !d.is_main() {
                    progress = ProgressMode::Silent;
                    out_dir = None;
                }
                Some(d)
            }
            None => None,
        };
        let mut t = Trainer {
            model: self.model,
            varmap: self.varmap,
            train,
            val,
            optimizer: self.optimizer,
            step,
            scheduler: self.scheduler,
            metrics,
            callbacks: self.callbacks,
            cfg: Config {
                clip: self.clip,
                accumulate: self.accumulate,
                epochs: self.epochs,
                max_steps: self.max_steps,
                progress,
                checkpoint,
                out_dir,
                log_every: self.log_every.unwrap_or(if on_cpu { 1 } else { 50 }),
                check_grads: !self.allow_unused_parameters,
            },
            vars,
            var_names,
            accumulator,
            log: Default::default(),
            grads_checked: false,
            stop_requested: false,
            run: RunState::default(),
            clock: Default::default(),
            last_checkpoint: None,
            saved_at_step: None,
            skipped: Vec::new(),
            resume_note: None,
            frozen,
            dist,
        };
        match self.resume {
            Some(Resume::From(p)) => t.load_checkpoint(&p)?,
            Some(Resume::LatestValid(root)) => {
                t.load_latest_valid_checkpoint(&root)?;
            }
            None => {}
        }
        if let Some(d) = &t.dist {
            // every rank continues from rank 0's weights, fresh or resumed
            d.broadcast(&t.vars)?;
        }
        Ok(t)
    }
}
