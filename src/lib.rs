//! minibatch: real mini-batch training for candle models.
pub use minibatch_data as data;
pub use minibatch_optim as optim;
pub use minibatch_train as train;
