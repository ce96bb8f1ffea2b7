//! The [`ProcessGroup`] trait every backend implements, and the generic
//! helpers on top of it ([`ProcessGroupExt`]).

use std::fmt;

use candle_core::Tensor;
use half::bf16;

use crate::error::{DistError, Result};

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The element-wise sum over the ranks.
    Sum,
    /// The sum divided by the world size (what DDP does to gradients).
    Mean,
}

/// A mutable slice of one of the element types the collectives reduce.
#[derive(Debug)]
pub enum Buffer<'a> {
    /// `f32` values.
    F32(&'a mut [f32]),
    /// `f64` values.
    F64(&'a mut [f64]),
    /// `bf16` values (reduced in f32 over MPI, natively over NCCL).
    BF16(&'a mut [bf16]),
}

impl Buffer<'_> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(x) => x.len(),
            Buffer::F64(x) => x.len(),
            Buffer::BF16(x) => x.len(),
        }
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Divides every element by `world_size` (the `Mean` after a `Sum`).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn divide(&mut self, world_size: usize) {
        if world_size <= 1 {
            return;
        }
        match self {
            Buffer::F32(x) => {
                let w = world_size as f32;
                x.iter_mut().for_each(|v| *v /= w);
            }
            Buffer::F64(x) => {
                let w = world_size as f64;
                x.iter_mut().for_each(|v| *v /= w);
            }
            Buffer::BF16(x) => {
                let w = world_size as f32;
                x.iter_mut()
                    .for_each(|v| *v = bf16::from_f32(v.to_f32() / w));
            }
        }
    }
}

/// A group of processes (ranks) that train one model together.
///
/// Every collective must be called by every rank of the group, in the same
/// order, with buffers of the same length; otherwise MPI and NCCL hang or
/// abort. The methods here are the primitives a backend implements; the
/// generic ones (`all_reduce_sum::<f32>`, `broadcast` of any plain values,
/// agreement checks, failing the whole job) are in [`ProcessGroupExt`].
///
/// Backends: [`Single`](crate::Single) (one process, every collective a
/// no-op), [`Mpi`](crate::Mpi) (feature `mpi`) and [`Nccl`](crate::Nccl)
/// (feature `nccl`).
pub trait ProcessGroup: Send + Sync + fmt::Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The number of ranks on this machine (to share its cores between them).
    fn local_size(&self) -> usize;
    /// The backend's name: `"single"`, `"mpi"` or `"nccl"`.
    fn backend(&self) -> &'static str;
    /// All-reduces `buf` in place: afterwards every rank holds the sum (or
    /// mean) of all ranks' buffers.
    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()>;
    /// Overwrites `buf` on every rank with rank `root`'s bytes.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Sums `send` over all ranks into `recv` (same length). The default
    /// copies `send` into `recv` and reduces in place; MPI reduces straight
    /// from `send`. The gradient buckets use it with their own two buffers.
    fn sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        self.all_reduce(Buffer::F32(recv), ReduceOp::Sum)
    }
    /// The f64 counterpart of [`sum_f32_into`](Self::sum_f32_into).
    fn sum_f64_into(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        recv.copy_from_slice(send);
        self.all_reduce(Buffer::F64(recv), ReduceOp::Sum)
    }
    /// Blocks until every rank has reached it.
    fn barrier(&self) -> Result<()>;
    /// Every rank's `value`, in rank order (for small values: counts,
    /// checksums, losses).
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// All-reduces a tensor in place (its storage is overwritten). The
    /// tensor must be contiguous, f32/f64/bf16, and on a device the backend
    /// reduces (the CPU for MPI, CUDA for NCCL).
    fn all_reduce_tensor(&self, tensor: &Tensor, op: ReduceOp) -> Result<()>;
    /// Overwrites a tensor in place on every rank with rank `root`'s values.
    fn broadcast_tensor(&self, tensor: &Tensor, root: usize) -> Result<()>;
    /// Ends every rank of the job now (`MPI_Abort`) with exit code `code`.
    fn abort(&self, code: i32) -> !;
}

/// Plain values that travel as bytes in a broadcast.
pub trait Pod: Copy + sealed::Sealed + 'static {}

/// Element types of [`Buffer`]: what an all-reduce sums.
pub trait Element: Pod {
    /// Wraps a slice as a [`Buffer`].
    fn buffer(x: &mut [Self]) -> Buffer<'_>;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! pod {
    ($($t:ty),*) => { $( impl sealed::Sealed for $t {} impl Pod for $t {} )* };
}
pod!(u8, u32, u64, i32, i64, f32, f64, bf16);

impl Element for f32 {
    fn buffer(x: &mut [f32]) -> Buffer<'_> {
        Buffer::F32(x)
    }
}
impl Element for f64 {
    fn buffer(x: &mut [f64]) -> Buffer<'_> {
        Buffer::F64(x)
    }
}
impl Element for bf16 {
    fn buffer(x: &mut [bf16]) -> Buffer<'_> {
        Buffer::BF16(x)
    }
}

/// The bytes of a slice of plain values.
pub(crate) fn as_bytes_mut<T: Pod>(x: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(x);
    // SAFETY: `T` is one of the sealed `Pod` types (integers, floats, bf16):
    // no padding, no invalid bit patterns, alignment of u8 is 1, and the
    // byte slice borrows `x` mutably for its whole lifetime.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), len) }
}

/// The generic collectives over any [`ProcessGroup`], trait objects included.
pub trait ProcessGroupExt: ProcessGroup {
    /// All-reduces a slice in place with the sum.
    fn all_reduce_sum<T: Element>(&self, x: &mut [T]) -> Result<()> {
        self.all_reduce(T::buffer(x), ReduceOp::Sum)
    }
    /// All-reduces a slice in place with the mean.
    fn all_reduce_mean<T: Element>(&self, x: &mut [T]) -> Result<()> {
        self.all_reduce(T::buffer(x), ReduceOp::Mean)
    }
    /// Overwrites `x` on every rank with rank `root`'s values.
    fn broadcast<T: Pod>(&self, x: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(as_bytes_mut(x), root)
    }
    /// Every rank's `value`, in rank order.
    fn all_gather_f64(&self, value: f64) -> Result<Vec<f64>> {
        Ok(self
            .all_gather_u64(value.to_bits())?
            .into_iter()
            .map(f64::from_bits)
            .collect())
    }
    /// Checks that every rank has the same `value` of `what`; else
    /// [`DistError::Mismatch`] naming the first rank that differs, on every rank.
    fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let all = self.all_gather_u64(value)?;
        match all.iter().position(|v| *v != all[0]) {
            None => Ok(()),
            Some(rank) => Err(DistError::Mismatch {
                what: what.to_string(),
                rank,
                expected: all[0],
                got: all[rank],
            }),
        }
    }
    /// Prints `error` with this rank's number to stderr and ends the whole
    /// job ([`abort`](ProcessGroup::abort), exit code 1): the other ranks,
    /// blocked in a collective or not, end within seconds instead of hanging.
    fn fail(&self, error: &dyn fmt::Display) -> ! {
        eprintln!(
            "minibatch-dist: rank {} of {} failed: {error}; aborting all ranks",
            self.rank(),
            self.world_size()
        );
        self.abort(1)
    }
    /// The value of `result`, or [`fail`](Self::fail) with its error.
    fn or_abort<T, E: fmt::Display>(&self, result: std::result::Result<T, E>) -> T {
        match result {
            Ok(v) => v,
            Err(e) => self.fail(&e),
        }
    }
}

impl<G: ProcessGroup + ?Sized> ProcessGroupExt for G {}

/// `root` must be a rank of a world of `world_size`.
pub(crate) fn check_root(root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(DistError::InvalidRoot { root, world_size });
    }
    Ok(())
}
