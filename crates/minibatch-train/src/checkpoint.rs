//! Atomic, verifiable checkpoints.
//!
//! Layout of a checkpoint root directory:
//!
//! ```text
//! ckpt/
//!   step-000000120/         one checkpoint (a directory)
//!     model.safetensors     the VarMap's tensors, by name
//!     optimizer.bin         Optimizer::state_bytes()
//!     trainer.json          CheckpointState: the RunState (position, counters,
//!                           history), schedule, metric and callback states,
//!                           file sizes + hashes
//!   step-000000240/
//!   best-step-000000180/    the best checkpoint so far (when monitored)
//!   latest                  text file naming the newest complete checkpoint
//!   best                    text file naming the best one
//! ```
//!
//! [`list_checkpoints`] lists the checkpoint directories newest first, which
//! is how `Trainer::load_latest_valid_checkpoint` falls back past corrupt ones.
//!
//! A checkpoint is written into `.tmp-<name>/` (each file fsynced), renamed to
//! `<name>/` and the parent directory fsynced; only then is the `latest`
//! pointer replaced (temporary file + fsync + rename). A crash at any point
//! leaves the previous `latest` valid. Older `step-*` directories beyond
//! `keep_last` are deleted after the pointer moved. On load, sizes and
//! FNV-1a 64 hashes of both binary files are checked, and every tensor's
//! name, shape and dtype must match the model's `VarMap`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::metrics::RunningMean;
use crate::state::RunState;
use minibatch_optim::{sync_dir, varmap_vars, write_atomic};

/// Version of the `trainer.json` format (2: one `run` object, keyed metric
/// and callback states; 3: the data-parallel layout, [`WorldState`]).
pub const FORMAT_VERSION: u32 = 3;

/// Size and hash of a file inside a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Length in bytes.
    pub bytes: u64,
    /// FNV-1a 64-bit hash, hex.
    pub fnv1a64: String,
}

impl FileDigest {
    fn of(data: &[u8]) -> Self {
        Self {
            bytes: data.len() as u64,
            fnv1a64: format!("{:016x}", fnv1a64(data)),
        }
    }
}

/// FNV-1a, 64 bits (integrity check, not cryptographic).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Everything in `trainer.json`: the [`RunState`], the state of the parts
/// that is not a tensor, and what a resume checks the trainer against.
///
/// Every field is required when read back (no silent defaults): a missing or
/// mistyped one makes the checkpoint corrupt.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// Where the run stands: position, counters, running epoch figures, history.
    pub run: RunState,
    /// Batches per epoch of the train loader that wrote it (checked on resume).
    pub batches_per_epoch: u64,
    /// Samples per epoch of the train loader that wrote it (checked on resume).
    pub samples_per_epoch: u64,
    /// Micro-batches per optimizer step (checked on resume).
    pub accumulate: u64,
    /// The optimizer's `name()`, checked on load.
    pub optimizer: String,
    /// The schedule's `state()`, if the trainer has a schedule.
    #[serde(deserialize_with = "Option::deserialize")]
    pub scheduler: Option<Value>,
    /// Metric states by `name#k` (the k-th metric of that name), running
    /// figures of the current epoch; metrics without state are left out.
    pub metrics: BTreeMap<String, Value>,
    /// Callback states by `name#k`; callbacks without state are left out.
    pub callbacks: BTreeMap<String, Value>,
    /// Shapes of the model tensors by name.
    pub tensors: BTreeMap<String, Vec<usize>>,
    /// Digests of `model.safetensors` and `optimizer.bin`.
    pub files: BTreeMap<String, FileDigest>,
    /// The data-parallel layout that wrote it (checked on resume: a
    /// checkpoint resumes with the world size that wrote it).
    pub world: WorldState,
}

/// The data-parallel layout of the run that wrote a checkpoint, and the
/// running figures of the epoch in progress that each rank keeps for itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorldState {
    /// The ranks that trained together (1: one process).
    pub world_size: u64,
    /// Samples per batch on each rank (the train loader's batch size).
    pub batch_per_rank: u64,
    /// Samples per batch over all ranks: `batch_per_rank × world_size`
    /// (per micro-batch; an optimizer step takes `accumulate` of them).
    pub global_batch: u64,
    /// Each rank's running figures of the epoch in progress, in rank order
    /// (train loss and metric states of its shard): a mid-epoch resume
    /// gives every rank its own back. Empty in one process, whose figures
    /// are `run.epoch_loss` and `metrics`.
    pub ranks: Vec<RankRunning>,
}

/// One rank's running figures of the epoch in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankRunning {
    /// The running train loss of this rank's shard.
    pub epoch_loss: RunningMean,
    /// This rank's metric states by `name#k`, as [`CheckpointState::metrics`].
    pub metrics: BTreeMap<String, Value>,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The directory it was read from.
    pub path: PathBuf,
    /// `trainer.json`.
    pub state: CheckpointState,
    /// The raw safetensors bytes of the model.
    pub model: Vec<u8>,
    /// The optimizer's state bytes.
    pub optimizer: Vec<u8>,
}

const MODEL: &str = "model.safetensors";
const OPTIM: &str = "optimizer.bin";
const STATE: &str = "trainer.json";

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

/// Serialises a `VarMap`'s tensors as safetensors bytes (sorted by name).
pub fn varmap_bytes(varmap: &VarMap) -> Result<Vec<u8>> {
    let items: Vec<(String, Tensor)> = varmap_vars(varmap)?
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    safetensors::serialize(items.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| TrainError::Config(format!("cannot serialise model tensors: {e}")))
}

fn varmap_shapes(varmap: &VarMap) -> Result<BTreeMap<String, Vec<usize>>> {
    Ok(varmap_vars(varmap)?
        .into_iter()
        .map(|(k, v)| (k, v.dims().to_vec()))
        .collect())
}

/// Writes one checkpoint named `name` under `root` atomically and returns
/// its directory. Fills `state.files`, `state.tensors` and `state.format`.
pub fn write_checkpoint(
    root: &Path,
    name: &str,
    varmap: &VarMap,
    optimizer_state: &[u8],
    state: &mut CheckpointState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    let model = varmap_bytes(varmap)?;
    state.format = FORMAT_VERSION;
    state.tensors = varmap_shapes(varmap)?;
    state.files.clear();
    state.files.insert(MODEL.into(), FileDigest::of(&model));
    state
        .files
        .insert(OPTIM.into(), FileDigest::of(optimizer_state));
    let json =
        serde_json::to_vec_pretty(&state).map_err(|e| TrainError::json("trainer.json", e))?;

    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write_file(&tmp.join(MODEL), &model)?;
    write_file(&tmp.join(OPTIM), optimizer_state)?;
    write_file(&tmp.join(STATE), &json)?;
    sync_dir(&tmp);
    let dst = root.join(name);
    if dst.exists() {
        // Re-writing the same step (e.g. after a resume): move the old one aside first.
        let old = root.join(format!(".old-{name}"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dst, &old).map_err(|e| TrainError::io(&dst, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
    }
    sync_dir(root);
    Ok(dst)
}

/// Points `root/<pointer>` (for example `latest`) at checkpoint `name`, atomically.
pub fn set_pointer(root: &Path, pointer: &str, name: &str) -> Result<()> {
    Ok(write_atomic(
        &root.join(pointer),
        format!("{name}\n").as_bytes(),
    )?)
}

/// Reads the checkpoint name a pointer file names, if the pointer exists.
pub fn read_pointer(root: &Path, pointer: &str) -> Result<Option<String>> {
    let p = root.join(pointer);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let name = s.trim().to_string();
            if name.is_empty() || name.contains('/') || name.contains("..") {
                return Err(TrainError::ckpt(
                    &p,
                    format!("pointer holds an invalid name {name:?}"),
                ));
            }
            Ok(Some(name))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&p, e)),
    }
}

/// Deletes `prefix*` checkpoint directories beyond the newest `keep`, never
/// touching the ones named in `protect`.
pub fn prune(root: &Path, prefix: &str, keep: usize, protect: &[&str]) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| TrainError::io(root, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    let n = names.len();
    for name in names.into_iter().take(n.saturating_sub(keep)) {
        if protect.contains(&name.as_str()) {
            continue;
        }
        let p = root.join(&name);
        std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
    }
    Ok(())
}

/// The checkpoint directories under `root`, newest first: `step-<N>`,
/// `best-step-<N>` and `.old-step-<N>` (a checkpoint moved aside while the
/// same step was being re-written), ordered by `N` descending, and for one
/// `N` in that order. Other entries are ignored; a missing `root` is an error.
pub fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(u64, u8, String)> = std::fs::read_dir(root)
        .map_err(|e| TrainError::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let (rank, n) = if let Some(n) = name.strip_prefix("step-") {
                (0, n)
            } else if let Some(n) = name.strip_prefix("best-step-") {
                (1, n)
            } else if let Some(n) = name.strip_prefix(".old-step-") {
                (2, n)
            } else {
                return None;
            };
            let step = n.parse::<u64>().ok()?;
            Some((step, rank, name))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(found.into_iter().map(|(_, _, n)| root.join(n)).collect())
}

/// Finds the checkpoint directory `path` refers to: a checkpoint directory
/// itself, or a root directory whose `latest` pointer names one.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(TrainError::ckpt(path, "no such file or directory"));
    }
    match read_pointer(path, "latest")? {
        Some(name) => Ok(path.join(name)),
        None => Err(TrainError::ckpt(
            path,
            "neither a checkpoint (no trainer.json) nor a checkpoint root (no `latest` pointer)",
        )),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TrainError::ckpt(path, format!("cannot read: {e}")))
}

/// Reads and verifies the checkpoint at `path` (see [`resolve`]).
pub fn read_checkpoint(path: &Path) -> Result<LoadedCheckpoint> {
    let dir = resolve(path)?;
    let json = read(&dir.join(STATE))?;
    let state: CheckpointState = serde_json::from_slice(&json)
        .map_err(|e| TrainError::ckpt(dir.join(STATE), format!("corrupt trainer.json: {e}")))?;
    if state.format != FORMAT_VERSION {
        return Err(TrainError::ckpt(
            &dir,
            format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                state.format
            ),
        ));
    }
    let model = read(&dir.join(MODEL))?;
    let optimizer = read(&dir.join(OPTIM))?;
    for (name, data) in [(MODEL, &model), (OPTIM, &optimizer)] {
        let want = state.files.get(name).ok_or_else(|| {
            TrainError::ckpt(&dir, format!("trainer.json lists no digest for {name}"))
        })?;
        let got = FileDigest::of(data);
        if &got != want {
            return Err(TrainError::ckpt(
                dir.join(name),
                format!(
                    "corrupt: {} bytes with hash {} but {} bytes with hash {} were written",
                    got.bytes, got.fnv1a64, want.bytes, want.fnv1a64
                ),
            ));
        }
    }
    Ok(LoadedCheckpoint {
        path: dir,
        state,
        model,
        optimizer,
    })
}

/// Copies the tensors of a safetensors buffer into a `VarMap`, bit for bit,
/// after checking that names, shapes and dtypes match exactly.
pub fn load_weights(varmap: &VarMap, bytes: &[u8], origin: &Path) -> Result<()> {
    let vars = varmap_vars(varmap)?;
    let device = match vars.first() {
        Some((_, v)) => v.device().clone(),
        None => return Err(TrainError::ckpt(origin, "the model's VarMap is empty")),
    };
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(bytes, &device)
        .map_err(|e| TrainError::ckpt(origin, format!("corrupt safetensors: {e}")))?;
    let missing: Vec<&String> = vars
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !tensors.contains_key(*k))
        .collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| vars.binary_search_by(|(n, _)| n.cmp(k)).is_err())
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        extra.sort();
        return Err(TrainError::ckpt(
            origin,
            format!("model mismatch: missing tensors {missing:?}, unexpected tensors {extra:?}"),
        ));
    }
    for (name, var) in &vars {
        let t = &tensors[name];
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            return Err(TrainError::ckpt(
                origin,
                format!(
                    "model mismatch for {name}: checkpoint has {:?} {:?}, model has {:?} {:?}",
                    t.dims(),
                    t.dtype(),
                    var.dims(),
                    var.dtype()
                ),
            ));
        }
    }
    for (name, var) in &vars {
        var.set(&tensors[name])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn varmap(seed: f32) -> VarMap {
        let vm = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((2, 3), "w", candle_nn::Init::Const(seed as f64))
            .unwrap();
        let _ = vb
            .get_with_hints(4, "b", candle_nn::Init::Const(0.5))
            .unwrap();
        drop(w);
        vm
    }

    #[test]
    fn write_read_round_trip_and_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let vm = varmap(1.25);
        let mut st = CheckpointState::default();
        st.run.step = 7;
        let p = write_checkpoint(dir.path(), "step-7", &vm, b"opt", &mut st).unwrap();
        set_pointer(dir.path(), "latest", "step-7").unwrap();
        let back = read_checkpoint(dir.path()).unwrap();
        assert_eq!(back.path, p);
        assert_eq!(back.state.run.step, 7);
        assert_eq!(back.optimizer, b"opt");
        let other = varmap(0.0);
        load_weights(&other, &back.model, &p).unwrap();
        assert_eq!(varmap_bytes(&other).unwrap(), varmap_bytes(&vm).unwrap());
        assert!(!dir.path().join(".tmp-step-7").exists());
    }

    #[test]
    fn corrupt_and_mismatched_checkpoints_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let vm = varmap(1.0);
        let mut st = CheckpointState::default();
        let p = write_checkpoint(dir.path(), "c", &vm, b"opt", &mut st).unwrap();
        // flip a byte in the model file
        let mf = p.join(MODEL);
        let mut bytes = std::fs::read(&mf).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&mf, &bytes).unwrap();
        let err = read_checkpoint(&p).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("model.safetensors"),
            "{err}"
        );

        // a model with different shapes
        let vm2 = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu);
        let _ = vb
            .get_with_hints((3, 3), "w", candle_nn::Init::Const(0.))
            .unwrap();
        let _ = vb
            .get_with_hints(4, "b", candle_nn::Init::Const(0.))
            .unwrap();
        let good = varmap_bytes(&vm).unwrap();
        let err = load_weights(&vm2, &good, &p).unwrap_err().to_string();
        assert!(err.contains("model mismatch for w"), "{err}");

        let err = read_checkpoint(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
        std::fs::write(p.join(STATE), b"{not json").unwrap();
        let err = read_checkpoint(&p).unwrap_err().to_string();
        assert!(err.contains("corrupt trainer.json"), "{err}");
    }

    #[test]
    fn a_trainer_json_without_a_field_is_a_corrupt_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let vm = varmap(1.0);
        let mut st = CheckpointState::default();
        let p = write_checkpoint(dir.path(), "c", &vm, b"opt", &mut st).unwrap();
        let mut json: Value =
            serde_json::from_slice(&std::fs::read(p.join(STATE)).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("scheduler");
        std::fs::write(p.join(STATE), serde_json::to_vec(&json).unwrap()).unwrap();
        let err = read_checkpoint(&p).unwrap_err();
        assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
        assert!(
            err.to_string().contains("missing field `scheduler`"),
            "{err}"
        );
    }

    #[test]
    fn checkpoints_are_listed_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "step-000000010",
            "best-step-000000020",
            "step-000000020",
            ".old-step-000000030",
            ".tmp-step-000000040",
            "step-x",
        ] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        std::fs::write(dir.path().join("latest"), "step-000000020\n").unwrap();
        let names: Vec<String> = list_checkpoints(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                ".old-step-000000030",
                "step-000000020",
                "best-step-000000020",
                "step-000000010"
            ]
        );
    }

    #[test]
    fn prune_keeps_newest_and_protected() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["step-1", "step-2", "step-3", "step-4"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        prune(dir.path(), "step-", 2, &["step-1"]).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["step-1", "step-3", "step-4"]);
    }
}
