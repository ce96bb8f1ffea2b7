//! Sentence embeddings as sentence-transformers computes them: mean pooling
//! over the tokens of the attention mask, then L2 normalisation.

use candle_core::{DType, Tensor, D};

use crate::error::{ModelsError, Result};

/// sentence-transformers' `Pooling(pooling_mode_mean_tokens=True)`: the
/// mean of `hidden (b, t, h)` over the positions where `attention_mask
/// (b, t)` is non-zero, `Σ_t h·m / max(Σ_t m, 1e-9)`, shape `(b, h)`. The
/// mask may be `u8`, `u32`, `i64` or float. Differentiable in `hidden`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    if attention_mask.dims() != [b, t] {
        return Err(ModelsError::Input(format!(
            "mean_pool: attention_mask must be (batch, seq) = ({b}, {t}), got shape {:?}",
            attention_mask.dims()
        )));
    }
    let m = attention_mask
        .to_dtype(DType::F32)?
        .ne(0f32)?
        .to_dtype(hidden.dtype())?
        .unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(sum.broadcast_div(&count)?)
}

/// `torch.nn.functional.normalize(x, p=2, dim=-1)`: each row divided by
/// `max(‖x‖₂, 1e-12)` (sentence-transformers' `Normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}
