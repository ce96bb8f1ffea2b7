//! What the fused elementwise ops (`relu`, `gelu`) share: the split of `n`
//! elements over candle's thread pool, and the dtype and device plumbing of a
//! custom op's CPU forward and backward, so that each op is only its maths.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

use crate::cpu::contiguous;
use crate::split::{assume_init, parts, run_parts, uninit};

/// `n` elements, each chunk written by `f(chunk, offset of its first
/// element)`; split over candle's CPU pool when `work` (about the cost of
/// the whole pass, in element visits) is worth a hand-off.
pub(crate) fn map<T: Copy + Send + Sync>(
    n: usize,
    work: usize,
    f: impl Fn(&mut [MaybeUninit<T>], usize) + Sync,
) -> Vec<T> {
    let mut out = uninit::<T>(n);
    let per = n.div_ceil(parts(n, work)).max(1);
    run_parts(out.chunks_mut(per).collect(), |k, chunk| f(chunk, k * per));
    // SAFETY: `f` writes every element of its chunk (callers' contract).
    unsafe { assume_init(out) }
}

/// A custom op's `cpu_fwd` for an elementwise op: `f32`/`f64` slices of the
/// (contiguous) input to the output's elements; other dtypes are an error.
pub(crate) fn cpu_fwd(
    what: &str,
    s: &CpuStorage,
    l: &Layout,
    f32: impl Fn(&[f32]) -> Vec<f32>,
    f64: impl Fn(&[f64]) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    let out = match s {
        CpuStorage::F32(_) => CpuStorage::F32(f32(contiguous(s, l, what)?)),
        CpuStorage::F64(_) => CpuStorage::F64(f64(contiguous(s, l, what)?)),
        _ => candle_core::bail!("{what}: the fused kernel runs on f32 or f64 only"),
    };
    Ok((out, l.shape().clone()))
}

/// A custom op's backward for an elementwise op: `dx` from the tensor it
/// saved (its input or its output) and the incoming gradient, both of that
/// tensor's shape, as `f32`/`f64` slices.
pub(crate) fn cpu_bwd(
    what: &str,
    saved: &Tensor,
    grad: &Tensor,
    f32: impl Fn(&[f32], &[f32]) -> Vec<f32>,
    f64: impl Fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    let (ss, sl) = saved.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (Storage::Cpu(ss), Storage::Cpu(gs)) = (&*ss, &*gs) else {
        candle_core::bail!("{what}: the fused backward got a tensor off the CPU");
    };
    if sl.shape() != gl.shape() {
        candle_core::bail!(
            "{what}: gradient of shape {:?} for a tensor of shape {:?}",
            gl.dims(),
            sl.dims()
        );
    }
    let (shape, dev) = (saved.shape(), saved.device());
    match ss {
        CpuStorage::F32(_) => Tensor::from_vec(
            f32(contiguous(ss, sl, what)?, contiguous(gs, gl, what)?),
            shape,
            dev,
        ),
        CpuStorage::F64(_) => Tensor::from_vec(
            f64(contiguous(ss, sl, what)?, contiguous(gs, gl, what)?),
            shape,
            dev,
        ),
        _ => candle_core::bail!("{what}: the fused kernel runs on f32 or f64 only"),
    }
}
