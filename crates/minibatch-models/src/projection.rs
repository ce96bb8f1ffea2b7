//! [`Projection`]: the affine maps of the ports (attention and MLP
//! projections, heads), in the two weight layouts transformers uses.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use minibatch_nn::Linear;

use crate::lora::LoraLayer;

/// One affine map `y = x Wᵀ + b` of a port, run by [`minibatch_nn::Linear`]
/// (a fused CPU forward and a lean backward).
///
/// The variants keep the parameter exactly as the checkpoint stores it:
/// `torch.nn.Linear`'s `weight (out, in)`, or GPT-2's `Conv1D` with
/// `weight (in, out)` (used through a transposed view: the Var is the
/// checkpoint's tensor, and its gradient has the checkpoint's layout). Every
/// projection of a port is one of these, so wrappers (adapters, frozen
/// copies) can replace any of them by name.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Projection {
    /// `torch.nn.Linear`: `weight (out, in)`, `bias (out,)`.
    Linear(Linear),
    /// transformers' `Conv1D` (GPT-2): `weight (in, out)`, `bias (out,)`.
    Conv1d {
        /// The parameter as stored, `(in, out)`.
        weight: Tensor,
        /// The layer over `weight.t()`.
        linear: Linear,
    },
    /// A projection with a LoRA adapter ([`crate::lora`]): the base map plus
    /// `(alpha / r) · B (A (dropout(x)))`. [`weight`](Self::weight),
    /// [`bias`](Self::bias) and [`as_linear`](Self::as_linear) are the base
    /// map's.
    Lora(Box<LoraLayer>),
}

/// `N(0, std)`, transformers' `_init_weights` for linear and embedding weights.
pub(crate) fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// Zeros (biases) and ones (norm weights).
pub(crate) const ZEROS: Init = Init::Const(0.0);
pub(crate) const ONES: Init = Init::Const(1.0);

impl Projection {
    /// A `torch.nn.Linear(in_dim, out_dim, bias)` read from (or created in)
    /// `vb` as `weight` and `bias`, initialised as transformers does: the
    /// weight `N(0, std)`, the bias zero.
    pub fn linear(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get_with_hints((out_dim, in_dim), "weight", normal(std))?;
        let b = if bias {
            Some(vb.get_with_hints(out_dim, "bias", ZEROS)?)
        } else {
            None
        };
        Ok(Self::Linear(Linear::new(w, b)))
    }

    /// transformers' `Conv1D(out_dim, in_dim)` read from (or created in) `vb`:
    /// `weight (in_dim, out_dim)` `N(0, std)`, `bias (out_dim,)` zero.
    pub fn conv1d(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints((in_dim, out_dim), "weight", normal(std))?;
        let b = vb.get_with_hints(out_dim, "bias", ZEROS)?;
        Ok(Self::Conv1d {
            linear: Linear::new(w.t()?, Some(b)),
            weight: w,
        })
    }

    /// The weight as the checkpoint stores it (`(out, in)` for `Linear`,
    /// `(in, out)` for `Conv1d`).
    pub fn weight(&self) -> &Tensor {
        match self {
            Self::Linear(l) => l.weight(),
            Self::Conv1d { weight, .. } => weight,
            Self::Lora(l) => l.base().weight(),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Linear(l) => l.bias(),
            Self::Conv1d { linear, .. } => linear.bias(),
            Self::Lora(l) => l.base().bias(),
        }
    }

    /// The layer that runs it (`weight` is `(out, in)` there); for
    /// [`Lora`](Self::Lora), the base layer, without the adapter.
    pub fn as_linear(&self) -> &Linear {
        match self {
            Self::Linear(l) => l,
            Self::Conv1d { linear, .. } => linear,
            Self::Lora(l) => l.base().as_linear(),
        }
    }

    /// The LoRA adapter, when this projection has one.
    pub fn lora(&self) -> Option<&LoraLayer> {
        match self {
            Self::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// The output, with the adapter's dropout when `train` (the other
    /// variants have no dropout: `train` changes nothing there).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Lora(l) => l.forward_t(x, train),
            p => p.as_linear().forward(x),
        }
    }

    /// `residual + self.forward_t(x, train)`, the residual sum of a block
    /// as one node with the product where the layer allows
    /// ([`Linear::forward_add`]: the same bits).
    pub fn forward_add_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Lora(l) => residual + l.forward_t(x, train)?,
            p => p.as_linear().forward_add(x, residual),
        }
    }
}

impl Module for Projection {
    /// The output in eval mode ([`forward_t`](Projection::forward_t) with
    /// `train = false`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}
