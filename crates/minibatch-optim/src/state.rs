//! Saving and loading optimizer state as safetensors.
//!
//! Layout: for every parameter that has been updated, `{name}.step` (i64
//! scalar) and `{name}.{buffer}` for each of the rule's state buffers (f32 for
//! f32/bf16/f16 parameters, f64 for f64 ones, the parameter's shape).
//! Metadata: `minibatch.kind` (e.g. `"SGD"`), `minibatch.version` (crate
//! version), `minibatch.format` (`"1"`), `minibatch.groups` (JSON: per group
//! its `lr`, `hyperparameters` and parameter `names`).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use safetensors::{Dtype, SafeTensors, View};

use crate::generic::{state_dtype, Buffers};
use crate::kernel::HostBuffers;
use crate::{GenericOptimizer, OptimError, Result, UpdateRule};

const KIND: &str = "minibatch.kind";
const VERSION: &str = "minibatch.version";
const FORMAT: &str = "minibatch.format";
const GROUPS: &str = "minibatch.groups";

struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn serialize<R: UpdateRule>(opt: &GenericOptimizer<R>) -> Result<Vec<u8>> {
    let mut owned = Vec::new();
    let mut groups_json = Vec::new();
    for (g, group) in opt.groups.iter().enumerate() {
        let rule = &opt.rules[g];
        let mut hyper = rule.to_json();
        if let Some(obj) = hyper.as_object_mut() {
            obj.insert("lr".into(), group.lr.into());
        }
        groups_json.push(serde_json::json!({
            "lr": group.lr,
            "hyperparameters": hyper,
            "names": group.names(),
        }));
        let names = rule.state_names();
        for (i, var) in group.vars().iter().enumerate() {
            let Some(st) = &opt.states[g][i] else {
                continue;
            };
            let pname = &group.names()[i];
            owned.push(Owned {
                name: format!("{pname}.step"),
                dtype: Dtype::I64,
                shape: vec![],
                data: (st.step as i64).to_le_bytes().to_vec(),
            });
            let shape = var.dims().to_vec();
            for (k, bname) in names.iter().enumerate() {
                let (dtype, data) = match &st.bufs {
                    Buffers::Host(HostBuffers::F32(b)) => (Dtype::F32, f32_bytes(&b[k])),
                    Buffers::Host(HostBuffers::F64(b)) => (Dtype::F64, f64_bytes(&b[k])),
                    Buffers::Device(ts) => {
                        let t = ts[k].flatten_all()?;
                        match t.dtype() {
                            DType::F64 => (Dtype::F64, f64_bytes(&t.to_vec1::<f64>()?)),
                            _ => (
                                Dtype::F32,
                                f32_bytes(&t.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                            ),
                        }
                    }
                };
                owned.push(Owned {
                    name: format!("{pname}.{bname}"),
                    dtype,
                    shape: shape.clone(),
                    data,
                });
            }
        }
    }
    let mut meta = HashMap::new();
    meta.insert(KIND.to_string(), R::KIND.to_string());
    meta.insert(VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert(FORMAT.to_string(), "1".to_string());
    meta.insert(
        GROUPS.to_string(),
        serde_json::Value::Array(groups_json).to_string(),
    );
    safetensors::serialize(owned.iter().map(|o| (o.name.clone(), o)), Some(meta))
        .map_err(|e| OptimError::CorruptState(format!("cannot serialise state: {e}")))
}

fn decode<F, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> F) -> Vec<F> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect()
}

pub(crate) fn deserialize<R: UpdateRule>(
    opt: &mut GenericOptimizer<R>,
    bytes: &[u8],
) -> Result<()> {
    let corrupt = |e: safetensors::SafeTensorError| OptimError::CorruptState(e.to_string());
    let st = SafeTensors::deserialize(bytes).map_err(corrupt)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
    let meta = header.metadata().as_ref().ok_or_else(|| {
        OptimError::CorruptState("no metadata (not a minibatch optimizer state)".into())
    })?;
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| OptimError::CorruptState(format!("metadata `{key}` is missing")))
    };
    let kind = get(KIND)?;
    if kind != R::KIND {
        return Err(OptimError::StateMismatch(format!(
            "the state was saved by {kind}, this optimizer is {}",
            R::KIND
        )));
    }
    let groups: serde_json::Value = serde_json::from_str(get(GROUPS)?)
        .map_err(|e| OptimError::CorruptState(format!("metadata `{GROUPS}`: {e}")))?;
    let groups = groups
        .as_array()
        .ok_or_else(|| OptimError::CorruptState(format!("metadata `{GROUPS}` is not an array")))?;
    if groups.len() != opt.groups.len() {
        return Err(OptimError::StateMismatch(format!(
            "the state has {} parameter groups, this optimizer {}",
            groups.len(),
            opt.groups.len()
        )));
    }
    let mut new_rules = opt.rules.clone();
    let mut new_lrs = Vec::with_capacity(groups.len());
    let mut new_states = Vec::with_capacity(groups.len());
    let mut consumed = 0usize;
    for (g, gj) in groups.iter().enumerate() {
        let group = &opt.groups[g];
        let names: Vec<String> = gj
            .get("names")
            .and_then(|n| serde_json::from_value(n.clone()).ok())
            .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no parameter names")))?;
        if names != group.names() {
            let diff = names
                .iter()
                .zip(group.names())
                .position(|(a, b)| a != b)
                .map(|i| format!("`{}` in the state vs `{}` here", names[i], group.names()[i]))
                .unwrap_or_else(|| {
                    format!(
                        "{} parameters in the state vs {} here",
                        names.len(),
                        group.len()
                    )
                });
            return Err(OptimError::StateMismatch(format!(
                "group {g} parameter names differ: {diff}"
            )));
        }
        let lr = gj
            .get("lr")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no numeric lr")))?;
        let hyper = gj
            .get("hyperparameters")
            .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no hyperparameters")))?;
        new_rules[g].load_json(hyper)?;
        new_rules[g].set_learning_rate(lr);
        new_rules[g].validate()?;
        new_lrs.push(lr);
        let rule = &new_rules[g];
        let mut gstates = Vec::with_capacity(group.len());
        for (i, var) in group.vars().iter().enumerate() {
            let pname = &group.names()[i];
            let step_key = format!("{pname}.step");
            let Ok(sv) = st.tensor(&step_key) else {
                gstates.push(None);
                continue;
            };
            consumed += 1;
            if sv.dtype() != Dtype::I64 || sv.shape().iter().product::<usize>() != 1 {
                return Err(OptimError::StateMismatch(format!(
                    "`{step_key}` should be one i64, found {:?} {:?}",
                    sv.dtype(),
                    sv.shape()
                )));
            }
            let step = decode(sv.data(), i64::from_le_bytes)[0];
            if step < 0 {
                return Err(OptimError::CorruptState(format!(
                    "`{step_key}` is negative"
                )));
            }
            let sdt = state_dtype(pname, var.dtype())?;
            let mut st_new = GenericOptimizer::<R>::init_state(rule, var, false, pname)?;
            // Keep the representation the live optimizer uses (device tensors
            // for non-CPU parameters or a forced tensor path).
            let device = opt.tensor_path || !var.device().is_cpu();
            let mut dev_bufs = Vec::new();
            for (k, bname) in rule.state_names().iter().enumerate() {
                let key = format!("{pname}.{bname}");
                let tv = st
                    .tensor(&key)
                    .map_err(|_| OptimError::StateMismatch(format!("`{key}` is missing")))?;
                consumed += 1;
                if tv.shape() != var.dims() {
                    return Err(OptimError::StateMismatch(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        tv.shape(),
                        var.dims()
                    )));
                }
                let want = if sdt == DType::F64 {
                    Dtype::F64
                } else {
                    Dtype::F32
                };
                if tv.dtype() != want {
                    return Err(OptimError::StateMismatch(format!(
                        "`{key}` has dtype {:?}, expected {want:?}",
                        tv.dtype()
                    )));
                }
                match &mut st_new.bufs {
                    Buffers::Host(HostBuffers::F32(b)) => {
                        b[k] = decode(tv.data(), f32::from_le_bytes);
                        if device {
                            dev_bufs.push(Tensor::from_slice(&b[k], var.shape(), var.device())?);
                        }
                    }
                    Buffers::Host(HostBuffers::F64(b)) => {
                        b[k] = decode(tv.data(), f64::from_le_bytes);
                        if device {
                            dev_bufs.push(Tensor::from_slice(&b[k], var.shape(), var.device())?);
                        }
                    }
                    Buffers::Device(_) => unreachable!("init_state(.., false, ..) on the host"),
                }
            }
            if device {
                st_new.bufs = Buffers::Device(dev_bufs);
            }
            st_new.step = step as u64;
            gstates.push(Some(st_new));
        }
        new_states.push(gstates);
    }
    if consumed != st.len() {
        let mut known = std::collections::HashSet::new();
        for (g, group) in opt.groups.iter().enumerate() {
            for pname in group.names() {
                known.insert(format!("{pname}.step"));
                for b in new_rules[g].state_names() {
                    known.insert(format!("{pname}.{b}"));
                }
            }
        }
        let mut unknown: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !known.contains(*n))
            .map(|n| n.to_string())
            .collect();
        unknown.sort();
        return Err(OptimError::StateMismatch(format!(
            "tensors not belonging to this optimizer: {unknown:?}"
        )));
    }
    opt.rules = new_rules;
    for (group, lr) in opt.groups.iter_mut().zip(new_lrs) {
        group.lr = lr;
    }
    opt.states = new_states;
    Ok(())
}
