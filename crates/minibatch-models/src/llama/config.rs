//! [`Config`]: `LlamaConfig`'s fields and defaults, read from `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::activation::Activation;
use crate::config::{parse_json, read_json, resolve_rope, RopeParameters};
use crate::error::{ModelsError, Result};
use crate::rope::Rope;

/// transformers' `LlamaConfig`, deserialized from a `config.json` of either
/// generation (transformers 4's top-level `rope_theta` and `rope_scaling`,
/// transformers 5's `rope_parameters`). Missing fields take
/// `LlamaConfig`'s defaults; unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    /// Default 32000.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Default 4096.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Default 11008.
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Default 32.
    #[serde(default = "d_32")]
    pub num_hidden_layers: usize,
    /// Default 32.
    #[serde(default = "d_32")]
    pub num_attention_heads: usize,
    /// Grouped-query attention; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Default `"silu"`.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Default 2048 (the rope table is extended on demand beyond it).
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    /// Default 0.02: the standard deviation of the random init.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// Default 1e-6.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Default false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `torch.nn.Embedding(padding_idx)` of the token embeddings (that row
    /// gets no gradient); default none.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// transformers 4: the rope base at the top level (default 10000).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 4: the rope scaling object.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: the rope object (with `rope_theta` inside).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Biases on q, k, v, o projections. Default false.
    #[serde(default)]
    pub attention_bias: bool,
    /// Default 0.0 (dropout of the attention weights).
    #[serde(default)]
    pub attention_dropout: f32,
    /// Biases on the MLP's projections. Default false.
    #[serde(default)]
    pub mlp_bias: bool,
}

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_inter() -> usize {
    11008
}
fn d_32() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_maxpos() -> usize {
    2048
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-6
}

impl Config {
    /// Reads and checks `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let c: Self = read_json(path.as_ref())?;
        c.validate()?;
        Ok(c)
    }

    /// Parses and checks `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = parse_json(text)?;
        c.validate()?;
        Ok(c)
    }

    /// A small config for tests and examples (random init): the given
    /// sizes, transformers' defaults elsewhere.
    pub fn small(
        vocab_size: usize,
        hidden_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size: hidden_size * 8 / 3,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            hidden_act: d_act(),
            max_position_embeddings: d_maxpos(),
            initializer_range: d_init(),
            rms_norm_eps: d_eps(),
            tie_word_embeddings: false,
            pad_token_id: None,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            attention_dropout: 0.0,
            mlp_bias: false,
        }
    }

    /// `num_key_value_heads`, defaulting to `num_attention_heads`.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `head_dim`, defaulting to `hidden_size / num_attention_heads`.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The activation of the MLP.
    pub fn activation(&self) -> Result<Activation> {
        Activation::parse("hidden_act", &self.hidden_act)
    }

    /// The rotary embedding (`θ`, head size, frequency rule).
    pub fn rope(&self) -> Result<Rope> {
        let (theta, scaling) = resolve_rope(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
        )?;
        Ok(Rope {
            theta,
            dim: self.head_size(),
            scaling,
        })
    }

    /// Checks that the values fit together and are supported.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelsError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_size()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even (rotary embedding)",
                self.head_size()
            ));
        }
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return bad(format!(
                "attention_dropout {} must be in [0, 1)",
                self.attention_dropout
            ));
        }
        self.activation()?;
        self.rope()?;
        Ok(())
    }
}
