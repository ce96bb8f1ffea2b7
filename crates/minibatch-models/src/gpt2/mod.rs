//! GPT-2 (`GPT2LMHeadModel`) with transformers' parameter names and its
//! `Conv1D` weight layout (`(in, out)`):
//!
//! ```text
//! transformer.wte.weight, transformer.wpe.weight
//! transformer.h.N.ln_1.{weight,bias}
//! transformer.h.N.attn.c_attn.{weight,bias}     (n_embd, 3·n_embd)
//! transformer.h.N.attn.c_proj.{weight,bias}     (n_embd, n_embd)
//! transformer.h.N.ln_2.{weight,bias}
//! transformer.h.N.mlp.c_fc.{weight,bias}        (n_embd, n_inner)
//! transformer.h.N.mlp.c_proj.{weight,bias}      (n_inner, n_embd)
//! transformer.ln_f.{weight,bias}
//! lm_head.weight                                only when not tie_word_embeddings
//! ```

mod config;

pub use config::Config;

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use minibatch_nn::recompute::checkpoint;
use minibatch_nn::{Dropout, Embedding, LayerNorm, Linear};

use crate::activation::Activation;
use crate::inputs::{check_ids, check_positions, key_padding_mask};
use crate::lora::{build_with, Adapt, LoraConfig};
use crate::projection::{normal, Projection, ONES, ZEROS};
use minibatch_nn::ops::multi_head_attention as attention;

fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let w = vb.get_with_hints(size, "weight", ONES)?;
    let b = vb.get_with_hints(size, "bias", ZEROS)?;
    Ok(LayerNorm::new(w, b, eps))
}

/// `transformer.h.N`.
#[derive(Clone, Debug)]
pub struct Block {
    /// `ln_1`.
    pub ln_1: LayerNorm,
    /// `attn.c_attn`.
    pub c_attn: Projection,
    /// `attn.c_proj`.
    pub attn_c_proj: Projection,
    /// `ln_2`.
    pub ln_2: LayerNorm,
    /// `mlp.c_fc`.
    pub c_fc: Projection,
    /// `mlp.c_proj`.
    pub mlp_c_proj: Projection,
    heads: usize,
    scale: f64,
    act: Activation,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
}

/// `GPT2LMHeadModel`: token and position embeddings, blocks, `ln_f` and the
/// head (the token embeddings themselves unless `tie_word_embeddings` is
/// false).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_models::gpt2::{Config, Gpt2};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = Config::from_json(r#"{"vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 8}"#)?;
/// let varmap = VarMap::new();
/// let gpt = Gpt2::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
/// let logits = gpt.forward(&Tensor::new(&[[3u32, 1, 4, 1, 5]], &Device::Cpu)?)?;
/// assert_eq!(logits.dims(), [1, 5, 40]);
/// // A token id outside the vocabulary is an error naming it.
/// let e = gpt.forward(&Tensor::new(&[[40u32]], &Device::Cpu)?).unwrap_err().to_string();
/// assert!(e.contains("40"), "{e}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Gpt2 {
    /// `transformer.wte`.
    pub wte: Embedding,
    /// `transformer.wpe`.
    pub wpe: Embedding,
    /// `transformer.h`.
    pub blocks: Vec<Block>,
    /// `transformer.ln_f`.
    pub ln_f: LayerNorm,
    /// `lm_head` (over `transformer.wte.weight` when tied).
    pub lm_head: Projection,
    drop: Dropout,
    cfg: Config,
    gradient_checkpointing: bool,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, index: usize, ad: &Adapt) -> Result<Self> {
        let (e, std, eps) = (cfg.n_embd, cfg.initializer_range, cfg.layer_norm_epsilon);
        // transformers: the residual projections are N(0, 0.02 / sqrt(2 n_layer)).
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let hd = e / cfg.n_head;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        let conv = |i: usize, o: usize, std: f64, name: &str| {
            ad.wrap(name, Projection::conv1d(i, o, std, vb.pp(name))?)
        };
        Ok(Self {
            ln_1: layer_norm(e, eps, vb.pp("ln_1"))?,
            c_attn: conv(e, 3 * e, std, "attn.c_attn")?,
            attn_c_proj: conv(e, e, proj_std, "attn.c_proj")?,
            ln_2: layer_norm(e, eps, vb.pp("ln_2"))?,
            c_fc: conv(e, cfg.inner(), std, "mlp.c_fc")?,
            mlp_c_proj: conv(cfg.inner(), e, proj_std, "mlp.c_proj")?,
            heads: cfg.n_head,
            scale,
            act: cfg.activation()?,
            attn_dropout: Dropout::new(cfg.attn_pdrop),
            resid_dropout: Dropout::new(cfg.resid_pdrop),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (e, h) = (x.dim(2)?, self.heads);
        let a = self.ln_1.forward(x)?;
        // (b, t, 3 · e): q, k, v as strided (b, t, h · hd) views, no copies;
        // the attention reads them so and writes (b, t, e).
        let qkv = self.c_attn.forward_t(&a, train)?;
        let part = |i: usize| qkv.narrow(2, i * e, e);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let o = attention(
            &q,
            &k,
            &v,
            h,
            mask,
            true,
            Some(self.scale),
            &self.attn_dropout,
            train,
        )?;
        // dropout(proj(.)) + residual as one op each.
        let o = self.attn_c_proj.forward_t(&o, train)?;
        let x = self.resid_dropout.forward_add(&o, x, train)?;
        let m = self
            .act
            .forward(&self.c_fc.forward_t(&self.ln_2.forward(&x)?, train)?)?;
        let m = self.mlp_c_proj.forward_t(&m, train)?;
        self.resid_dropout.forward_add(&m, &x, train)
    }
}

impl Gpt2 {
    /// The model with every parameter read from (or created in) `vb` under
    /// transformers' names (see the [module docs](self)); new parameters
    /// are initialised as transformers does (`N(0, initializer_range)`,
    /// the residual projections `N(0, initializer_range / √(2·n_layer))`,
    /// zero biases, unit LayerNorms).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::build(vb, cfg, &Adapt::none())
    }

    /// The model with LoRA adapters ([`crate::lora`]): the base parameters
    /// from `base` (a frozen
    /// [`checkpoint::frozen_var_builder`](crate::checkpoint::frozen_var_builder)),
    /// the adapters of the projections `lora` targets (`c_attn`, `c_proj`,
    /// `c_fc`, `attn.c_proj`, `mlp.c_proj`, `lm_head`) created in (or read
    /// from) `adapters` under PEFT's keys,
    /// `base_model.model.transformer.h.N.attn.c_attn.lora_A.weight` `(r,
    /// in)` and `...lora_B.weight` `(out, r)`. The `Conv1D` weights stay
    /// `(in, out)`; as in PEFT (which sets `fan_in_fan_out` for them) the
    /// adapters have the `nn.Linear` layout.
    ///
    /// Errors: a bad `lora` ([`LoraConfig::validate`]), a target module
    /// that matches no module, and whatever [`load`](Self::load) reports.
    pub fn load_lora(
        base: VarBuilder,
        cfg: &Config,
        lora: &LoraConfig,
        adapters: VarBuilder,
    ) -> crate::Result<Self> {
        build_with(lora, adapters, |ad| Self::build(base, cfg, ad))
    }

    fn build(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        cfg.validate()?;
        let (e, std) = (cfg.n_embd, cfg.initializer_range);
        let t = vb.pp("transformer");
        let wte = t
            .pp("wte")
            .get_with_hints((cfg.vocab_size, e), "weight", normal(std))?;
        let wpe = t
            .pp("wpe")
            .get_with_hints((cfg.n_positions, e), "weight", normal(std))?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let name = format!("h.{i}");
                Block::load(t.pp(&name), cfg, i, &ad.pp("transformer").pp(&name))
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = layer_norm(e, cfg.layer_norm_epsilon, t.pp("ln_f"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Projection::Linear(Linear::new(wte.clone(), None))
        } else {
            Projection::linear(e, cfg.vocab_size, false, std, vb.pp("lm_head"))?
        };
        let lm_head = ad.wrap("lm_head", lm_head)?;
        Ok(Self {
            wte: Embedding::new(wte, e),
            wpe: Embedding::new(wpe, e),
            blocks,
            ln_f,
            lm_head,
            drop: Dropout::new(cfg.embd_pdrop),
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// The same model with gradient checkpointing on or off
    /// (transformers' `gradient_checkpointing_enable()`): in training passes
    /// each block keeps only its input, and the backward pass recomputes its
    /// activations (see [`minibatch_nn::recompute`]).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Logits `(b, t, vocab)` of `input_ids (b, t)` (`u32` or `i64`) in eval
    /// mode.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_masked(input_ids, None, false)
    }

    /// [`forward`](Self::forward) with an optional padding mask `(b, t)`
    /// (1 = token, 0 = padding; pad on the right) and the train flag.
    pub fn forward_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, train)?;
        self.lm_head.forward_t(&h, train)
    }

    /// The hidden states after `ln_f`, `(b, t, n_embd)`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = check_ids(
            input_ids,
            cfg.vocab_size,
            "input_ids",
            "the vocabulary (vocab_size)",
        )?;
        check_positions(t, cfg.n_positions, "the position table")?;
        let mask = attention_mask
            .map(|m| key_padding_mask(m, b, t))
            .transpose()?;
        let pos = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let x = self
            .wte
            .forward(input_ids)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        let mut x = self.drop.forward(&x, train)?;
        let on = self.gradient_checkpointing && train;
        for block in &self.blocks {
            x = if on {
                let (bl, m) = (block.clone(), mask.clone());
                checkpoint(move |h| bl.forward(h, m.as_ref(), train), &x)?
            } else {
                block.forward(&x, mask.as_ref(), train)?
            };
        }
        self.ln_f.forward(&x)
    }
}

impl ModuleT for Gpt2 {
    /// Logits `(b, t, vocab)` of `input_ids (b, t)`, with dropout when `train`.
    fn forward_t(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_masked(input_ids, None, train)
    }
}
