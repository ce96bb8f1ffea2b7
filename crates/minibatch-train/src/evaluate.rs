//! Evaluation over a whole loader: the sample-weighted mean loss and metrics.

use std::collections::BTreeMap;

use candle_core::Tensor;
use minibatch_data::DataLoader;

use crate::error::Result;
use crate::metrics::{Metric, RunningMean};
use crate::model::Model;
use crate::step::{detached_scalar, loss_step, read_scalars, update_metrics, StepOutput};

/// Loss and metrics over a whole loader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the samples.
    pub loss: f64,
    /// Metrics by name.
    pub metrics: BTreeMap<String, f64>,
    /// Number of samples seen.
    pub samples: u64,
}

/// Evaluates `model` (with `train = false`) over every batch of `loader`
/// (batches of `(inputs, targets)`): the sample-weighted mean of `loss` and
/// `metrics` (reset first).
///
/// Usable from a hand-written loop as well as by
/// [`Trainer::evaluate`](crate::Trainer::evaluate); [`evaluate_step`] takes a
/// general step instead of a loss.
pub fn evaluate<M: Model + ?Sized>(
    model: &M,
    loader: &DataLoader,
    loss: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    metrics: &mut [Box<dyn Metric>],
) -> Result<Evaluation> {
    let step = |m: &M, b: &minibatch_data::Batch, train: bool| loss_step(m, b, train, loss);
    evaluate_step(model, loader, &step, metrics)
}

/// Evaluates `model` over every batch of `loader` with a general step (see
/// [`StepOutput`]), called with `train = false`: the mean of the step losses
/// weighted by the batch sizes, and `metrics` (reset first) fed with what the
/// step returns for them.
///
/// The losses stay on the model's device until the end, where they are read
/// back in one transfer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{Batch, DataLoader, TensorDataset};
/// use minibatch_train::{evaluate_step, StepOutput};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // (x, y, weight): a weighted squared error
/// let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?;
/// let y = Tensor::new(&[1f32, 0.0, 3.0, 0.0], &dev)?;
/// let w = Tensor::new(&[1f32, 0.0, 1.0, 0.0], &dev)?;
/// let loader = DataLoader::builder(TensorDataset::new(vec![x, y, w])?).batch_size(2).build()?;
/// let identity = |x: &Tensor| Ok(x.clone());
/// let step = |model: &_, batch: &Batch, _train: bool| {
///     let [x, y, w] = batch.tensors() else { unreachable!() };
///     let out = minibatch_train::Model::forward(model, x, false)?;
///     let l = ((out - y)?.sqr()? * w)?.sum_all()?;
///     Ok(StepOutput::new((l / w.sum_all()?.to_scalar::<f32>()? as f64)?))
/// };
/// let ev = evaluate_step(&identity, &loader, &step, &mut [])?;
/// assert_eq!(ev.loss, 0.0); // the errors sit where the weight is 0
/// assert_eq!(ev.samples, 4);
/// # Ok(()) }
/// ```
pub fn evaluate_step<M, F>(
    model: &M,
    loader: &DataLoader,
    step: &F,
    metrics: &mut [Box<dyn Metric>],
) -> Result<Evaluation>
where
    M: Model + ?Sized,
    F: Fn(&M, &minibatch_data::Batch, bool) -> candle_core::Result<StepOutput> + ?Sized,
{
    for m in metrics.iter_mut() {
        m.reset();
    }
    let mut losses = Vec::with_capacity(loader.len());
    let mut sizes = Vec::with_capacity(loader.len());
    for batch in loader.epoch(0) {
        let batch = batch?;
        let out = step(model, &batch, false)?;
        losses.push(detached_scalar(&out.loss)?);
        sizes.push(batch.len() as u64);
        update_metrics(metrics, out.metrics)?;
    }
    let mut mean = RunningMean::default();
    for (l, n) in read_scalars(&losses)?.into_iter().zip(sizes) {
        mean.add(l, n);
    }
    Ok(Evaluation {
        loss: mean.mean(),
        metrics: metrics
            .iter()
            .map(|m| (m.name().to_string(), m.value()))
            .collect(),
        samples: mean.count(),
    })
}
