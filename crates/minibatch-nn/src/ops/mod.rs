//! Functional ops with candle-nn's signatures (`candle_nn::ops`) and real
//! backward passes: softmax, log-softmax, layer and RMS normalisation,
//! max and average pooling.

mod pool;

pub use pool::{avg_pool2d, avg_pool2d_with_stride, max_pool2d, max_pool2d_with_stride};
