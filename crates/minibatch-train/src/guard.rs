//! Checks that the trainer's parts fit together: the optimizer's parameters
//! are the `VarMap`'s, and every trained parameter receives a gradient.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{TensorId, Var};
use candle_nn::VarMap;
use minibatch_optim::{varmap_vars, Optimizer};

use crate::error::{Result, TrainError};

/// The names (`VarMap` paths, sorted) of the parameters of `varmap` that have
/// no gradient in `grads`: the trainer's gradient guard, for hand-written
/// loops.
///
/// candle-nn 0.11's fused `LayerNorm`/`RmsNorm`, `ops::softmax_last_dim`,
/// `ops::layer_norm`/`rms_norm` and `rotary_emb::rope*` have no backward:
/// `loss.backward()` succeeds, but nothing upstream of them gets a gradient
/// and an optimizer silently skips those parameters. Call this once after the
/// first backward pass; `minibatch::nn` has drop-ins with real backward passes.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let fc = candle_nn::linear(3, 4, vb.pp("fc"))?;
/// let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
/// // softmax_last_dim has no backward in candle-nn 0.11: the Linear gets no gradient
/// let loss = candle_nn::ops::softmax_last_dim(&fc.forward(&x)?)?.sqr()?.sum_all()?;
/// let missing = minibatch_train::params_without_grad(&varmap, &loss.backward()?)?;
/// assert_eq!(missing, ["fc.bias", "fc.weight"]);
/// // the generic softmax has one
/// let loss = candle_nn::ops::softmax(&fc.forward(&x)?, 1)?.sqr()?.sum_all()?;
/// assert!(minibatch_train::params_without_grad(&varmap, &loss.backward()?)?.is_empty());
/// # Ok(()) }
/// ```
pub fn params_without_grad(varmap: &VarMap, grads: &GradStore) -> Result<Vec<String>> {
    Ok(varmap_vars(varmap)?
        .into_iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(name, _)| name)
        .collect())
}

/// The `VarMap` names of the optimizer's parameters, in the optimizer's
/// order. An error when one of them is not in the `VarMap`: the trainer
/// checkpoints the `VarMap`, so such a parameter would be trained but never
/// saved (an optimizer built from another `VarMap`).
///
/// An error too when the optimizer holds no parameter at all: it would train
/// nothing, silently. Parameters of the `VarMap` the optimizer does not hold
/// are allowed: they are frozen (saved and restored, never updated); see
/// [`frozen_names`].
pub(crate) fn optimizer_var_names(
    varmap: &VarMap,
    optimizer: &dyn Optimizer,
) -> Result<(Vec<Var>, Vec<String>)> {
    let by_id: HashMap<TensorId, String> = varmap_vars(varmap)?
        .into_iter()
        .map(|(name, v)| (v.as_tensor().id(), name))
        .collect();
    let (mut vars, mut names, mut foreign) = (Vec::new(), Vec::new(), Vec::new());
    for group in optimizer.param_groups() {
        for (var, opt_name) in group.vars().iter().zip(group.names()) {
            match by_id.get(&var.as_tensor().id()) {
                Some(name) => {
                    vars.push(var.clone());
                    names.push(name.clone());
                }
                None => foreign.push(opt_name.clone()),
            }
        }
    }
    if !foreign.is_empty() {
        let in_varmap: Vec<&String> = {
            let mut v: Vec<&String> = by_id.values().collect();
            v.sort();
            v
        };
        return Err(TrainError::Config(format!(
            "the optimizer's parameters {foreign:?} are not in the trainer's VarMap \
             (which holds {in_varmap:?}): build the optimizer from the same VarMap as \
             the model, or the trainer would checkpoint other weights than it trains"
        )));
    }
    if vars.is_empty() {
        return Err(TrainError::Config(format!(
            "the optimizer holds no parameter, so training would change nothing (the VarMap \
             holds {}). The usual cause: the optimizer was built from the VarMap (for example \
             Sgd::from_varmap) before the model created its weights there; build the model \
             first, then the optimizer",
            match by_id.len() {
                0 => "none either".to_string(),
                n => format!("{n} parameter(s)"),
            }
        )));
    }
    Ok((vars, names))
}

/// The `VarMap` names (sorted) of its parameters that the optimizer does not
/// hold (`trained`: the optimizer's names): they stay frozen.
pub(crate) fn frozen_names(varmap: &VarMap, trained: &[String]) -> Result<Vec<String>> {
    Ok(varmap_vars(varmap)?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !trained.contains(name))
        .collect())
}

/// The note the trainer prints once at build when the optimizer leaves some
/// of the `VarMap`'s parameters out.
pub(crate) fn frozen_note(frozen: &[String], total: usize) -> String {
    format!(
        "note: the optimizer holds {} of the VarMap's {total} parameters; these {} stay frozen \
         (saved in checkpoints, never updated): {}. If they should train, build the optimizer \
         after the whole model, from all of the VarMap's parameters; to freeze parameters on \
         purpose, build it from the ones to train only (minibatch::optim::select picks them \
         by name)",
        total - frozen.len(),
        frozen.len(),
        frozen.join(", ")
    )
}

/// The names of `vars` (with their `names`) that have no gradient in `grads`.
pub(crate) fn missing_grads(vars: &[Var], names: &[String], grads: &GradStore) -> Vec<String> {
    let mut missing: Vec<String> = vars
        .iter()
        .zip(names)
        .filter(|(v, _)| grads.get(v.as_tensor()).is_none())
        .map(|(_, n)| n.clone())
        .collect();
    missing.sort();
    missing
}
