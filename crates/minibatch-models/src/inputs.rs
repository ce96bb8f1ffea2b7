//! Checks and conversions of model inputs: token ids, token types and
//! attention masks as PyTorch and tokenizers produce them.

use candle_core::{DType, Tensor};

use crate::error::{ModelsError, Result};

/// `(batch, seq)` of a rank-2 integer tensor (`u32`, `i64` or `u8`) whose
/// values are all in `0..n`; `what` names it in errors, `table` the table it
/// indexes.
pub(crate) fn check_ids(ids: &Tensor, n: usize, what: &str, table: &str) -> Result<(usize, usize)> {
    let (b, t) = match *ids.dims() {
        [b, t] => (b, t),
        ref d => {
            return Err(ModelsError::Input(format!(
                "{what} must be (batch, seq), got shape {d:?}"
            )))
        }
    };
    if !matches!(ids.dtype(), DType::U32 | DType::I64 | DType::U8) {
        return Err(ModelsError::Input(format!(
            "{what} must be u32, i64 or u8, got {:?}",
            ids.dtype()
        )));
    }
    if b * t == 0 {
        return Err(ModelsError::Input(format!(
            "{what} is empty (shape {:?})",
            ids.dims()
        )));
    }
    let all = ids.to_dtype(DType::I64)?.flatten_all()?;
    let max = all.max(0)?.to_scalar::<i64>()?;
    let min = all.min(0)?.to_scalar::<i64>()?;
    if min < 0 {
        return Err(ModelsError::Input(format!("{what}: negative id {min}")));
    }
    if max as u64 >= n as u64 {
        return Err(ModelsError::Input(format!(
            "{what}: id {max} is out of range for {table} of size {n}"
        )));
    }
    Ok((b, t))
}

/// A sequence of `t` positions against a table of `n`.
pub(crate) fn check_positions(t: usize, n: usize, what: &str) -> Result<()> {
    if t > n {
        return Err(ModelsError::Input(format!(
            "a sequence of {t} tokens is longer than {what} ({n} positions, max_position_embeddings / n_positions)"
        )));
    }
    Ok(())
}

/// A `(b, t)` attention mask (1 = a token, 0 = padding; `u8`, `u32`,
/// `i64` or any float dtype) as the `u8` key-padding mask `(b, 1, 1, t)`
/// of [`minibatch_nn::ops::scaled_dot_product_attention_masked`].
pub(crate) fn key_padding_mask(mask: &Tensor, b: usize, t: usize) -> Result<Tensor> {
    if mask.dims() != [b, t] {
        return Err(ModelsError::Input(format!(
            "attention_mask must be (batch, seq) = ({b}, {t}) like input_ids, got shape {:?}",
            mask.dims()
        )));
    }
    let m = match mask.dtype() {
        DType::U8 => mask.ne(0u8)?,
        DType::U32 => mask.ne(0u32)?,
        DType::I64 => mask.ne(0i64)?,
        dt if dt.is_float() => mask.to_dtype(DType::F32)?.ne(0f32)?,
        dt => {
            return Err(ModelsError::Input(format!(
                "attention_mask must be u8, u32, i64 or float, got {dt:?}"
            )))
        }
    };
    Ok(m.reshape((b, 1, 1, t))?)
}

/// `torch.nn.Embedding(padding_idx=pad)`: the looked-up rows of `pad` pass
/// no gradient to the table (their values are unchanged).
pub(crate) fn padding_idx(
    rows: Tensor,
    ids: &Tensor,
    pad: Option<usize>,
) -> candle_core::Result<Tensor> {
    let Some(pad) = pad else { return Ok(rows) };
    let is_pad = ids.to_dtype(DType::I64)?.eq(pad as i64)?;
    if is_pad.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? == 0 {
        return Ok(rows);
    }
    is_pad
        .unsqueeze(2)?
        .broadcast_as(rows.shape())?
        .where_cond(&rows.detach(), &rows)
}
