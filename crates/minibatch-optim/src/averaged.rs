//! Averaged weights: `torch.optim.swa_utils.AveragedModel` with the SWA
//! (equal-weight running mean) or EMA (exponential moving average) rule.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor, Var};
use candle_nn::VarMap;

use crate::kernel::{drive_pair, HalfElem};
use crate::{varmap_vars, OptimError, Result};

/// How [`AveragedModel::update_parameters`] folds the current weights into
/// the average (PyTorch's `avg_fn` / `multi_avg_fn`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Averaging {
    /// Stochastic weight averaging, PyTorch's default (`get_swa_avg_fn`):
    /// the equal-weight mean of every update,
    /// `avg ← avg + (θ − avg) / (n + 1)`.
    Swa,
    /// Exponential moving average (`get_ema_multi_avg_fn(decay)`):
    /// `avg ← lerp(avg, θ, 1 − decay)`, i.e. `decay · avg + (1 − decay) · θ`.
    Ema {
        /// The weight of the old average, in `[0, 1]` (PyTorch's default 0.999).
        decay: f64,
    },
}

impl Averaging {
    fn check(self) -> Result<()> {
        if let Averaging::Ema { decay } = self {
            if !(0.0..=1.0).contains(&decay) {
                return Err(OptimError::InvalidHyperparameter {
                    name: "decay",
                    value: decay.to_string(),
                    reason: "must be in [0, 1]",
                });
            }
        }
        Ok(())
    }

    fn label(self) -> &'static str {
        match self {
            Averaging::Swa => "swa",
            Averaging::Ema { .. } => "ema",
        }
    }
}

/// A running average of a set of parameters, like
/// `torch.optim.swa_utils.AveragedModel(model, avg_fn / multi_avg_fn)`:
/// it holds its own copy of every parameter, starting as a copy of the
/// parameters' values when it is built; the first
/// [`update_parameters`](AveragedModel::update_parameters) copies the
/// parameters again, each later one folds them in with the [`Averaging`]
/// rule, and [`n_averaged`](AveragedModel::n_averaged) counts the updates.
///
/// The numbers follow PyTorch on CPU operation by operation: SWA is
/// `avg + (θ − avg) / (n + 1)` with the divisor rounded to the parameter's
/// dtype (the same bits as PyTorch); EMA is `torch.lerp(avg, θ, 1 − decay)`
/// (weight rounded to the dtype, `avg + w (θ − avg)` for `w < 0.5`,
/// `θ − (θ − avg)(1 − w)` otherwise; within an ulp of PyTorch, whose
/// vectorised lerp uses a fused multiply-add). f32 and f64 parameters on CPU are averaged in place, in one
/// pass, chunked over candle's CPU pool; bf16/f16 compute each element in
/// f32; other devices use candle tensor ops.
///
/// Evaluate with the averaged weights through
/// [`with_averaged`](AveragedModel::with_averaged) (swaps them into the
/// model's variables and back, bit for bit), build a second model from
/// [`to_varmap`](AveragedModel::to_varmap), or keep them with
/// [`copy_to_params`](AveragedModel::copy_to_params) at the end of training.
/// [`state_bytes`](AveragedModel::state_bytes) saves everything a bit-exact
/// resume needs. (Buffers such as BatchNorm statistics are not averaged:
/// candle keeps them as `Var`s, so select only the trained weights, and
/// recompute the statistics as PyTorch's `update_bn` does if needed.)
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{AveragedModel, Averaging, Optimizer, Sgd, SgdConfig};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
/// let mut opt = Sgd::named(vec![("w".into(), w.clone())], SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut ema = AveragedModel::new(vec![("w".into(), w.clone())], Averaging::Ema { decay: 0.9 })?;
/// for _ in 0..3 {
///     opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
///     ema.update_parameters()?;
/// }
/// assert_eq!(ema.n_averaged(), 3);
/// // evaluate with the averaged weights; the model's own come back afterwards
/// let seen = ema.with_averaged(|| w.as_tensor().to_vec1::<f32>())??;
/// assert_eq!(seen, ema.get("w").unwrap().to_vec1::<f32>()?);
/// assert_ne!(seen, w.as_tensor().to_vec1::<f32>()?);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AveragedModel {
    names: Vec<String>,
    params: Vec<Var>,
    averages: Vec<Tensor>,
    averaging: Averaging,
    n_averaged: u64,
    tensor_path: bool,
}

const META_KEY: &str = "minibatch.averaged";

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    kind: String,
    format: u32,
    averaging: String,
    decay: Option<f64>,
    n_averaged: u64,
    names: Vec<String>,
}

impl AveragedModel {
    /// An average of `params` (names key the saved state), stored on the
    /// parameters' own devices. Errors: no parameter, a name twice, a
    /// non-float dtype, an EMA decay outside `[0, 1]`.
    pub fn new(params: Vec<(String, Var)>, averaging: Averaging) -> Result<Self> {
        Self::build(params, averaging, None)
    }

    /// [`new`](AveragedModel::new) with the averages kept on `device`
    /// (PyTorch's `device=` argument: for example a CPU copy of a model
    /// trained on CUDA, which saves device memory; each update copies the
    /// parameters over).
    pub fn on_device(
        params: Vec<(String, Var)>,
        averaging: Averaging,
        device: &Device,
    ) -> Result<Self> {
        Self::build(params, averaging, Some(device))
    }

    /// An average of every variable of `varmap`, sorted by name (pass
    /// [`select`](crate::select)'s result to [`new`](AveragedModel::new)
    /// for a subset).
    pub fn from_varmap(varmap: &VarMap, averaging: Averaging) -> Result<Self> {
        Self::new(varmap_vars(varmap)?, averaging)
    }

    fn build(
        params: Vec<(String, Var)>,
        averaging: Averaging,
        device: Option<&Device>,
    ) -> Result<Self> {
        averaging.check()?;
        if params.is_empty() {
            return Err(OptimError::InvalidSetup(
                "AveragedModel: no parameter to average".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let (mut names, mut vars, mut averages) = (Vec::new(), Vec::new(), Vec::new());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::InvalidSetup(format!(
                    "AveragedModel: parameter name `{name}` appears twice"
                )));
            }
            if !var.dtype().is_float() {
                return Err(OptimError::UnsupportedDtype {
                    name,
                    dtype: var.dtype(),
                });
            }
            let dev = device.cloned().unwrap_or_else(|| var.device().clone());
            averages.push(fresh_copy(var.as_tensor(), &dev)?);
            names.push(name);
            vars.push(var);
        }
        Ok(Self {
            names,
            params: vars,
            averages,
            averaging,
            n_averaged: 0,
            tensor_path: false,
        })
    }

    /// Uses candle tensor ops (the path of non-CPU devices) for CPU averages
    /// too; for testing that path without a GPU.
    pub fn set_tensor_path(&mut self, on: bool) {
        self.tensor_path = on;
    }

    /// The averaging rule.
    pub fn averaging(&self) -> Averaging {
        self.averaging
    }

    /// How many times [`update_parameters`](AveragedModel::update_parameters)
    /// has run (PyTorch's `n_averaged`).
    pub fn n_averaged(&self) -> u64 {
        self.n_averaged
    }

    /// The parameters' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The parameters that are averaged (the model's own variables), in
    /// the order of [`names`](AveragedModel::names).
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// The average of parameter `name`: the live tensor, which later updates
    /// change in place (`.copy()` it to keep a snapshot).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.averages[i])
    }

    /// `(name, average)` pairs, in order.
    pub fn averages(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.averages.iter())
    }

    /// Folds the parameters' current values into the average (PyTorch's
    /// `update_parameters(model)`): the first call copies them, later ones
    /// apply the [`Averaging`] rule. Call it after the optimizer steps you
    /// want averaged.
    pub fn update_parameters(&mut self) -> Result<()> {
        let first = self.n_averaged == 0;
        for i in 0..self.params.len() {
            let cur = self.params[i].as_tensor();
            let avg = &self.averages[i];
            if cur.shape() != avg.shape() || cur.dtype() != avg.dtype() {
                return Err(OptimError::StateMismatch(format!(
                    "AveragedModel: parameter `{}` is now {:?} {:?}, its average {:?} {:?}",
                    self.names[i],
                    cur.shape(),
                    cur.dtype(),
                    avg.shape(),
                    avg.dtype()
                )));
            }
            let cur = if cur.device().same_device(avg.device()) {
                cur.clone()
            } else {
                cur.to_device(avg.device())?
            };
            if first {
                self.averages[i] = fresh_copy(&cur, avg.device())?;
                continue;
            }
            let op = match self.averaging {
                Averaging::Swa => AvgOp::Swa {
                    divisor: (self.n_averaged + 1) as f64,
                },
                Averaging::Ema { decay } => AvgOp::Lerp {
                    weight: 1.0 - decay,
                },
            };
            if avg.device().is_cpu() && !self.tensor_path {
                let cur = cur.contiguous()?;
                avg.inplace_op2(&cur, &op)?;
            } else {
                self.averages[i] = op.tensors(avg, &cur)?;
            }
        }
        self.n_averaged += 1;
        Ok(())
    }

    /// Runs `f` with the averaged weights in the parameters' variables, then
    /// puts the parameters' own values back, bit for bit (also when `f`
    /// panics): evaluation with the averaged weights of the model being
    /// trained. The error is candle's, from copying the values in or out.
    pub fn with_averaged<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let mut saved = Vec::with_capacity(self.params.len());
        for p in &self.params {
            saved.push(fresh_copy(p.as_tensor(), p.device())?);
        }
        let restore = Restore {
            params: &self.params,
            saved,
            armed: true,
        };
        self.copy_to_params()?;
        let out = f();
        restore.finish()?;
        Ok(out)
    }

    /// Writes the averages into the parameters' variables (PyTorch users
    /// evaluate or export `swa_model.module`; here the model's own
    /// variables take the averaged values, as at the end of training).
    pub fn copy_to_params(&self) -> Result<()> {
        for (p, a) in self.params.iter().zip(&self.averages) {
            let a = if a.device().same_device(p.device()) {
                a.clone()
            } else {
                a.to_device(p.device())?
            };
            p.set(&a)?;
        }
        Ok(())
    }

    /// A new `VarMap` holding a copy of every average under its name: build
    /// a second model from it (`VarBuilder::from_varmap`) to evaluate or
    /// export the averaged weights while training goes on.
    pub fn to_varmap(&self) -> Result<VarMap> {
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| OptimError::InvalidSetup("the VarMap's lock is poisoned".into()))?;
            for (name, a) in self.names.iter().zip(&self.averages) {
                data.insert(name.clone(), Var::from_tensor(&a.copy()?)?);
            }
        }
        Ok(varmap)
    }

    /// Everything a bit-exact resume needs (the averages, `n_averaged`, the
    /// rule) as safetensors bytes: the averages under their parameters'
    /// names, and one metadata entry `minibatch.averaged` (JSON). The same
    /// averages give the same bytes.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let meta = Meta {
            kind: "AveragedModel".into(),
            format: 1,
            averaging: self.averaging.label().into(),
            decay: match self.averaging {
                Averaging::Swa => None,
                Averaging::Ema { decay } => Some(decay),
            },
            n_averaged: self.n_averaged,
            names: self.names.clone(),
        };
        let meta = serde_json::to_string(&meta)
            .map_err(|e| OptimError::InvalidSetup(format!("AveragedModel metadata: {e}")))?;
        let cpu: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(&self.averages)
            .map(|(n, a)| Ok((n.clone(), a.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let metadata = HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| OptimError::InvalidSetup(format!("AveragedModel: cannot serialise: {e}")))
    }

    /// Restores [`state_bytes`](AveragedModel::state_bytes). The rule (and
    /// EMA decay), the parameter names, shapes and dtypes must be this
    /// average's; on error nothing changes.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let corrupt = |e: &dyn std::fmt::Display| {
            OptimError::CorruptState(format!("AveragedModel state: {e}"))
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(&e))?;
        let meta: Meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| corrupt(&format!("no `{META_KEY}` metadata")))
            .and_then(|s| serde_json::from_str(s).map_err(|e| corrupt(&e)))?;
        if meta.kind != "AveragedModel" || meta.format != 1 {
            return Err(OptimError::StateMismatch(format!(
                "not an AveragedModel state of format 1 (kind `{}`, format {})",
                meta.kind, meta.format
            )));
        }
        let saved_rule = match (meta.averaging.as_str(), meta.decay) {
            ("swa", None) => Averaging::Swa,
            ("ema", Some(decay)) => Averaging::Ema { decay },
            (other, _) => return Err(corrupt(&format!("unknown averaging `{other}`"))),
        };
        if saved_rule != self.averaging {
            return Err(OptimError::StateMismatch(format!(
                "the saved average uses {saved_rule:?}, this one {:?}",
                self.averaging
            )));
        }
        if meta.names != self.names {
            return Err(OptimError::StateMismatch(format!(
                "the saved average holds {:?}, this one {:?}",
                meta.names, self.names
            )));
        }
        let tensors =
            candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| corrupt(&e))?;
        let mut new = Vec::with_capacity(self.names.len());
        for (name, old) in self.names.iter().zip(&self.averages) {
            let t = tensors
                .get(name)
                .ok_or_else(|| corrupt(&format!("missing tensor `{name}`")))?;
            if t.shape() != old.shape() || t.dtype() != old.dtype() {
                return Err(OptimError::StateMismatch(format!(
                    "saved average `{name}` is {:?} {:?}, the parameter {:?} {:?}",
                    t.shape(),
                    t.dtype(),
                    old.shape(),
                    old.dtype()
                )));
            }
            new.push(fresh_copy(t, old.device())?);
        }
        self.averages = new;
        self.n_averaged = meta.n_averaged;
        Ok(())
    }

    /// Writes [`state_bytes`](AveragedModel::state_bytes) to `path`
    /// atomically.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, &self.state_bytes()?)
    }

    /// Reads a file written by [`save_state`](AveragedModel::save_state).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_state_bytes(&bytes)
    }
}

/// A copy of `t` on `device` with storage of its own (never shared with `t`).
fn fresh_copy(t: &Tensor, device: &Device) -> Result<Tensor> {
    let moved = if t.device().same_device(device) {
        t.copy()?
    } else {
        t.to_device(device)?
    };
    Ok(moved.contiguous()?)
}

/// Puts saved values back into the parameters when dropped before
/// [`Restore::finish`] (a panic inside `with_averaged`'s closure).
struct Restore<'a> {
    params: &'a [Var],
    saved: Vec<Tensor>,
    armed: bool,
}

impl Restore<'_> {
    fn finish(mut self) -> Result<()> {
        self.armed = false;
        for (p, s) in self.params.iter().zip(&self.saved) {
            p.set(s)?;
        }
        Ok(())
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if self.armed {
            for (p, s) in self.params.iter().zip(&self.saved) {
                let _ = p.set(s);
            }
        }
    }
}

/// One averaging step, in place over the average's CPU storage.
#[derive(Debug, Clone, Copy)]
enum AvgOp {
    /// `avg + (cur − avg) / divisor`
    Swa { divisor: f64 },
    /// `torch.lerp(avg, cur, weight)`
    Lerp { weight: f64 },
}

/// The scalar maths, in the element type `F` (f32 or f64), as PyTorch's CPU
/// kernels do it.
trait Elem: Copy + Send + Sync {
    fn from_f64(v: f64) -> Self;
    fn swa(a: Self, c: Self, d: Self) -> Self;
    fn lerp(a: Self, c: Self, w: Self) -> Self;
}

macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn swa(a: Self, c: Self, d: Self) -> Self {
                a + (c - a) / d
            }
            #[inline(always)]
            fn lerp(a: Self, c: Self, w: Self) -> Self {
                if w.abs() < 0.5 {
                    a + w * (c - a)
                } else {
                    c - (c - a) * (1.0 - w)
                }
            }
        }
    };
}
elem!(f32);
elem!(f64);

impl AvgOp {
    fn run<F: Elem>(self, avg: &mut [F], cur: &[F]) {
        match self {
            AvgOp::Swa { divisor } => {
                let d = F::from_f64(divisor);
                drive_pair(avg, cur, |a, c| {
                    for (a, &c) in a.iter_mut().zip(c) {
                        *a = F::swa(*a, c, d);
                    }
                });
            }
            AvgOp::Lerp { weight } => {
                let w = F::from_f64(weight);
                drive_pair(avg, cur, |a, c| {
                    for (a, &c) in a.iter_mut().zip(c) {
                        *a = F::lerp(*a, c, w);
                    }
                });
            }
        }
    }

    fn run_half<H: HalfElem>(self, avg: &mut [H], cur: &[H]) {
        let (swa, w) = match self {
            AvgOp::Swa { divisor } => (true, divisor as f32),
            AvgOp::Lerp { weight } => (false, weight as f32),
        };
        drive_pair(avg, cur, |a, c| {
            for (a, &c) in a.iter_mut().zip(c) {
                let (af, cf) = (a.to_f32(), c.to_f32());
                let r = if swa {
                    f32::swa(af, cf, w)
                } else {
                    f32::lerp(af, cf, w)
                };
                *a = H::from_f32(r);
            }
        });
    }

    /// The same maths with candle tensor ops (other devices), returning the
    /// new average.
    fn tensors(self, avg: &Tensor, cur: &Tensor) -> Result<Tensor> {
        let scalar =
            |v: f64| -> Result<Tensor> { Ok(Tensor::new(v, avg.device())?.to_dtype(avg.dtype())?) };
        let diff = cur.sub(avg)?;
        Ok(match self {
            AvgOp::Swa { divisor } => avg.add(&diff.broadcast_div(&scalar(divisor)?)?)?,
            AvgOp::Lerp { weight } => {
                // the weight rounded to the dtype, as PyTorch's kernel does
                let w = scalar(weight)?;
                if weight.abs() < 0.5 {
                    avg.add(&diff.broadcast_mul(&w)?)?
                } else {
                    let one_minus = scalar(1.0)?.sub(&w)?;
                    cur.sub(&diff.broadcast_mul(&one_minus)?)?
                }
            }
        })
    }
}

fn contiguous<'s, T>(data: &'s [T], l: &Layout) -> candle_core::Result<&'s [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("AveragedModel: a tensor is not contiguous"),
    }
}

fn contiguous_mut<'s, T>(data: &'s mut [T], l: &Layout) -> candle_core::Result<&'s mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("AveragedModel: the average is not contiguous"),
    }
}

impl InplaceOp2 for AvgOp {
    fn name(&self) -> &'static str {
        "minibatch-average"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(c)) => {
                self.run(contiguous_mut(a, l1)?, contiguous(c, l2)?)
            }
            (CpuStorage::F64(a), CpuStorage::F64(c)) => {
                self.run(contiguous_mut(a, l1)?, contiguous(c, l2)?)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(c)) => {
                self.run_half(contiguous_mut(a, l1)?, contiguous(c, l2)?)
            }
            (CpuStorage::F16(a), CpuStorage::F16(c)) => {
                self.run_half(contiguous_mut(a, l1)?, contiguous(c, l2)?)
            }
            (a, c) => candle_core::bail!(
                "AveragedModel: unsupported dtypes {:?} / {:?}",
                candle_core::backend::BackendStorage::dtype(a),
                candle_core::backend::BackendStorage::dtype(c)
            ),
        }
        Ok(())
    }
}
