//! The losses the trainer offers by name: `minibatch-nn`'s, re-exported.

use candle_core::Tensor;

/// The default loss of the [`Trainer`](crate::Trainer): mean cross-entropy of
/// logits `(batch, classes)` against class ids `(batch,)`, fused (one pass,
/// backward `softmax - onehot`); see [`minibatch_nn::loss::cross_entropy`].
pub use minibatch_nn::loss::cross_entropy;
/// Mean negative log-likelihood of log-probabilities; see [`minibatch_nn::loss::nll`].
pub use minibatch_nn::loss::nll;

/// Mean squared error; see [`minibatch_nn::loss::mse`]: targets cast to the
/// output's dtype, shapes equal up to size-1 dimensions (`(batch,)` targets
/// fit `(batch, 1)` outputs), no broadcasting. The loss to pass to
/// [`TrainerBuilder::loss`](crate::TrainerBuilder::loss) for regression.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let out = Tensor::new(&[[1f32], [3.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[1f64, 1.0], &Device::Cpu)?;
/// assert_eq!(minibatch_train::mse(&out, &y)?.to_scalar::<f32>()?, 2.0);
/// # Ok(()) }
/// ```
pub use minibatch_nn::loss::mse;

/// The trainer's default loss: [`cross_entropy`], with an error that names
/// the usual mistake when the targets are floats (a regression without
/// `.loss(mse)`).
pub(crate) fn default_loss(output: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if targets.dtype().is_float() {
        candle_core::bail!(
            "the Trainer's default loss is cross-entropy, which needs class ids (u8, u32 or i64) \
             as targets, but the targets are {:?} {:?}: for regression, call `.loss(mse)` on the \
             builder (minibatch::train::mse, also in the prelude)",
            targets.dtype(),
            targets.dims()
        );
    }
    cross_entropy(output, targets)
}
