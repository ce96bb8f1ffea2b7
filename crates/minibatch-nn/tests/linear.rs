//! `Linear` against PyTorch (fixtures from `fixtures/make_core.py`), against
//! `candle_nn::Linear` (forward to the bit, gradients of its composed ops),
//! against f64 finite differences, on every device and on both paths.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::{linear, linear_b, linear_no_bias, Linear};
use minibatch_testkit::{assert_close, Tol};

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        _ => (1e-12, 1e-12),
    }
}

#[test]
fn matches_pytorch() {
    for dev in devices() {
        let fx = load_fixture("core.safetensors", &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            let key = |k: &str| fx[&format!("{tag}.{k}")].clone();
            for (case, with_bias) in [("linear", true), ("linear_nb", false), ("linear2", true)] {
                both_paths(|forced| {
                    let what = format!("{case} {tag} tensor path {forced} {dev:?}");
                    let w = Var::from_tensor(&key("linear.w")).unwrap();
                    let b = Var::from_tensor(&key("linear.b")).unwrap();
                    let x = Var::from_tensor(&key(&format!("{case}.x"))).unwrap();
                    let layer = Linear::new(
                        w.as_tensor().clone(),
                        with_bias.then(|| b.as_tensor().clone()),
                    );
                    let y = layer.forward(x.as_tensor()).unwrap();
                    let at = |k: &str| key(&format!("{case}.{k}"));
                    assert_close(&y, &at("y"), Tol::new(atol, rtol), &format!("y {what}"));
                    let g = (y * at("r"))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    assert_close(
                        g.get(x.as_tensor()).unwrap(),
                        &at("dx"),
                        Tol::new(atol, rtol),
                        &format!("dx {what}"),
                    );
                    assert_close(
                        g.get(w.as_tensor()).unwrap(),
                        &at("dw"),
                        Tol::new(atol, rtol),
                        &format!("dw {what}"),
                    );
                    if with_bias {
                        assert_close(
                            g.get(b.as_tensor()).unwrap(),
                            &at("db"),
                            Tol::new(atol, rtol),
                            &format!("db {what}"),
                        );
                    } else {
                        assert!(g.get(b.as_tensor()).is_none());
                    }
                });
            }
        }
    }
}

/// Forward bit-identical to candle_nn::Linear for ranks 2 to 4, strided
/// inputs, with and without bias, small and large (multi-threaded gemm)
/// shapes; gradients equal to those of candle-nn's ops up to rounding, through
/// two layers (so the hidden layer's input gradient is used).
#[test]
fn equals_candle_nn() {
    let dev = Device::Cpu;
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 7], &[64, 784], &[2, 5, 33], &[2, 3, 4, 17]];
    for dims in shapes {
        let k = *dims.last().unwrap();
        for dtype in [DType::F32, DType::F64] {
            for bias in [true, false] {
                let rnd = |s: &[usize], sd: f32| {
                    common::randn(0f32, sd, s, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let x = Var::from_tensor(&rnd(dims, 1.0)).unwrap();
                let w1 = Var::from_tensor(&rnd(&[128, k], 0.1)).unwrap();
                let b1 = Var::from_tensor(&rnd(&[128], 0.1)).unwrap();
                let w2 = Var::from_tensor(&rnd(&[10, 128], 0.1)).unwrap();
                let b2 = Var::from_tensor(&rnd(&[10], 0.1)).unwrap();
                let opt = |b: &Var| bias.then(|| b.as_tensor().clone());
                let ours = [
                    Linear::new(w1.as_tensor().clone(), opt(&b1)),
                    Linear::new(w2.as_tensor().clone(), opt(&b2)),
                ];
                let theirs = [
                    candle_nn::Linear::new(w1.as_tensor().clone(), opt(&b1)),
                    candle_nn::Linear::new(w2.as_tensor().clone(), opt(&b2)),
                ];
                let yb = theirs[1]
                    .forward(&theirs[0].forward(x.as_tensor()).unwrap().relu().unwrap())
                    .unwrap();
                let gb = yb.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                both_paths(|forced| {
                    let what = format!("{dims:?} {dtype:?} bias {bias} tensor path {forced}");
                    let h = ours[0].forward(x.as_tensor()).unwrap();
                    assert_close(
                        &h,
                        &theirs[0].forward(x.as_tensor()).unwrap(),
                        Tol::bits(),
                        &what,
                    );
                    let ya = ours[1].forward(&h.relu().unwrap()).unwrap();
                    assert_close(&ya, &yb, Tol::bits(), &what);
                    let ga = ya.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    let (rtol, _) = tol(dtype);
                    let mut vars = vec![&x, &w1, &w2];
                    if bias {
                        vars.extend([&b1, &b2]);
                    }
                    for v in vars {
                        let (a, b) = (
                            ga.get(v.as_tensor()).unwrap(),
                            gb.get(v.as_tensor()).unwrap(),
                        );
                        // Relative to the largest gradient entry (at least 1).
                        let tol = Tol::rel_to_max(rtol).floor(1.0);
                        assert_close(a, b, tol, &format!("gradient, {what}"));
                    }
                });
            }
        }
    }
}

/// A transposed (strided) rank-2 input, and a strided rank-3 one.
#[test]
fn strided_inputs() {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&common::randn(0f64, 1.0, (6, 5), &dev).unwrap()).unwrap();
    let b = common::randn(0f64, 1.0, 6, &dev).unwrap();
    let layer = Linear::new(w.as_tensor().clone(), Some(b.clone()));
    let cn = candle_nn::Linear::new(w.as_tensor().clone(), Some(b));
    let x = Var::from_tensor(&common::randn(0f64, 1.0, (5, 9), &dev).unwrap()).unwrap();
    let xt = x.as_tensor().t().unwrap();
    let x3 = Var::from_tensor(&common::randn(0f64, 1.0, (4, 5, 3), &dev).unwrap()).unwrap();
    let x3t = x3.as_tensor().transpose(1, 2).unwrap();
    for (input, var) in [(&xt, &x), (&x3t, &x3)] {
        let y = layer.forward(input).unwrap();
        assert_close(
            &y,
            &cn.forward(input).unwrap(),
            Tol::bits(),
            "strided forward",
        );
        let ga = y.sum_all().unwrap().backward().unwrap();
        let gb = cn
            .forward(input)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [var, &w] {
            assert_close(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
                Tol::new(1e-12, 1e-12),
                "strided gradient",
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let x = common::randn(0f64, 1.0, (2, 3, 4), &dev).unwrap();
    let w = common::randn(0f64, 1.0, (5, 4), &dev).unwrap();
    let b = common::randn(0f64, 1.0, 5, &dev).unwrap();
    let r = common::randn(0f64, 1.0, (2, 3, 5), &dev).unwrap();
    both_paths(|_| {
        check_gradients_fd(
            &[x.clone(), w.clone(), b.clone()],
            |a| {
                let y = Linear::new(a[1].clone(), Some(a[2].clone())).forward(&a[0])?;
                (y.tanh()? * &r)?.sum_all()
            },
            1e-5,
            Tol::new(1e-8, 1e-6),
        );
        check_gradients_fd(
            &[x.flatten_to(1).unwrap(), w.clone()],
            |a| {
                let y = Linear::new(a[1].clone(), None).forward(&a[0])?;
                y.sqr()?.sum_all()
            },
            1e-5,
            Tol::new(1e-8, 1e-6),
        );
    });
}

/// A data batch gets no gradient; a tracked input does.
#[test]
fn input_gradient_only_when_tracked() {
    let dev = Device::Cpu;
    let w = Var::new(&[[1f64, 0.0, -1.0], [0.5, 0.5, 0.5]], &dev).unwrap();
    let b = Tensor::new(&[0.1f64, -0.1], &dev).unwrap();
    let layer = Linear::new(w.as_tensor().clone(), Some(b));
    let data = Tensor::new(&[[1f64, 2.0, 3.0]], &dev).unwrap();
    let g = layer
        .forward(&data)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&data).is_none());
    assert!(g.get(w.as_tensor()).is_some());
    let x = Var::new(&[[1f64, 2.0, 3.0]], &dev).unwrap();
    let y = layer.forward(x.as_tensor()).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![-1.9, 2.9]]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(dx, vec![vec![1.5, 0.5, -0.5]]);
}

/// The same VarBuilder names, shapes and initialisation as candle-nn.
#[test]
fn varbuilder_names_and_init() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let l = linear(400, 300, vb.pp("fc")).unwrap();
    let nb = linear_no_bias(300, 2, vb.pp("head")).unwrap();
    let lb = linear_b(2, 3, false, vb.pp("lb")).unwrap();
    assert!(nb.bias().is_none() && lb.bias().is_none());
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["fc.bias", "fc.weight", "head.weight", "lb.weight"]);
    assert_eq!(l.weight().dims(), &[300, 400]);
    assert_eq!(l.bias().unwrap().dims(), &[300]);
    // Kaiming normal: std sqrt(2 / 400) = 0.0707; bias uniform in ±1/20.
    let w = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let sd = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.002 && (sd - 0.0707).abs() < 0.002,
        "mean {mean}, sd {sd}"
    );
    let b = l.bias().unwrap().to_vec1::<f32>().unwrap();
    assert!(b.iter().all(|v| v.abs() <= 0.05));
    assert!(b.iter().any(|v| v.abs() > 0.04));
    // Reading existing weights back by the same names works with candle-nn.
    drop(data);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let c = candle_nn::linear(400, 300, vb.pp("fc")).unwrap();
    assert_close(c.weight(), l.weight(), Tol::bits(), "shared weight");
}

/// Shapes or dtypes that do not fit are errors, not panics.
#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let w = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let layer = Linear::new(w.clone(), Some(b));
    both_paths(|_| {
        assert!(layer
            .forward(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap())
            .is_err());
        assert!(layer
            .forward(&Tensor::zeros((2, 3), DType::F64, &dev).unwrap())
            .is_err());
        let bad_bias = Linear::new(w.clone(), Some(Tensor::zeros(3, DType::F32, &dev).unwrap()));
        assert!(bad_bias
            .forward(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap())
            .is_err());
        // Rank 1 input works as in candle-nn (a broadcast product).
        let ours = layer.forward(&Tensor::ones(3, DType::F32, &dev).unwrap());
        let theirs = candle_nn::Linear::new(w.clone(), None)
            .forward(&Tensor::ones(3, DType::F32, &dev).unwrap());
        assert_eq!(ours.is_ok(), theirs.is_ok());
    });
}

#[test]
fn a_frozen_weight_gets_no_gradient_and_the_input_the_same_one() {
    // Constant weight and bias (a frozen or LoRA base layer): the backward
    // pass skips their products and gives the input the gradient it gets
    // when they are trainable, to the bit.
    let dev = Device::Cpu;
    let w = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &dev).unwrap();
    let b = Tensor::new(&[0.1f32, -0.2], &dev).unwrap();
    let x =
        Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 4.]], &dev).unwrap()).unwrap();
    let r = Tensor::new(&[[1f32, -2.], [0.5, 3.]], &dev).unwrap();
    let loss = |w: &Tensor, b: &Tensor| {
        let y = Linear::new(w.clone(), Some(b.clone()))
            .forward(x.as_tensor())
            .unwrap();
        (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let frozen = loss(&w, &b);
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    let trained = loss(wv.as_tensor(), bv.as_tensor());
    assert!(frozen.get(&w).is_none() && frozen.get(&b).is_none());
    assert!(trained.get(wv.as_tensor()).is_some() && trained.get(bv.as_tensor()).is_some());
    assert_close(
        frozen.get(x.as_tensor()).unwrap(),
        trained.get(x.as_tensor()).unwrap(),
        Tol::bits(),
        "input gradient",
    );
}
