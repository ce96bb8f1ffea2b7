//! Checks of integer index tensors (class ids, token ids): dtype and range,
//! so that a bad id is an error naming it, on every device.

use candle_core::{DType, Tensor};

use crate::cpu::{with_cpu, ClassIds};
use crate::NnError;

/// Whether `dtype` is one of the index dtypes the ops take (`u8`, `u32`, `i64`).
pub(crate) fn is_index_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::U8 | DType::U32 | DType::I64)
}

/// An error unless `ids` has an index dtype.
pub(crate) fn check_index_dtype(what: &str, ids: &Tensor) -> candle_core::Result<()> {
    if is_index_dtype(ids.dtype()) {
        Ok(())
    } else {
        Err(NnError::InvalidArgument(format!(
            "{what}: ids must be u8, u32 or i64, got {:?}",
            ids.dtype()
        ))
        .into())
    }
}

/// An error unless every id of `ids` is in `0..n`: scanned in place on the
/// CPU; on other devices the minimum and maximum are read back (two scalars).
pub(crate) fn check_ids(what: &str, ids: &Tensor, n: usize) -> candle_core::Result<()> {
    check_index_dtype(what, ids)?;
    if ids.elem_count() == 0 {
        return Ok(());
    }
    if ids.device().is_cpu() {
        let t = ids.contiguous()?;
        return with_cpu(&t, |s, l| ClassIds::new(s, l, what)?.check(n, what));
    }
    let t = ids.flatten_all()?.to_dtype(DType::I64)?;
    let lo = t.min_all()?.to_scalar::<i64>()?;
    let hi = t.max_all()?.to_scalar::<i64>()?;
    if lo < 0 || hi as u64 >= n as u64 {
        let bad = if lo < 0 { lo } else { hi };
        return Err(
            NnError::InvalidArgument(format!("{what}: id {bad} is out of range 0..{n}")).into(),
        );
    }
    Ok(())
}
