//! The activations named by `hidden_act` / `activation_function` in
//! transformers' configs, on minibatch-nn's ops.

use candle_core::{Result, Tensor};

use crate::error::ModelsError;

/// An activation function of transformers' `ACT2FN` that the ports implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact GELU `x Φ(x)` ([`minibatch_nn::ops::gelu_erf`]).
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation
    /// ([`minibatch_nn::ops::gelu`]).
    GeluTanh,
    /// `relu` ([`minibatch_nn::ops::relu`]).
    Relu,
    /// `silu` / `swish`: `x σ(x)`.
    Silu,
}

impl Activation {
    /// The activation transformers calls `name`; `field` names the config
    /// field in the error for a name this crate lacks.
    pub fn parse(field: &str, name: &str) -> std::result::Result<Self, ModelsError> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(ModelsError::Unsupported(format!(
                    "{field} = {other:?} (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish)"
                )))
            }
        })
    }

    /// The activation applied elementwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => minibatch_nn::ops::gelu_erf(x),
            Self::GeluTanh => minibatch_nn::ops::gelu(x),
            Self::Relu => minibatch_nn::ops::relu(x),
            Self::Silu => minibatch_nn::ops::silu(x),
        }
    }
}
