//! What the three `Config`s share: reading `config.json`, and rope
//! parameters in both generations of transformers' format.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{ModelsError, Result};
use crate::rope::RopeScaling;

/// Parses a `config.json` file.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelsError::Config(format!("cannot read {}: {e}", path.display())))?;
    parse_json(&text).map_err(|e| match e {
        ModelsError::Config(m) => ModelsError::Config(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// Parses `config.json` text.
pub(crate) fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| ModelsError::Config(e.to_string()))
}

/// transformers' rope parameters: the `rope_scaling` object of
/// transformers 4 (with `rope_theta` beside it at the top level) or the
/// `rope_parameters` object of transformers 5 (`rope_theta` inside).
/// Unknown keys are ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// `rope_type` (transformers ≥ 4.45) or `type` (older files).
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// The base `θ` (transformers 5).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `linear` and `llama3`: the scaling factor.
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// A fraction of the head rotated (only 1.0 is supported).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// `θ` and the frequency rule from a config's `rope_theta`, `rope_scaling`
/// and `rope_parameters` (transformers 5's object wins where both are set).
pub(crate) fn resolve_rope(
    rope_theta: Option<f64>,
    rope_scaling: Option<&RopeParameters>,
    rope_parameters: Option<&RopeParameters>,
) -> Result<(f64, RopeScaling)> {
    let p = rope_parameters.or(rope_scaling);
    let theta = p
        .and_then(|p| p.rope_theta)
        .or(rope_theta)
        .unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ModelsError::Config(format!(
            "rope_theta = {theta} must be positive"
        )));
    }
    let Some(p) = p else {
        return Ok((theta, RopeScaling::Default));
    };
    if let Some(f) = p.partial_rotary_factor {
        if f != 1.0 {
            return Err(ModelsError::Unsupported(format!(
                "partial_rotary_factor = {f} (only 1.0)"
            )));
        }
    }
    let need = |v: Option<f64>, name: &str| {
        v.ok_or_else(|| ModelsError::Config(format!("rope type {:?} needs {name}", p.rope_type)))
    };
    let scaling = match p.rope_type.as_deref().unwrap_or("default") {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need(p.factor, "factor")?,
        },
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: p.original_max_position_embeddings.ok_or_else(
                    || {
                        ModelsError::Config(
                            "rope type llama3 needs original_max_position_embeddings".into(),
                        )
                    },
                )?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = s
            {
                if high_freq_factor <= low_freq_factor {
                    return Err(ModelsError::Config(format!(
                        "llama3 rope: high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    )));
                }
            }
            s
        }
        other => {
            return Err(ModelsError::Unsupported(format!(
                "rope_type = {other:?} (supported: default, linear, llama3)"
            )))
        }
    };
    Ok((theta, scaling))
}
