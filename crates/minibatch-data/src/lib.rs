//! minibatch-data (placeholder while the crate is written).
