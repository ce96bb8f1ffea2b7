//! Rotary position tables (`cos`, `sin`) as transformers' rope
//! initialisation functions compute them: the default, `linear` and `llama3`
//! frequency rules.

use candle_core::{DType, Device, Result, Tensor};

/// How the inverse frequencies are computed (transformers'
/// `ROPE_INIT_FUNCTIONS`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `θ^(−2i/d)`.
    Default,
    /// `linear`: the default divided by `factor` (positions interpolated).
    Linear {
        /// The interpolation factor.
        factor: f64,
    },
    /// `llama3`: long wavelengths divided by `factor`, short ones kept, a
    /// smooth blend in between.
    Llama3 {
        /// The scaling factor of the long wavelengths.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

/// The rotary embedding of a model: `theta`, the rotated head size and the
/// frequency rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// The base `θ` (`rope_theta`).
    pub theta: f64,
    /// The number of rotated features per head (the head size).
    pub dim: usize,
    /// The frequency rule.
    pub scaling: RopeScaling,
}

impl Rope {
    /// The `dim / 2` inverse frequencies.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.dim as f64;
        let base: Vec<f64> = (0..self.dim / 2)
            .map(|i| {
                // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in f32.
                let e = ((2 * i) as f32 / d as f32) as f64;
                1.0 / (self.theta as f32).powf(e as f32) as f64
            })
            .collect();
        match &self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// `(cos, sin)` tables of shape `(positions, dim / 2)` in `dtype`.
    pub fn tables(
        &self,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv = self.inv_freq();
        let h = inv.len();
        let mut cos = Vec::with_capacity(positions * h);
        let mut sin = Vec::with_capacity(positions * h);
        for p in 0..positions {
            for &f in &inv {
                // transformers multiplies in f32: (inv_freq @ positions).float().
                let a = (f as f32 * p as f32) as f64;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, h), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, h), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}
