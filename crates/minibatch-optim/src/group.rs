//! Parameter groups.

use candle_core::Var;

/// A set of parameters sharing hyperparameters, like an entry of PyTorch's
/// `optimizer.param_groups`. Schedules change [`ParamGroup::lr`]; the other
/// hyperparameters live in the optimizer's per-group rule.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The learning rate used by the next step for this group.
    pub lr: f64,
    /// The learning rate the first schedule attached to this group started
    /// from (PyTorch's `initial_lr`); later schedules use it as their base.
    pub initial_lr: Option<f64>,
    names: Vec<String>,
    vars: Vec<Var>,
}

impl ParamGroup {
    pub(crate) fn new(lr: f64, params: Vec<(String, Var)>) -> Self {
        let (names, vars) = params.into_iter().unzip();
        Self {
            lr,
            initial_lr: None,
            names,
            vars,
        }
    }

    /// The parameters' names (state keys), in the group's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The parameters, in the group's order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The number of parameters.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether the group holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}
