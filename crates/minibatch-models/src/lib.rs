//! # minibatch-models
//!
//! The models people load from candle-transformers, ported onto
//! `minibatch-nn`'s ops so that they train: every op has a real backward
//! pass (candle-nn 0.11's fused LayerNorm, RmsNorm, `softmax_last_dim` and
//! `rope`, which candle-transformers uses, have none).
//!
//! | module | transformers class | candle-transformers |
//! |---|---|---|
//! | [`bert`] | `BertModel`, `BertForSequenceClassification` | `models::bert` |
//! | [`llama`] | `LlamaForCausalLM` | `models::llama` |
//! | [`gpt2`] | `GPT2LMHeadModel` | `models::bigcode` (the GPT-2 family) |
//!
//! [`lora`] adds PEFT's LoRA adapters to any of them (`load_lora`), and
//! saves and loads PEFT's adapter files.
//!
//! Each port has a `Config` read from Hugging Face's `config.json` (both
//! transformers 4 and 5 files; unknown fields ignored, unsupported values an
//! error naming them) and a `load(vb, &cfg)` that creates every parameter
//! under the name `save_pretrained` writes, so that
//! [`checkpoint::load_pretrained`] (or `VarMap::load`) fills a trainable
//! model and [`checkpoint::frozen_var_builder`] gives a frozen one.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use minibatch_models::{checkpoint, llama};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = "path/to/hf-checkpoint";
//! let cfg = llama::Config::from_file(format!("{dir}/config.json"))?;
//! let varmap = VarMap::new();
//! let model = llama::Llama::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
//! checkpoint::load_pretrained(&varmap, dir, None, false)?; // every Var from the files
//! # let _ = model; Ok(()) }
//! ```
#![warn(missing_docs)]

mod activation;
pub mod bert;
pub mod checkpoint;
mod config;
mod error;
pub mod gpt2;
mod inputs;
pub mod llama;
pub mod lora;
pub mod pooling;
mod projection;
pub mod rope;

pub use activation::Activation;
pub use config::RopeParameters;
pub use error::{ModelsError, Result};
pub use projection::Projection;
