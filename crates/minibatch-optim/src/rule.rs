//! The extension point: one update rule per optimizer.

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Float, Result};

/// The most state buffers per parameter an update rule may ask for.
pub const MAX_STATE_BUFFERS: usize = 8;

/// Where one parameter stands when [`UpdateRule::update`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamStep {
    /// The 1-based number of updates this parameter has received, including
    /// the current one (PyTorch's `state["step"]` after its increment): what
    /// bias corrections use.
    pub t: u64,
    /// Bit `k` is set when state buffer `k` has never been updated: every
    /// buffer on a parameter's first update, and a buffer that a
    /// hyperparameter change added since the last update (enabling SGD
    /// momentum mid-run). This is PyTorch's state entry that is still `None`;
    /// SGD starts such a momentum buffer from the gradient. Read it with
    /// [`ParamStep::is_new`].
    pub new_buffers: u8,
}

impl ParamStep {
    /// A parameter's first update: `t = 1`, every buffer new.
    pub const FIRST: Self = Self {
        t: 1,
        new_buffers: u8::MAX,
    };

    /// Whether state buffer `buffer` (an index into
    /// [`UpdateRule::state_names`]) has never been updated.
    pub fn is_new(self, buffer: usize) -> bool {
        buffer < MAX_STATE_BUFFERS && (self.new_buffers >> buffer) & 1 == 1
    }
}

/// An optimizer's per-element update, run by [`GenericOptimizer`](crate::GenericOptimizer).
///
/// The implementing type *is* the hyperparameter set of one parameter group
/// (for example [`SgdConfig`](crate::SgdConfig)), learning rate included: it
/// is the only place the optimizer keeps them. It derives serde's
/// `Serialize`/`Deserialize`, which is how saved state carries the
/// hyperparameters (each once). The generic optimizer owns parameters,
/// groups, state buffers, threading, dtype handling and saving; a rule says
/// where its learning rate is, checks its values and says how a chunk of
/// elements is updated.
///
/// * [`update`](UpdateRule::update) is called on contiguous chunks of a
///   parameter (possibly from several threads at once, on disjoint chunks),
///   with the matching chunk of the gradient and of each state buffer. It must
///   be element-wise: element `j` of the output may only depend on element `j`
///   of the inputs. It must not allocate.
/// * State buffers are created on a parameter's first update, filled with
///   [`initial_state`](UpdateRule::initial_state) (0 by default). When a
///   hyperparameter change (through
///   [`GenericOptimizer::update_rule`](crate::GenericOptimizer::update_rule))
///   makes [`state_names`](UpdateRule::state_names) ask for a new buffer,
///   parameters that already have state get it the same way, marked new in
///   [`ParamStep::new_buffers`] until their next update.
/// * [`update_tensors`](UpdateRule::update_tensors) is the same maths on whole
///   candle tensors, used for parameters on non-CPU devices so the state stays
///   on the device. When it returns `None` the optimizer copies the parameter,
///   gradient and state to the host, runs [`update`](UpdateRule::update) and
///   copies them back (correct but slow).
///
/// Values of the rule are cloned when the optimizer checks a change or reads
/// its learning rate: keep it plain data.
///
/// See the crate documentation, "Writing a new optimizer", and
/// `examples/custom_optimizer.rs`.
pub trait UpdateRule:
    Clone + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The optimizer's name, written into saved state and checked on load
    /// (for example `"SGD"`).
    const KIND: &'static str;

    /// The learning rate of this group, PyTorch's `group["lr"]`:
    /// `fn lr_mut(&mut self) -> &mut f64 { &mut self.lr }`. Schedules and
    /// [`Optimizer::set_group_lr`](crate::Optimizer::set_group_lr) change it
    /// through this.
    fn lr_mut(&mut self) -> &mut f64;

    /// The momentum-like hyperparameter cycled by
    /// [`OneCycleLR`](crate::OneCycleLR) and set by
    /// [`Optimizer::set_momentum`](crate::Optimizer::set_momentum)
    /// (PyTorch's `momentum`, or `betas[0]` for Adam-style rules), if the rule
    /// has one. `None` (the default) means it has none, like Adagrad.
    fn momentum_mut(&mut self) -> Option<&mut f64> {
        None
    }

    /// Checks the hyperparameters; the error names the offending one (see
    /// [`check_non_negative`](crate::check_non_negative) and
    /// [`check_unit`](crate::check_unit)).
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
    fn update<F: Float>(
        &self,
        step: ParamStep,
        param: &mut [F],
        grad: &[F],
        state: &mut [&mut [F]],
    );

    /// The same update with candle tensor ops (device-side). Replace the
    /// entries of `state` with their new values and return the new parameter
    /// value. `None` (the default) means "not implemented": the optimizer then
    /// falls back to a host round trip.
    fn update_tensors(
        &self,
        step: ParamStep,
        param: &Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
    ) -> Result<Option<Tensor>> {
        let _ = (step, param, grad, state);
        Ok(None)
    }
}

/// The learning rate of `rule` (a copy of the rule is read: it is plain data).
pub(crate) fn lr_of<R: UpdateRule>(rule: &R) -> f64 {
    *rule.clone().lr_mut()
}

/// The momentum (or β₁) of `rule`, if it has one.
pub(crate) fn momentum_of<R: UpdateRule>(rule: &R) -> Option<f64> {
    rule.clone().momentum_mut().map(|m| *m)
}
