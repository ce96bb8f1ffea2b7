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

    /// The learning rate of group 0.
    fn learning_rate(&self) -> f64;

    /// Sets the learning rate of every group.
    fn set_learning_rate(&mut self, lr: f64);

    /// The parameter groups.
    fn param_groups(&self) -> &[ParamGroup];

    /// The parameter groups, mutable (schedules set [`ParamGroup::lr`]).
    fn param_groups_mut(&mut self) -> &mut [ParamGroup];

    /// The optimizer state (buffers, step counts, hyperparameters) as
    /// safetensors bytes.
    fn state_bytes(&self) -> Result<Vec<u8>>;

    /// Restores a state produced by [`Optimizer::state_bytes`]. Checks the
    /// kind, names, shapes and dtypes; on error the optimizer is unchanged.
    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()>;

    /// Writes [`Optimizer::state_bytes`] to `path` atomically (temporary file
    /// in the same directory, fsync, rename).
    fn save_state(&self, path: &Path) -> Result<()> {
        crate::state::write_atomic(path, &self.state_bytes()?)
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
