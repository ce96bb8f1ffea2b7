//! Saving and loading optimizer state as safetensors.
//!
//! Layout (format 2): for every parameter that has been updated,
//! `{name}.step` (i64 scalar) and `{name}.{buffer}` for each of the rule's
//! state buffers that holds data (f32 for f32/bf16/f16 parameters, f64 for
//! f64 ones, the parameter's shape). Metadata: `minibatch.kind` (e.g.
//! `"SGD"`), `minibatch.version` (crate version), `minibatch.format` (`"2"`),
//! `minibatch.groups` (JSON: per group its `hyperparameters`, learning rate
//! included, its parameter `names` and, when some parameter has a buffer
//! that has not been updated yet, `new_buffers`: parameter name → buffer
//! names, saved without data like PyTorch's `None`).
//!
//! The bytes are deterministic: metadata keys and tensors are written in
//! sorted order (the header is written here rather than by
//! `safetensors::serialize`, whose metadata is a `HashMap`).
//!
//! Format 1 (before the learning rate had a single owner: a group-level
//! `lr` beside the hyperparameters) still loads.

use std::collections::{BTreeMap, HashSet};

use candle_core::{DType, Tensor};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};
use serde::ser::SerializeMap;
use serde_json::Value;

use super::param_state::{all_new, state_dtype, Buffers, ParamState};
use super::GenericOptimizer;
use crate::kernel::HostBuffers;
use crate::{OptimError, Result, UpdateRule};

const KIND: &str = "minibatch.kind";
const VERSION: &str = "minibatch.version";
const FORMAT: &str = "minibatch.format";
const GROUPS: &str = "minibatch.groups";
/// The format written.
const FORMAT_NOW: &str = "2";

/// One tensor to write.
struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
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

/// The safetensors header, metadata first, entries in the given order.
struct Header<'a> {
    meta: &'a BTreeMap<&'static str, String>,
    tensors: &'a [(&'a str, TensorInfo)],
}

impl serde::Serialize for Header<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry("__metadata__", self.meta)?;
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

/// A safetensors file of `tensors` and `meta`, byte for byte the same for the
/// same input: tensors sorted like `safetensors::serialize` does (by
/// decreasing dtype alignment, then name), metadata by key.
fn write_safetensors(mut tensors: Vec<Owned>, meta: &BTreeMap<&'static str, String>) -> Vec<u8> {
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut offset = 0;
    let infos: Vec<(&str, TensorInfo)> = tensors
        .iter()
        .map(|t| {
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.data.len()),
            };
            offset += t.data.len();
            (t.name.as_str(), info)
        })
        .collect();
    let header = Header {
        meta,
        tensors: &infos,
    };
    // Serialising strings, numbers and maps of them cannot fail.
    let mut header = serde_json::to_vec(&header).unwrap_or_default();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in &tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

impl<R: UpdateRule> GenericOptimizer<R> {
    /// [`Optimizer::state_bytes`](crate::Optimizer::state_bytes).
    pub(super) fn save_bytes(&self) -> Result<Vec<u8>> {
        let mut owned = Vec::new();
        let mut groups_json = Vec::with_capacity(self.groups.len());
        for ((group, rule), states) in self.groups.iter().zip(&self.rules).zip(&self.states) {
            let hyper = serde_json::to_value(rule).map_err(|e| {
                OptimError::InvalidSetup(format!(
                    "{} hyperparameters cannot be saved: {e}",
                    R::KIND
                ))
            })?;
            let names = rule.state_names();
            let mut new_buffers = serde_json::Map::new();
            for ((pname, var), st) in group.names().iter().zip(group.vars()).zip(states) {
                let Some(st) = st else {
                    continue;
                };
                owned.push(Owned {
                    name: format!("{pname}.step"),
                    dtype: Dtype::I64,
                    shape: vec![],
                    data: (st.step as i64).to_le_bytes().to_vec(),
                });
                let mut unstarted = Vec::new();
                for (k, bname) in names.iter().enumerate() {
                    if !st.holds(k) {
                        unstarted.push(Value::from(*bname));
                        continue;
                    }
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
                        shape: var.dims().to_vec(),
                        data,
                    });
                }
                if !unstarted.is_empty() {
                    new_buffers.insert(pname.clone(), Value::Array(unstarted));
                }
            }
            let mut gj = serde_json::Map::new();
            gj.insert("hyperparameters".into(), hyper);
            gj.insert("names".into(), group.names().into());
            if !new_buffers.is_empty() {
                gj.insert("new_buffers".into(), Value::Object(new_buffers));
            }
            groups_json.push(Value::Object(gj));
        }
        let meta = BTreeMap::from([
            (KIND, R::KIND.to_string()),
            (VERSION, env!("CARGO_PKG_VERSION").to_string()),
            (FORMAT, FORMAT_NOW.to_string()),
            (GROUPS, Value::Array(groups_json).to_string()),
        ]);
        Ok(write_safetensors(owned, &meta))
    }

    /// [`Optimizer::load_state_bytes`](crate::Optimizer::load_state_bytes):
    /// everything is checked before anything changes.
    pub(super) fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
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
        let format1 = match get(FORMAT)?.as_str() {
            "1" => true,
            "2" => false,
            other => {
                return Err(OptimError::StateMismatch(format!(
                    "the state is in format {other} (written by minibatch-optim {}); this \
                     version ({}) reads formats 1 and 2",
                    meta.get(VERSION).map_or("?", String::as_str),
                    env!("CARGO_PKG_VERSION")
                )))
            }
        };
        let groups: Value = serde_json::from_str(get(GROUPS)?)
            .map_err(|e| OptimError::CorruptState(format!("metadata `{GROUPS}`: {e}")))?;
        let groups = groups.as_array().ok_or_else(|| {
            OptimError::CorruptState(format!("metadata `{GROUPS}` is not an array"))
        })?;
        if groups.len() != self.groups.len() {
            return Err(OptimError::StateMismatch(format!(
                "the state has {} parameter groups, this optimizer {}",
                groups.len(),
                self.groups.len()
            )));
        }
        let mut new_rules = Vec::with_capacity(groups.len());
        let mut new_states = Vec::with_capacity(groups.len());
        let mut consumed = 0usize;
        for (g, gj) in groups.iter().enumerate() {
            self.check_names(g, gj)?;
            let rule = self.read_rule(g, gj, format1)?;
            let unstarted = read_new_buffers(g, gj)?;
            let group = &self.groups[g];
            let mut gstates = Vec::with_capacity(group.len());
            for (pname, var) in group.names().iter().zip(group.vars()) {
                let step_key = format!("{pname}.step");
                let Ok(sv) = st.tensor(&step_key) else {
                    if unstarted.contains_key(pname.as_str()) {
                        return Err(OptimError::CorruptState(format!(
                            "`{pname}` has new buffers but no `{step_key}`"
                        )));
                    }
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
                let on_device = self.tensor_path || !var.device().is_cpu();
                let mut state = ParamState::new(&rule, var, false, pname)?;
                let sdt = state_dtype(pname, var.dtype())?;
                let names = rule.state_names();
                let new_names = unstarted.get(pname.as_str()).map_or(&[][..], Vec::as_slice);
                if let Some(unknown) = new_names.iter().find(|n| !names.contains(&n.as_str())) {
                    return Err(OptimError::StateMismatch(format!(
                        "`{pname}`: new buffer `{unknown}` is not one of {} ({names:?})",
                        R::KIND
                    )));
                }
                let mut mask = all_new(names.len());
                for (k, bname) in names.iter().enumerate() {
                    let key = format!("{pname}.{bname}");
                    let found = st.tensor(&key).ok();
                    let listed_new = new_names.iter().any(|n| n == bname);
                    let tv = match (found, listed_new) {
                        (None, true) => continue,
                        (Some(_), true) => {
                            return Err(OptimError::CorruptState(format!(
                                "`{key}` is saved but listed as a new (empty) buffer"
                            )))
                        }
                        (None, false) => {
                            return Err(OptimError::StateMismatch(format!("`{key}` is missing")))
                        }
                        (Some(tv), false) => tv,
                    };
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
                    match &mut state.bufs {
                        Buffers::Host(HostBuffers::F32(b)) => {
                            b[k] = decode(tv.data(), f32::from_le_bytes)
                        }
                        Buffers::Host(HostBuffers::F64(b)) => {
                            b[k] = decode(tv.data(), f64::from_le_bytes)
                        }
                        Buffers::Device(_) => {
                            unreachable!("ParamState::new(.., false, ..) is on the host")
                        }
                    }
                    mask &= !(1 << k);
                }
                state.step = step as u64;
                state.new_buffers = mask;
                if on_device {
                    state.bufs = to_device(state.bufs, var)?;
                }
                gstates.push(Some(state));
            }
            new_rules.push(rule);
            new_states.push(gstates);
        }
        if consumed != st.len() {
            let mut known = HashSet::new();
            for (group, rule) in self.groups.iter().zip(&new_rules) {
                for pname in group.names() {
                    known.insert(format!("{pname}.step"));
                    for b in rule.state_names() {
                        known.insert(format!("{pname}.{b}"));
                    }
                }
            }
            let mut unknown: Vec<&str> = st
                .names()
                .into_iter()
                .filter(|n| !known.contains(*n))
                .collect();
            unknown.sort();
            return Err(OptimError::StateMismatch(format!(
                "tensors not belonging to this optimizer: {unknown:?}"
            )));
        }
        self.rules = new_rules;
        self.states = new_states;
        Ok(())
    }

    /// Checks that saved group `g` lists this group's parameter names.
    fn check_names(&self, g: usize, gj: &Value) -> Result<()> {
        let group = &self.groups[g];
        let names: Vec<String> = gj
            .get("names")
            .and_then(|n| serde_json::from_value(n.clone()).ok())
            .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no parameter names")))?;
        if names == group.names() {
            return Ok(());
        }
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
        Err(OptimError::StateMismatch(format!(
            "group {g} parameter names differ: {diff}"
        )))
    }

    /// The hyperparameters of saved group `g`, checked. Format 1 also had a
    /// group-level `lr` (the one in force), and rules that saved only their
    /// `lr` then: those keep the other values of this optimizer's rule.
    fn read_rule(&self, g: usize, gj: &Value, format1: bool) -> Result<R> {
        let hyper = gj
            .get("hyperparameters")
            .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no hyperparameters")))?;
        let bad = |e: serde_json::Error| {
            OptimError::CorruptState(format!("group {g}: {} hyperparameters: {e}", R::KIND))
        };
        let mut rule = match serde_json::from_value::<R>(hyper.clone()) {
            Ok(rule) => rule,
            Err(e) => {
                let lr_only = hyper.as_object().is_some_and(|o| o.len() == 1);
                if !(format1 && lr_only) {
                    return Err(bad(e));
                }
                self.rules[g].clone()
            }
        };
        if format1 {
            let lr = gj
                .get("lr")
                .and_then(Value::as_f64)
                .ok_or_else(|| OptimError::CorruptState(format!("group {g} has no numeric lr")))?;
            *rule.lr_mut() = lr;
        }
        super::check_rule(&rule)?;
        Ok(rule)
    }
}

/// Saved group `g`'s `new_buffers`: parameter name → buffer names.
fn read_new_buffers(g: usize, gj: &Value) -> Result<BTreeMap<String, Vec<String>>> {
    match gj.get("new_buffers") {
        None => Ok(BTreeMap::new()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| OptimError::CorruptState(format!("group {g}: bad `new_buffers`: {e}"))),
    }
}

/// Host buffers moved to `var`'s device (a non-CPU parameter or a forced
/// tensor path).
fn to_device(bufs: Buffers, var: &candle_core::Var) -> Result<Buffers> {
    let ts = match bufs {
        Buffers::Host(HostBuffers::F32(b)) => b
            .into_iter()
            .map(|v| Tensor::from_vec(v, var.shape(), var.device()))
            .collect::<candle_core::Result<Vec<_>>>()?,
        Buffers::Host(HostBuffers::F64(b)) => b
            .into_iter()
            .map(|v| Tensor::from_vec(v, var.shape(), var.device()))
            .collect::<candle_core::Result<Vec<_>>>()?,
        device => return Ok(device),
    };
    Ok(Buffers::Device(ts))
}
