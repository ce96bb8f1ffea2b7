//! Hugging Face checkpoints on disk: `model.safetensors`, or the shards of
//! `model.safetensors.index.json`, read into a trainable [`VarMap`] or a
//! frozen [`VarBuilder`].

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{ModelsError, Result};

/// The safetensors files of the checkpoint in `dir`: `model.safetensors`,
/// or every shard named by `model.safetensors.index.json`'s `weight_map`
/// (sorted, each once). An error names what is missing or unreadable.
pub fn safetensors_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelsError::Checkpoint(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| ModelsError::Checkpoint(format!("cannot read {}: {e}", index.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelsError::Checkpoint(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            ModelsError::Checkpoint(format!("{}: no \"weight_map\" object", index.display()))
        })?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelsError::Checkpoint(format!(
                "{}: the shard of {name} is not a file name",
                index.display()
            ))
        })?;
        shards.insert(file.to_string());
    }
    let files: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
    if let Some(f) = files.iter().find(|f| !f.is_file()) {
        return Err(ModelsError::Checkpoint(format!(
            "the shard {} named by {} does not exist",
            f.display(),
            index.display()
        )));
    }
    Ok(files)
}

/// Every tensor of `files` (on `device`, each converted to `dtype`), by name.
pub fn load_tensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        let ts = candle_core::safetensors::load(f, device)
            .map_err(|e| ModelsError::Checkpoint(format!("cannot read {}: {e}", f.display())))?;
        for (k, t) in ts {
            all.insert(k, t.to_dtype(dtype)?);
        }
    }
    Ok(all)
}

/// A frozen [`VarBuilder`] over the checkpoint in `dir` (read into memory,
/// converted to `dtype`): a model loaded from it has constant weights (no
/// Vars). `VarBuilder::from_mmaped_safetensors(&safetensors_files(dir)?, ..)`
/// is the zero-copy alternative (unsafe: the files must not change while
/// mapped).
pub fn frozen_var_builder(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files = safetensors_files(dir)?;
    Ok(VarBuilder::from_tensors(
        load_tensors(&files, dtype, device)?,
        dtype,
        device,
    ))
}

/// What [`load_pretrained`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The Vars filled from the checkpoint.
    pub loaded: Vec<String>,
    /// The Vars the checkpoint lacks (left as initialised: a new head, say),
    /// sorted.
    pub missing: Vec<String>,
    /// The checkpoint's tensors no Var took, sorted.
    pub unused: Vec<String>,
}

/// Fills the Vars of `varmap` (a model built with
/// `VarBuilder::from_varmap`) from the checkpoint in `dir`, as transformers'
/// `from_pretrained` does:
///
/// * each Var takes the tensor of its own name; failing that, when
///   `base_prefix` is given (`"bert"`, `"model"`, `"transformer"`), a Var
///   named `<base_prefix>.<rest>` takes the tensor `<rest>` (a base model's
///   checkpoint loaded under a head), and a Var named `<rest>` takes
///   `<base_prefix>.<rest>` (a head's checkpoint loaded into its base);
/// * a tensor of another shape is an error naming it and both shapes;
/// * Vars without a tensor are reported in [`LoadReport::missing`] (an
///   error if you pass `allow_missing = false`).
pub fn load_pretrained(
    varmap: &VarMap,
    dir: impl AsRef<Path>,
    base_prefix: Option<&str>,
    allow_missing: bool,
) -> Result<LoadReport> {
    let dir = dir.as_ref();
    let files = safetensors_files(dir)?;
    let vars = varmap.data().lock().expect("the VarMap's lock is poisoned");
    let (dtype, device) = match vars.values().next() {
        Some(v) => (v.dtype(), v.device().clone()),
        None => return Err(ModelsError::Checkpoint("the VarMap holds no Vars".into())),
    };
    let tensors = load_tensors(&files, dtype, &device)?;
    let mut report = LoadReport::default();
    let mut used = BTreeSet::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let key = candidates(name, base_prefix)
            .into_iter()
            .find(|k| tensors.contains_key(k));
        let Some(key) = key else {
            report.missing.push(name.clone());
            continue;
        };
        let t = &tensors[&key];
        if t.dims() != var.dims() {
            return Err(ModelsError::Checkpoint(format!(
                "{key} in {} has shape {:?} but the model's {name} is {:?}",
                dir.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
        used.insert(key);
        report.loaded.push(name.clone());
    }
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unused.sort();
    report.unused = unused;
    if !allow_missing && !report.missing.is_empty() {
        return Err(ModelsError::Checkpoint(format!(
            "{} lacks {} tensor(s) of the model: {}",
            dir.display(),
            report.missing.len(),
            report.missing.join(", ")
        )));
    }
    Ok(report)
}

fn candidates(name: &str, base_prefix: Option<&str>) -> Vec<String> {
    let mut c = vec![name.to_string()];
    if let Some(p) = base_prefix {
        match name.strip_prefix(&format!("{p}.")) {
            Some(rest) => c.push(rest.to_string()),
            None => c.push(format!("{p}.{name}")),
        }
    }
    c
}
