//! Gradient checkpointing of the ports' blocks, transformers'
//! `gradient_checkpointing_enable()`: each block runs through
//! [`minibatch_nn::recompute::checkpoint`] when it is on and the pass is a
//! training pass (transformers' rule: `self.gradient_checkpointing and
//! self.training`), so a training step keeps one input per block instead of
//! all the block's activations and recomputes them in the backward pass.

use candle_core::{Result, Tensor};

/// Runs `f(x)`, through a checkpoint when `on`.
pub(crate) fn block<F>(on: bool, x: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if on {
        minibatch_nn::recompute::checkpoint(f, x)
    } else {
        f(x)
    }
}
