use super::Sampler;

/// Yields the same given order every epoch (repeats allowed): replays a
/// recorded sample order, e.g. a PyTorch run's, exactly.
///
/// ```
/// use minibatch_data::{FixedOrderSampler, Sampler};
/// let s = FixedOrderSampler::new(vec![2, 2, 0]);
/// assert_eq!(s.indices(0), s.indices(9));
/// ```
#[derive(Debug, Clone)]
pub struct FixedOrderSampler {
    order: Vec<usize>,
}

impl FixedOrderSampler {
    /// A sampler that always yields `order`.
    pub fn new(order: Vec<usize>) -> Self {
        Self { order }
    }
    /// The order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

impl Sampler for FixedOrderSampler {
    fn len(&self) -> usize {
        self.order.len()
    }
    fn indices(&self, _epoch: u64) -> Vec<usize> {
        self.order.clone()
    }
}
