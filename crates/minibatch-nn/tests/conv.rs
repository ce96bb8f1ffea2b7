//! `minibatch_nn::Conv2d` against PyTorch (fixtures made by
//! `tests/fixtures/make_conv_pool.py`), against candle's own `conv2d`, and
//! against f64 finite differences, on every device and on the tensor-op path.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use common::{check_gradients_fd, devices, load_fixture};
use minibatch_nn::{conv2d, conv2d_no_bias, set_tensor_path, Conv2d};
use minibatch_testkit::{assert_close, Tol};

const CASES: [&str; 8] = [
    "basic",
    "stride2_pad1",
    "stride3_square",
    "dilation2",
    "groups2",
    "pointwise_nobias",
    "mixed",
    "mnist_like",
];

fn cfg_of(t: &Tensor) -> Conv2dConfig {
    let v = t.to_vec1::<i64>().unwrap();
    Conv2dConfig {
        stride: v[0] as usize,
        padding: v[1] as usize,
        dilation: v[2] as usize,
        groups: v[3] as usize,
        cudnn_fwd_algo: None,
    }
}

/// Both implementations: the fused CPU kernel (where the device is the CPU)
/// and the tensor-op path.
fn paths() -> [bool; 2] {
    [false, true]
}

#[test]
fn outputs_and_gradients_match_pytorch() {
    for dev in devices() {
        for tp in paths() {
            set_tensor_path(tp);
            for (dtype, tag, rtol, atol) in [
                (DType::F32, "f32", 1e-4, 1e-5),
                (DType::F64, "f64", 1e-10, 1e-12),
            ] {
                let fx = load_fixture("conv_pool.safetensors", &dev);
                for case in CASES {
                    let key = |s: &str| format!("{tag}.conv.{case}.{s}");
                    let get = |s: &str| fx.get(&key(s)).unwrap_or_else(|| panic!("{}", key(s)));
                    let what = format!("{case} {tag} {dev:?} tensor_path={tp}");
                    let x = Var::from_tensor(get("x")).unwrap();
                    let w = Var::from_tensor(get("w")).unwrap();
                    let b = fx.get(&key("b")).map(|b| Var::from_tensor(b).unwrap());
                    assert_eq!(x.dtype(), dtype);
                    let conv = Conv2d::new(
                        w.as_tensor().clone(),
                        b.as_ref().map(|b| b.as_tensor().clone()),
                        cfg_of(get("cfg")),
                    );
                    let y = conv.forward(x.as_tensor()).unwrap();
                    assert_close(&y, get("y"), Tol::new(atol, rtol), &format!("{what}: y"));
                    let grads = (&y * get("r"))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let dx = grads.get(x.as_tensor()).expect("dx");
                    assert_close(dx, get("dx"), Tol::new(atol, rtol), &format!("{what}: dx"));
                    let dw = grads.get(w.as_tensor()).expect("dw");
                    assert_close(dw, get("dw"), Tol::new(atol, rtol), &format!("{what}: dw"));
                    if let Some(b) = &b {
                        let db = grads.get(b.as_tensor()).expect("db");
                        assert_close(db, get("db"), Tol::new(atol, rtol), &format!("{what}: db"));
                    }
                }
            }
            set_tensor_path(false);
        }
    }
}

/// The forward pass equals candle's `conv2d` + bias (candle_nn::Conv2d)
/// within f32 rounding, including a batch large enough to be split over
/// threads.
#[test]
fn forward_matches_candle_nn_conv2d() {
    let dev = Device::Cpu;
    for &(xs, ws, cfg) in &[
        ((64, 1, 28, 28), (16, 1, 5, 5), (1, 0, 1, 1)),
        ((64, 16, 12, 12), (32, 16, 5, 5), (1, 0, 1, 1)),
        ((5, 6, 11, 9), (4, 3, 3, 2), (2, 1, 1, 2)),
        ((9, 4, 10, 13), (8, 4, 3, 3), (1, 2, 2, 1)),
        ((3, 8, 7, 7), (8, 8, 1, 1), (1, 0, 1, 1)),
    ] {
        let (stride, padding, dilation, groups) = cfg;
        let cfg = Conv2dConfig {
            stride,
            padding,
            dilation,
            groups,
            cudnn_fwd_algo: None,
        };
        let x = common::randn(0f32, 1.0, xs, &dev).unwrap();
        let w = common::randn(0f32, 0.3, ws, &dev).unwrap();
        let b = common::randn(0f32, 0.3, ws.0, &dev).unwrap();
        let ours = Conv2d::new(w.clone(), Some(b.clone()), cfg)
            .forward(&x)
            .unwrap();
        let theirs = candle_nn::Conv2d::new(w, Some(b), cfg).forward(&x).unwrap();
        // Both sum up to 400 products of ~0.3 in f32, in different orders
        // (different gemm blockings): near-zero outputs differ by up to ~2e-5.
        assert_close(
            &ours,
            &theirs,
            Tol::new(5e-5, 1e-5),
            &format!("{xs:?} {ws:?} {cfg:?}"),
        );
    }
}

/// The fused kernel and the tensor path (candle's own autograd) agree on a
/// batch that the fused kernel splits over threads, for every gradient.
#[test]
fn threaded_batch_matches_the_tensor_path() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&common::randn(0f64, 1.0, (9, 4, 14, 15), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&common::randn(0f64, 0.3, (6, 2, 3, 3), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&common::randn(0f64, 0.3, 6, &dev).unwrap()).unwrap();
    let cfg = Conv2dConfig {
        stride: 2,
        padding: 1,
        dilation: 1,
        groups: 2,
        cudnn_fwd_algo: None,
    };
    let conv = Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), cfg);
    let run = |tp: bool| {
        set_tensor_path(tp);
        let y = conv.forward(x.as_tensor()).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        set_tensor_path(false);
        let pick = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (y, pick(&x), pick(&w), pick(&b))
    };
    let (a, b_) = (run(false), run(true));
    assert_close(&a.0, &b_.0, Tol::new(1e-12, 1e-12), "y");
    assert_close(&a.1, &b_.1, Tol::new(1e-12, 1e-12), "dx");
    assert_close(&a.2, &b_.2, Tol::new(1e-12, 1e-12), "dw");
    assert_close(&a.3, &b_.3, Tol::new(1e-12, 1e-12), "db");
    // The same inputs give the same bits every run.
    let again = run(false);
    for (p, q) in [
        (&a.0, &again.0),
        (&a.1, &again.1),
        (&a.2, &again.2),
        (&a.3, &again.3),
    ] {
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            q.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    for tp in paths() {
        for &(xs, ws, stride, padding, dilation, groups) in &[
            ((2, 2, 5, 6), (2, 2, 3, 2), 1, 1, 1, 1),
            ((1, 4, 7, 6), (4, 2, 2, 3), 2, 1, 2, 2),
        ] {
            let cfg = Conv2dConfig {
                stride,
                padding,
                dilation,
                groups,
                cudnn_fwd_algo: None,
            };
            let x = common::randn(0f64, 1.0, xs, &dev).unwrap();
            let w = common::randn(0f64, 0.5, ws, &dev).unwrap();
            let b = common::randn(0f64, 0.5, ws.0, &dev).unwrap();
            set_tensor_path(tp);
            check_gradients_fd(
                &[x, w, b],
                |t| {
                    let y = Conv2d::new(t[1].clone(), Some(t[2].clone()), cfg).forward(&t[0])?;
                    // A non-linear loss, so every gradient entry matters.
                    (y.sqr()? * 0.5)?.sum_all()
                },
                1e-5,
                Tol::new(1e-7, 1e-6),
            );
            set_tensor_path(false);
        }
    }
}

/// A data batch (not a variable) gets no gradient: the fused backward skips
/// `dx` entirely. Parameters that are not variables get none either.
#[test]
fn data_batch_and_frozen_weights_get_no_gradient() {
    let dev = Device::Cpu;
    let x = common::randn(0f32, 1.0, (3, 2, 6, 6), &dev).unwrap();
    let w = Var::from_tensor(&common::randn(0f32, 0.3, (4, 2, 3, 3), &dev).unwrap()).unwrap();
    let b = common::randn(0f32, 0.3, 4, &dev).unwrap();
    let conv = Conv2d::new(
        w.as_tensor().clone(),
        Some(b.clone()),
        Conv2dConfig::default(),
    );
    let g = conv
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_none());
    assert!(g.get(&b).is_none());
    assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[4, 2, 3, 3]);
}

/// The builders create the same variables, with the same names, shapes and
/// initialisation as candle-nn's, so a VarMap made for one serves the other.
#[test]
fn varbuilder_names_and_shapes_match_candle_nn() {
    let dev = Device::Cpu;
    let cfg = Conv2dConfig {
        groups: 2,
        padding: 1,
        ..Default::default()
    };
    let ours = VarMap::new();
    let theirs = VarMap::new();
    let vb = VarBuilder::from_varmap(&ours, DType::F32, &dev);
    let a = conv2d(4, 6, 3, cfg, vb.pp("c1")).unwrap();
    let a2 = conv2d_no_bias(6, 2, 1, Conv2dConfig::default(), vb.pp("c2")).unwrap();
    assert!(a2.bias().is_none());
    let vb = VarBuilder::from_varmap(&theirs, DType::F32, &dev);
    let c = candle_nn::conv2d(4, 6, 3, cfg, vb.pp("c1")).unwrap();
    candle_nn::conv2d_no_bias(6, 2, 1, Conv2dConfig::default(), vb.pp("c2")).unwrap();
    let shapes = |vm: &VarMap| {
        let mut v: Vec<(String, Vec<usize>)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&ours), shapes(&theirs));
    assert_eq!(
        shapes(&ours),
        vec![
            ("c1.bias".to_string(), vec![6]),
            ("c1.weight".to_string(), vec![6, 2, 3, 3]),
            ("c2.weight".to_string(), vec![2, 6, 1, 1]),
        ]
    );
    // Bias: uniform in ±1/sqrt(in); weight: Kaiming normal, std sqrt(2/fan_in)
    // with fan_in = in/groups·k·k = 18 (the same init candle-nn uses).
    let bias = a.bias().unwrap().to_vec1::<f32>().unwrap();
    assert!(bias.iter().all(|v| v.abs() <= 0.5));
    let wv = a.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let std = (wv.iter().map(|v| v * v).sum::<f32>() / wv.len() as f32).sqrt();
    assert!(
        (std - (2f32 / 18.0).sqrt()).abs() < 0.12,
        "weight std {std}"
    );
    // Same weights give the same outputs.
    let x = common::randn(0f32, 1.0, (2, 4, 5, 5), &dev).unwrap();
    let c_ours = Conv2d::new(c.weight().clone(), c.bias().cloned(), cfg);
    assert_close(
        &c_ours.forward(&x).unwrap(),
        &c.forward(&x).unwrap(),
        Tol::new(1e-6, 1e-5),
        "forward with candle-nn's weights",
    );
}

#[test]
fn bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    // groups not dividing the channels, or zero: errors, not panics.
    for groups in [0, 3] {
        let cfg = Conv2dConfig {
            groups,
            ..Default::default()
        };
        assert!(conv2d(4, 6, 3, cfg, vb.pp(format!("g{groups}"))).is_err());
        assert!(conv2d_no_bias(4, 6, 3, cfg, vb.pp(format!("h{groups}"))).is_err());
    }
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let cfg = |stride, padding, dilation, groups| Conv2dConfig {
        stride,
        padding,
        dilation,
        groups,
        cudnn_fwd_algo: None,
    };
    let cases: Vec<(&str, Conv2d, Tensor)> = vec![
        (
            "channel mismatch",
            Conv2d::new(w.clone(), Some(b.clone()), cfg(1, 0, 1, 1)),
            Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "groups do not divide the output channels",
            Conv2d::new(
                Tensor::zeros((3, 2, 3, 3), DType::F32, &dev).unwrap(),
                None,
                cfg(1, 0, 1, 2),
            ),
            Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "groups 0",
            Conv2d::new(w.clone(), None, cfg(1, 0, 1, 0)),
            Tensor::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "kernel larger than the padded input",
            Conv2d::new(w.clone(), None, cfg(1, 0, 1, 1)),
            Tensor::zeros((1, 2, 2, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "dilated kernel larger than the padded input",
            Conv2d::new(w.clone(), None, cfg(1, 1, 4, 1)),
            Tensor::zeros((1, 2, 6, 6), DType::F32, &dev).unwrap(),
        ),
        (
            "stride 0",
            Conv2d::new(w.clone(), None, cfg(0, 0, 1, 1)),
            Tensor::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "dilation 0",
            Conv2d::new(w.clone(), None, cfg(1, 0, 0, 1)),
            Tensor::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "3-D input",
            Conv2d::new(w.clone(), None, cfg(1, 0, 1, 1)),
            Tensor::zeros((2, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "bias of the wrong length",
            Conv2d::new(
                w.clone(),
                Some(Tensor::zeros(3, DType::F32, &dev).unwrap()),
                cfg(1, 0, 1, 1),
            ),
            Tensor::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "dtype mismatch",
            Conv2d::new(w.clone(), None, cfg(1, 0, 1, 1)),
            Tensor::zeros((1, 2, 8, 8), DType::F64, &dev).unwrap(),
        ),
    ];
    for tp in paths() {
        set_tensor_path(tp);
        for (what, conv, x) in &cases {
            let r = conv.forward(x);
            assert!(r.is_err(), "{what} (tensor_path={tp}) was accepted");
        }
        set_tensor_path(false);
    }
    // The messages name the problem.
    let e = cases[0].1.forward(&cases[0].2).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let e = cases[3].1.forward(&cases[3].2).unwrap_err().to_string();
    assert!(e.contains("larger than the padded input"), "{e}");
}
