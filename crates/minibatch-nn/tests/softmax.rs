//! softmax, softmax_last_dim and log_softmax: against PyTorch (fixtures from
//! `fixtures/make_norm_softmax_rope.py`), candle-nn's ops, candle's autograd
//! of the composed formula and f64 finite differences, on every device and on
//! both paths (fused CPU kernel, candle tensor ops).

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::ops::{log_softmax, softmax, softmax_last_dim};
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

const FIXTURE: &str = "norm_softmax_rope.safetensors";

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 1e-6),
        _ => (1e-12, 1e-14),
    }
}

/// `Σ y ⊙ r` over the finite entries of `y` (log-softmax gives `-inf` where
/// the input is masked; PyTorch's reference zeroes those terms too).
fn weighted_sum(y: &Tensor, r: &Tensor) -> Tensor {
    let finite = y.ne(f64::NEG_INFINITY).unwrap();
    let y = finite.where_cond(y, &y.zeros_like().unwrap()).unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 6.0 - 3.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn softmax_and_log_softmax_match_pytorch() {
    for dev in devices() {
        let fx = load_fixture(FIXTURE, &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            for op in ["softmax", "log_softmax"] {
                for case in ["last", "dim1", "dim0", "masked"] {
                    let key = |k: &str| fx[&format!("{tag}.{op}.{case}.{k}")].clone();
                    let dim = key("dim").to_vec1::<i64>().unwrap()[0];
                    let x = Var::from_tensor(&key("x")).unwrap();
                    let dim = if dim < 0 {
                        (x.rank() as i64 + dim) as usize
                    } else {
                        dim as usize
                    };
                    both_paths(|forced| {
                        let what = format!("{op} {case} {tag} tensor path {forced} {dev:?}");
                        let y = match (op, dim + 1 == x.rank()) {
                            ("softmax", true) => softmax_last_dim(x.as_tensor()).unwrap(),
                            ("softmax", false) => softmax(x.as_tensor(), dim).unwrap(),
                            _ => log_softmax(x.as_tensor(), dim).unwrap(),
                        };
                        assert_eq!(y.dtype(), dtype);
                        assert_close(&y, &key("y"), Tol::new(atol, rtol), &format!("y {what}"));
                        let g = weighted_sum(&y, &key("r")).backward().unwrap();
                        let dx = g.get(x.as_tensor()).expect("no gradient");
                        assert_close(dx, &key("dx"), Tol::new(atol, rtol), &format!("dx {what}"));
                    });
                }
            }
        }
    }
}

/// Forward within f32 rounding of candle-nn's ops (the fused CPU kernel's
/// `exp` is a polynomial within 2 ulp of `expf`), for every dim.
#[test]
fn forward_matches_candle_nn() {
    for dtype in [DType::F32, DType::F64] {
        let rtol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
        // Large enough for the parallel path, with a row length that is not a
        // multiple of the kernel's 16 lanes.
        let x = randn(&[24, 33, 45], dtype, 1);
        let ours = softmax_last_dim(&x).unwrap();
        if dtype == DType::F32 {
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert_close(&ours, &theirs, Tol::new(1e-9, rtol), "softmax_last_dim");
        }
        for dim in 0..3 {
            let ours = softmax(&x, dim).unwrap();
            let theirs = candle_nn::ops::softmax(&x, dim).unwrap();
            assert_close(
                &ours,
                &theirs,
                Tol::new(1e-9, rtol),
                &format!("softmax dim {dim}"),
            );
            let ours = log_softmax(&x, dim).unwrap();
            let theirs = candle_nn::ops::log_softmax(&x, dim).unwrap();
            assert_close(
                &ours,
                &theirs,
                Tol::new(1e-6, rtol),
                &format!("log_softmax dim {dim}"),
            );
        }
    }
}

/// Half precision runs candle-nn's own formula: bit-identical results.
#[test]
fn half_precision_falls_back_to_candle_ops() {
    let x = randn(&[3, 7, 20], DType::F32, 2);
    for dtype in [DType::BF16, DType::F16] {
        let x = x.to_dtype(dtype).unwrap();
        for dim in [0, 2] {
            let pairs = [
                (
                    softmax(&x, dim).unwrap(),
                    candle_nn::ops::softmax(&x, dim).unwrap(),
                ),
                (
                    log_softmax(&x, dim).unwrap(),
                    candle_nn::ops::log_softmax(&x, dim).unwrap(),
                ),
            ];
            for (ours, theirs) in pairs {
                assert_eq!(ours.dtype(), dtype);
                let diff = (ours.to_dtype(DType::F32).unwrap()
                    - theirs.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
                assert_eq!(diff, 0.0, "{dtype:?} dim {dim}");
            }
        }
        // And the gradient flows (candle's autograd of the formula).
        let v = Var::from_tensor(&x).unwrap();
        let g = softmax_last_dim(v.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(v.as_tensor()).is_some());
    }
}

/// f64 gradients: against candle's autograd of candle-nn's composed formula,
/// and against central finite differences, for every dim and both ops.
#[test]
fn gradients_match_composed_formula_and_finite_differences() {
    let x = randn(&[3, 4, 5], DType::F64, 3);
    let r = randn(&[3, 4, 5], DType::F64, 4);
    for dim in 0..3 {
        for log in [false, true] {
            let ours = |t: &Tensor| {
                if log {
                    log_softmax(t, dim)
                } else {
                    softmax(t, dim)
                }
            };
            let theirs = |t: &Tensor| {
                if log {
                    candle_nn::ops::log_softmax(t, dim)
                } else {
                    candle_nn::ops::softmax(t, dim)
                }
            };
            let what = format!("log {log} dim {dim}");
            let v = Var::from_tensor(&x).unwrap();
            let ga = (ours(v.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (theirs(v.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_close(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
                Tol::new(1e-14, 1e-12),
                &what,
            );
            both_paths(|_| {
                check_gradients_fd(
                    std::slice::from_ref(&x),
                    |ts| (ours(&ts[0])? * &r)?.sum_all(),
                    1e-6,
                    Tol::new(1e-9, 1e-7),
                )
            });
        }
    }
}

/// Strided inputs (a transposed view) give the same values and gradients as
/// their contiguous copy, and the gradient reaches the original tensor.
#[test]
fn non_contiguous_inputs() {
    let base = randn(&[6, 5, 40], DType::F32, 5);
    let r = randn(&[6, 40, 5], DType::F32, 6);
    let v = Var::from_tensor(&base).unwrap();
    let view = v.as_tensor().transpose(1, 2).unwrap();
    assert!(!view.is_contiguous());
    let copy = Var::from_tensor(&view.contiguous().unwrap()).unwrap();
    for log in [false, true] {
        let f = |t: &Tensor| {
            if log {
                log_softmax(t, D::Minus1).unwrap()
            } else {
                softmax_last_dim(t).unwrap()
            }
        };
        let (ya, yb) = (f(&view), f(copy.as_tensor()));
        assert_close(&ya, &yb, Tol::exact(), "forward");
        let ga = (ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let da = ga.get(v.as_tensor()).unwrap();
        let db = gb.get(copy.as_tensor()).unwrap().transpose(1, 2).unwrap();
        assert_close(da, &db, Tol::exact(), "gradient");
    }
}

/// The fused kernel and the tensor path agree on a tensor large enough to
/// run in parallel, for the last dim and a middle dim.
#[test]
fn fused_kernel_agrees_with_tensor_path_on_large_inputs() {
    let x = randn(&[8, 4, 64, 70], DType::F32, 7);
    let r = randn(&[8, 4, 64, 70], DType::F32, 8);
    for dim in [3, 2] {
        for log in [false, true] {
            let run = |forced: bool| {
                set_tensor_path(forced);
                let v = Var::from_tensor(&x).unwrap();
                let y = if log {
                    log_softmax(v.as_tensor(), dim).unwrap()
                } else {
                    softmax(v.as_tensor(), dim).unwrap()
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                set_tensor_path(false);
                (y, g.get(v.as_tensor()).unwrap().clone())
            };
            let ((ya, ga), (yb, gb)) = (run(false), run(true));
            let what = format!("dim {dim} log {log}");
            assert_close(&ya, &yb, Tol::new(1e-6, 1e-5), &format!("y {what}"));
            assert_close(&ga, &gb, Tol::new(1e-5, 1e-4), &format!("dx {what}"));
            // Same bits on a second run (rows never split between threads).
            assert_close(&run(false).1, &ga, Tol::exact(), &format!("rerun {what}"));
        }
    }
}

#[test]
fn edge_shapes() {
    // Empty tensors keep their shape.
    let e = Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(softmax_last_dim(&e).unwrap().dims(), &[0, 5]);
    assert_eq!(log_softmax(&e, 0).unwrap().dims(), &[0, 5]);
    // A single element is 1 (log: 0); a 1-D tensor works.
    let one = Tensor::new(&[[3f32]], &Device::Cpu).unwrap();
    assert_eq!(
        softmax_last_dim(&one).unwrap().to_vec2::<f32>().unwrap(),
        [[1.0]]
    );
    assert_eq!(
        log_softmax(&one, 0).unwrap().to_vec2::<f32>().unwrap(),
        [[0.0]]
    );
    let v = Tensor::new(&[1f64, 1.], &Device::Cpu).unwrap();
    assert_eq!(
        softmax(&v, 0).unwrap().to_vec1::<f64>().unwrap(),
        [0.5, 0.5]
    );
    // A dimension out of range and a scalar are errors, not panics.
    assert!(softmax(&v, 1).is_err());
    let s = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(softmax_last_dim(&s).is_err());
    // Huge logits do not overflow.
    let big = Tensor::new(&[1000f32, 0.], &Device::Cpu).unwrap();
    assert_eq!(
        softmax_last_dim(&big).unwrap().to_vec1::<f32>().unwrap(),
        [1.0, 0.0]
    );
    let l = log_softmax(&big, 0).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(l, [0.0, -1000.0]);
}

/// Why this crate exists: candle-nn's `softmax_last_dim` gives nothing
/// upstream a gradient; ours does.
#[test]
fn candle_nn_softmax_last_dim_drops_the_gradient_ours_does_not() {
    let w = Var::from_tensor(&randn(&[8, 8], DType::F32, 9)).unwrap();
    let x = randn(&[4, 8], DType::F32, 10);
    let r = randn(&[4, 8], DType::F32, 11);
    let h = x.matmul(w.as_tensor()).unwrap();
    let theirs = (candle_nn::ops::softmax_last_dim(&h).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = theirs.backward().unwrap();
    assert!(
        g.get(w.as_tensor()).is_none(),
        "candle-nn now has a backward"
    );
    let ours = (softmax_last_dim(&h).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = ours.backward().unwrap();
    let dw = g
        .get(w.as_tensor())
        .expect("our softmax drops the gradient");
    let norm = dw
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0);
}
