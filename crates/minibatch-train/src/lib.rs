//! minibatch-train (placeholder while the crate is written).
