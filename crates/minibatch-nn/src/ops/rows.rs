//! Host-side plumbing of the fused CPU kernels: the slices behind CPU
//! tensors and storages, and the row-parallel loop they all use.

use std::ops::Range;

use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};

use crate::float::Float;
use crate::split::run_parts;

/// Below this many elements a kernel runs on the calling thread: handing
/// work to the thread pool costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// About how many elements one pool task handles.
const TASK_ELEMS: usize = 1 << 13;

/// The contiguous elements of a CPU storage under `layout`.
pub(crate) fn slice<'a, T: Float>(
    s: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    crate::cpu::contiguous(s, layout, what)
}

/// Runs `f` on the contiguous elements of each CPU tensor of `ts` (copied to
/// a contiguous layout first where needed).
pub(crate) fn with_slices<T: Float, R>(
    ts: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(slice::<T>(s, layout, what)?),
            _ => candle_core::bail!("{what}: the fused kernel needs CPU tensors"),
        }
    }
    f(&slices)
}

/// A CPU tensor that owns `data`, no copy.
pub(crate) fn tensor<T: Float>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape.into(), &Device::Cpu)
}

/// Runs `f(rows, outs, partial)` over blocks of whole rows (in parallel when
/// the work is large, else on this thread) and returns the sum of the
/// `partial`s.
///
/// * `rows` rows of `row_elems` elements each (that sizes the blocks);
/// * `outs`: output buffers split by rows, each with its number of elements
///   per row (`0` for an unused buffer); `f` gets the part of each that
///   belongs to its rows;
/// * `partial`: `m` zeroed elements that `f` adds column sums into (`m = 0`
///   when the kernel has none).
///
/// The blocks depend only on the shape, and their partials are added in
/// block order, so the column sums do not depend on the number of threads.
pub(crate) fn row_blocks<T: Float, const J: usize>(
    rows: usize,
    row_elems: usize,
    outs: [(&mut [T], usize); J],
    m: usize,
    f: impl Fn(Range<usize>, [&mut [T]; J], &mut [T]) + Sync,
) -> Vec<T> {
    let mut total = vec![T::ZERO; m];
    if rows == 0 {
        return total;
    }
    if rows * row_elems < PAR_MIN_ELEMS {
        f(0..rows, outs.map(|(o, _)| o), &mut total);
        return total;
    }
    let rows_per_task = (TASK_ELEMS / row_elems.max(1)).max(1);
    let widths = outs.each_ref().map(|(_, w)| *w);
    let mut rest = outs.map(|(o, _)| o);
    let mut tasks = Vec::with_capacity(rows.div_ceil(rows_per_task));
    for lo in (0..rows).step_by(rows_per_task) {
        let hi = (lo + rows_per_task).min(rows);
        let parts: [&mut [T]; J] = std::array::from_fn(|j| {
            let (part, tail) = std::mem::take(&mut rest[j]).split_at_mut((hi - lo) * widths[j]);
            rest[j] = tail;
            part
        });
        tasks.push((lo..hi, parts));
    }
    // On candle's CPU pool, as every kernel of this crate (see `run_parts`).
    let partials: Vec<Vec<T>> = run_parts(tasks, |_, (range, parts)| {
        let mut partial = vec![T::ZERO; m];
        f(range, parts, &mut partial);
        partial
    });
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += *v;
        }
    }
    total
}
