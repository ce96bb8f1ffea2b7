//! Gradient accumulation over micro-batches.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{OptimError, Result};

/// How [`GradAccumulator::finish`] combines the micro-batch gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// The sum of the micro-batch gradients.
    Sum,
    /// The sum divided by the number of micro-batches: with a mean-reduced
    /// loss and equal micro-batches this is the full batch's gradient.
    Mean,
}

/// Sums the gradients of several backward passes (micro-batches) before one
/// optimizer step.
///
/// ```
/// use candle_core::{Device, Var};
/// use minibatch_optim::{GradAccumulator, Optimizer, Reduction, Sgd};
/// # fn main() -> minibatch_optim::Result<()> {
/// let w = Var::new(&[1.0f32], &Device::Cpu)?;
/// let mut opt = Sgd::minibatch_gd(vec![w.clone()], 0.1)?;
/// let mut acc = GradAccumulator::new(opt.vars());
/// for scale in [1.0, 3.0] {
///     let loss = w.as_tensor().affine(scale, 0.0)?.sum_all()?; // grad = scale
///     acc.add(&loss.backward()?)?;
/// }
/// let grads = acc.finish(Reduction::Mean)?; // grad = 2
/// opt.step(&grads)?;
/// assert!((w.as_tensor().to_vec1::<f32>()?[0] - 0.8).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An accumulator for the gradients of `vars`.
    pub fn new(vars: Vec<Var>) -> Self {
        let sums = vec![None; vars.len()];
        Self {
            vars,
            sums,
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients (variables without a gradient in
    /// `grads` contribute nothing).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *sum = Some(match sum.take() {
                    None => g.detach(),
                    Some(s) => (s + g)?,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// The number of micro-batches added since the last finish.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The combined gradients, ready for [`Optimizer::step`](crate::Optimizer::step);
    /// resets the accumulator. Error if nothing was added.
    pub fn finish(&mut self, reduction: Reduction) -> Result<GradStore> {
        if self.micro_batches == 0 {
            return Err(OptimError::InvalidSetup(
                "GradAccumulator::finish called before any add".into(),
            ));
        }
        let n = self.micro_batches as f64;
        let mut store = GradStore::default();
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                let g = match reduction {
                    Reduction::Sum => s,
                    Reduction::Mean => s.affine(1.0 / n, 0.0)?,
                };
                store.insert(var.as_tensor(), g);
            }
        }
        self.micro_batches = 0;
        Ok(store)
    }

    /// Drops what was accumulated.
    pub fn reset(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.micro_batches = 0;
    }
}
