//! Shared helpers of the minibatch-nn integration tests: PyTorch fixtures,
//! f64 finite differences, devices, seeded draws (the comparisons are
//! `minibatch_testkit`'s).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use minibatch_testkit::{assert_close, Tol};

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

/// The elements of `t`, flattened, as f64.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Central finite differences of the scalar function `f` with respect to
/// every element of every input (f64 inputs), compared with the analytic
/// gradients candle's `backward` gives through `f` (actual: analytic,
/// expected: numeric, under `tol`).
pub fn check_gradients_fd(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    eps: f64,
    tol: Tol,
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
        assert_close(analytic, &numeric, tol, &format!("d/d input {k}"));
    }
}

thread_local! {
    /// The normal draws of [`randn`]: a fixed seed per thread, and the test
    /// harness runs each test on its own thread, so every test sees the same
    /// numbers on every run (candle's CPU `Tensor::randn` cannot be seeded).
    static RNG: std::cell::RefCell<rand_chacha::ChaCha8Rng> =
        std::cell::RefCell::new(rand::SeedableRng::seed_from_u64(0x5eed));
}

/// `Tensor::randn`'s signature with seeded, reproducible draws (Box-Muller
/// over ChaCha8), so a test passes or fails the same way on every run.
pub fn randn<T: candle_core::FloatDType>(
    mean: T,
    std: T,
    shape: impl Into<candle_core::Shape>,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    use rand::Rng;
    let shape = shape.into();
    let (mean, std) = (mean.to_f64(), std.to_f64());
    let n = shape.elem_count();
    let v: Vec<f64> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| {
                let u1: f64 = r.random_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = r.random::<f64>();
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    });
    Tensor::from_vec(v, shape, dev)?.to_dtype(T::DTYPE)
}

/// Runs `f` once on the fused path and once on the forced tensor path
/// (`set_tensor_path`, per thread), and leaves the fused path on.
pub fn both_paths(mut f: impl FnMut(bool)) {
    for forced in [false, true] {
        minibatch_nn::set_tensor_path(forced);
        f(forced);
    }
    minibatch_nn::set_tensor_path(false);
}

/// Uniform draws in `[-scale, scale)`, seeded by `seed`, as a `dtype` tensor.
pub fn uniform(shape: &[usize], dtype: DType, seed: u64, scale: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Every element's bits as f64 (f32 widened exactly), for bit-for-bit
/// comparisons of two computations.
pub fn bits(t: &Tensor) -> Vec<u64> {
    to_f64_vec(t).iter().map(|v| v.to_bits()).collect()
}

/// `Σ |t|` as f64: zero only for an all-zero tensor (NaN for a NaN in it).
pub fn abs_sum(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
