//! The losses the trainer offers by name: `minibatch-nn`'s, re-exported.

use candle_core::Tensor;

/// The default loss of the [`Trainer`](crate::Trainer): mean cross-entropy of
/// logits `(batch, classes)` against class ids `(batch,)`, fused (one pass,
/// backward `softmax - onehot`); see [`minibatch_nn::loss::cross_entropy`].
pub use minibatch_nn::loss::cross_entropy;
/// Mean negative log-likelihood of log-probabilities; see [`minibatch_nn::loss::nll`].
pub use minibatch_nn::loss::nll;

/// Mean squared error ([`minibatch_nn::loss::mse`]) after casting the
/// targets to the output's dtype and reshaping them to its shape, so that
/// `(batch,)` targets fit `(batch, 1)` outputs.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let out = Tensor::new(&[[1f32], [3.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[1f64, 1.0], &Device::Cpu)?;
/// assert_eq!(minibatch_train::mse(&out, &y)?.to_scalar::<f32>()?, 2.0);
/// # Ok(()) }
/// ```
pub fn mse(output: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let t = targets.to_dtype(output.dtype())?.reshape(output.shape())?;
    minibatch_nn::loss::mse(output, &t)
}
