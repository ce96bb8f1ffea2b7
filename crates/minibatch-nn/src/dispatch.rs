//! Which implementation an op runs: the fused CPU kernel, or the same maths
//! as candle tensor ops (the path every non-CPU device takes).

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static TENSOR_PATH: Cell<bool> = const { Cell::new(false) };
}

/// Makes every op of this crate run as candle tensor ops on this thread, even
/// on the CPU, instead of its fused CPU kernel. That is the path CUDA (and any
/// other device) takes, so tests call this to check that maths without a GPU.
/// The setting is per thread (tests run on their own threads) and applies to
/// forward and backward passes run on this thread.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// minibatch_nn::set_tensor_path(true);
/// assert!(minibatch_nn::tensor_path());
/// minibatch_nn::set_tensor_path(false);
/// # Ok(()) }
/// ```
pub fn set_tensor_path(on: bool) {
    TENSOR_PATH.with(|c| c.set(on));
}

/// Whether [`set_tensor_path`] forced the tensor-op path on this thread.
pub fn tensor_path() -> bool {
    TENSOR_PATH.with(Cell::get)
}

/// Whether the fused CPU kernel should run for `t`: it lives on the CPU and
/// the tensor path is not forced.
pub(crate) fn cpu_kernel(t: &Tensor) -> bool {
    t.device().is_cpu() && !tensor_path()
}
