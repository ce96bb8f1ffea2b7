//! [`Config`]: `BertConfig`'s fields and defaults, read from `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::activation::Activation;
use crate::config::{parse_json, read_json};
use crate::error::{ModelsError, Result};

/// transformers' `BertConfig`, deserialized from `config.json`. Missing
/// fields take `BertConfig`'s defaults; unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    /// Default 30522.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Default 768.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Default 12.
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    /// Default 12.
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    /// Default 3072.
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Default `"gelu"` (exact); `"gelu_new"` is the tanh approximation.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Default 0.1.
    #[serde(default = "d_drop")]
    pub hidden_dropout_prob: f32,
    /// Default 0.1.
    #[serde(default = "d_drop")]
    pub attention_probs_dropout_prob: f32,
    /// Default 512: the length of the position table.
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    /// Default 2.
    #[serde(default = "d_types")]
    pub type_vocab_size: usize,
    /// Default 0.02.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// Default 1e-12.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Default 0: `torch.nn.Embedding(padding_idx)` of the word
    /// embeddings (that row gets no gradient); `null` for none.
    #[serde(default = "d_pad")]
    pub pad_token_id: Option<usize>,
    /// Only `"absolute"` (the default) is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// The classifier's dropout; defaults to `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    /// Labels of a classification head (its size gives `num_labels`).
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// An explicit label count (else `id2label`'s size, else 2).
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Decoder BERTs are not supported (must be false).
    #[serde(default)]
    pub is_decoder: bool,
    /// Cross-attention is not supported (must be false).
    #[serde(default)]
    pub add_cross_attention: bool,
}

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_12() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_drop() -> f32 {
    0.1
}
fn d_maxpos() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_init() -> f64 {
    0.02
}
fn d_pad() -> Option<usize> {
    Some(0)
}
fn d_eps() -> f64 {
    1e-12
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

    /// The activation of the intermediate layer.
    pub fn activation(&self) -> Result<Activation> {
        Activation::parse("hidden_act", &self.hidden_act)
    }

    /// The classification head's size: `num_labels`, else the size of
    /// `id2label`, else 2 (transformers' default).
    pub fn labels(&self) -> usize {
        self.num_labels
            .or(self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    /// Checks that the values fit together and are supported.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelsError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return bad(format!("{name} = {p} must be in [0, 1)"));
                }
            }
        }
        if let Some(t) = &self.position_embedding_type {
            if t != "absolute" {
                return Err(ModelsError::Unsupported(format!(
                    "position_embedding_type = {t:?} (only \"absolute\")"
                )));
            }
        }
        if self.is_decoder {
            return Err(ModelsError::Unsupported(
                "is_decoder = true (encoder BERTs only)".into(),
            ));
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
