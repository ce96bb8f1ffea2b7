//! The attention core shared by the ports: the fused
//! [`scaled_dot_product_attention_masked`] of minibatch-nn, or, when
//! attention dropout is on in training, the same maths as tensor ops with
//! dropout on the weights (as transformers' eager attention).

use candle_core::{Result, Tensor};
use minibatch_nn::ops::{scaled_dot_product_attention_masked, softmax_last_dim};
use minibatch_nn::Dropout;

/// `softmax(scale · q kᵀ + masks) v` for `q (b, h, tq, d)`, `k`, `v`
/// `(b, hk, tk, d)` (`hk` divides `h`), `mask` a `u8` key-padding mask
/// `(b, 1, 1, tk)` (non-zero = a token). `dropout` applies to the
/// attention weights when `train`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    dropout: &Dropout,
    train: bool,
) -> Result<Tensor> {
    if !train || dropout.drop_p() == 0.0 {
        return scaled_dot_product_attention_masked(q, k, v, mask, causal, Some(scale));
    }
    let (b, h, tq, _) = q.dims4()?;
    let (_, hk, tk, _) = k.dims4()?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if hk == h {
            return x.contiguous();
        }
        let dx = x.dim(3)?;
        x.unsqueeze(2)?
            .broadcast_as((b, hk, h / hk, tk, dx))?
            .reshape((b, h, tk, dx))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let mut add: Option<Tensor> = None;
    if causal {
        let m: Vec<f32> = (0..tq)
            .flat_map(|i| (0..tk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        add = Some(Tensor::from_vec(m, (1, 1, tq, tk), q.device())?.to_dtype(q.dtype())?);
    }
    if let Some(m) = mask {
        let zero = Tensor::zeros(m.shape(), q.dtype(), q.device())?;
        let ninf = Tensor::full(f32::NEG_INFINITY, m.shape(), q.device())?.to_dtype(q.dtype())?;
        let pad = m.where_cond(&zero, &ninf)?;
        add = Some(match add {
            Some(a) => a.broadcast_add(&pad)?,
            None => pad,
        });
    }
    if let Some(a) = add {
        s = s.broadcast_add(&a)?;
    }
    let p = softmax_last_dim(&s)?;
    let p = dropout.forward(&p, true)?;
    p.matmul(&v)
}
