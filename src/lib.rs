//! # minibatch
//!
//! Real mini-batch training for [candle](https://github.com/huggingface/candle)
//! models, with PyTorch's semantics: this crate re-exports the member
//! crates and gathers the names a training script needs in [`prelude`].
//!
//! | module | crate | what it holds |
//! |---|---|---|
//! | [`data`] | `minibatch-data` | `Dataset`, `TensorDataset`, samplers, the seeded `DataLoader`, MNIST and IDX |
//! | [`dist`] | `minibatch-dist` | data-parallel training: `ProcessGroup` (`Single`, MPI, NCCL), gradient buckets |
//! | [`models`] | `minibatch-models` | BERT, Llama and GPT-2 ports that load Hugging Face checkpoints and train; pooling, gradient checkpointing |
//! | [`nn`] | `minibatch-nn` | drop-in candle-nn layers and ops with real, fast backward passes |
//! | [`optim`] | `minibatch-optim` | `Optimizer`, `UpdateRule`, `Sgd`, `Adam`, `AdamW`, `RmsProp`, `Adagrad`, schedules, clipping, saved state |
//! | [`train`] | `minibatch-train` | `Trainer` (fit/evaluate), metrics, callbacks, history, plots, checkpoints |
//!
//! The `mpi` feature turns on [`dist`]'s MPI backend, `nccl` its NCCL one.
//! The `cuda` feature turns on candle's CUDA backend in every crate;
//! [`data::parse_device`] turns `"cpu"`, `"cuda"` or `"cuda:N"` into a device,
//! with a clear error when the build or the machine has no GPU.
//!
//! ```
//! use minibatch::prelude::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! // y = 3x + 1 on 64 points, learned by mini-batch SGD with momentum.
//! let x = Tensor::arange(0f32, 64f32, &device)?.affine(1.0 / 64.0, 0.0)?.reshape((64, 1))?;
//! let y = x.affine(3.0, 1.0)?;
//! let loader = DataLoader::builder(TensorDataset::new(vec![x, y])?)
//!     .batch_size(8)
//!     .shuffle(7)
//!     .build()?;
//!
//! let w = Var::zeros((1, 1), DType::F32, &device)?;
//! let b = Var::zeros(1, DType::F32, &device)?;
//! let config = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
//! let mut opt = Sgd::new(vec![w.clone(), b.clone()], config)?;
//! for epoch in 0..60 {
//!     for batch in loader.epoch(epoch) {
//!         let (xb, yb) = batch?.into_pair()?;
//!         let pred = xb.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
//!         let loss = (pred - yb)?.sqr()?.mean_all()?;
//!         opt.backward_step(&loss)?;
//!     }
//! }
//! let w = w.as_tensor().flatten_all()?.to_vec1::<f32>()?[0];
//! let b = b.as_tensor().to_vec1::<f32>()?[0];
//! assert!((w - 3.0).abs() < 1e-2 && (b - 1.0).abs() < 1e-2, "w = {w}, b = {b}");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub use minibatch_data as data;
pub use minibatch_dist as dist;
pub use minibatch_models as models;
pub use minibatch_nn as nn;
pub use minibatch_optim as optim;
pub use minibatch_train as train;

/// The names most training scripts use, in one import: `use minibatch::prelude::*;`.
///
/// It also brings candle's `Device`, `DType`, `Tensor`, `Var`, `Module`,
/// `ModuleT` and `VarMap`/`VarBuilder`, and [`seeded_var_builder`](crate::nn::seeded_var_builder)
/// (seeded initial weights), so a script needs no second import for the
/// basics. It leaves out the trainer's `Model` trait: its
/// `forward(x, train)` would make every `layer.forward(x)` call ambiguous
/// (`Module` and `Model` both have a `forward`); in a step, call
/// `model.forward_t(x, train)`.
///
/// The README's training script, as a doc test (`tests/train_readme.rs`
/// checks that the two are the same text, so the README's copy compiles):
///
/// ```no_run
/// use minibatch::prelude::*;
///
/// struct Mlp { fc1: Linear, fc2: Linear }
/// impl Module for Mlp {
///     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
///         self.fc2.forward(&self.fc1.forward(x)?.relu()?)
///     }
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let device = parse_device("cpu")?;                         // "cuda" with --features cuda
///     let (train, test) = mnist::load("data/mnist", &device)?;
///     let train = DataLoader::builder(train).batch_size(64).shuffle(42).build()?;
///     let test = DataLoader::builder(test).batch_size(1000).build()?;
///     let varmap = VarMap::new();
///     let vb = seeded_var_builder(&varmap, 42, DType::F32, &device); // initial weights: a function of (seed, name)
///     let model = Mlp { fc1: linear(784, 256, vb.pp("fc1"))?, fc2: linear(256, 10, vb.pp("fc2"))? };
///     // after the model: the optimizer takes the parameters the VarMap holds now
///     let mut opt = Sgd::from_varmap(&varmap, SgdConfig { lr: 0.05, momentum: 0.9, ..Default::default() })?;
///     let sched = CosineAnnealingLR::new(&mut opt, 10, 0.0)?;
///     let mut trainer = Trainer::builder(model, varmap, train, opt)
///         .val_loader(test)
///         .scheduler(sched, ScheduleEvery::Epoch)
///         .checkpoint_dir("runs/ckpt")                             // resumable to the bit
///         .epochs(10)
///         .build()?;
///     trainer.fit()?;
///     Ok(())
/// }
/// ```
///
/// The README's Training section needs nothing else either (compiled with the
/// docs too):
///
/// ```no_run
/// use minibatch::prelude::*;
///
/// struct Mlp { fc1: Linear, fc2: Linear }
/// impl Module for Mlp {
///     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
///         self.fc2.forward(&self.fc1.forward(x)?.relu()?)
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let device = parse_device("cpu")?;
/// let (train, test) = mnist::load("data/mnist", &device)?;
/// let train_loader = DataLoader::builder(train).batch_size(64).shuffle(42).build()?;
/// let test_loader = DataLoader::builder(test).batch_size(1000).build()?;
/// let varmap = VarMap::new();
/// let vb = seeded_var_builder(&varmap, 42, DType::F32, &device);
/// let model = Mlp { fc1: linear(784, 256, vb.pp("fc1"))?, fc2: linear(256, 10, vb.pp("fc2"))? };
/// let mut opt = Sgd::from_varmap(&varmap, SgdConfig { lr: 0.05, momentum: 0.9, ..Default::default() })?;
/// let sched = CosineAnnealingLR::new(&mut opt, 10, 0.0)?;
/// let mut trainer = Trainer::builder(model, varmap, train_loader, opt)
///     .val_loader(test_loader)
///     .scheduler(sched, ScheduleEvery::Epoch)
///     .clip(Clip::Norm { max_norm: 1.0, norm: Norm::L2 })
///     .accumulate(4)
///     .callback(EarlyStopping::new("val_loss", Mode::Min).patience(3).min_delta(1e-4))
///     .on_epoch(|rec| { println!("{:?}", rec.val_metrics); Ok(Control::Continue) })
///     .checkpoint_dir("runs/ckpt").checkpoint_every_steps(500).save_best("val_accuracy", Mode::Max)
///     .out_dir("runs/mnist")
///     .epochs(10)
///     .build()?;
/// trainer.fit()?;
///
/// // a step over (x, y, mask) batches
/// # let varmap = VarMap::new();
/// # let fc = linear(3, 1, seeded_var_builder(&varmap, 0, DType::F32, &device))?;
/// # let loader = DataLoader::builder(TensorDataset::new(vec![Tensor::zeros((4, 3), DType::F32, &device)?])?).build()?;
/// # let opt = Sgd::from_varmap(&varmap, SgdConfig::default())?;
/// let builder = Trainer::builder(fc, varmap, loader, opt).step(|model, batch: &Batch, train| {
///     let [x, y, mask] = batch.tensors() else { candle_core::bail!("want 3 tensors") };
///     let err = (model.forward_t(x, train)? - y)?.sqr()?;
///     let loss = (err * mask)?.sum_all()?.div(&mask.sum_all()?)?;
///     Ok(StepOutput::new(loss))
/// });
/// # let _ = builder;
/// # Ok(()) }
/// ```
pub mod prelude {
    pub use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
    pub use candle_nn::{VarBuilder, VarMap};

    pub use minibatch_nn::{linear, seeded_var_builder, Linear};

    pub use minibatch_data::{
        available_devices, mnist, parse_device, random_split, Batch, ConcatDataset, DataLoader,
        Dataset, DistributedSampler, FixedOrderSampler, FnDataset, RandomSampler, Sampler,
        SequentialSampler, Subset, SubsetRandomSampler, TensorDataset, WeightedRandomSampler,
    };
    pub use minibatch_optim::{
        clip_grad_norm, clip_grad_value, Adagrad, AdagradConfig, Adam, AdamConfig, AdamW,
        AdamWConfig, CosineAnnealingLR, CosineAnnealingWarmRestarts, ExponentialLR,
        GradAccumulator, LinearLR, LrScheduler, MultiStepLR, Norm, OneCycleLR, OneCycleOptions,
        Optimizer, ReduceLROnPlateau, RmsProp, RmsPropConfig, SequentialLR, Sgd, SgdConfig, StepLR,
        UpdateRule,
    };
    pub use minibatch_train::{
        cross_entropy, evaluate, evaluate_step, loss_step, mse, params_without_grad, r2_score,
        Accuracy, Callback, Clip, Control, EarlyStopping, EpochRecord, History, MeanAbsoluteError,
        Metric, MiniBatchRegressor, Mode, ProgressMode, ScheduleEvery, StepOutput, StepRecord,
        Trainer, TrainerBuilder,
    };
}
