//! Parameter groups.

use candle_core::Var;

/// A set of parameters sharing hyperparameters, like an entry of PyTorch's
/// `optimizer.param_groups`.
///
/// The group's hyperparameters, learning rate included, live in one place:
/// the optimizer's rule for the group (read them with
/// [`Optimizer::group_lr`](crate::Optimizer::group_lr),
/// [`Optimizer::momentum`](crate::Optimizer::momentum) or
/// [`GenericOptimizer::rule`](crate::GenericOptimizer::rule), change them
/// with [`Optimizer::set_group_lr`](crate::Optimizer::set_group_lr),
/// [`Optimizer::set_momentum`](crate::Optimizer::set_momentum) or
/// [`GenericOptimizer::update_rule`](crate::GenericOptimizer::update_rule)).
/// The group itself holds its parameters and the schedules' `initial_lr`.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    names: Vec<String>,
    vars: Vec<Var>,
    initial_lr: Option<f64>,
}

impl ParamGroup {
    pub(crate) fn new(params: Vec<(String, Var)>) -> Self {
        let (names, vars) = params.into_iter().unzip();
        Self {
            names,
            vars,
            initial_lr: None,
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

    /// The learning rate the first schedule attached to this group started
    /// from (PyTorch's `group["initial_lr"]`); later schedules use it as their
    /// base. Set by [`Optimizer::set_initial_lr`](crate::Optimizer::set_initial_lr).
    pub fn initial_lr(&self) -> Option<f64> {
        self.initial_lr
    }

    pub(crate) fn set_initial_lr(&mut self, lr: f64) {
        self.initial_lr = Some(lr);
    }
}
