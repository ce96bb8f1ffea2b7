//! Small helpers of the fused CPU kernels: read access to a tensor's host
//! memory without copying it, and integer class ids.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};

/// The elements of a contiguous CPU storage, `T`-typed, from the layout's
/// offset; an error for another dtype or a strided layout.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the host storage and layout of a CPU tensor (no copy); an
/// error if the tensor is not on the CPU.
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(s, layout),
        _ => {
            candle_core::bail!("internal error: a fused CPU kernel got a tensor on another device")
        }
    }
}

/// Integer class ids (`u8`, `u32` or `i64`) of a contiguous CPU storage.
pub(crate) enum ClassIds<'a> {
    U8(&'a [u8]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl<'a> ClassIds<'a> {
    pub fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        Ok(match s {
            CpuStorage::U8(_) => Self::U8(contiguous(s, l, what)?),
            CpuStorage::U32(_) => Self::U32(contiguous(s, l, what)?),
            CpuStorage::I64(_) => Self::I64(contiguous(s, l, what)?),
            _ => candle_core::bail!("{what}: ids must be u8, u32 or i64, got {:?}", s.dtype()),
        })
    }
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I64(v) => v.len(),
        }
    }
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Self::U8(v) => v[i] as i64,
            Self::U32(v) => v[i] as i64,
            Self::I64(v) => v[i],
        }
    }
    /// Every id as an index below `n`, or an error naming the first one out of range.
    pub fn check(&self, n: usize, what: &str) -> candle_core::Result<()> {
        for i in 0..self.len() {
            let id = self.get(i);
            if id < 0 || id as u64 >= n as u64 {
                candle_core::bail!("{what}: id {id} at position {i} is out of range 0..{n}");
            }
        }
        Ok(())
    }
}
