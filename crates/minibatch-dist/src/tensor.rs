//! In-place access to a CPU tensor's storage, for the collectives over
//! candle tensors and the gradient buckets.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use crate::error::{DistError, Result};
use crate::group::Buffer;

/// The error for a tensor a collective cannot use.
pub(crate) fn unsupported(t: &Tensor, reason: impl Into<String>) -> DistError {
    DistError::UnsupportedTensor {
        shape: t.dims().to_vec(),
        dtype: t.dtype(),
        device: format!("{:?}", t.device().location()),
        reason: reason.into(),
    }
}

/// What [`with_cpu_buffer`] runs on the storage.
pub(crate) type BufferFn<'a> = dyn FnMut(Buffer<'_>) -> Result<()> + 'a;

/// Runs `f` on the contiguous CPU storage of `t`, mutably and in place.
pub(crate) fn with_cpu_buffer(t: &Tensor, f: &mut BufferFn<'_>) -> Result<()> {
    if !t.device().is_cpu() {
        return Err(unsupported(t, "this backend reduces CPU tensors only"));
    }
    if !t.is_contiguous() {
        return Err(unsupported(t, "not contiguous; call .contiguous() first"));
    }
    let op = InPlace {
        f: RefCell::new(f),
        error: RefCell::new(None),
    };
    let ran = t.inplace_op1(&op);
    if let Some(e) = op.error.into_inner() {
        return Err(e);
    }
    ran?;
    Ok(())
}

struct InPlace<'a, 'b> {
    f: RefCell<&'a mut BufferFn<'b>>,
    error: RefCell<Option<DistError>>,
}

impl InplaceOp1 for InPlace<'_, '_> {
    fn name(&self) -> &'static str {
        "minibatch-dist-in-place"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("minibatch-dist: the tensor is not contiguous")
        };
        let buf = match storage {
            CpuStorage::F32(v) => Buffer::F32(&mut v[start..end]),
            CpuStorage::F64(v) => Buffer::F64(&mut v[start..end]),
            CpuStorage::BF16(v) => Buffer::BF16(&mut v[start..end]),
            other => candle_core::bail!(
                "minibatch-dist: dtype {:?} cannot be reduced (f32, f64, bf16)",
                other.dtype()
            ),
        };
        if let Err(e) = (self.f.borrow_mut())(buf) {
            let msg = e.to_string();
            *self.error.borrow_mut() = Some(e);
            candle_core::bail!("{msg}")
        }
        Ok(())
    }
}

/// A read-only view of a CPU tensor's elements, as f32/f64/bf16.
pub(crate) enum View<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    BF16(&'a [half::bf16]),
}

/// Runs `f` on the contiguous CPU elements of `t`.
pub(crate) fn with_cpu_view<R>(t: &Tensor, f: impl FnOnce(View<'_>) -> R) -> Result<R> {
    if !t.device().is_cpu() {
        return Err(unsupported(t, "this backend reduces CPU tensors only"));
    }
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(unsupported(t, "not contiguous"));
    };
    let view = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => View::F32(&v[start..end]),
        Storage::Cpu(CpuStorage::F64(v)) => View::F64(&v[start..end]),
        Storage::Cpu(CpuStorage::BF16(v)) => View::BF16(&v[start..end]),
        _ => return Err(unsupported(t, "dtype must be f32, f64 or bf16")),
    };
    Ok(f(view))
}
