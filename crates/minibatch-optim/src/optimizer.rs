//! The object-safe optimizer trait.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{ParamGroup, Result};

/// An optimizer: usable as `Box<dyn Optimizer>`.
///
/// Parameters whose gradient is absent from the [`GradStore`] are skipped and
/// their state (step count included) is left untouched, like PyTorch's
/// `p.grad is None`.
pub trait Optimizer: Send {
    /// Applies one update with the given gradients.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// Back-propagates `loss` and applies one update.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The learning rate of group 0 (0 for an optimizer without groups).
    fn learning_rate(&self) -> f64 {
        self.group_lr(0).unwrap_or(0.0)
    }

    /// Sets the learning rate of every group (PyTorch's `group["lr"] = lr`
    /// for each group). Infallible like `candle_nn::Optimizer`'s: an invalid
    /// value (negative, NaN) is stored and reported by the next
    /// [`step`](Optimizer::step). [`Optimizer::set_group_lr`] checks it at once.
    fn set_learning_rate(&mut self, lr: f64);

    /// The learning rate of group `group`; `None` when it does not exist.
    fn group_lr(&self, group: usize) -> Option<f64>;

    /// Sets the learning rate of group `group` (PyTorch's
    /// `optimizer.param_groups[group]["lr"] = lr`), as schedules do. Errors
    /// (leaving the optimizer unchanged) when the group does not exist or
    /// the value is invalid.
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()>;

    /// The momentum of group `group` (PyTorch's `momentum`, or `betas[0]` for
    /// Adam and AdamW), as cycled by [`OneCycleLR`](crate::OneCycleLR).
    /// `None` when the group does not exist or its optimizer has no momentum
    /// (Adagrad). The default returns `None`.
    fn momentum(&self, group: usize) -> Option<f64> {
        let _ = group;
        None
    }

    /// Sets the momentum (or `betas[0]`) of group `group`, like PyTorch's
    /// `group["momentum"] = m`. Errors, leaving the optimizer unchanged, when
    /// the group does not exist, its optimizer has no momentum, the new value
    /// is invalid, or the change would drop a state buffer that parameters
    /// already hold (SGD and RMSprop keep a momentum buffer only while
    /// momentum > 0: turning it off after the first step is refused).
    /// Turning momentum on mid-run is fine: each parameter's momentum buffer
    /// starts at its next update as PyTorch's does (SGD: from the gradient;
    /// RMSprop: from zero). The default always errors.
    fn set_momentum(&mut self, group: usize, momentum: f64) -> Result<()> {
        let _ = (group, momentum);
        Err(crate::OptimError::InvalidSetup(format!(
            "{} has no momentum to set",
            self.name()
        )))
    }

    /// The parameter groups.
    fn param_groups(&self) -> &[ParamGroup];

    /// Records the base learning rate schedules start from
    /// ([`ParamGroup::initial_lr`], PyTorch's `group["initial_lr"]`). Errors
    /// when the group does not exist or `lr` is negative or not finite.
    fn set_initial_lr(&mut self, group: usize, lr: f64) -> Result<()>;

    /// The optimizer state (buffers, step counts, hyperparameters) as
    /// safetensors bytes. Deterministic: two optimizers built and stepped
    /// the same way give the same bytes, so saved files can be compared by
    /// hash.
    fn state_bytes(&self) -> Result<Vec<u8>>;

    /// Restores a state produced by [`Optimizer::state_bytes`]. Checks the
    /// kind, names, shapes and dtypes; on error the optimizer is unchanged.
    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()>;

    /// Writes [`Optimizer::state_bytes`] to `path` atomically (temporary file
    /// in the same directory, fsync, rename).
    fn save_state(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, &self.state_bytes()?)
    }

    /// Reads a file written by [`Optimizer::save_state`].
    fn load_state(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| crate::OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_state_bytes(&bytes)
    }

    /// All parameters, group by group.
    fn vars(&self) -> Vec<Var> {
        self.param_groups()
            .iter()
            .flat_map(|g| g.vars().iter().cloned())
            .collect()
    }

    /// The optimizer's name (`"SGD"`, `"Adam"`...).
    fn name(&self) -> &str;
}

/// A boxed optimizer is an optimizer, so functions generic over
/// `impl Optimizer` (such as `minibatch_train::Trainer::builder`) also take a
/// `Box<dyn Optimizer>` chosen at run time. Every method is forwarded,
/// default ones included, so the boxed optimizer's own overrides apply.
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{Optimizer, Sgd, SgdConfig};
/// let w = Var::new(&[1f32], &Device::Cpu)?;
/// let config = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
/// let opt: Box<dyn Optimizer> = Box::new(Sgd::new(vec![w], config)?);
/// fn describe(opt: &impl Optimizer) -> (String, Option<f64>) {
///     (opt.name().to_string(), opt.momentum(0))
/// }
/// // SGD's own momentum(), not the trait's default None
/// assert_eq!(describe(&opt), ("SGD".to_string(), Some(0.9)));
/// # Ok::<(), minibatch_optim::OptimError>(())
/// ```
impl<O: Optimizer + ?Sized> Optimizer for Box<O> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        (**self).step(grads)
    }
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        (**self).backward_step(loss)
    }
    fn learning_rate(&self) -> f64 {
        (**self).learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        (**self).set_learning_rate(lr)
    }
    fn group_lr(&self, group: usize) -> Option<f64> {
        (**self).group_lr(group)
    }
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        (**self).set_group_lr(group, lr)
    }
    fn momentum(&self, group: usize) -> Option<f64> {
        (**self).momentum(group)
    }
    fn set_momentum(&mut self, group: usize, momentum: f64) -> Result<()> {
        (**self).set_momentum(group, momentum)
    }
    fn param_groups(&self) -> &[ParamGroup] {
        (**self).param_groups()
    }
    fn set_initial_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        (**self).set_initial_lr(group, lr)
    }
    fn state_bytes(&self) -> Result<Vec<u8>> {
        (**self).state_bytes()
    }
    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).load_state_bytes(bytes)
    }
    fn save_state(&self, path: &Path) -> Result<()> {
        (**self).save_state(path)
    }
    fn load_state(&mut self, path: &Path) -> Result<()> {
        (**self).load_state(path)
    }
    fn vars(&self) -> Vec<Var> {
        (**self).vars()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}
