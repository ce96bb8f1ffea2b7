//! [`Config`]: `GPT2Config`'s fields and defaults, read from `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::activation::Activation;
use crate::config::{parse_json, read_json};
use crate::error::{ModelsError, Result};

/// transformers' `GPT2Config`, deserialized from `config.json`. Missing
/// fields take `GPT2Config`'s defaults; unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    /// Default 50257.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Default 1024: the length of the position table.
    #[serde(default = "d_pos")]
    pub n_positions: usize,
    /// Default 768.
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    /// Default 12.
    #[serde(default = "d_12")]
    pub n_layer: usize,
    /// Default 12.
    #[serde(default = "d_12")]
    pub n_head: usize,
    /// The MLP's inner size; defaults to `4 · n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Default `"gelu_new"`.
    #[serde(default = "d_act")]
    pub activation_function: String,
    /// Default 0.1.
    #[serde(default = "d_drop")]
    pub resid_pdrop: f32,
    /// Default 0.1.
    #[serde(default = "d_drop")]
    pub embd_pdrop: f32,
    /// Default 0.1.
    #[serde(default = "d_drop")]
    pub attn_pdrop: f32,
    /// Default 1e-5.
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// Default 0.02.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// Default true: scores scaled by `1/√head_dim`.
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    /// Default false: scores also divided by `layer index + 1`.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Default true: `lm_head.weight` is `transformer.wte.weight`.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Cross-attention is not supported (must be false).
    #[serde(default)]
    pub add_cross_attention: bool,
}

fn d_vocab() -> usize {
    50257
}
fn d_pos() -> usize {
    1024
}
fn d_embd() -> usize {
    768
}
fn d_12() -> usize {
    12
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_drop() -> f32 {
    0.1
}
fn d_eps() -> f64 {
    1e-5
}
fn d_init() -> f64 {
    0.02
}
fn d_true() -> bool {
    true
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

    /// The MLP's inner size.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The MLP's activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::parse("activation_function", &self.activation_function)
    }

    /// Checks that the values fit together and are supported.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelsError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_inner", self.inner()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        for (name, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} = {p} must be in [0, 1)"));
            }
        }
        if self.add_cross_attention {
            return Err(ModelsError::Unsupported(
                "add_cross_attention = true".into(),
            ));
        }
        self.activation()?;
        Ok(())
    }
}
