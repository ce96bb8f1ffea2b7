//! The extension point: one update rule per optimizer.

use candle_core::Tensor;

use crate::{Float, Result};

/// The most state buffers per parameter an update rule may ask for.
pub const MAX_STATE_BUFFERS: usize = 8;

/// An optimizer's per-element update, run by [`GenericOptimizer`](crate::GenericOptimizer).
///
/// The implementing type *is* the hyperparameter set of one parameter group
/// (for example [`SgdConfig`](crate::SgdConfig)). The generic optimizer owns
/// parameters, groups, state buffers, threading, dtype handling and
/// saving; a rule only says how a chunk of elements is updated.
///
/// * [`update`](UpdateRule::update) is called on contiguous chunks of a
///   parameter (possibly from several threads at once, on disjoint chunks),
///   with the matching chunk of the gradient and of each state buffer. It must
///   be element-wise: element `j` of the output may only depend on element `j`
///   of the inputs. It must not allocate.
/// * `step` is the 1-based number of updates this parameter has received,
///   including the current one (PyTorch's `state["step"]` after its increment).
/// * State buffers are created on a parameter's first update, filled with
///   [`initial_state`](UpdateRule::initial_state) (0 by default).
/// * [`update_tensors`](UpdateRule::update_tensors) is the same maths on whole
///   candle tensors, used for parameters on non-CPU devices so the state stays
///   on the device. When it returns `None` the optimizer copies the parameter,
///   gradient and state to the host, runs [`update`](UpdateRule::update) and
///   copies them back (correct but slow).
///
/// See the crate documentation, "Writing a new optimizer", and
/// `examples/custom_optimizer.rs`.
pub trait UpdateRule: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The optimizer's name, written into saved state and checked on load
    /// (for example `"SGD"`).
    const KIND: &'static str;

    /// The learning rate of this group.
    fn learning_rate(&self) -> f64;

    /// Sets the learning rate of this group.
    fn set_learning_rate(&mut self, lr: f64);

    /// The momentum-like hyperparameter cycled by
    /// [`OneCycleLR`](crate::OneCycleLR) (PyTorch's `momentum`, or `betas[0]`
    /// for Adam-style rules), if the rule has one. `None` (the default) means
    /// it has none, like Adagrad.
    fn momentum(&self) -> Option<f64> {
        None
    }

    /// Sets the hyperparameter returned by [`momentum`](UpdateRule::momentum).
    /// The default does nothing (rules without momentum). The optimizer
    /// validates the rule afterwards.
    fn set_momentum(&mut self, momentum: f64) {
        let _ = momentum;
    }

    /// Checks the hyperparameters; the error names the offending one.
    fn validate(&self) -> Result<()>;

    /// The names of the per-parameter state buffers (keys in saved state, at
    /// most [`MAX_STATE_BUFFERS`]). May depend on the hyperparameters.
    fn state_names(&self) -> &'static [&'static str];

    /// The value state buffer `index` starts with.
    fn initial_state(&self, index: usize) -> f64 {
        let _ = index;
        0.0
    }

    /// Updates one contiguous chunk in place. `state[k]` is the chunk of the
    /// buffer named `state_names()[k]`.
    fn update<F: Float>(&self, step: u64, param: &mut [F], grad: &[F], state: &mut [&mut [F]]);

    /// The same update with candle tensor ops (device-side). Replace the
    /// entries of `state` with their new values and return the new parameter
    /// value. `None` (the default) means "not implemented": the optimizer then
    /// falls back to a host round trip.
    fn update_tensors(
        &self,
        step: u64,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        let _ = (step, param, grad, state);
        Ok(None)
    }

    /// The hyperparameters as JSON, stored in saved state. The default stores
    /// only `lr`.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "lr": self.learning_rate() })
    }

    /// Restores hyperparameters saved by [`to_json`](UpdateRule::to_json).
    /// The default restores only `lr`.
    fn load_json(&mut self, value: &serde_json::Value) -> Result<()> {
        match value.get("lr").and_then(|v| v.as_f64()) {
            Some(lr) => {
                self.set_learning_rate(lr);
                Ok(())
            }
            None => Err(crate::OptimError::CorruptState(format!(
                "hyperparameters without a numeric `lr`: {value}"
            ))),
        }
    }
}

/// The hyperparameters of a serde rule as JSON: a ready body for
/// [`UpdateRule::to_json`] when the rule derives `Serialize`.
pub fn hyperparameters_to_json<R: serde::Serialize>(rule: &R) -> serde_json::Value {
    serde_json::to_value(rule).unwrap_or_default()
}

/// Hyperparameters read back from [`hyperparameters_to_json`]'s JSON: a ready
/// body for [`UpdateRule::load_json`] when the rule derives `Deserialize`
/// (`*self = hyperparameters_from_json(Self::KIND, value)?`). A value that does
/// not fit is a `CorruptState` error naming `kind`.
pub fn hyperparameters_from_json<R: serde::de::DeserializeOwned>(
    kind: &str,
    value: &serde_json::Value,
) -> Result<R> {
    serde_json::from_value(value.clone())
        .map_err(|e| crate::OptimError::CorruptState(format!("{kind} hyperparameters: {e}")))
}
