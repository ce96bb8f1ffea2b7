//! The [`Model`] abstraction the trainer drives.

use candle_core::{ModuleT, Tensor};

/// Anything that maps an input batch to outputs (logits, predictions).
///
/// `train` is `true` during [`fit`](crate::Trainer::fit) and `false` during
/// evaluation, so layers such as dropout or batch norm can change behaviour.
///
/// Implemented for every [`candle_core::ModuleT`], hence for every
/// [`candle_nn::Module`] (`Linear`, `Sequential`, your own structs) and every
/// closure `Fn(&Tensor) -> candle_core::Result<Tensor>`. For a closure that
/// wants the `train` flag use [`model_fn`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_train::{model_fn, Model};
/// let relu = |x: &Tensor| x.relu();
/// let x = Tensor::new(&[-1f32, 2.0], &Device::Cpu)?;
/// assert_eq!(relu.forward(&x, true)?.to_vec1::<f32>()?, [0.0, 2.0]);
/// let scaled = model_fn(|x: &Tensor, train: bool| if train { x * 2.0 } else { Ok(x.clone()) });
/// assert_eq!(scaled.forward(&x, false)?.to_vec1::<f32>()?, [-1.0, 2.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait Model {
    /// Runs the model on a batch.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
}

impl<M: ModuleT> Model for M {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_t(x, train)
    }
}

/// A [`Model`] made from a closure taking `(input, train)`; see [`model_fn`].
#[derive(Clone, Copy, Debug)]
pub struct FnModel<F>(pub F);

impl<F> ModuleT for FnModel<F>
where
    F: Fn(&Tensor, bool) -> candle_core::Result<Tensor>,
{
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        (self.0)(xs, train)
    }
}

/// Wraps a closure `Fn(&Tensor, bool) -> Result<Tensor>` into a [`Model`].
pub fn model_fn<F>(f: F) -> FnModel<F>
where
    F: Fn(&Tensor, bool) -> candle_core::Result<Tensor>,
{
    FnModel(f)
}
