//! `minibatch_nn::ops::gelu` (tanh approximation) and `gelu_erf` (exact)
//! against PyTorch (`F.gelu(x, approximate="tanh")`, `F.gelu(x)`; fixtures
//! from tests/fixtures/make_gelu.py), candle's own `Tensor::gelu` /
//! `gelu_erf` and their autograd (the tensor path), and f64 finite
//! differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_gradients_fd, devices, load_fixture};
use minibatch_nn::ops::{gelu, gelu_erf};
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

type Op = fn(&Tensor) -> candle_core::Result<Tensor>;
const OPS: [(&str, Op); 2] = [("tanh", gelu), ("erf", gelu_erf)];

/// `(y, dx)` of `op` at `x` for the loss `sum(y * r)`.
fn run(op: Op, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let x = Var::from_tensor(x).unwrap();
    let y = op(x.as_tensor()).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).unwrap().clone();
    (y, dx)
}

/// Values and gradients match PyTorch on the fused kernel to f32 / f64
/// rounding. The tensor path (candle's op and autograd, the CUDA path)
/// matches to 1e-5 only: candle's backward rounds its constants to six
/// digits (`0.797885`, `0.0356774`, `0.398942`, ...).
#[test]
fn matches_pytorch() {
    for dev in devices() {
        let fx = load_fixture("gelu.safetensors", &dev);
        for p in ["f32", "f64"] {
            let f = |k: &str| fx[&format!("{p}.{k}")].clone();
            let (x, r) = (f("x"), f("r"));
            for (name, op) in OPS {
                for tp in [false, true] {
                    set_tensor_path(tp);
                    let (y, dx) = run(op, &x, &r);
                    set_tensor_path(false);
                    let (ytol, gtol) = match (p, tp) {
                        ("f32", false) => (2e-6, 2e-6),
                        ("f64", false) => (1e-13, 1e-13),
                        (_, true) => (2e-6, 1e-5),
                        _ => unreachable!(),
                    };
                    let what = format!("{p} {name} {dev:?} tensor path {tp}");
                    assert_close(&y, &f(&format!("{name}.y")), Tol::new(ytol, ytol), &what);
                    let want = f(&format!("{name}.dx"));
                    assert_close(&dx, &want, Tol::new(gtol, gtol), &format!("{what}: dx"));
                }
            }
        }
    }
}

/// The fused forward is candle's `Tensor::gelu` / `gelu_erf` (bit for bit
/// in f64; in f32 the vectorised tanh and erf are within a few ulp),
/// and its backward agrees with the tensor path (candle's composed autograd,
/// within its six-digit constants) on a size the kernel splits over threads
/// and on a strided input.
#[test]
fn matches_candle_and_the_tensor_path() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let x = (common::randn(0f32, 1.0, (96, 2, 200), &dev).unwrap() * 2.5)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let r = common::randn(0f32, 1.0, (96, 200, 2), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for (name, op) in OPS {
            let both = |tp: bool| {
                set_tensor_path(tp);
                let xv = Var::from_tensor(&x).unwrap();
                // A transposed view: the op must handle strided inputs.
                let y = op(&xv.as_tensor().transpose(1, 2).unwrap()).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                set_tensor_path(false);
                (y, g.get(xv.as_tensor()).unwrap().clone())
            };
            let (a, b) = (both(false), both(true));
            let what = format!("{dtype:?} {name}");
            // f32: a vectorised tanh or erf, a few ulp from libm's.
            let tol = if dtype == DType::F32 { 1e-6 } else { 0.0 };
            assert_close(&a.0, &b.0, Tol::new(tol, tol), &format!("{what}: y"));
            assert_close(&a.1, &b.1, Tol::new(1e-5, 1e-5), &format!("{what}: dx"));
            let xt = x.transpose(1, 2).unwrap();
            let theirs = match name {
                "tanh" => xt.gelu().unwrap(),
                _ => xt.gelu_erf().unwrap(),
            };
            assert_close(
                &a.0,
                &theirs,
                Tol::new(tol, tol),
                &format!("{what}: candle's forward"),
            );
        }
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let vals: Vec<f64> = (0..30).map(|i| (i as f64 - 14.7) * 0.35).collect();
    let x = Tensor::from_vec(vals, (5, 6), &dev).unwrap();
    for (_, op) in OPS {
        // The fused kernel to the finite differences' own noise (the loss is
        // ~100, so rounding gives ~1e-16 · 100 / 1e-6 ≈ 1e-8); candle's
        // autograd within its six-digit constants.
        for (tp, rtol, atol) in [(false, 1e-7, 5e-8), (true, 1e-5, 1e-5)] {
            set_tensor_path(tp);
            check_gradients_fd(
                std::slice::from_ref(&x),
                |t| op(&t[0])?.sqr()?.sum_all(),
                1e-6,
                Tol::new(atol, rtol),
            );
            set_tensor_path(false);
        }
    }
}

/// Far in the tails the fused gradient is the limit (1 above, 0 below)
/// rather than `inf · 0 = NaN` where x³ overflows; NaN stays NaN.
#[test]
fn tails_and_nan() {
    let dev = Device::Cpu;
    for (name, op) in OPS {
        let x = Var::new(&[1e30f32, -1e30, 60.0, -60.0, f32::NAN], &dev).unwrap();
        let y = op(x.as_tensor()).unwrap();
        let yv = y.to_vec1::<f32>().unwrap();
        assert_eq!(&yv[..4], [1e30, 0.0, 60.0, 0.0], "{name}: y");
        assert!(yv[4].is_nan(), "{name}: gelu(NaN)");
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&dx[..4], [1.0, 0.0, 1.0, 0.0], "{name}: dx");
        assert!(dx[4].is_nan(), "{name}: dx at NaN");
    }
}

/// Other dtypes take candle's op (forward and autograd).
#[test]
fn other_dtypes_use_candle() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[-1f32, 0.5, 2.0], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_close(
        &gelu(&x).unwrap(),
        &x.gelu().unwrap(),
        Tol::exact(),
        "bf16 gelu",
    );
    assert_close(
        &gelu_erf(&x).unwrap(),
        &x.gelu_erf().unwrap(),
        Tol::exact(),
        "bf16 gelu_erf",
    );
}
