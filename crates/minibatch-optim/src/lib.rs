//! PyTorch-parity optimizers for candle: SGD (momentum, dampening, Nesterov,
//! weight decay, maximize), Adam / AMSGrad, AdamW, RMSprop and Adagrad,
//! learning-rate schedules, gradient clipping and accumulation, and state
//! saved to safetensors for bit-exact resumption.
//! (In a crate that depends on `minibatch`, write these paths `minibatch::optim::...`.)
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Linear, Module, VarBuilder, VarMap};
//! use minibatch_optim::{clip_grad_norm, CosineAnnealingLR, LrScheduler, Norm, Optimizer, Sgd, SgdConfig};
//! # fn main() -> minibatch_optim::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = candle_nn::linear(2, 1, vb.pp("fc"))?;
//! let cfg = SgdConfig { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5e-4, ..Default::default() };
//! let mut opt = Sgd::from_varmap(&varmap, cfg)?;
//! let mut sched = CosineAnnealingLR::new(&mut opt, 10, 1e-4)?;
//! let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
//! let y = Tensor::new(&[[1.0f32], [2.0]], &Device::Cpu)?;
//! for _epoch in 0..3 {
//!     let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
//!     let mut grads = loss.backward()?;
//!     let _total_norm = clip_grad_norm(&mut grads, &opt.vars(), 1.0, Norm::L2)?;
//!     opt.step(&grads)?;
//!     sched.step(&mut opt)?;
//! }
//! let bytes = opt.state_bytes()?; // or opt.save_state(path)
//! opt.load_state_bytes(&bytes)?;
//! # Ok(()) }
//! ```
//!
//! # Writing a new optimizer
//!
//! An optimizer is an [`UpdateRule`]: a hyperparameter struct (serde
//! `Serialize`/`Deserialize`, which is how saved state carries it) that says
//! where its learning rate is, checks its values, and says how one contiguous
//! chunk of a parameter is updated from the same chunk of its gradient and of
//! its state buffers. [`GenericOptimizer`] does the rest: parameter groups,
//! skipping parameters without gradients, the fused in-place pass over CPU
//! storage, chunking of big tensors over candle's CPU pool, bf16/f16 parameters (upcast to
//! f32, state in f32), saving and loading state (every hyperparameter, once),
//! guarded hyperparameter changes and learning-rate schedules.
//!
//! ```
//! use minibatch_optim::{check_non_negative, check_unit, Float, GenericOptimizer, ParamStep, Result, UpdateRule};
//! use serde::{Deserialize, Serialize};
//!
//! /// signSGD with momentum: b ← β b + (1 − β) g;  θ ← θ − lr · sign(b).
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct SignSgd { lr: f64, beta: f64 }
//!
//! impl UpdateRule for SignSgd {
//!     const KIND: &'static str = "SignSGD";
//!     fn lr_mut(&mut self) -> &mut f64 { &mut self.lr }
//!     fn validate(&self) -> Result<()> {
//!         check_non_negative("lr", self.lr)?;
//!         check_unit("beta", self.beta)
//!     }
//!     fn state_names(&self) -> &'static [&'static str] { &["momentum"] }
//!     fn update<F: Float>(&self, _step: ParamStep, p: &mut [F], g: &[F], s: &mut [&mut [F]]) {
//!         let (lr, beta) = (F::from_f64(self.lr), F::from_f64(self.beta));
//!         let b = &mut *s[0];
//!         for j in 0..p.len() {
//!             b[j] = beta * b[j] + (F::ONE - beta) * g[j];
//!             p[j] -= lr * b[j].sign();
//!         }
//!     }
//! }
//! pub type SignSgdOptimizer = GenericOptimizer<SignSgd>;
//! ```
//!
//! Optionally implement [`UpdateRule::momentum_mut`] (so
//! [`OneCycleLR`] can cycle it and [`Optimizer::set_momentum`] set it) and
//! [`UpdateRule::update_tensors`] (the same maths with candle tensor ops) so
//! parameters on CUDA keep their state on the device; without it those
//! parameters take a host round trip each step.
//!
//! # Changing hyperparameters
//!
//! Each group's hyperparameters, learning rate included, live in its rule
//! and nowhere else. [`Optimizer::set_group_lr`] (or
//! [`Optimizer::set_learning_rate`] for every group),
//! [`Optimizer::set_momentum`] and, for any field,
//! [`GenericOptimizer::update_rule`] change them: the change is validated
//! (an invalid one is an error that leaves the optimizer unchanged) and the
//! state buffers follow it (momentum switched on mid-run starts its buffer
//! like PyTorch does).
//!
//! ```
//! use candle_core::{Device, Var};
//! use minibatch_optim::{Optimizer, Sgd, SgdConfig};
//! # fn main() -> minibatch_optim::Result<()> {
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let mut opt = Sgd::new(vec![w.clone()], SgdConfig { lr: 0.1, ..Default::default() })?;
//! opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
//! opt.set_group_lr(0, 0.05)?;                       // group["lr"] = 0.05
//! opt.set_momentum(0, 0.9)?;                        // group["momentum"] = 0.9
//! opt.update_rule(0, |c| c.weight_decay = 1e-4)?;  // group["weight_decay"] = 1e-4
//! assert!(opt.update_rule(0, |c| c.momentum = -1.0).is_err());
//! opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
//! assert_eq!(opt.rule(0).unwrap().lr, 0.05);
//! # Ok(()) }
//! ```
//!
//! # Numerics
//!
//! The rules follow PyTorch 2.x's single-tensor implementations operation by
//! operation (f32 parameters compute in f32 with hyperparameters rounded to
//! f32, like PyTorch on CPU), so trajectories agree with PyTorch to about
//! 1e-12 relative in f64 and 1e-5 in f32 (see `tests/optim_parity.rs`).
#![warn(missing_docs)]

mod accumulate;
mod adagrad;
mod adam;
mod adamw;
mod atomic;
mod averaged;
mod clip;
mod error;
mod float;
mod generic;
mod grad_term;
mod group;
mod kernel;
mod optimizer;
mod rmsprop;
mod rule;
pub mod schedule;
mod select;
mod sgd;
mod varmap;

pub use accumulate::{GradAccumulator, Reduction};
pub use adagrad::{Adagrad, AdagradConfig};
pub use adam::{Adam, AdamConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use atomic::{sync_dir, write_atomic};
pub use averaged::{AveragedModel, Averaging};
pub use clip::{clip_grad_norm, clip_grad_norm_with, clip_grad_value, Norm};
pub use error::{check_non_negative, check_unit, OptimError, Result};
pub use float::Float;
pub use generic::GenericOptimizer;
pub use group::ParamGroup;
pub use optimizer::Optimizer;
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use rule::{ParamStep, UpdateRule, MAX_STATE_BUFFERS};
pub use schedule::{
    CosineAnnealing, CosineAnnealingLR, CosineAnnealingWarmRestarts, ExponentialLR, LinearLR,
    LrScheduler, MultiStepLR, OneCycleLR, OneCycleOptions, ReduceLROnPlateau, SequentialLR, StepLR,
    SwaAnneal, SWALR,
};
pub use select::{name_matches, select, select_except, vars_of};
pub use sgd::{Sgd, SgdConfig};
pub use varmap::varmap_vars;
