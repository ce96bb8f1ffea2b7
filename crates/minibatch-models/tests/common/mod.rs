//! Shared helpers of the minibatch-models tests: fixture paths and a
//! comparison relative to the largest expected value.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `crates/minibatch-models/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Every tensor of `<name>.io.safetensors`.
pub fn io(name: &str) -> HashMap<String, Tensor> {
    let p = fixture(&format!("{name}.io.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Asserts `|a - b| <= tol · max|b|` elementwise, with equal shapes and
/// every value finite; names `what` and the worst element on failure.
pub fn assert_close_rel_max(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_close_rel_max_floor(a, b, tol, 0.0, what)
}

/// [`assert_close_rel_max`] with the scale `max(max|b|, floor)`: for
/// values that are zero in exact arithmetic (the gradient of an attention
/// key's bias), whose recorded value is rounding noise.
pub fn assert_close_rel_max_floor(a: &Tensor, b: &Tensor, tol: f64, floor: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (va, vb) = (values(a), values(b));
    assert_eq!(va.len(), vb.len(), "{what}: lengths differ");
    assert!(!vb.is_empty(), "{what}: empty");
    let scale = vb.iter().fold(floor, |m, x| m.max(x.abs()));
    assert!(
        scale.is_finite() && scale > 0.0,
        "{what}: expected values are all zero or not finite"
    );
    let mut worst = (0usize, 0.0f64);
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        assert!(x.is_finite() && y.is_finite(), "{what}[{i}]: {x} vs {y}");
        let d = (x - y).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    assert!(
        worst.1 <= tol * scale,
        "{what}: element {} is {} but expected {} (|diff| {:.3e} > {tol:e} x max {scale:.3e})",
        worst.0,
        va[worst.0],
        vb[worst.0],
        worst.1
    );
}

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f64 {
    values(t).iter().fold(0.0, |m, x| m.max(x.abs()))
}
