//! Helpers shared by the integration tests under `tests/`.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

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

/// Asserts that `got` equals `want` element by element within
/// `rtol * |want| + atol` (compared in f64), naming `what` and the index.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap_or_else(|e| panic!("{what}: cannot read tensor: {e}"))
    };
    let (got, want) = (values(got), values(want));
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * w.abs() + atol,
            "{what}[{j}]: got {g:e}, PyTorch {w:e} (diff {:e})",
            (g - w).abs()
        );
    }
}
