//! Functional ops with candle-nn's signatures (`candle_nn::ops`) and real
//! backward passes: softmax, log-softmax, layer and RMS normalisation,
//! max and average pooling, relu, gelu and silu, attention (with masks and
//! grouped-query heads).

mod attention;
mod elementwise;
mod gelu;
mod pool;
mod relu;
mod silu;

pub use attention::{
    multi_head_attention, scaled_dot_product_attention, scaled_dot_product_attention_dropout,
    scaled_dot_product_attention_masked,
};
pub use gelu::{gelu, gelu_erf};
pub use pool::{avg_pool2d, avg_pool2d_with_stride, max_pool2d, max_pool2d_with_stride};
pub use relu::relu;
pub use silu::{silu, silu_mul};

mod norm;
pub(crate) mod rows;
pub(crate) mod simd;
mod softmax;

pub(crate) use norm::normalize;
pub use norm::{layer_norm, rms_norm};
pub use softmax::{log_softmax, softmax, softmax_last_dim};
