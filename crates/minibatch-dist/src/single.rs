//! [`Single`]: the one-process group, the default.

use candle_core::Tensor;

use crate::error::Result;
use crate::group::{check_root, Buffer, ProcessGroup, ReduceOp};

/// The group of one process: rank 0 of 1. Every collective is a no-op (a
/// sum or mean over one rank is the value itself), so code written for a
/// [`ProcessGroup`] runs unchanged, and at no cost, without MPI.
///
/// ```
/// use minibatch_dist::{ProcessGroup, ProcessGroupExt, Single};
/// let g = Single;
/// let mut x = [1f32, 2.0];
/// g.all_reduce_mean(&mut x).unwrap();
/// assert_eq!((g.rank(), g.world_size(), x), (0, 1, [1.0, 2.0]));
/// assert!(g.broadcast(&mut x, 1).is_err()); // no rank 1
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl ProcessGroup for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce(&self, _buf: Buffer<'_>, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn all_reduce_tensor(&self, _tensor: &Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast_tensor(&self, _tensor: &Tensor, root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
