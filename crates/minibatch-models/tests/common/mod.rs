//! Shared helpers of the minibatch-models tests: fixture paths and
//! tensors (comparisons are `minibatch_testkit`'s).
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

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f64 {
    values(t).iter().fold(0.0, |m, x| m.max(x.abs()))
}
