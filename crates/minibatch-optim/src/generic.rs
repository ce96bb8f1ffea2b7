//! The one optimizer implementation every update rule shares.

use std::collections::HashSet;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, WithDType};
use candle_nn::VarMap;

use crate::kernel::{run_native, FusedUpdate, HostBuffers};
use crate::rule::MAX_STATE_BUFFERS;
use crate::{Float, OptimError, Optimizer, ParamGroup, Result, UpdateRule};

/// The state buffers of one parameter: host vectors for CPU parameters,
/// tensors on the parameter's device otherwise.
#[derive(Debug, Clone)]
pub(crate) enum Buffers {
    Host(HostBuffers),
    Device(Vec<Tensor>),
}

/// The state of one parameter: created on its first update.
#[derive(Debug, Clone)]
pub(crate) struct ParamState {
    pub step: u64,
    pub bufs: Buffers,
}

/// An optimizer running an [`UpdateRule`] over parameter groups.
///
/// [`Sgd`](crate::Sgd), [`Adam`](crate::Adam), [`AdamW`](crate::AdamW),
/// [`RmsProp`](crate::RmsProp) and [`Adagrad`](crate::Adagrad) are aliases of
/// this type; a new optimizer is a new rule (see the crate docs).
///
/// How a step runs, per parameter with a gradient:
/// * **CPU parameters**: one fused in-place pass over the parameter's storage
///   (a candle `InplaceOp2`), the gradient and the state buffers (host
///   `Vec<f32>`/`Vec<f64>` owned by the optimizer). Tensors above 65 536
///   elements are split in chunks over the rayon pool. Nothing is allocated.
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
    pub(crate) groups: Vec<ParamGroup>,
    pub(crate) rules: Vec<R>,
    pub(crate) states: Vec<Vec<Option<ParamState>>>,
    pub(crate) tensor_path: bool,
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
            rule.validate()?;
            if rule.state_names().len() > MAX_STATE_BUFFERS {
                return Err(OptimError::InvalidSetup(format!(
                    "{} asks for {} state buffers, at most {MAX_STATE_BUFFERS} are supported",
                    R::KIND,
                    rule.state_names().len()
                )));
            }
            for (name, var) in &params {
                if !seen.insert(name.clone()) {
                    return Err(OptimError::InvalidSetup(format!(
                        "parameter name `{name}` appears twice"
                    )));
                }
                check_dtype(name, var.dtype())?;
            }
            states.push(vec![None; params.len()]);
            out_groups.push(ParamGroup::new(rule.learning_rate(), params));
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

    /// The hyperparameters of group `group` (its learning rate is kept in
    /// sync with [`ParamGroup::lr`] at each step).
    pub fn rule(&self, group: usize) -> Option<&R> {
        self.rules.get(group)
    }

    /// Mutable hyperparameters of group `group`; validated at the next step.
    pub fn rule_mut(&mut self, group: usize) -> Option<&mut R> {
        self.rules.get_mut(group)
    }

    /// The number of updates parameter `name` has received (0 if none).
    pub fn step_count(&self, name: &str) -> u64 {
        for (g, group) in self.groups.iter().enumerate() {
            if let Some(i) = group.names().iter().position(|n| n == name) {
                return self.states[g][i].as_ref().map_or(0, |s| s.step);
            }
        }
        0
    }

    /// A copy of state buffer `buffer` (e.g. `"exp_avg"`) of parameter `name`
    /// as a CPU tensor, if that parameter has been updated.
    pub fn state_tensor(&self, name: &str, buffer: &str) -> Result<Option<Tensor>> {
        for (g, group) in self.groups.iter().enumerate() {
            let Some(i) = group.names().iter().position(|n| n == name) else {
                continue;
            };
            let Some(k) = self.rules[g]
                .state_names()
                .iter()
                .position(|b| *b == buffer)
            else {
                return Ok(None);
            };
            let Some(st) = &self.states[g][i] else {
                return Ok(None);
            };
            let shape = group.vars()[i].shape().clone();
            let t = match &st.bufs {
                Buffers::Host(HostBuffers::F32(b)) => {
                    Tensor::from_slice(&b[k], shape, &candle_core::Device::Cpu)?
                }
                Buffers::Host(HostBuffers::F64(b)) => {
                    Tensor::from_slice(&b[k], shape, &candle_core::Device::Cpu)?
                }
                Buffers::Device(ts) => ts[k].to_device(&candle_core::Device::Cpu)?,
            };
            return Ok(Some(t));
        }
        Ok(None)
    }

    pub(crate) fn init_state(
        rule: &R,
        var: &Var,
        tensor_path: bool,
        name: &str,
    ) -> Result<ParamState> {
        let k = rule.state_names().len();
        let n = var.elem_count();
        let bufs = if var.device().is_cpu() && !tensor_path {
            match var.dtype() {
                DType::F64 => Buffers::Host(HostBuffers::F64(
                    (0..k).map(|i| vec![rule.initial_state(i); n]).collect(),
                )),
                DType::F32 | DType::BF16 | DType::F16 => Buffers::Host(HostBuffers::F32(
                    (0..k)
                        .map(|i| vec![rule.initial_state(i) as f32; n])
                        .collect(),
                )),
                dtype => {
                    return Err(OptimError::UnsupportedDtype {
                        name: name.to_string(),
                        dtype,
                    })
                }
            }
        } else {
            let sdt = state_dtype(name, var.dtype())?;
            let mut ts = Vec::with_capacity(k);
            for i in 0..k {
                let v = rule.initial_state(i);
                let t = if sdt == DType::F64 {
                    Tensor::full(v, var.shape(), var.device())?
                } else {
                    Tensor::full(v as f32, var.shape(), var.device())?
                };
                ts.push(t);
            }
            Buffers::Device(ts)
        };
        Ok(ParamState { step: 0, bufs })
    }
}

fn check_dtype(name: &str, dtype: DType) -> Result<()> {
    state_dtype(name, dtype).map(|_| ())
}

/// The dtype state buffers are kept in for a parameter dtype.
pub(crate) fn state_dtype(name: &str, dtype: DType) -> Result<DType> {
    match dtype {
        DType::F64 => Ok(DType::F64),
        DType::F32 | DType::BF16 | DType::F16 => Ok(DType::F32),
        dtype => Err(OptimError::UnsupportedDtype {
            name: name.to_string(),
            dtype,
        }),
    }
}

fn check_grad(name: &str, var: &Var, grad: &Tensor) -> Result<()> {
    let reason = if grad.shape() != var.shape() {
        format!("shape {:?} vs parameter {:?}", grad.dims(), var.dims())
    } else if grad.dtype() != var.dtype() {
        format!("dtype {:?} vs parameter {:?}", grad.dtype(), var.dtype())
    } else if !grad.device().same_device(var.device()) {
        format!("device {:?} vs parameter {:?}", grad.device(), var.device())
    } else {
        return Ok(());
    };
    Err(OptimError::GradientMismatch {
        name: name.to_string(),
        reason,
    })
}

/// Tensor-path update of one parameter (non-CPU devices, or forced).
fn device_update<R: UpdateRule>(
    rule: &R,
    step: u64,
    var: &Var,
    grad: &Tensor,
    state: &mut [Tensor],
) -> Result<()> {
    let half = matches!(var.dtype(), DType::BF16 | DType::F16);
    let (p, g) = if half {
        (
            var.as_tensor().to_dtype(DType::F32)?,
            grad.to_dtype(DType::F32)?,
        )
    } else {
        (var.as_tensor().detach(), grad.detach())
    };
    if let Some(new) = rule.update_tensors(step, &p, &g, state)? {
        var.set(&new.to_dtype(var.dtype())?)?;
        return Ok(());
    }
    if p.dtype() == DType::F64 {
        host_round_trip::<R, f64>(rule, step, var, &p, &g, state)
    } else {
        host_round_trip::<R, f32>(rule, step, var, &p, &g, state)
    }
}

fn host_round_trip<R: UpdateRule, F: Float + WithDType>(
    rule: &R,
    step: u64,
    var: &Var,
    p: &Tensor,
    g: &Tensor,
    state: &mut [Tensor],
) -> Result<()> {
    let mut pv: Vec<F> = p.flatten_all()?.to_vec1()?;
    let gv: Vec<F> = g.flatten_all()?.to_vec1()?;
    let mut sv = Vec::with_capacity(state.len());
    for t in state.iter() {
        sv.push(t.flatten_all()?.to_vec1::<F>()?);
    }
    run_native(rule, step, &mut pv, &gv, &mut sv);
    let dev = var.device();
    let new = Tensor::from_vec(pv, var.shape(), dev)?.to_dtype(var.dtype())?;
    var.set(&new)?;
    for (t, v) in state.iter_mut().zip(sv) {
        *t = Tensor::from_vec(v, var.shape(), dev)?;
    }
    Ok(())
}

impl<R: UpdateRule> Optimizer for GenericOptimizer<R> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for gi in 0..self.groups.len() {
            let lr = self.groups[gi].lr;
            let rule = &mut self.rules[gi];
            if rule.learning_rate() != lr {
                rule.set_learning_rate(lr);
                rule.validate()?;
            }
            let rule = &self.rules[gi];
            let group = &self.groups[gi];
            for (pi, var) in group.vars().iter().enumerate() {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let name = &group.names()[pi];
                check_grad(name, var, grad)?;
                let slot = &mut self.states[gi][pi];
                if slot.is_none() {
                    *slot = Some(Self::init_state(rule, var, self.tensor_path, name)?);
                }
                let st = slot.as_mut().expect("state initialised above");
                let step = st.step + 1;
                match &mut st.bufs {
                    Buffers::Host(bufs) => {
                        let contiguous;
                        let grad = if grad.is_contiguous() {
                            grad
                        } else {
                            contiguous = grad.contiguous()?;
                            &contiguous
                        };
                        let op = FusedUpdate {
                            rule,
                            step,
                            state: Mutex::new(bufs),
                        };
                        var.as_tensor().inplace_op2(grad, &op)?;
                    }
                    Buffers::Device(ts) => device_update(rule, step, var, grad, ts)?,
                }
                st.step = step;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.groups.first().map_or_else(
            || self.rules.first().map_or(0.0, |r| r.learning_rate()),
            |g| g.lr,
        )
    }

    fn set_learning_rate(&mut self, lr: f64) {
        for g in &mut self.groups {
            g.lr = lr;
        }
    }

    fn momentum(&self, group: usize) -> Option<f64> {
        self.rules.get(group).and_then(|r| r.momentum())
    }

    fn set_momentum(&mut self, group: usize, momentum: f64) -> Result<()> {
        let n = self.rules.len();
        let Some(rule) = self.rules.get(group) else {
            return Err(OptimError::InvalidSetup(format!(
                "{}: no parameter group {group} (it has {n})",
                R::KIND
            )));
        };
        if rule.momentum().is_none() {
            return Err(OptimError::InvalidSetup(format!(
                "{} has no momentum (nor betas) to set",
                R::KIND
            )));
        }
        let mut new = rule.clone();
        new.set_momentum(momentum);
        new.validate()?;
        if new.state_names() != rule.state_names() && self.states[group].iter().any(|s| s.is_some())
        {
            return Err(OptimError::InvalidSetup(format!(
                "{}: setting momentum {} -> {momentum} in group {group} changes the state \
                 buffers ({:?} -> {:?}) of parameters that already have state; set it before \
                 the first step",
                R::KIND,
                rule.momentum().unwrap_or_default(),
                rule.state_names(),
                new.state_names()
            )));
        }
        self.rules[group] = new;
        Ok(())
    }

    fn param_groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn param_groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    fn state_bytes(&self) -> Result<Vec<u8>> {
        crate::state::serialize(self)
    }

    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        crate::state::deserialize(self, bytes)
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
