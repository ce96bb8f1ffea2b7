//! Llama (`LlamaForCausalLM`): RMSNorm, rotary embeddings, grouped-query
//! attention and a SwiGLU MLP, with transformers' parameter names.
//!
//! ```text
//! model.embed_tokens.weight                         (vocab, hidden)
//! model.layers.N.input_layernorm.weight             (hidden,)
//! model.layers.N.self_attn.{q,k,v,o}_proj.weight    q: (heads·head_dim, hidden), k, v: (kv_heads·head_dim, hidden), o: (hidden, heads·head_dim)
//! model.layers.N.post_attention_layernorm.weight
//! model.layers.N.mlp.{gate,up,down}_proj.weight
//! model.norm.weight
//! lm_head.weight                                    absent when tie_word_embeddings
//! ```
//! (`.bias` beside the attention projections with `attention_bias`, beside
//! the MLP's with `mlp_bias`.)

mod config;

pub use config::Config;

use candle_core::{DType, Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use minibatch_nn::recompute::checkpoint;
use minibatch_nn::rotary_emb::rope_thd;
use minibatch_nn::{Dropout, Embedding, RmsNorm};

use crate::activation::Activation;
use crate::inputs::{check_ids, key_padding_mask, padding_idx};
use crate::lora::{build_with, Adapt, LoraConfig};
use crate::projection::{normal, Projection, ONES};
use crate::rope::Rope;
use minibatch_nn::ops::multi_head_attention as attention;

/// One attention block's projections and sizes.
#[derive(Clone, Debug)]
pub struct Attention {
    /// `self_attn.q_proj`.
    pub q_proj: Projection,
    /// `self_attn.k_proj`.
    pub k_proj: Projection,
    /// `self_attn.v_proj`.
    pub v_proj: Projection,
    /// `self_attn.o_proj`.
    pub o_proj: Projection,
    heads: usize,
    head_dim: usize,
    dropout: Dropout,
}

/// The gated MLP `down(act(gate(x)) · up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `mlp.gate_proj`.
    pub gate_proj: Projection,
    /// `mlp.up_proj`.
    pub up_proj: Projection,
    /// `mlp.down_proj`.
    pub down_proj: Projection,
    act: Activation,
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

/// `LlamaForCausalLM`: token embeddings, decoder layers, the final norm and
/// the language-model head (one parameter with the embeddings when
/// `tie_word_embeddings`).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_models::llama::{Config, Llama};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = Config::small(64, 32, 2, 4, 2);
/// let varmap = VarMap::new();
/// let model = Llama::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
/// let ids = Tensor::new(&[[1u32, 5, 9], [2, 3, 4]], &Device::Cpu)?;
/// let logits = model.forward(&ids)?;
/// assert_eq!(logits.dims(), [2, 3, 64]);
/// // Every parameter is a Var of the map and gets a gradient.
/// let grads = logits.sum_all()?.backward()?;
/// assert!(varmap.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Llama {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (over `model.embed_tokens.weight` when tied).
    pub lm_head: Projection,
    cfg: Config,
    rope: Rope,
    cos: Tensor,
    sin: Tensor,
    gradient_checkpointing: bool,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        let (h, hk, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let (e, std, bias) = (cfg.hidden_size, cfg.initializer_range, cfg.attention_bias);
        let lin = |i: usize, o: usize, name: &str| {
            ad.wrap(name, Projection::linear(i, o, bias, std, vb.pp(name))?)
        };
        Ok(Self {
            q_proj: lin(e, h * hd, "q_proj")?,
            k_proj: lin(e, hk * hd, "k_proj")?,
            v_proj: lin(e, hk * hd, "v_proj")?,
            o_proj: lin(h * hd, e, "o_proj")?,
            heads: h,
            head_dim: hd,
            dropout: Dropout::new(cfg.attention_dropout),
        })
    }

    /// `residual + o_proj(attention(x))`.
    fn forward_add(
        &self,
        x: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        // q (b, t, heads · hd), k and v (b, t, kv_heads · hd) as the
        // projections give them, rotated in that layout (the head size from
        // the tables); the attention reads these layouts and writes
        // (b, t, heads · hd): no reshape nodes around it.
        let q = self.q_proj.forward_t(x, train)?;
        let k = self.k_proj.forward_t(x, train)?;
        let v = self.v_proj.forward_t(x, train)?;
        let q = rope_thd(&q, cos, sin)?;
        let k = rope_thd(&k, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let o = attention(
            &q,
            &k,
            &v,
            self.heads,
            mask,
            true,
            Some(scale),
            &self.dropout,
            train,
        )?;
        self.o_proj.forward_add_t(&o, residual, train)
    }
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        let (e, i, std, bias) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
            cfg.mlp_bias,
        );
        let lin = |a: usize, o: usize, name: &str| {
            ad.wrap(name, Projection::linear(a, o, bias, std, vb.pp(name))?)
        };
        Ok(Self {
            gate_proj: lin(e, i, "gate_proj")?,
            up_proj: lin(e, i, "up_proj")?,
            down_proj: lin(i, e, "down_proj")?,
            act: cfg.activation()?,
        })
    }

    /// `residual + down(act(gate(x)) · up(x))`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let gate = self.gate_proj.forward_t(x, train)?;
        let up = self.up_proj.forward_t(x, train)?;
        // SiLU (Llama's default): activation and product in one op.
        let h = match self.act {
            Activation::Silu => minibatch_nn::ops::silu_mul(&gate, &up)?,
            act => (act.forward(&gate)? * up)?,
        };
        self.down_proj.forward_add_t(&h, residual, train)
    }
}

fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get_with_hints(size, "weight", ONES)?, eps))
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        let (e, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(e, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, &ad.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(e, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, &ad.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        // The residual sums ride in the output projections (one node each).
        let h = self.input_layernorm.forward(x)?;
        let x = self.self_attn.forward_add(&h, x, cos, sin, mask, train)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        self.mlp.forward_add(&h, &x, train)
    }
}

impl Llama {
    /// The model with every parameter read from (or created in) `vb` under
    /// transformers' names (see the [module docs](self)); a `VarBuilder`
    /// over a `VarMap` initialises new parameters as transformers does
    /// (`N(0, initializer_range)` weights, zero biases, unit norms). Checks
    /// `cfg` first: an unsupported value is an error naming it.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::build(vb, cfg, &Adapt::none())
    }

    /// The model with LoRA adapters ([`crate::lora`]): every parameter of
    /// the base model read from `base` (a frozen
    /// [`checkpoint::frozen_var_builder`](crate::checkpoint::frozen_var_builder),
    /// so nothing of it is copied into a `VarMap`), and for each projection
    /// `lora` targets (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`, `lm_head`) the adapter weights created in (or
    /// read from) `adapters` under PEFT's keys,
    /// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
    /// `(r, in)` and `...lora_B.weight` `(out, r)`, kaiming-uniform and
    /// zero as PEFT initialises them.
    ///
    /// Errors: a bad `lora` ([`LoraConfig::validate`]: `r = 0`, a
    /// non-finite alpha, no target), a target module that matches no
    /// module of the model, and whatever [`load`](Self::load) reports.
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
        let std = cfg.initializer_range;
        let emb = vb.pp("model.embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            normal(std),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let name = format!("model.layers.{i}");
                DecoderLayer::load(vb.pp(&name), cfg, &ad.pp(&name))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Projection::Linear(minibatch_nn::Linear::new(emb.clone(), None))
        } else {
            Projection::linear(
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                std,
                vb.pp("lm_head"),
            )?
        };
        let lm_head = ad.wrap("lm_head", lm_head)?;
        let rope = cfg.rope()?;
        let (cos, sin) = rope.tables(cfg.max_position_embeddings, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens: Embedding::new(emb, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            rope,
            cos,
            sin,
            gradient_checkpointing: false,
        })
    }

    /// The same model with gradient checkpointing on or off
    /// (transformers' `gradient_checkpointing_enable()`): in training passes
    /// each decoder layer keeps only its input, and the backward pass
    /// recomputes its activations (the same gradients, to the bit, for less
    /// memory and one more forward pass; see [`minibatch_nn::recompute`]).
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

    /// Logits `(b, t, vocab)` at every position of `input_ids (b, t)` (`u32`
    /// or `i64`), in eval mode (no dropout), every token attending to all
    /// before it.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_masked(input_ids, None, false)
    }

    /// [`forward`](Self::forward) with an optional padding mask `(b, t)`
    /// (1 = token, 0 = padding; integer or float) and the train flag
    /// (attention dropout when `attention_dropout > 0`). Padding keys are
    /// hidden from every query; positions count from 0 in each row, as
    /// transformers does without explicit `position_ids` (pad on the right).
    pub fn forward_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, train)?;
        self.lm_head.forward_t(&h, train)
    }

    /// The final hidden states `(b, t, hidden)` (after `model.norm`, before
    /// the head).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = check_ids(
            input_ids,
            self.cfg.vocab_size,
            "input_ids",
            "the vocabulary (vocab_size)",
        )?;
        let mask = attention_mask
            .map(|m| key_padding_mask(m, b, t))
            .transpose()?;
        let (cos, sin) = if t <= self.cos.dim(0)? {
            (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?)
        } else {
            self.rope.tables(t, self.cos.dtype(), self.cos.device())?
        };
        let mut x = padding_idx(
            self.embed_tokens.forward(input_ids)?,
            input_ids,
            self.cfg.pad_token_id,
        )?;
        let on = self.gradient_checkpointing && train;
        for layer in &self.layers {
            x = if on {
                let (l, c, s, m) = (layer.clone(), cos.clone(), sin.clone(), mask.clone());
                checkpoint(move |h| l.forward(h, &c, &s, m.as_ref(), train), &x)?
            } else {
                layer.forward(&x, &cos, &sin, mask.as_ref(), train)?
            };
        }
        self.norm.forward(&x)
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.cos.dtype()
    }
}

impl ModuleT for Llama {
    /// Logits `(b, t, vocab)` of `input_ids (b, t)`, with dropout when `train`.
    fn forward_t(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_masked(input_ids, None, train)
    }
}
