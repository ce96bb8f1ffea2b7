//! The one optimizer implementation every update rule shares.
//!
//! Children: `param_state` (one parameter's step count and buffers),
//! `update` (running a rule on one parameter), `state` (saving and loading
//! the optimizer's state). They use this module's private fields; nothing
//! here imports from them but their types.

mod param_state;
mod state;
mod update;

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::rule::{lr_of, momentum_of, MAX_STATE_BUFFERS};
use crate::{OptimError, Optimizer, ParamGroup, Result, UpdateRule};
use param_state::{state_dtype, ParamState};

/// An optimizer running an [`UpdateRule`] over parameter groups.
///
/// [`Sgd`](crate::Sgd), [`Adam`](crate::Adam), [`AdamW`](crate::AdamW),
/// [`RmsProp`](crate::RmsProp) and [`Adagrad`](crate::Adagrad) are aliases of
/// this type; a new optimizer is a new rule (see the crate docs).
///
/// Each group's hyperparameters, learning rate included, live in one place:
/// the group's rule. Read them with [`rule`](GenericOptimizer::rule) (or
/// [`Optimizer::group_lr`], [`Optimizer::momentum`]); change them with
/// [`update_rule`](GenericOptimizer::update_rule) (or
/// [`Optimizer::set_group_lr`], [`Optimizer::set_momentum`]), which checks
/// the change and keeps the state buffers consistent with it.
///
/// How a step runs, per parameter with a gradient:
/// * **CPU parameters**: one fused in-place pass over the parameter's storage
///   (a candle `InplaceOp2`), the gradient and the state buffers (host
///   `Vec<f32>`/`Vec<f64>` owned by the optimizer). Tensors above 65 536
///   elements are split in chunks over candle's CPU pool. Nothing is allocated.
/// * **bf16 / f16 parameters**: blocks of 1024 elements are upcast to f32 in a
///   stack buffer, updated against f32 state, and rounded back. The state is
///   kept in f32 (like mixed-precision "master" moments).
/// * **Other devices (CUDA)**: the rule's [`UpdateRule::update_tensors`]
///   (candle tensor ops, state kept as tensors on the device). Rules without
///   it fall back to copying to the host and back each step (slow).
///
/// [`set_tensor_path`](GenericOptimizer::set_tensor_path) forces the tensor
/// path on CPU too, which is how the CUDA maths is tested without a GPU.
#[derive(Debug)]
pub struct GenericOptimizer<R: UpdateRule> {
    groups: Vec<ParamGroup>,
    rules: Vec<R>,
    states: Vec<Vec<Option<ParamState>>>,
    tensor_path: bool,
}

impl<R: UpdateRule> GenericOptimizer<R> {
    /// One group of unnamed parameters, named `param.{i}` in saved state.
    pub fn new(vars: Vec<Var>, config: R) -> Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        Self::named(named, config)
    }

    /// One group of named parameters; the names key the saved state.
    pub fn named(params: Vec<(String, Var)>, config: R) -> Result<Self> {
        Self::with_groups(vec![(params, config)])
    }

    /// All variables of a [`VarMap`], named by their VarMap names and sorted
    /// by name (so the order and the saved state are stable).
    pub fn from_varmap(varmap: &VarMap, config: R) -> Result<Self> {
        Self::named(crate::varmap_vars(varmap)?, config)
    }

    /// Several parameter groups, each with its own hyperparameters (like
    /// PyTorch's list of dicts). Parameter names must be unique across groups.
    pub fn with_groups(groups: Vec<(Vec<(String, Var)>, R)>) -> Result<Self> {
        let mut seen = HashSet::new();
        let mut out_groups = Vec::with_capacity(groups.len());
        let mut rules = Vec::with_capacity(groups.len());
        let mut states = Vec::with_capacity(groups.len());
        for (params, rule) in groups {
            check_rule(&rule)?;
            for (name, var) in &params {
                if !seen.insert(name.clone()) {
                    return Err(OptimError::InvalidSetup(format!(
                        "parameter name `{name}` appears twice"
                    )));
                }
                state_dtype(name, var.dtype())?;
            }
            states.push(vec![None; params.len()]);
            out_groups.push(ParamGroup::new(params));
            rules.push(rule);
        }
        Ok(Self {
            groups: out_groups,
            rules,
            states,
            tensor_path: false,
        })
    }

    /// Runs the candle-tensor-op update (the path non-CPU devices take) for
    /// CPU parameters too. Slower; meant for testing that path without a GPU.
    /// Call before the first step: existing state keeps its representation.
    pub fn set_tensor_path(&mut self, on: bool) {
        self.tensor_path = on;
    }

    /// The hyperparameters of group `group`, learning rate included.
    pub fn rule(&self, group: usize) -> Option<&R> {
        self.rules.get(group)
    }

    /// Changes the hyperparameters of group `group`: `change` edits a copy,
    /// which is checked ([`UpdateRule::validate`]) and then replaces the
    /// group's rule. The optimizer's equivalent of editing PyTorch's
    /// `optimizer.param_groups[group]` dict.
    ///
    /// The state stays consistent with the new values, as in PyTorch:
    /// * a change that adds a state buffer (SGD or RMSprop momentum switched
    ///   on from 0, AMSGrad or `centered` switched on) gives every parameter that
    ///   already has state that buffer, started at its next update the way a
    ///   new parameter's is (SGD: from the gradient, like PyTorch's missing
    ///   `momentum_buffer`; the others: from their initial value, 0);
    /// * a change that would drop a buffer some parameter already holds
    ///   (momentum back to 0, AMSGrad off after the first step) is refused.
    ///   PyTorch would keep that buffer unused; here the state holds exactly
    ///   the buffers the rule uses, so set such values before the first step
    ///   or build a new optimizer.
    ///
    /// On error (no such group, an invalid value, a dropped buffer) the
    /// optimizer is unchanged.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use minibatch_optim::{Optimizer, Sgd, SgdConfig};
    /// # fn main() -> minibatch_optim::Result<()> {
    /// let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
    /// let mut opt = Sgd::new(vec![w.clone()], SgdConfig { lr: 0.1, ..Default::default() })?;
    /// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
    /// // Momentum on after the first step: the buffer starts from the next gradient.
    /// opt.update_rule(0, |c| { c.momentum = 0.9; c.weight_decay = 1e-4 })?;
    /// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
    /// assert!(opt.state_tensor("param.0", "momentum_buffer")?.is_some());
    /// // Invalid values are refused and change nothing.
    /// assert!(opt.update_rule(0, |c| c.lr = -1.0).is_err());
    /// assert_eq!(opt.rule(0).unwrap().lr, 0.1);
    /// # Ok(()) }
    /// ```
    pub fn update_rule(&mut self, group: usize, change: impl FnOnce(&mut R)) -> Result<()> {
        let old = self.rules.get(group).ok_or_else(|| self.no_group(group))?;
        let mut new = old.clone();
        change(&mut new);
        check_rule(&new)?;
        let (old_names, new_names) = (old.state_names(), new.state_names());
        if old_names == new_names {
            self.rules[group] = new;
            return Ok(());
        }
        let group_state = &self.states[group];
        for (k, name) in old_names.iter().enumerate() {
            if new_names.contains(name) {
                continue;
            }
            let holders = group_state.iter().flatten().filter(|s| s.holds(k)).count();
            if holders > 0 {
                return Err(OptimError::InvalidSetup(format!(
                    "{}: this change to group {group} drops the state buffer `{name}` that \
                     {holders} parameter(s) already hold ({old_names:?} -> {new_names:?}); make \
                     it before the first step or build a new optimizer",
                    R::KIND
                )));
            }
        }
        let vars = self.groups[group].vars();
        let mut relaid = Vec::with_capacity(group_state.len());
        for (slot, var) in group_state.iter().zip(vars) {
            relaid.push(match slot {
                Some(st) => Some(st.relayout(old_names, &new, var)?),
                None => None,
            });
        }
        self.states[group] = relaid;
        self.rules[group] = new;
        Ok(())
    }

    /// The number of updates parameter `name` has received (0 if none).
    pub fn step_count(&self, name: &str) -> u64 {
        self.find(name)
            .and_then(|(g, i)| self.states[g][i].as_ref())
            .map_or(0, |s| s.step)
    }

    /// A copy of state buffer `buffer` (e.g. `"exp_avg"`) of parameter `name`
    /// as a CPU tensor, if that parameter has been updated since the rule
    /// asked for that buffer (PyTorch's state entry that is not `None`).
    pub fn state_tensor(&self, name: &str, buffer: &str) -> Result<Option<Tensor>> {
        let Some((g, i)) = self.find(name) else {
            return Ok(None);
        };
        let Some(k) = self.rules[g]
            .state_names()
            .iter()
            .position(|b| *b == buffer)
        else {
            return Ok(None);
        };
        match &self.states[g][i] {
            Some(st) if st.holds(k) => Ok(Some(st.buffer_on_cpu(k, &self.groups[g].vars()[i])?)),
            _ => Ok(None),
        }
    }

    /// The group and index of parameter `name`.
    fn find(&self, name: &str) -> Option<(usize, usize)> {
        self.groups
            .iter()
            .enumerate()
            .find_map(|(g, group)| group.names().iter().position(|n| n == name).map(|i| (g, i)))
    }

    fn no_group(&self, group: usize) -> OptimError {
        OptimError::InvalidSetup(format!(
            "{}: no parameter group {group} (it has {})",
            R::KIND,
            self.groups.len()
        ))
    }
}

/// Checks a rule's values and its number of state buffers.
fn check_rule<R: UpdateRule>(rule: &R) -> Result<()> {
    rule.validate()?;
    let k = rule.state_names().len();
    if k > MAX_STATE_BUFFERS {
        return Err(OptimError::InvalidSetup(format!(
            "{} asks for {k} state buffers, at most {MAX_STATE_BUFFERS} are supported",
            R::KIND
        )));
    }
    Ok(())
}

impl<R: UpdateRule> Optimizer for GenericOptimizer<R> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        // Every group is checked before any parameter moves (an lr set by
        // `set_learning_rate` is checked here).
        for rule in &self.rules {
            rule.validate()?;
        }
        for (gi, group) in self.groups.iter().enumerate() {
            let rule = &self.rules[gi];
            for (pi, var) in group.vars().iter().enumerate() {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let name = &group.names()[pi];
                update::check_grad(name, var, grad)?;
                let slot = &mut self.states[gi][pi];
                let st = match slot {
                    Some(st) => st,
                    None => {
                        let on_device = self.tensor_path || !var.device().is_cpu();
                        slot.insert(ParamState::new(rule, var, on_device, name)?)
                    }
                };
                update::update_param(rule, var, grad, st)?;
            }
        }
        Ok(())
    }

    fn set_learning_rate(&mut self, lr: f64) {
        for rule in &mut self.rules {
            *rule.lr_mut() = lr;
        }
    }

    fn group_lr(&self, group: usize) -> Option<f64> {
        self.rules.get(group).map(lr_of)
    }

    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.update_rule(group, |r| *r.lr_mut() = lr)
    }

    fn momentum(&self, group: usize) -> Option<f64> {
        self.rules.get(group).and_then(momentum_of)
    }

    fn set_momentum(&mut self, group: usize, momentum: f64) -> Result<()> {
        let rule = self.rules.get(group).ok_or_else(|| self.no_group(group))?;
        if momentum_of(rule).is_none() {
            return Err(OptimError::InvalidSetup(format!(
                "{} has no momentum (nor betas) to set",
                R::KIND
            )));
        }
        self.update_rule(group, |r| {
            if let Some(m) = r.momentum_mut() {
                *m = momentum;
            }
        })
    }

    fn param_groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn set_initial_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        crate::check_non_negative("initial_lr", lr)?;
        if group >= self.groups.len() {
            return Err(self.no_group(group));
        }
        self.groups[group].set_initial_lr(lr);
        Ok(())
    }

    fn state_bytes(&self) -> Result<Vec<u8>> {
        self.save_bytes()
    }

    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_bytes(bytes)
    }

    fn name(&self) -> &str {
        R::KIND
    }
}

impl<R: UpdateRule> candle_nn::Optimizer for GenericOptimizer<R> {
    type Config = R;

    fn new(vars: Vec<Var>, config: R) -> candle_core::Result<Self> {
        GenericOptimizer::new(vars, config).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Optimizer::step(self, grads).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        Optimizer::learning_rate(self)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        Optimizer::set_learning_rate(self, lr)
    }
}
