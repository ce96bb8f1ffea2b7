//! Helpers shared by the integration tests under `tests/`.
#![allow(dead_code)]

use std::path::PathBuf;

/// The directory of PyTorch reference trajectories the parity tests replay.
///
/// `MINIBATCH_REFERENCE_DIR` points the tests at another directory of the same
/// layout (an `index.json` plus the safetensors files it names); without it the
/// copy committed under `tests/fixtures/torch/` is used.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("MINIBATCH_REFERENCE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch"),
    }
}

/// The parsed `index.json` of [`reference_dir`].
pub fn reference_index() -> serde_json::Value {
    let path = reference_dir().join("index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The MNIST directory committed with the project.
pub fn mnist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
}
