//! layer_norm and rms_norm (functional ops and the LayerNorm / RmsNorm
//! layers): against PyTorch (fixtures from `fixtures/make_norm_softmax_rope.py`),
//! candle-nn, candle's autograd of the composed formula and f64 finite
//! differences, on every device and on both paths (fused CPU kernel, candle
//! tensor ops).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::{ops, set_tensor_path, LayerNorm, LayerNormConfig, RmsNorm};
use minibatch_testkit::{assert_close, Tol};

const FIXTURE: &str = "norm_softmax_rope.safetensors";

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 2e-5),
        _ => (1e-12, 1e-12),
    }
}

fn randn(shape: &[usize], dtype: DType, seed: u64, scale: f64, shift: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale + shift)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn weighted_sum(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

fn grad(g: &candle_core::backprop::GradStore, v: &Var, what: &str) -> Tensor {
    g.get(v.as_tensor())
        .unwrap_or_else(|| panic!("{what}: no gradient"))
        .clone()
}

#[test]
fn layer_norm_and_rms_norm_match_pytorch() {
    for dev in devices() {
        let fx = load_fixture(FIXTURE, &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            for case in ["rows", "wide", "long"] {
                let ln = |k: &str| fx[&format!("{tag}.layer_norm.{case}.{k}")].clone();
                let rms = |k: &str| fx[&format!("{tag}.rms_norm.{case}.{k}")].clone();
                both_paths(|forced| {
                    for layer in [false, true] {
                        let what =
                            format!("{case} {tag} tensor path {forced} layer {layer} {dev:?}");
                        let x = Var::from_tensor(&ln("x")).unwrap();
                        let w = Var::from_tensor(&ln("w")).unwrap();
                        let b = Var::from_tensor(&ln("b")).unwrap();
                        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
                        let y = if layer {
                            LayerNorm::new(wt.clone(), bt.clone(), 1e-5)
                                .forward(xt)
                                .unwrap()
                        } else {
                            ops::layer_norm(xt, wt, bt, 1e-5).unwrap()
                        };
                        assert_close(
                            &y,
                            &ln("y"),
                            Tol::new(atol, rtol),
                            &format!("layer_norm y {what}"),
                        );
                        let g = weighted_sum(&y, &ln("r")).backward().unwrap();
                        assert_close(
                            &grad(&g, &x, &what),
                            &ln("dx"),
                            Tol::new(atol, rtol),
                            &format!("layer_norm dx {what}"),
                        );
                        assert_close(
                            &grad(&g, &w, &what),
                            &ln("dw"),
                            Tol::new(atol, rtol),
                            &format!("layer_norm dw {what}"),
                        );
                        assert_close(
                            &grad(&g, &b, &what),
                            &ln("db"),
                            Tol::new(atol, rtol),
                            &format!("layer_norm db {what}"),
                        );

                        let x = Var::from_tensor(&rms("x")).unwrap();
                        let w = Var::from_tensor(&rms("w")).unwrap();
                        let y = if layer {
                            RmsNorm::new(w.as_tensor().clone(), 1e-6)
                                .forward(x.as_tensor())
                                .unwrap()
                        } else {
                            ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap()
                        };
                        assert_close(
                            &y,
                            &rms("y"),
                            Tol::new(atol, rtol),
                            &format!("rms_norm y {what}"),
                        );
                        let g = weighted_sum(&y, &rms("r")).backward().unwrap();
                        assert_close(
                            &grad(&g, &x, &what),
                            &rms("dx"),
                            Tol::new(atol, rtol),
                            &format!("rms_norm dx {what}"),
                        );
                        assert_close(
                            &grad(&g, &w, &what),
                            &rms("dw"),
                            Tol::new(atol, rtol),
                            &format!("rms_norm dw {what}"),
                        );
                    }
                });
            }
        }
    }
}

/// Forward within f32 rounding of candle-nn's fused ops and layers (they
/// compute the variance in one pass, this crate in two), and equal to
/// candle-nn's tensor-op formula in f64, where candle-nn's fused CPU ops
/// have no kernel at all.
#[test]
fn forward_matches_candle_nn() {
    let x = randn(&[16, 40, 77], DType::F32, 1, 2.0, 0.5);
    let w = randn(&[77], DType::F32, 2, 0.5, 1.0);
    let b = randn(&[77], DType::F32, 3, 0.5, 0.0);
    let ours = ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    let theirs = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert_close(&ours, &theirs, Tol::new(1e-5, 1e-5), "ops::layer_norm f32");
    let ours = ops::rms_norm(&x, &w, 1e-5).unwrap();
    let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
    assert_close(&ours, &theirs, Tol::new(1e-6, 1e-5), "ops::rms_norm f32");
    // Every LayerNorm configuration, f32 and f64, against candle-nn's layer
    // (its fused op where it takes it, its formula otherwise).
    for dtype in [DType::F32, DType::F64] {
        let (x, w, b) = (
            x.to_dtype(dtype).unwrap(),
            w.to_dtype(dtype).unwrap(),
            b.to_dtype(dtype).unwrap(),
        );
        let (rtol, atol) = if dtype == DType::F32 {
            (1e-5, 1e-5)
        } else {
            (1e-12, 1e-12)
        };
        for (remove_mean, bias) in [(true, true), (true, false), (false, true), (false, false)] {
            let what = format!("{dtype:?} remove_mean {remove_mean} bias {bias}");
            let config = LayerNormConfig {
                eps: 1e-5,
                remove_mean,
                affine: bias,
            };
            let mut map = HashMap::new();
            map.insert("weight".to_string(), w.clone());
            map.insert("bias".to_string(), b.clone());
            let vb = VarBuilder::from_tensors(map, dtype, &Device::Cpu);
            let ours = minibatch_nn::layer_norm(77, config, vb.clone()).unwrap();
            let theirs = candle_nn::layer_norm(77, config, vb).unwrap();
            let yb = if dtype == DType::F64 && remove_mean && bias {
                // candle-nn's layer errors here (its fused CPU op has no f64
                // kernel); compare with its formula.
                assert!(
                    theirs.forward(&x).is_err(),
                    "candle-nn gained an f64 kernel"
                );
                candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap()
            } else {
                theirs.forward(&x).unwrap()
            };
            assert_close(&ours.forward(&x).unwrap(), &yb, Tol::new(atol, rtol), &what);
        }
        let ours = RmsNorm::new(w.clone(), 1e-6).forward(&x).unwrap();
        let theirs = candle_nn::ops::rms_norm_slow(&x, &w, 1e-6).unwrap();
        assert_close(
            &ours,
            &theirs,
            Tol::new(atol, rtol),
            &format!("RmsNorm {dtype:?}"),
        );
    }
}

/// Half precision runs candle-nn's own formula: bit-identical results, and
/// gradients through candle's autograd.
#[test]
fn half_precision_falls_back_to_candle_ops() {
    for dtype in [DType::BF16, DType::F16] {
        let x = randn(&[4, 6, 24], dtype, 4, 2.0, 0.3);
        let w = randn(&[24], dtype, 5, 0.5, 1.0);
        let b = randn(&[24], dtype, 6, 0.5, 0.0);
        let pairs = [
            (
                ops::layer_norm(&x, &w, &b, 1e-5).unwrap(),
                candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap(),
            ),
            (
                ops::rms_norm(&x, &w, 1e-5).unwrap(),
                candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap(),
            ),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours.dtype(), dtype);
            assert_close(&ours, &theirs, Tol::exact(), &format!("{dtype:?}"));
        }
        let v = Var::from_tensor(&x).unwrap();
        let g = ops::layer_norm(v.as_tensor(), &w, &b, 1e-5)
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

/// f64 gradients of x, weight and bias: against candle's autograd of
/// candle-nn's composed formula, and against central finite differences,
/// on both paths.
#[test]
fn gradients_match_composed_formula_and_finite_differences() {
    let x = randn(&[3, 4, 13], DType::F64, 7, 1.5, 0.7);
    let w = randn(&[13], DType::F64, 8, 0.5, 1.0);
    let b = randn(&[13], DType::F64, 9, 0.5, 0.0);
    let r = randn(&[3, 4, 13], DType::F64, 10, 1.0, 0.0);
    // Composed formula (candle-nn's *_slow functions) vs ours.
    let (xv, wv, bv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w).unwrap(),
        Var::from_tensor(&b).unwrap(),
    );
    let (xt, wt, bt) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let ga = weighted_sum(&ops::layer_norm(xt, wt, bt, 1e-5).unwrap(), &r)
        .backward()
        .unwrap();
    let gb = weighted_sum(
        &candle_nn::ops::layer_norm_slow(xt, wt, bt, 1e-5).unwrap(),
        &r,
    )
    .backward()
    .unwrap();
    for (v, name) in [(&xv, "x"), (&wv, "w"), (&bv, "b")] {
        assert_close(
            &grad(&ga, v, name),
            &grad(&gb, v, name),
            Tol::new(1e-12, 1e-11),
            name,
        );
    }
    let ga = weighted_sum(&ops::rms_norm(xt, wt, 1e-5).unwrap(), &r)
        .backward()
        .unwrap();
    let gb = weighted_sum(&candle_nn::ops::rms_norm_slow(xt, wt, 1e-5).unwrap(), &r)
        .backward()
        .unwrap();
    for (v, name) in [(&xv, "rms x"), (&wv, "rms w")] {
        assert_close(
            &grad(&ga, v, name),
            &grad(&gb, v, name),
            Tol::new(1e-12, 1e-11),
            name,
        );
    }
    both_paths(|_| {
        check_gradients_fd(
            &[x.clone(), w.clone(), b.clone()],
            |ts| weighted_sum(&ops::layer_norm(&ts[0], &ts[1], &ts[2], 1e-5)?, &r).sum_all(),
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
        check_gradients_fd(
            &[x.clone(), w.clone()],
            |ts| weighted_sum(&ops::rms_norm(&ts[0], &ts[1], 1e-5)?, &r).sum_all(),
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
        // The layers' other configurations: no bias, RMS with a bias.
        for (remove_mean, with_bias) in [(true, false), (false, true)] {
            let inputs = if with_bias {
                vec![x.clone(), w.clone(), b.clone()]
            } else {
                vec![x.clone(), w.clone()]
            };
            check_gradients_fd(
                &inputs,
                |ts| {
                    let mut map = HashMap::new();
                    map.insert("weight".to_string(), ts[1].clone());
                    if with_bias {
                        map.insert("bias".to_string(), ts[2].clone());
                    }
                    let vb = VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
                    let config = LayerNormConfig {
                        eps: 1e-5,
                        remove_mean,
                        affine: with_bias,
                    };
                    let layer = minibatch_nn::layer_norm(13, config, vb)?;
                    weighted_sum(&layer.forward(&ts[0])?, &r).sum_all()
                },
                1e-6,
                Tol::new(1e-8, 1e-6),
            );
        }
    });
}

/// The layers create candle-nn's parameters (names, shapes, initial values),
/// read PyTorch's old `gamma`/`beta` names, and train them.
#[test]
fn layers_build_candle_nn_parameters() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let ln = minibatch_nn::layer_norm(5, 1e-5, vb.pp("ln")).unwrap();
    let nb = minibatch_nn::layer_norm_no_bias(5, 1e-5, vb.pp("nb")).unwrap();
    let rms = minibatch_nn::rms_norm(5, 1e-6, vb.pp("rms")).unwrap();
    {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["ln.bias", "ln.weight", "nb.weight", "rms.weight"]);
        assert_eq!(
            data["ln.weight"].as_tensor().to_vec1::<f32>().unwrap(),
            [1.0; 5]
        );
        assert_eq!(
            data["ln.bias"].as_tensor().to_vec1::<f32>().unwrap(),
            [0.0; 5]
        );
    }
    assert!(ln.bias().is_some() && nb.bias().is_none());
    assert!(ln.remove_mean() && !rms.clone().into_inner().remove_mean());
    assert_eq!((ln.eps(), rms.eps()), (1e-5, 1e-6));
    let x = randn(&[2, 3, 5], DType::F32, 11, 1.0, 0.0);
    let y = rms
        .forward(&ln.forward(&nb.forward(&x).unwrap()).unwrap())
        .unwrap();
    let g = (y * randn(&[2, 3, 5], DType::F32, 12, 1.0, 0.0))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        assert!(g.get(var.as_tensor()).is_some(), "{name} got no gradient");
    }
    // A checkpoint with PyTorch's old names.
    let mut map = HashMap::new();
    map.insert(
        "gamma".to_string(),
        Tensor::new(&[2f32, 2.], &Device::Cpu).unwrap(),
    );
    map.insert(
        "beta".to_string(),
        Tensor::new(&[1f32, 1.], &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    let old = minibatch_nn::layer_norm(2, 1e-5, vb).unwrap();
    let y = old
        .forward(&Tensor::new(&[[0f32, 2.]], &Device::Cpu).unwrap())
        .unwrap();
    let y = y.to_vec2::<f32>().unwrap();
    assert!(
        (y[0][0] + 1.0).abs() < 1e-4 && (y[0][1] - 3.0).abs() < 1e-4,
        "{y:?}"
    );
    // From candle-nn's layers.
    let c = candle_nn::LayerNorm::new(
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        1e-3,
    );
    let l = LayerNorm::from(c);
    assert_eq!(l.eps(), 1e-3);
    assert!(l.bias().is_some());
    let c = candle_nn::RmsNorm::new(Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(), 1e-4);
    assert_eq!(RmsNorm::from(c).eps(), 1e-4);
}

/// A strided input gives the same values and gradients as its contiguous
/// copy; a data batch (not a variable) gets no gradient while the weights do.
#[test]
fn non_contiguous_inputs_and_untracked_data() {
    let base = randn(&[6, 24, 5], DType::F32, 13, 1.0, 0.2);
    let w = Var::from_tensor(&randn(&[24], DType::F32, 14, 0.3, 1.0)).unwrap();
    let bias = Var::from_tensor(&randn(&[24], DType::F32, 15, 0.3, 0.0)).unwrap();
    let r = randn(&[6, 5, 24], DType::F32, 16, 1.0, 0.0);
    let v = Var::from_tensor(&base).unwrap();
    let view = v.as_tensor().transpose(1, 2).unwrap();
    assert!(!view.is_contiguous());
    let copy = Var::from_tensor(&view.contiguous().unwrap()).unwrap();
    let f = |t: &Tensor| ops::layer_norm(t, w.as_tensor(), bias.as_tensor(), 1e-5).unwrap();
    let (ya, yb) = (f(&view), f(copy.as_tensor()));
    assert_close(&ya, &yb, Tol::exact(), "forward");
    let ga = weighted_sum(&ya, &r).backward().unwrap();
    let gb = weighted_sum(&yb, &r).backward().unwrap();
    let db = grad(&gb, &copy, "copy").transpose(1, 2).unwrap();
    assert_close(&grad(&ga, &v, "view"), &db, Tol::exact(), "gradient");
    // Untracked input: no dx, but dw and db, equal to the tracked case's.
    let data = view.contiguous().unwrap();
    let g = weighted_sum(&f(&data), &r).backward().unwrap();
    assert!(g.get(&data).is_none());
    assert_close(&grad(&g, &w, "w"), &grad(&gb, &w, "w"), Tol::exact(), "dw");
    assert_close(
        &grad(&g, &bias, "b"),
        &grad(&gb, &bias, "b"),
        Tol::exact(),
        "db",
    );
}

/// The fused kernel and the tensor path agree on a transformer-sized input
/// (parallel path); the fused gradients are the same bits on a rerun.
#[test]
fn fused_kernel_agrees_with_tensor_path_on_large_inputs() {
    let x = randn(&[16, 64, 128], DType::F32, 17, 2.0, 0.5);
    let w = randn(&[128], DType::F32, 18, 0.5, 1.0);
    let b = randn(&[128], DType::F32, 19, 0.5, 0.0);
    let r = randn(&[16, 64, 128], DType::F32, 20, 1.0, 0.0);
    for rms in [false, true] {
        let run = |forced: bool| {
            set_tensor_path(forced);
            let vars: Vec<Var> = [&x, &w, &b]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let (xt, wt, bt) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let y = if rms {
                ops::rms_norm(xt, wt, 1e-5).unwrap()
            } else {
                ops::layer_norm(xt, wt, bt, 1e-5).unwrap()
            };
            let g = weighted_sum(&y, &r).backward().unwrap();
            set_tensor_path(false);
            let grads: Vec<Option<Tensor>> =
                vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
            (y, grads)
        };
        let ((ya, ga), (yb, gb)) = (run(false), run(true));
        assert_close(&ya, &yb, Tol::new(1e-5, 1e-5), &format!("y rms {rms}"));
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    // dw and db sum 1024 rows: relative to their size.
                    let scale = b
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64;
                    assert_close(
                        a,
                        b,
                        Tol::new(1e-5 * scale, 1e-4),
                        &format!("grad {i} rms {rms}"),
                    )
                }
                (None, None) => assert!(rms && i == 2),
                _ => panic!("grad {i} rms {rms}: present on one path only"),
            }
        }
        let again = run(false).1;
        for (a, b) in again.iter().zip(&ga) {
            if let (Some(a), Some(b)) = (a, b) {
                assert_close(a, b, Tol::exact(), "rerun");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let w4 = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let w3 = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let e = ops::layer_norm(&x, &w3, &w4, 1e-5).unwrap_err().to_string();
    assert!(e.contains("shape mismatch") && e.contains("alpha"), "{e}");
    assert!(ops::layer_norm(&x, &w4, &w3, 1e-5).is_err());
    assert!(ops::rms_norm(&x, &w3, 1e-5).is_err());
    assert!(RmsNorm::new(w3, 1e-5).forward(&x).is_err());
    let s = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(ops::rms_norm(&s, &w4, 1e-5).is_err());
    // Empty batches are fine.
    let e = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ops::layer_norm(&e, &w4, &w4, 1e-5).unwrap().dims(), &[0, 4]);
    // Constant rows normalise to the bias (no division by zero with eps > 0).
    let c = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
    let y = ops::layer_norm(&c, &w4, &b, 1e-5).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap()[1], [1., 2., 3., 4.]);
}

/// Why this crate exists: candle-nn's fused norms give nothing upstream a
/// gradient; ours do.
#[test]
fn candle_nn_norms_drop_the_gradient_ours_do_not() {
    let w = Var::from_tensor(&randn(&[8, 8], DType::F32, 21, 0.5, 0.0)).unwrap();
    let x = randn(&[4, 8], DType::F32, 22, 1.0, 0.0);
    let r = randn(&[4, 8], DType::F32, 23, 1.0, 0.0);
    let (a, b) = (
        Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let h = x.matmul(w.as_tensor()).unwrap();
    let theirs: [Tensor; 4] = [
        candle_nn::ops::layer_norm(&h, &a, &b, 1e-5).unwrap(),
        candle_nn::ops::rms_norm(&h, &a, 1e-5).unwrap(),
        candle_nn::LayerNorm::new(a.clone(), b.clone(), 1e-5)
            .forward(&h)
            .unwrap(),
        candle_nn::RmsNorm::new(a.clone(), 1e-5)
            .forward(&h)
            .unwrap(),
    ];
    for (i, y) in theirs.iter().enumerate() {
        let g = weighted_sum(y, &r).backward().unwrap();
        assert!(
            g.get(w.as_tensor()).is_none(),
            "candle-nn op {i} now has a backward"
        );
    }
    let ours: [Tensor; 4] = [
        ops::layer_norm(&h, &a, &b, 1e-5).unwrap(),
        ops::rms_norm(&h, &a, 1e-5).unwrap(),
        LayerNorm::new(a.clone(), b.clone(), 1e-5)
            .forward(&h)
            .unwrap(),
        RmsNorm::new(a.clone(), 1e-5).forward(&h).unwrap(),
    ];
    for (i, y) in ours.iter().enumerate() {
        let g = weighted_sum(y, &r).backward().unwrap();
        let dw = g
            .get(w.as_tensor())
            .unwrap_or_else(|| panic!("op {i} drops the gradient"));
        assert!(
            dw.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
