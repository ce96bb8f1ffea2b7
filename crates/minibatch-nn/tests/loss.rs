//! Losses against PyTorch (fixtures from `fixtures/make_core.py`), against
//! candle-nn's composed ops, against f64 finite differences, on every device
//! and on both paths (fused CPU kernel, candle tensor ops).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::loss::{cross_entropy, mse, nll};
use minibatch_testkit::{assert_close, Tol};

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-6),
        _ => (1e-12, 1e-13),
    }
}

#[test]
fn cross_entropy_matches_pytorch() {
    for dev in devices() {
        let fx = load_fixture("core.safetensors", &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            for case in ["ce", "ce_wide"] {
                let key = |k: &str| fx[&format!("{tag}.{case}.{k}")].clone();
                for id_dtype in [DType::I64, DType::U32, DType::U8] {
                    let target = key("target").to_dtype(id_dtype).unwrap();
                    both_paths(|forced| {
                        let what =
                            format!("{case} {tag} ids {id_dtype:?} tensor path {forced} {dev:?}");
                        let x = Var::from_tensor(&key("logits")).unwrap();
                        let loss = cross_entropy(x.as_tensor(), &target).unwrap();
                        assert_eq!(loss.dtype(), dtype);
                        assert_eq!(loss.dims(), &[] as &[usize]);
                        assert_close(
                            &loss,
                            &key("loss"),
                            Tol::new(atol, rtol),
                            &format!("loss {what}"),
                        );
                        let g = loss.backward().unwrap();
                        let dx = g.get(x.as_tensor()).expect("no gradient");
                        assert_close(
                            dx,
                            &key("dlogits"),
                            Tol::new(atol, rtol),
                            &format!("dlogits {what}"),
                        );
                    });
                }
            }
        }
    }
}

#[test]
fn nll_and_mse_match_pytorch() {
    for dev in devices() {
        let fx = load_fixture("core.safetensors", &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            let key = |k: &str| fx[&format!("{tag}.{k}")].clone();
            let logp = Var::from_tensor(&key("nll.logp")).unwrap();
            for id_dtype in [DType::I64, DType::U32] {
                let target = key("nll.target").to_dtype(id_dtype).unwrap();
                let loss = nll(logp.as_tensor(), &target).unwrap();
                assert_close(&loss, &key("nll.loss"), Tol::new(atol, rtol), "nll");
                let g = loss.backward().unwrap();
                assert_close(
                    g.get(logp.as_tensor()).unwrap(),
                    &key("nll.dlogp"),
                    Tol::new(atol, rtol),
                    "dlogp",
                );
            }
            let a = Var::from_tensor(&key("mse.a")).unwrap();
            let b = Var::from_tensor(&key("mse.b")).unwrap();
            let loss = mse(a.as_tensor(), b.as_tensor()).unwrap();
            assert_close(&loss, &key("mse.loss"), Tol::new(atol, rtol), "mse");
            let g = loss.backward().unwrap();
            assert_close(
                g.get(a.as_tensor()).unwrap(),
                &key("mse.da"),
                Tol::new(atol, rtol),
                "mse da",
            );
            assert_close(
                g.get(b.as_tensor()).unwrap(),
                &key("mse.db"),
                Tol::new(atol, rtol),
                "mse db",
            );
        }
    }
}

/// The forward value is candle-nn's to the bit (same ops, same order), on
/// both paths; the gradient agrees with candle-nn's autograd of its composed
/// ops. Shapes cover class counts below, at and above the SIMD widths,
/// and batches large enough for the fused op to split their rows over
/// candle's threads (an odd count, so the blocks differ in size).
#[test]
fn cross_entropy_equals_candle_nn() {
    let dev = Device::Cpu;
    for (b, c) in [
        (1, 1),
        (3, 7),
        (64, 10),
        (5, 32),
        (9, 33),
        (4, 100),
        (301, 257),
    ] {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &common::randn(0f32, 4.0, (b, c), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let ids: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % c as u32).collect();
            let target = Tensor::new(ids.as_slice(), &dev).unwrap();
            let want = candle_nn::loss::cross_entropy(x.as_tensor(), &target).unwrap();
            let gw = want.backward().unwrap();
            let gw = gw.get(x.as_tensor()).unwrap();
            both_paths(|forced| {
                let what = format!("({b}, {c}) {dtype:?} tensor path {forced}");
                let got = cross_entropy(x.as_tensor(), &target).unwrap();
                let (g, w) = (
                    got.to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                    want.to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                );
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{what}: loss {g} vs candle-nn {w}"
                );
                let gg = got.backward().unwrap();
                let (rtol, atol) = tol(dtype);
                assert_close(
                    gg.get(x.as_tensor()).unwrap(),
                    gw,
                    Tol::new(atol, rtol),
                    &what,
                );
            });
        }
    }
}

/// A non-contiguous input (a transposed view) gives the same as its copy.
#[test]
fn cross_entropy_strided_input() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&common::randn(0f64, 1.0, (5, 4), &dev).unwrap()).unwrap();
    let t = Tensor::new(&[0u32, 4, 2, 1], &dev).unwrap();
    both_paths(|forced| {
        let a = cross_entropy(&x.as_tensor().t().unwrap(), &t).unwrap();
        let b = cross_entropy(&x.as_tensor().t().unwrap().contiguous().unwrap(), &t).unwrap();
        assert_close(
            &a,
            &b,
            Tol::exact(),
            &format!("strided, tensor path {forced}"),
        );
        let ga = a.backward().unwrap();
        let gb = b.backward().unwrap();
        assert_close(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
            Tol::rel(1e-15),
            "strided gradient",
        );
    });
}

/// f64 central differences through the loss, scaled by an upstream factor
/// (so the incoming gradient is not 1), on both paths.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let x = common::randn(0f64, 2.0, (4, 6), &dev).unwrap();
    let t = Tensor::new(&[5i64, 0, 3, 3], &dev).unwrap();
    both_paths(|_| {
        check_gradients_fd(
            std::slice::from_ref(&x),
            |a| cross_entropy(&a[0], &t)? * 2.5,
            1e-5,
            Tol::new(1e-8, 1e-6),
        );
    });
    let logp = candle_nn::ops::log_softmax(&x, 1).unwrap();
    check_gradients_fd(
        std::slice::from_ref(&logp),
        |a| nll(&a[0], &t)? * -0.5,
        1e-5,
        Tol::new(1e-8, 1e-6),
    );
    let y = common::randn(0f64, 1.0, (4, 6), &dev).unwrap();
    check_gradients_fd(&[x, y], |a| mse(&a[0], &a[1]), 1e-5, Tol::new(1e-8, 1e-6));
}

/// The same maths as the composition `log_softmax -> nll` in candle ops
/// (candle's own autograd), in f64.
#[test]
fn cross_entropy_is_log_softmax_then_nll() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&common::randn(0f64, 3.0, (7, 9), &dev).unwrap()).unwrap();
    let t = Tensor::new(&[8u32, 0, 1, 4, 4, 2, 7], &dev).unwrap();
    let composed = nll(&candle_nn::ops::log_softmax(x.as_tensor(), 1).unwrap(), &t).unwrap();
    let gc = composed.backward().unwrap();
    both_paths(|forced| {
        let fused = cross_entropy(x.as_tensor(), &t).unwrap();
        assert_close(&fused, &composed, Tol::rel(1e-15), "loss");
        let gf = fused.backward().unwrap();
        assert_close(
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
            Tol::new(1e-15, 1e-12),
            &format!("gradient, tensor path {forced}"),
        );
    });
}

#[test]
fn bad_inputs_are_errors() {
    for dev in devices() {
        let x = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let ok = Tensor::new(&[0u32, 1, 3], &dev).unwrap();
        both_paths(|forced| {
            let err = |r: candle_core::Result<Tensor>, what: &str, needle: &str| {
                let e = r.expect_err(what).to_string();
                assert!(e.contains(needle), "{what} (tensor path {forced}): {e}");
            };
            assert!(cross_entropy(&x, &ok).is_ok());
            let too_big = Tensor::new(&[0u32, 4, 1], &dev).unwrap();
            err(
                cross_entropy(&x, &too_big),
                "id 4 of 4 classes",
                "out of range",
            );
            err(nll(&x, &too_big), "nll id 4", "out of range");
            let negative = Tensor::new(&[0i64, -1, 1], &dev).unwrap();
            err(cross_entropy(&x, &negative), "negative id", "out of range");
            err(nll(&x, &negative), "nll negative id", "out of range");
            let short = Tensor::new(&[0u32, 1], &dev).unwrap();
            err(cross_entropy(&x, &short), "batch mismatch", "target");
            err(
                cross_entropy(&x.flatten_all().unwrap(), &ok),
                "rank 1 input",
                "(batch, classes)",
            );
            let float_ids = Tensor::new(&[0f32, 1., 2.], &dev).unwrap();
            err(cross_entropy(&x, &float_ids), "float ids", "u32");
            let empty = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
            let no_ids = Tensor::zeros(0, DType::U32, &dev).unwrap();
            err(cross_entropy(&empty, &no_ids), "empty batch", "empty");
            err(mse(&x, &x.t().unwrap()), "mse shapes", "differ");
            err(mse(&empty, &empty), "mse empty", "empty");
        });
    }
}

/// Data batches get no gradient; a detached input gives no graph at all.
#[test]
fn no_gradient_for_targets_or_plain_inputs() {
    let dev = Device::Cpu;
    let x = common::randn(0f32, 1.0, (2, 3), &dev).unwrap();
    let t = Tensor::new(&[2u32, 0], &dev).unwrap();
    let loss = cross_entropy(&x, &t).unwrap();
    assert!(loss.backward().unwrap().get(&x).is_none());
}

/// `(..., classes)` logits with `(...)` targets: the flattened computation
/// to the bit, loss and gradient, on both paths; a target of another shape
/// is an error naming both.
#[test]
fn cross_entropy_over_positions_is_the_flattened_loss() {
    let dev = Device::Cpu;
    let (b, t, c) = (3, 67, 129);
    for dtype in [DType::F32, DType::F64] {
        let x0 = common::randn(0f32, 3.0, (b, t, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 31 + 5) % c as u32)
            .collect();
        let y = Tensor::from_vec(ids, (b, t), &dev).unwrap();
        both_paths(|forced| {
            let what = format!("{dtype:?} tensor path {forced}");
            let x3 = Var::from_tensor(&x0).unwrap();
            let l3 = cross_entropy(x3.as_tensor(), &y).unwrap();
            let g3 = l3.backward().unwrap();
            let g3 = g3.get(x3.as_tensor()).unwrap();
            assert_eq!(g3.dims(), &[b, t, c], "{what}");
            let x2 = Var::from_tensor(&x0.reshape((b * t, c)).unwrap()).unwrap();
            let l2 = cross_entropy(x2.as_tensor(), &y.flatten_all().unwrap()).unwrap();
            let g2 = l2.backward().unwrap();
            let g2 = g2.get(x2.as_tensor()).unwrap();
            assert_close(&l3, &l2, Tol::exact(), &format!("loss, {what}"));
            assert_close(
                g3,
                &g2.reshape((b, t, c)).unwrap(),
                Tol::exact(),
                &format!("gradient, {what}"),
            );
        });
    }
    let x = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
    for bad in [vec![6usize], vec![3, 2], vec![2, 3, 1]] {
        let y = Tensor::zeros(bad.as_slice(), DType::U32, &dev).unwrap();
        let e = cross_entropy(&x, &y).unwrap_err().to_string();
        assert!(
            e.contains("cross_entropy") && e.contains("[2, 3]"),
            "{bad:?}: {e}"
        );
    }
}
