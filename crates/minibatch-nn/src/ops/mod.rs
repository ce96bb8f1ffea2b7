//! Functional ops with candle-nn's signatures (`candle_nn::ops`) and real
//! backward passes: softmax, log-softmax, layer and RMS normalisation,
//! max and average pooling.
