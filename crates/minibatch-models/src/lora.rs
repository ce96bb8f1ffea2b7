//! LoRA (low-rank adapters) with PEFT's semantics and files.
//!
//! A LoRA-wrapped projection computes, as PEFT's `lora.Linear`,
//!
//! ```text
//! y = W x + b + (alpha / r) · B (A (dropout(x)))
//! ```
//!
//! with `A (r, in)` initialised kaiming-uniform with `a = √5` (PEFT's
//! `nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))`: uniform in
//! `±1/√in`), `B (out, r)` zero, so a new adapter leaves the model's output
//! unchanged. Dropout ([`minibatch_nn::Dropout`], only in training, skipped
//! entirely when `dropout == 0` as PEFT's `nn.Identity`) applies to the
//! adapter's input only.
//!
//! * [`LoraConfig`] holds PEFT's `r`, `lora_alpha`, `lora_dropout` and
//!   `target_modules` (module-name suffixes, matched as PEFT matches a list:
//!   a module named `model.layers.0.self_attn.q_proj` is targeted by
//!   `q_proj`, `self_attn.q_proj` or its full name).
//! * `llama::Llama::load_lora`, `gpt2::Gpt2::load_lora` and
//!   `bert::BertModel::load_lora` read the base weights from one
//!   `VarBuilder` (a frozen one: [`checkpoint::frozen_var_builder`](crate::checkpoint::frozen_var_builder))
//!   and create the adapters through another under the names PEFT saves:
//!   `base_model.model.<module>.lora_A.weight` `(r, in)` and
//!   `base_model.model.<module>.lora_B.weight` `(out, r)`. With
//!   [`minibatch_nn::seeded_var_builder`] over a `VarMap`, the map holds the
//!   adapters and nothing else: the optimizer, the checkpoints and the
//!   memory are the base model plus the adapters.
//!   `bert::BertForSequenceClassification::load_lora` is PEFT's
//!   `task_type="SEQ_CLS"`: the `classifier` is trained in full as PEFT's
//!   `modules_to_save`, a Var `base_model.model.classifier.{weight,bias}`
//!   beside the adapters, saved, loaded and merged with them.
//! * [`save_adapter`] writes `adapter_config.json` and
//!   `adapter_model.safetensors` as PEFT's `save_pretrained` does, so that
//!   `peft.PeftModel.from_pretrained(base, dir)` loads them;
//!   [`load_adapter`] reads PEFT's files back ([`Adapter::fill`] puts them
//!   into the adapter Vars), and [`merge`] / [`merge_checkpoint`] fold an
//!   adapter into the base weights (PEFT's `merge_and_unload`) for export
//!   as a plain transformers checkpoint.
//!
//! GPT-2's `Conv1D` (weight `(in, out)`): PEFT sets `fan_in_fan_out = true`
//! for it, keeps `lora_A (r, in)` and `lora_B (out, r)`, and merges
//! `W + (alpha/r)·(B A)ᵀ`; so does this module.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use minibatch_models::llama::{Config, Llama};
//! use minibatch_models::lora::LoraConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg = Config::small(64, 32, 2, 4, 2);
//! // A base model (random here; a frozen checkpoint in practice).
//! let base_map = VarMap::new();
//! let base = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
//! let plain = Llama::load(base.clone(), &cfg)?;
//! let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()] };
//! let adapters = VarMap::new();
//! let model = Llama::load_lora(base, &cfg, &lora, minibatch_nn::seeded_var_builder(&adapters, 0, DType::F32, &dev))?;
//! // Two layers × two targets × (A, B), under PEFT's names.
//! assert_eq!(adapters.all_vars().len(), 8);
//! assert!(adapters.data().lock().unwrap().contains_key(
//!     "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
//! // B starts at zero: the adapted model computes the base model's logits.
//! let ids = Tensor::new(&[[1u32, 5, 9]], &dev)?;
//! let d = (model.forward(&ids)? - plain.forward(&ids)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert_eq!(d, 0.0);
//! // A target that names no module is an error.
//! let bad = LoraConfig { target_modules: vec!["q_prj".into()], ..lora };
//! let e = Llama::load_lora(VarBuilder::from_varmap(&base_map, DType::F32, &dev), &cfg, &bad,
//!     VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev)).unwrap_err().to_string();
//! assert!(e.contains("q_prj"), "{e}");
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder, VarMap};
use minibatch_nn::{Dropout, Linear};
use serde_json::{json, Value};

use crate::error::{ModelsError, Result};
use crate::projection::{Projection, ZEROS};

/// The prefix PEFT's `PeftModel` puts before the base model's module names
/// in the keys it saves (`base_model` is the `LoraModel`, `.model` the
/// wrapped transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The file names of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT release whose `adapter_config.json` fields [`save_adapter`]
/// writes (`peft_version`).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// PEFT's `LoraConfig`, the fields that change the maths.
///
/// | PEFT | here |
/// |---|---|
/// | `r` | `r` (> 0) |
/// | `lora_alpha` | `alpha` (finite; the scaling is `alpha / r`) |
/// | `lora_dropout` | `dropout` (in `[0, 1)`) |
/// | `target_modules=["q_proj", "v_proj"]` | `target_modules: vec!["q_proj".into(), "v_proj".into()]` |
///
/// The rest of PEFT's defaults are what this module implements
/// (`bias="none"`, `use_rslora=False`, `use_dora=False`,
/// `init_lora_weights=True`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank of the adapters.
    pub r: usize,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / r`.
    pub alpha: f64,
    /// The dropout probability on the adapter's input (training only).
    pub dropout: f32,
    /// PEFT's module-name suffixes (`q_proj`, `v_proj`, `c_attn`, `query`,
    /// `self_attn.o_proj`...): a module is adapted when its name equals one
    /// of them or ends with `.` followed by one.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// `alpha / r`, the factor on `B A x`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks the values: `r > 0`, a finite `alpha`, `dropout` in `[0, 1)`,
    /// at least one target module and no empty one. The error names the
    /// field and its value.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(ModelsError::Lora(
                "r = 0: the rank of the adapters must be at least 1".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(ModelsError::Lora(format!(
                "alpha = {}: lora_alpha must be a finite number",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelsError::Lora(format!(
                "dropout = {}: lora_dropout must be in [0, 1)",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(ModelsError::Lora(
                "target_modules is empty: nothing would be trained (name the modules to adapt, e.g. q_proj, v_proj)".into(),
            ));
        }
        if self.target_modules.iter().any(|t| t.is_empty()) {
            return Err(ModelsError::Lora(
                "target_modules holds an empty name".into(),
            ));
        }
        Ok(())
    }

    /// Whether the module named `module` (its transformers name, e.g.
    /// `model.layers.0.self_attn.q_proj`) is adapted, as PEFT matches a list
    /// of target modules: equal to a target or ending with `.<target>`.
    pub fn targets(&self, module: &str) -> bool {
        self.target_index(module).is_some()
    }

    fn target_index(&self, module: &str) -> Option<usize> {
        self.target_modules.iter().position(|t| {
            module == t
                || (module.len() > t.len()
                    && module.ends_with(t.as_str())
                    && module.as_bytes()[module.len() - t.len() - 1] == b'.')
        })
    }
}

/// PEFT's initialisation of `lora_A`: `kaiming_uniform_(a=√5)`, i.e. the
/// gain `√(2 / (1 + 5))` over `√fan_in`, uniform within `±√3·gain/√in =
/// ±1/√in`.
pub fn lora_a_init() -> Init {
    Init::Kaiming {
        dist: NormalOrUniform::Uniform,
        fan: FanInOut::FanIn,
        non_linearity: NonLinearity::ExplicitGain((1.0f64 / 3.0).sqrt()),
    }
}

/// A projection with a LoRA adapter: the frozen base map plus
/// `(alpha / r) · B (A (dropout(x)))`. Found in a model as
/// [`Projection::Lora`].
#[derive(Clone, Debug)]
pub struct LoraLayer {
    base: Projection,
    module: String,
    lora_a: Linear,
    lora_b: Linear,
    scaling: f64,
    dropout: Option<Dropout>,
}

impl LoraLayer {
    /// `base` with an adapter of `lora_a (r, in)`, `lora_b (out, r)` and
    /// `scaling`, dropout `p` on the adapter's input (none when 0). `module`
    /// is the transformers name of the wrapped module. Shapes that do not
    /// fit the base map are an error naming them.
    pub fn new(
        base: Projection,
        module: impl Into<String>,
        lora_a: Tensor,
        lora_b: Tensor,
        scaling: f64,
        dropout: f32,
    ) -> Result<Self> {
        let module = module.into();
        let (out_dim, in_dim) = base.as_linear().weight().dims2()?;
        let (ra, ia) = lora_a.dims2()?;
        let (ob, rb) = lora_b.dims2()?;
        if ia != in_dim || ob != out_dim || ra != rb {
            return Err(ModelsError::Lora(format!(
                "{module}: lora_A {:?} and lora_B {:?} do not fit a projection from {in_dim} to {out_dim} (want ({rb}, {in_dim}) and ({out_dim}, {ra}))",
                lora_a.dims(),
                lora_b.dims()
            )));
        }
        Ok(Self {
            base,
            module,
            lora_a: Linear::new(lora_a, None),
            lora_b: Linear::new(lora_b, None),
            scaling,
            dropout: (dropout > 0.0).then(|| Dropout::new(dropout)),
        })
    }

    /// The wrapped (base) projection.
    pub fn base(&self) -> &Projection {
        &self.base
    }

    /// The transformers name of the wrapped module
    /// (`model.layers.0.self_attn.q_proj`).
    pub fn module(&self) -> &str {
        &self.module
    }

    /// `lora_A.weight`, `(r, in)`.
    pub fn lora_a(&self) -> &Tensor {
        self.lora_a.weight()
    }

    /// `lora_B.weight`, `(out, r)`.
    pub fn lora_b(&self) -> &Tensor {
        self.lora_b.weight()
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `base(x) + scaling · B(A(dropout(x)))`, dropout only when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let dropout = train && self.dropout.is_some();
        if !dropout && !matches!(self.base, Projection::Lora(_)) {
            // No dropout on the adapter's input over a plain base map: one
            // fused node for both (`Linear::forward_lora`, the same bits).
            return self.base.as_linear().forward_lora(
                x,
                self.lora_a.weight(),
                self.lora_b.weight(),
                self.scaling,
            );
        }
        let y = self.base.forward_t(x, train)?;
        let h = match &self.dropout {
            Some(d) if train => d.forward(x, true)?,
            _ => x.clone(),
        };
        // The scaling on the rank-r activations: the same product as
        // PEFT's `lora_B(lora_A(x)) * scaling`, on r columns instead of out.
        let a = (self.lora_a.forward(&h)? * self.scaling)?;
        y + self.lora_b.forward(&a)?
    }

    /// The merged weight in the checkpoint's layout: `W + scaling · B A`
    /// (`(out, in)`), or for a `Conv1D` `W + scaling · (B A)ᵀ` (`(in, out)`).
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let delta = (self.lora_b().matmul(self.lora_a())? * self.scaling)?;
        match &self.base {
            Projection::Conv1d { weight, .. } => weight + delta.t()?,
            p => p.weight() + delta,
        }
    }
}

/// The adapter context the ports' loaders thread through their modules: the
/// module path so far and, when adapting, the config, the adapters'
/// `VarBuilder` and which targets matched.
pub(crate) struct Adapt<'a> {
    ctx: Option<&'a AdaptCtx<'a>>,
    path: String,
}

pub(crate) struct AdaptCtx<'a> {
    cfg: &'a LoraConfig,
    vb: VarBuilder<'a>,
    matched: RefCell<Vec<usize>>,
    modules: RefCell<BTreeSet<String>>,
}

impl<'a> Adapt<'a> {
    /// No adapters: every projection stays as built.
    pub(crate) fn none() -> Self {
        Self {
            ctx: None,
            path: String::new(),
        }
    }

    /// The context of the sub-module `name`.
    pub(crate) fn pp(&self, name: &str) -> Self {
        Self {
            ctx: self.ctx,
            path: join(&self.path, name),
        }
    }

    /// `proj`, the module `name` under this path, with an adapter when the
    /// config targets it.
    pub(crate) fn wrap(&self, name: &str, proj: Projection) -> candle_core::Result<Projection> {
        let Some(ctx) = self.ctx else {
            return Ok(proj);
        };
        let module = join(&self.path, name);
        ctx.modules.borrow_mut().insert(module.clone());
        let Some(i) = ctx.cfg.target_index(&module) else {
            return Ok(proj);
        };
        ctx.matched.borrow_mut()[i] += 1;
        let (out_dim, in_dim) = proj.as_linear().weight().dims2()?;
        let r = ctx.cfg.r;
        let key = format!("{KEY_PREFIX}{module}");
        let a =
            ctx.vb
                .get_with_hints((r, in_dim), &format!("{key}.lora_A.weight"), lora_a_init())?;
        let b = ctx
            .vb
            .get_with_hints((out_dim, r), &format!("{key}.lora_B.weight"), ZEROS)?;
        let layer = LoraLayer::new(proj, module, a, b, ctx.cfg.scaling(), ctx.cfg.dropout)?;
        Ok(Projection::Lora(Box::new(layer)))
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Builds a model with `build` under the adapter context of `cfg` and
/// `adapters`: checks `cfg` first, and afterwards that every target module
/// matched a module of the model (an error names those that did not and
/// the model's module names).
pub(crate) fn build_with<'a, T>(
    cfg: &'a LoraConfig,
    adapters: VarBuilder<'a>,
    build: impl FnOnce(&Adapt<'_>) -> candle_core::Result<T>,
) -> Result<T> {
    cfg.validate()?;
    let ctx = AdaptCtx {
        cfg,
        vb: adapters,
        matched: RefCell::new(vec![0; cfg.target_modules.len()]),
        modules: RefCell::new(BTreeSet::new()),
    };
    let model = build(&Adapt {
        ctx: Some(&ctx),
        path: String::new(),
    })?;
    let matched = ctx.matched.borrow();
    let unmatched: Vec<&str> = cfg
        .target_modules
        .iter()
        .zip(matched.iter())
        .filter(|(_, &n)| n == 0)
        .map(|(t, _)| t.as_str())
        .collect();
    if !unmatched.is_empty() {
        // The distinct last components (q_proj, c_attn...), what users write.
        let modules = ctx.modules.borrow();
        let short: BTreeSet<&str> = modules
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect();
        return Err(ModelsError::Lora(format!(
            "target module(s) {} match no module of the model; its projections are {} (full names like {})",
            unmatched.join(", "),
            short.into_iter().collect::<Vec<_>>().join(", "),
            modules.iter().next().map(String::as_str).unwrap_or("?")
        )));
    }
    Ok(model)
}

/// What `adapter_config.json` says beside the [`LoraConfig`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AdapterMeta {
    /// PEFT's `task_type` (`CAUSAL_LM`, `FEATURE_EXTRACTION`, ...; `None`
    /// writes `null`).
    pub task_type: Option<String>,
    /// `base_model_name_or_path` (the hub id or directory of the base model
    /// PEFT loads when given the adapter alone).
    pub base_model_name_or_path: Option<String>,
    /// PEFT's `fan_in_fan_out`: `true` for GPT-2's `Conv1D` (weight `(in,
    /// out)`), which PEFT forces when it adapts one.
    pub fan_in_fan_out: bool,
    /// PEFT's `modules_to_save`: the names of the modules trained in full
    /// beside the adapters (`["classifier", "score"]`, what PEFT writes for
    /// `task_type="SEQ_CLS"`); `None` writes `null`. Their weights are
    /// saved as `base_model.model.<module>.{weight,bias}`.
    pub modules_to_save: Option<Vec<String>>,
}

/// What PEFT's `SEQ_CLS` task type adds to `modules_to_save`.
pub const SEQ_CLS_MODULES_TO_SAVE: [&str; 2] = ["classifier", "score"];

impl AdapterMeta {
    /// The values PEFT writes for adapters with these keys: `CAUSAL_LM` for
    /// Llama (`base_model.model.model.layers.*`) and GPT-2
    /// (`base_model.model.transformer.h.*`, `fan_in_fan_out` when a
    /// `Conv1D` (`c_attn`, `c_proj`, `c_fc`) is adapted),
    /// `FEATURE_EXTRACTION` for a `BertModel`
    /// (`base_model.model.encoder.layer.*`), `SEQ_CLS` with
    /// `modules_to_save = ["classifier", "score"]` when a classifier is
    /// saved in full (`base_model.model.classifier.weight`, a
    /// `BertForSequenceClassification`), otherwise no task type.
    pub fn infer<'k>(keys: impl IntoIterator<Item = &'k str>) -> Self {
        let mut meta = AdapterMeta::default();
        let keys: Vec<&str> = keys.into_iter().collect();
        let keys_seen: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        for k in keys {
            let Some(m) = k.strip_prefix(KEY_PREFIX) else {
                continue;
            };
            if m.starts_with("model.layers.") {
                meta.task_type = Some("CAUSAL_LM".into());
            } else if let Some(rest) = m.strip_prefix("transformer.h.") {
                meta.task_type = Some("CAUSAL_LM".into());
                let module = rest.split(".lora_").next().unwrap_or(rest);
                if ["c_attn", "c_proj", "c_fc"]
                    .iter()
                    .any(|c| module.ends_with(&format!(".{c}")))
                {
                    meta.fan_in_fan_out = true;
                }
            } else if m.starts_with("encoder.layer.") {
                meta.task_type = Some("FEATURE_EXTRACTION".into());
            }
        }
        for k in keys_seen {
            if let Some(m) = saved_module(&k) {
                if SEQ_CLS_MODULES_TO_SAVE.contains(&m) {
                    meta.task_type = Some("SEQ_CLS".into());
                    meta.modules_to_save = Some(
                        SEQ_CLS_MODULES_TO_SAVE
                            .iter()
                            .map(|s| s.to_string())
                            .collect(),
                    );
                }
            }
        }
        meta
    }
}

/// A LoRA adapter in memory: its config, what `adapter_config.json` says
/// beside it, and its tensors under PEFT's keys
/// (`base_model.model.<module>.lora_{A,B}.weight`).
#[derive(Clone, Debug)]
pub struct Adapter {
    /// `r`, `lora_alpha`, `lora_dropout`, `target_modules`.
    pub config: LoraConfig,
    /// `task_type`, `base_model_name_or_path`, `fan_in_fan_out`.
    pub meta: AdapterMeta,
    /// The weights by key.
    pub tensors: HashMap<String, Tensor>,
}

fn is_lora_key(k: &str) -> bool {
    k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")
}

/// The module of a key saved in full (`base_model.model.classifier.weight`
/// -> `classifier`): under [`KEY_PREFIX`], not a LoRA key, ending in
/// `.weight` or `.bias`.
fn saved_module(k: &str) -> Option<&str> {
    if is_lora_key(k) {
        return None;
    }
    let m = k.strip_prefix(KEY_PREFIX)?;
    m.strip_suffix(".weight")
        .or_else(|| m.strip_suffix(".bias"))
}

/// Whether `module` is one of `modules_to_save` (PEFT's match: equal, or
/// ending with `.<name>`).
fn is_module_to_save(module: &str, modules_to_save: &[String]) -> bool {
    modules_to_save.iter().any(|t| {
        module == t
            || (module.len() > t.len()
                && module.ends_with(t.as_str())
                && module.as_bytes()[module.len() - t.len() - 1] == b'.')
    })
}

/// The keys of a `VarMap` that belong to an adapter: the LoRA weights and
/// the modules saved in full (`base_model.model.classifier.{weight,bias}`).
fn is_adapter_key(k: &str) -> bool {
    is_lora_key(k) || saved_module(k).is_some_and(|m| SEQ_CLS_MODULES_TO_SAVE.contains(&m))
}

impl Adapter {
    /// The adapter Vars of `varmap` (the keys ending in `.lora_A.weight` /
    /// `.lora_B.weight`, and the classifier PEFT's `SEQ_CLS` trains in full,
    /// `base_model.model.{classifier,score}.{weight,bias}`; anything else in
    /// the map is left out) with `config`
    /// and [`AdapterMeta::infer`]. An error when the map holds none, or
    /// when their ranks are not `config.r`.
    pub fn from_varmap(varmap: &VarMap, config: &LoraConfig) -> Result<Self> {
        config.validate()?;
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| ModelsError::Lora("the VarMap's lock is poisoned".into()))?;
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .filter(|(k, _)| is_adapter_key(k))
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        drop(vars);
        if tensors.is_empty() {
            return Err(ModelsError::Lora(
                "the VarMap holds no LoRA adapter weights (names ending in .lora_A.weight / .lora_B.weight): build the model with load_lora over it".into(),
            ));
        }
        let meta = AdapterMeta::infer(tensors.keys().map(String::as_str));
        let adapter = Self {
            config: config.clone(),
            meta,
            tensors,
        };
        adapter.check()?;
        Ok(adapter)
    }

    /// The adapted module names (`model.layers.0.self_attn.q_proj`), sorted.
    pub fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight"))
            .map(|k| k.strip_prefix(KEY_PREFIX).unwrap_or(k).to_string())
            .collect();
        m.sort();
        m
    }

    /// The tensors of the modules saved in full (`modules_to_save`) by
    /// their key in the base model (`classifier.weight`), sorted.
    pub fn saved_modules(&self) -> Vec<(String, &Tensor)> {
        let mut v: Vec<(String, &Tensor)> = self
            .tensors
            .iter()
            .filter(|(k, _)| saved_module(k).is_some())
            .map(|(k, t)| (k[KEY_PREFIX.len()..].to_string(), t))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every `lora_A` has its `lora_B`, both of rank `config.r`, and only
    /// LoRA keys or those of `modules_to_save`.
    fn check(&self) -> Result<()> {
        let r = self.config.r;
        let mut keys: Vec<&String> = self.tensors.keys().collect();
        keys.sort();
        let to_save = self.meta.modules_to_save.as_deref().unwrap_or(&[]);
        if let Some(k) = keys.iter().find(|k| {
            !is_lora_key(k) && !saved_module(k).is_some_and(|m| is_module_to_save(m, to_save))
        }) {
            return Err(ModelsError::Lora(format!(
                "{k} is not a LoRA weight nor one of modules_to_save {to_save:?} (only .lora_A.weight / .lora_B.weight and the modules_to_save weights and biases are supported: no LoRA biases or embeddings)"
            )));
        }
        for k in keys.into_iter().filter(|k| is_lora_key(k)) {
            let t = &self.tensors[k];
            let (other, rank_dim) = match k.strip_suffix(".lora_A.weight") {
                Some(m) => (format!("{m}.lora_B.weight"), 0),
                None => (
                    format!("{}.lora_A.weight", &k[..k.len() - ".lora_B.weight".len()]),
                    1,
                ),
            };
            if !self.tensors.contains_key(&other) {
                return Err(ModelsError::Lora(format!("{k} has no {other}")));
            }
            let dims = t.dims();
            if dims.len() != 2 || dims[rank_dim] != r {
                return Err(ModelsError::Lora(format!(
                    "{k} has shape {dims:?}, not of rank r = {r} (an adapter of another rank?)"
                )));
            }
        }
        Ok(())
    }

    /// Sets the adapter Vars of `varmap` (a model built with `load_lora`
    /// over it) to this adapter's tensors. Errors (nothing is set then):
    /// a Var the adapter lacks or a tensor no Var takes (an adapter for
    /// another model, or other target modules), a tensor of another shape
    /// (another rank), each naming the keys.
    pub fn fill(&self, varmap: &VarMap) -> Result<()> {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| ModelsError::Lora("the VarMap's lock is poisoned".into()))?;
        let mut mine: Vec<&String> = vars.keys().filter(|k| is_adapter_key(k)).collect();
        mine.sort();
        let missing: Vec<&str> = mine
            .iter()
            .filter(|k| !self.tensors.contains_key(**k))
            .map(|k| k.as_str())
            .collect();
        let mut extra: Vec<&str> = self
            .tensors
            .keys()
            .filter(|k| !vars.contains_key(*k))
            .map(String::as_str)
            .collect();
        extra.sort();
        if !missing.is_empty() || !extra.is_empty() {
            let mut msg = String::from("the adapter does not fit the model (made for another model or other target modules?):");
            if !missing.is_empty() {
                msg += &format!(
                    " it lacks {} of the model's adapter weights ({})",
                    missing.len(),
                    preview(&missing)
                );
            }
            if !extra.is_empty() {
                msg += &format!(
                    " it has {} weight(s) the model has no adapter for ({})",
                    extra.len(),
                    preview(&extra)
                );
            }
            return Err(ModelsError::Lora(msg));
        }
        for k in &mine {
            let (v, t) = (&vars[*k], &self.tensors[*k]);
            if v.dims() != t.dims() {
                return Err(ModelsError::Lora(format!(
                    "{k} is {:?} in the adapter but {:?} in the model: an adapter of another rank (r = {} in the adapter) or another model",
                    t.dims(),
                    v.dims(),
                    self.config.r
                )));
            }
        }
        for k in mine {
            let v = &vars[k];
            v.set(&self.tensors[k].to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        Ok(())
    }
}

fn preview(keys: &[&str]) -> String {
    let mut s = keys.iter().take(4).copied().collect::<Vec<_>>().join(", ");
    if keys.len() > 4 {
        s += &format!(", and {} more", keys.len() - 4);
    }
    s
}

/// `x` as JSON the way Python writes it: an integer when it is one (PEFT's
/// `lora_alpha: int`), a float otherwise.
fn py_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` PEFT 0.21 writes for `cfg` and `meta`: every
/// field of its `LoraConfig`, the defaults where this module has no
/// choice, keys sorted, indented by two spaces.
pub fn adapter_config_json(cfg: &LoraConfig, meta: &AdapterMeta) -> Result<String> {
    cfg.validate()?;
    let targets: BTreeSet<&str> = cfg.target_modules.iter().map(String::as_str).collect();
    // f32 -> its shortest decimal -> f64: 0.05, not 0.05000000074505806.
    let dropout: f64 = format!("{}", cfg.dropout).parse().unwrap_or(0.0);
    let fields: BTreeMap<&str, Value> = BTreeMap::from([
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!({})),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        (
            "base_model_name_or_path",
            json!(meta.base_model_name_or_path),
        ),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(meta.fan_in_fan_out)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_alpha", py_number(cfg.alpha)),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(dropout)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        ("modules_to_save", json!(meta.modules_to_save)),
        ("monteclora_config", Value::Null),
        ("peft_type", json!("LORA")),
        ("peft_version", json!(PEFT_FORMAT_VERSION)),
        ("qalora_group_size", json!(16)),
        ("r", json!(cfg.r)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(targets)),
        ("target_parameters", Value::Null),
        ("task_type", json!(meta.task_type)),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
        ("use_rslora", json!(false)),
        ("velora_config", Value::Null),
    ]);
    serde_json::to_string_pretty(&fields)
        .map_err(|e| ModelsError::Lora(format!("cannot write adapter_config.json: {e}")))
}

/// Writes the adapter of `adapters` (the `VarMap` given to `load_lora`)
/// to `dir` as PEFT's `save_pretrained` does: `adapter_config.json`
/// ([`adapter_config_json`], with [`AdapterMeta::infer`]'s task type and
/// `fan_in_fan_out`) and `adapter_model.safetensors` (the keys
/// `base_model.model.<module>.lora_{A,B}.weight`, without the adapter name,
/// as PEFT saves them). Each file is written to a temporary file in `dir`,
/// synced and renamed over the old one, so a crash leaves the previous
/// file or the new one. `dir` is created if needed.
pub fn save_adapter(adapters: &VarMap, cfg: &LoraConfig, dir: impl AsRef<Path>) -> Result<()> {
    let adapter = Adapter::from_varmap(adapters, cfg)?;
    let meta = adapter.meta.clone();
    save(&adapter, &meta, dir.as_ref())
}

/// [`save_adapter`] with the [`AdapterMeta`] given (a task type or
/// `base_model_name_or_path` of your choice).
pub fn save_adapter_with(
    adapters: &VarMap,
    cfg: &LoraConfig,
    meta: &AdapterMeta,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let adapter = Adapter::from_varmap(adapters, cfg)?;
    save(&adapter, meta, dir.as_ref())
}

fn save(adapter: &Adapter, meta: &AdapterMeta, dir: &Path) -> Result<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        ModelsError::Lora(format!("cannot {what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let json = adapter_config_json(&adapter.config, meta)?;
    let tensors: HashMap<String, Tensor> = adapter
        .tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| ModelsError::Lora(format!("cannot write {}: {e}", tmp.display())))?;
    commit(&tmp, &weights)?;
    let config = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| io("write", &tmp, e))?;
    commit(&tmp, &config)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all(); // the renames, where the platform allows it
    }
    Ok(())
}

/// Syncs `tmp` and renames it to `path`.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let err =
        |e: std::io::Error| ModelsError::Lora(format!("cannot write {}: {e}", path.display()));
    File::open(tmp).and_then(|f| f.sync_all()).map_err(err)?;
    std::fs::rename(tmp, path).map_err(err)
}

fn field<'j>(json: &'j Value, name: &str, path: &Path) -> Result<&'j Value> {
    json.get(name)
        .ok_or_else(|| ModelsError::Lora(format!("{}: no \"{name}\" field", path.display())))
}

/// Reads a PEFT LoRA adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`, as `save_pretrained` or [`save_adapter`]
/// write it), the tensors converted to `dtype` on `device`.
///
/// Errors name the file and the problem: a missing file, another
/// `peft_type`, `r = 0`, a non-finite `lora_alpha`, features this module
/// does not implement (`use_rslora`, `use_dora`, a LoRA bias,
/// `rank_pattern` / `alpha_pattern`, a regular expression as
/// `target_modules`), weights that are not LoRA's or not of rank `r`.
pub fn load_adapter(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Adapter> {
    let dir = dir.as_ref();
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath)
        .map_err(|e| ModelsError::Lora(format!("cannot read {}: {e}", cpath.display())))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ModelsError::Lora(format!("{}: {e}", cpath.display())))?;
    let bad = |what: String| ModelsError::Lora(format!("{}: {what}", cpath.display()));
    let peft_type = field(&json, "peft_type", &cpath)?;
    if peft_type.as_str() != Some("LORA") {
        return Err(bad(format!("peft_type is {peft_type}, not \"LORA\"")));
    }
    let r = field(&json, "r", &cpath)?;
    let r = r
        .as_u64()
        .ok_or_else(|| bad(format!("r = {r} is not a whole number")))? as usize;
    let alpha = field(&json, "lora_alpha", &cpath)?;
    let alpha = alpha
        .as_f64()
        .ok_or_else(|| bad(format!("lora_alpha = {alpha} is not a number")))?;
    let dropout = json
        .get("lora_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(0.0) as f32;
    let targets = field(&json, "target_modules", &cpath)?;
    let target_modules = match targets {
        Value::Array(a) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("target_modules holds {t}, not a name")))
            })
            .collect::<Result<Vec<_>>>()?,
        Value::String(s) => {
            return Err(bad(format!(
                "target_modules is the regular expression {s:?}; only a list of module names is supported"
            )))
        }
        other => return Err(bad(format!("target_modules is {other}, not a list"))),
    };
    for flag in ["use_rslora", "use_dora", "lora_bias", "use_qalora"] {
        if json.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{flag} = true is not supported")));
        }
    }
    if let Some(b) = json.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(format!(
                "bias = {b:?} is not supported (only \"none\")"
            )));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if json
            .get(pattern)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!("a non-empty {pattern} is not supported")));
        }
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    let meta = AdapterMeta {
        task_type: json
            .get("task_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        base_model_name_or_path: json
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        fan_in_fan_out: json
            .get("fan_in_fan_out")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        modules_to_save: match json.get("modules_to_save") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|t| {
                        t.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("modules_to_save holds {t}, not a name")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => return Err(bad(format!("modules_to_save is {other}, not a list"))),
        },
    };
    let wpath = dir.join(WEIGHTS_FILE);
    let raw = candle_core::safetensors::load(&wpath, device)
        .map_err(|e| ModelsError::Lora(format!("cannot read {}: {e}", wpath.display())))?;
    let tensors = raw
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let adapter = Adapter {
        config,
        meta,
        tensors,
    };
    adapter
        .check()
        .map_err(|e| ModelsError::Lora(format!("{}: {e}", wpath.display())))?;
    Ok(adapter)
}

/// [`load_adapter`] into the adapter Vars of `varmap` ([`Adapter::fill`]),
/// in their dtype and device; returns the adapter's config.
pub fn load_adapter_into(varmap: &VarMap, dir: impl AsRef<Path>) -> Result<LoraConfig> {
    let (dtype, device) = {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| ModelsError::Lora("the VarMap's lock is poisoned".into()))?;
        match vars.iter().find(|(k, _)| is_lora_key(k)) {
            Some((_, v)) => (v.dtype(), v.device().clone()),
            None => {
                return Err(ModelsError::Lora(
                    "the VarMap holds no LoRA adapter weights: build the model with load_lora over it first".into(),
                ))
            }
        }
    };
    let adapter = load_adapter(dir, dtype, &device)?;
    adapter.fill(varmap)?;
    Ok(adapter.config)
}

/// PEFT's `merge_and_unload` on tensors: `base` (a transformers checkpoint's
/// tensors by name) with every adapted module's weight replaced by
/// `W + (alpha/r)·B A` (`W + (alpha/r)·(B A)ᵀ` when
/// `adapter.meta.fan_in_fan_out`, GPT-2's `Conv1D`), computed in `f32`
/// (or `f64` for an `f64` weight) and stored in the weight's dtype. The
/// other tensors are passed through. The modules saved in full
/// (`modules_to_save`, e.g. the `classifier` of a `SEQ_CLS` adapter) are
/// written under their base names (`classifier.weight`), in the base
/// tensor's dtype when the base has one (which must be of the same shape). The base checkpoint must have
/// `<module>.weight` for every adapted module, of the shape the adapter
/// implies; otherwise an error names it.
pub fn merge(base: &HashMap<String, Tensor>, adapter: &Adapter) -> Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    let scaling = adapter.config.scaling();
    for module in adapter.modules() {
        let wkey = format!("{module}.weight");
        let w = base.get(&wkey).ok_or_else(|| {
            ModelsError::Lora(format!(
                "the base checkpoint has no {wkey}: the adapter was made for another model"
            ))
        })?;
        let key = format!("{KEY_PREFIX}{module}");
        let work = if w.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let a = adapter.tensors[&format!("{key}.lora_A.weight")].to_dtype(work)?;
        let b = adapter.tensors[&format!("{key}.lora_B.weight")].to_dtype(work)?;
        let b = b.to_device(w.device())?;
        let a = a.to_device(w.device())?;
        let mut delta = (b.matmul(&a)? * scaling)?;
        if adapter.meta.fan_in_fan_out {
            delta = delta.t()?;
        }
        if delta.dims() != w.dims() {
            return Err(ModelsError::Lora(format!(
                "{wkey} is {:?} but the adapter's update is {:?}{}: an adapter for another model",
                w.dims(),
                delta.dims(),
                if adapter.meta.fan_in_fan_out {
                    " (fan_in_fan_out)"
                } else {
                    ""
                }
            )));
        }
        let merged = (w.to_dtype(work)? + delta)?.to_dtype(w.dtype())?;
        out.insert(wkey, merged);
    }
    for (key, t) in adapter.saved_modules() {
        let t = match base.get(&key) {
            Some(w) if w.dims() != t.dims() => {
                return Err(ModelsError::Lora(format!(
                    "{key} is {:?} in the base checkpoint but {:?} in the adapter's modules_to_save: an adapter for another model",
                    w.dims(),
                    t.dims()
                )))
            }
            Some(w) => t.to_dtype(w.dtype())?.to_device(w.device())?,
            None => t.clone(),
        };
        out.insert(key, t);
    }
    Ok(out)
}

/// [`merge`] on disk: reads the transformers checkpoint in `base_dir`
/// (`model.safetensors` or its shards) and the PEFT adapter in
/// `adapter_dir`, and writes `out_dir/model.safetensors` (one file, each
/// tensor in its own dtype) beside a copy of `config.json` (and
/// `generation_config.json` when there is one): a plain checkpoint that
/// `AutoModel*.from_pretrained(out_dir)` and
/// [`checkpoint::frozen_var_builder`](crate::checkpoint::frozen_var_builder)
/// load. Returns the path of the weights file.
pub fn merge_checkpoint(
    base_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
) -> Result<PathBuf> {
    let (base_dir, out_dir) = (base_dir.as_ref(), out_dir.as_ref());
    let mut base = HashMap::new();
    for f in crate::checkpoint::safetensors_files(base_dir)? {
        let ts = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| ModelsError::Checkpoint(format!("cannot read {}: {e}", f.display())))?;
        base.extend(ts);
    }
    let adapter = load_adapter(adapter_dir, DType::F32, &Device::Cpu)?;
    let merged = merge(&base, &adapter)?;
    let io = |p: &Path, e: std::io::Error| {
        ModelsError::Lora(format!("cannot write {}: {e}", p.display()))
    };
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    for name in ["config.json", "generation_config.json"] {
        let src = base_dir.join(name);
        if src.is_file() {
            let dst = out_dir.join(name);
            std::fs::copy(&src, &dst).map_err(|e| io(&dst, e))?;
        }
    }
    let path = out_dir.join("model.safetensors");
    let tmp = out_dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&merged, &tmp)
        .map_err(|e| ModelsError::Lora(format!("cannot write {}: {e}", tmp.display())))?;
    commit(&tmp, &path)?;
    Ok(path)
}
