//! Shared helpers of the minibatch-nn integration tests: PyTorch fixtures,
//! tolerance checks, f64 finite differences, devices.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};

/// `crates/minibatch-nn/tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Every tensor of a fixture file, on `device`.
pub fn load_fixture(name: &str, device: &Device) -> HashMap<String, Tensor> {
    let path = fixture_path(name);
    candle_core::safetensors::load(&path, device)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// The devices to test on: the CPU, and `cuda:0` when the build has the
/// `cuda` feature and a GPU answers (unless `MINIBATCH_NO_CUDA=1`).
pub fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if std::env::var("MINIBATCH_NO_CUDA").as_deref() != Ok("1") {
        if let Ok(d) = Device::new_cuda(0) {
            v.push(d);
        }
    }
    v
}

fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise (shapes equal), naming
/// `what` and the worst element on failure.
pub fn assert_close(a: &Tensor, b: &Tensor, rtol: f64, atol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (va, vb) = (to_f64_vec(a), to_f64_vec(b));
    let mut worst = (0usize, 0.0f64);
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        assert!(x.is_finite() == y.is_finite(), "{what}[{i}]: {x} vs {y}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i} is {} but expected {} (rtol {rtol}, atol {atol})",
            va[i], vb[i]
        );
    }
}

/// Central finite differences of the scalar function `f` with respect to
/// every element of every input (f64 inputs), compared with the analytic
/// gradients candle's `backward` gives through `f`.
pub fn check_gradients_fd(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    eps: f64,
    rtol: f64,
    atol: f64,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&ts).unwrap();
    let grads = loss.backward().unwrap();
    for (k, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("input {k} received no gradient"));
        let base = to_f64_vec(var.as_tensor());
        let mut numeric = vec![0f64; base.len()];
        for i in 0..base.len() {
            let eval = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                let mut args: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.to_dtype(DType::F64).unwrap())
                    .collect();
                args[k] = Tensor::from_vec(v, var.shape(), var.device()).unwrap();
                f(&args).unwrap().to_scalar::<f64>().unwrap()
            };
            numeric[i] = (eval(eps) - eval(-eps)) / (2.0 * eps);
        }
        let numeric = Tensor::from_vec(numeric, var.shape(), var.device()).unwrap();
        assert_close(analytic, &numeric, rtol, atol, &format!("d/d input {k}"));
    }
}
