//! # minibatch
//!
//! Real mini-batch training for [candle](https://github.com/huggingface/candle)
//! models, with PyTorch's semantics: this crate re-exports the three member
//! crates and gathers the names a training script needs in [`prelude`].
//!
//! | module | crate | what it holds |
//! |---|---|---|
//! | [`data`] | `minibatch-data` | `Dataset`, `TensorDataset`, samplers, the seeded `DataLoader`, MNIST and IDX |
//! | [`nn`] | `minibatch-nn` | drop-in candle-nn layers and ops with real, fast backward passes |
//! | [`optim`] | `minibatch-optim` | `Optimizer`, `UpdateRule`, `Sgd`, `Adam`, `AdamW`, `RmsProp`, `Adagrad`, schedules, clipping, saved state |
//! | [`train`] | `minibatch-train` | `Trainer` (fit/evaluate), metrics, callbacks, history, plots, checkpoints |
//!
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
pub use minibatch_nn as nn;
pub use minibatch_optim as optim;
pub use minibatch_train as train;

/// The names most training scripts use, in one import: `use minibatch::prelude::*;`.
///
/// It also brings candle's `Device`, `DType`, `Tensor`, `Var`, `Module` and
/// `VarMap`/`VarBuilder`, so a script needs no second import for the basics.
pub mod prelude {
    pub use candle_core::{DType, Device, Module, Tensor, Var};
    pub use candle_nn::{VarBuilder, VarMap};

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
        cross_entropy, evaluate, mse, Accuracy, Callback, EarlyStopping, History, Metric, Model,
        Trainer,
    };
}
