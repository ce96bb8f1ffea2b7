//! # minibatch-nn
//!
//! Drop-in replacements for candle-nn's layers and ops whose backward passes
//! are real and fast. In candle-nn 0.11 the fused `LayerNorm`, `RmsNorm`,
//! `softmax_last_dim` and `rope` ops have no backward (gradients upstream of
//! them are silently dropped) and `max_pool2d`'s backward is scaled wrongly;
//! every op here has a tested backward, and on the CPU runs as a fused kernel.
//! Same names, signatures and `VarBuilder` parameter names as candle-nn, so
//! switching a model is one `use` line.
#![warn(missing_docs)]

mod conv;
mod cpu;
mod dispatch;
pub mod dropout;
mod embedding;
mod error;
mod float;
mod gemm;
mod ids;
mod init;
mod layer_norm;
mod linear;
mod linear_residual;
mod lora_linear;
pub mod loss;
pub mod malloc;
pub mod ops;
pub mod recompute;
mod rms_norm;
pub mod rotary_emb;
mod split;

pub use conv::{conv2d, conv2d_no_bias, Conv2d};
pub use dispatch::{set_tensor_path, tensor_path};
pub use dropout::{set_rng_step, Dropout};
pub use embedding::{embedding, Embedding};
pub use error::{NnError, Result};
pub use init::seeded_var_builder;
pub use layer_norm::{layer_norm, layer_norm_no_bias, LayerNorm, LayerNormConfig};
pub use linear::{linear, linear_b, linear_no_bias, Linear};
pub use rms_norm::{rms_norm, RmsNorm};
