//! The general training step: the model and a whole [`Batch`] in, the loss
//! (and optionally what the metrics need) out.
//!
//! The [`Trainer`](crate::Trainer) runs one step per micro-batch, with
//! `train = true` during [`fit`](crate::Trainer::fit) and `train = false` in
//! [`evaluate`](crate::Trainer::evaluate). The usual supervised case, a batch
//! of `(inputs, targets)` and a loss function of `(outputs, targets)`, is the
//! step [`loss_step`] builds; anything else (a loss mask, sample weights, two
//! inputs, an attention mask) is a closure given to
//! [`TrainerBuilder::step`](crate::TrainerBuilder::step).

use candle_core::{DType, Tensor};
use minibatch_data::Batch;

use crate::error::{Result, TrainError};
use crate::model::Model;

/// What one step returns: the loss to minimise and, when metrics are
/// configured, the outputs and targets they are updated with.
///
/// `loss` should be a scalar (rank 0). A tensor of another shape is averaged
/// (`mean_all`) first. The trainer keeps it on its device: it is read back to
/// the host only at logging points (see
/// [`TrainerBuilder::log_every_steps`](crate::TrainerBuilder::log_every_steps)).
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The loss of the micro-batch, still attached to the graph (the trainer
    /// calls `backward` on it during training).
    pub loss: Tensor,
    /// `(outputs, targets)` for [`Metric::update`](crate::Metric::update);
    /// `None` when the step feeds no metric. Detach the outputs
    /// ([`Tensor::detach`]) so the metrics do not keep the graph alive.
    pub metrics: Option<(Tensor, Tensor)>,
}

impl StepOutput {
    /// A step output with only a loss (no metric is updated).
    pub fn new(loss: Tensor) -> Self {
        Self {
            loss,
            metrics: None,
        }
    }

    /// Adds the `(outputs, targets)` the metrics are updated with.
    pub fn with_metrics(mut self, outputs: Tensor, targets: Tensor) -> Self {
        self.metrics = Some((outputs, targets));
        self
    }
}

/// A loss: `(model output, targets) -> scalar tensor` (mean over the batch).
pub type LossFn = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>>;

/// A training / evaluation step: `(model, batch, train) -> StepOutput`.
///
/// Any closure `Fn(&M, &Batch, bool) -> candle_core::Result<StepOutput>`
/// boxes into one; see [`TrainerBuilder::step`](crate::TrainerBuilder::step).
pub type StepFn<M> = Box<dyn Fn(&M, &Batch, bool) -> candle_core::Result<StepOutput>>;

/// The supervised step: a batch of exactly two tensors `(x, y)`, the loss
/// `loss(model(x, train), y)`, and the (detached) outputs and `y` for the
/// metrics. This is the step [`TrainerBuilder::loss`](crate::TrainerBuilder::loss)
/// installs (with [`cross_entropy`](crate::cross_entropy) by default), and a
/// building block for steps of your own.
///
/// A batch with another number of tensors is an error naming the count.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::Batch;
/// use minibatch_train::{loss_step, mse};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let double = |x: &Tensor| x * 2.0;
/// let x = Tensor::new(&[[1f32], [2.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[2f32, 5.0], &Device::Cpu)?;
/// let out = loss_step(&double, &Batch::new(vec![x, y])?, false, &mse)?;
/// assert_eq!(out.loss.to_scalar::<f32>()?, 0.5); // ((2-2)² + (4-5)²) / 2
/// # Ok(()) }
/// ```
pub fn loss_step<M: Model + ?Sized>(
    model: &M,
    batch: &Batch,
    train: bool,
    loss: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<StepOutput> {
    let [x, y] = batch.tensors() else {
        return Err(candle_core::Error::Msg(format!(
            "the (inputs, targets) step needs batches of 2 tensors, this one has {}; \
             give the trainer a step for other batches (TrainerBuilder::step)",
            batch.tensors().len()
        )));
    };
    let out = model.forward(x, train)?;
    let l = loss(&out, y)?;
    Ok(StepOutput::new(l).with_metrics(out.detach(), y.clone()))
}

/// The step a trainer runs: the supervised one with a loss, or a custom one.
pub(crate) enum TrainStep<M> {
    Loss(LossFn),
    Custom(StepFn<M>),
}

impl<M: Model> TrainStep<M> {
    pub(crate) fn run(
        &self,
        model: &M,
        batch: &Batch,
        train: bool,
    ) -> candle_core::Result<StepOutput> {
        match self {
            TrainStep::Loss(loss) => loss_step(model, batch, train, loss.as_ref()),
            TrainStep::Custom(step) => step(model, batch, train),
        }
    }
}

/// The loss as a detached `f64` scalar on its device (a rank > 0 loss is
/// averaged first): no host transfer.
pub(crate) fn detached_scalar(loss: &Tensor) -> Result<Tensor> {
    let l = if loss.rank() == 0 {
        loss.detach()
    } else {
        loss.mean_all()?.detach()
    };
    Ok(if l.dtype() == DType::F64 {
        l
    } else {
        l.to_dtype(DType::F64)?
    })
}

/// Reads detached `f64` scalars back to the host in one transfer.
pub(crate) fn read_scalars(scalars: &[Tensor]) -> Result<Vec<f64>> {
    match scalars {
        [] => Ok(Vec::new()),
        [one] => Ok(vec![one.to_scalar::<f64>()?]),
        many => Ok(Tensor::stack(many, 0)?.to_vec1::<f64>()?),
    }
}

/// Updates `metrics` with what a step returned; an error when metrics are
/// configured and the step gave them nothing.
pub(crate) fn update_metrics(
    metrics: &mut [Box<dyn crate::Metric>],
    out: Option<(Tensor, Tensor)>,
) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let Some((o, y)) = out else {
        let names: Vec<&str> = metrics.iter().map(|m| m.name()).collect();
        return Err(TrainError::Config(format!(
            "metrics {names:?} are configured but the step returned no (outputs, targets) \
             for them: return StepOutput::with_metrics(..) or drop the metrics \
             (no_default_metrics)"
        )));
    };
    for m in metrics.iter_mut() {
        m.update(&o, &y)?;
    }
    Ok(())
}
