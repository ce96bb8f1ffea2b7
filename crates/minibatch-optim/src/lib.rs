//! minibatch-optim (placeholder while the crate is written).
