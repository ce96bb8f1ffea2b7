//! `seeded_var_builder`: initial weights are a pure function of (seed, name),
//! drawn from the distribution each layer asks for.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use minibatch_nn::seeded_var_builder;

/// Every variable of `varmap`, sorted by name, as f64 values.
fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut out: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            let vals = v
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (n.clone(), v.dims().to_vec(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A small model with one layer of each kind, minibatch-nn's and candle-nn's.
fn build(vb: &VarBuilder) -> candle_core::Result<()> {
    minibatch_nn::linear(6, 5, vb.pp("fc1"))?;
    minibatch_nn::linear_no_bias(5, 4, vb.pp("fc2"))?;
    let cfg = candle_nn::Conv2dConfig::default();
    minibatch_nn::conv2d(3, 4, 3, cfg, vb.pp("conv"))?;
    minibatch_nn::embedding(10, 4, vb.pp("emb"))?;
    minibatch_nn::layer_norm(4, 1e-5, vb.pp("ln"))?;
    minibatch_nn::rms_norm(4, 1e-5, vb.pp("rms"))?;
    candle_nn::linear(4, 3, vb.pp("candle_fc"))?;
    candle_nn::embedding(7, 2, vb.pp("candle_emb"))?;
    Ok(())
}

fn model(seed: u64) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
    build(&vb).unwrap();
    snapshot(&varmap)
}

#[test]
fn same_seed_gives_identical_weights_in_two_varmaps() {
    let a = model(7);
    let b = model(7);
    assert_eq!(
        a.len(),
        12,
        "{:?}",
        a.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    assert_eq!(a, b);
    for (name, _, vals) in &a {
        assert!(vals.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn different_seed_gives_different_random_weights_and_same_constants() {
    let a = model(7);
    let b = model(8);
    for ((name, _, va), (_, _, vb)) in a.iter().zip(&b) {
        let constant = name.starts_with("ln.") || name.starts_with("rms.");
        if constant {
            assert_eq!(va, vb, "{name} is a constant init");
        } else {
            let same = va.iter().zip(vb).filter(|(x, y)| x == y).count();
            assert_eq!(same, 0, "{name}: {same} of {} equal", va.len());
        }
    }
}

#[test]
fn values_depend_on_the_name_not_on_build_order() {
    let dev = Device::Cpu;
    let forward = VarMap::new();
    let vb = seeded_var_builder(&forward, 3, DType::F32, &dev);
    minibatch_nn::linear(4, 4, vb.pp("a")).unwrap();
    minibatch_nn::linear(4, 4, vb.pp("b")).unwrap();
    let backward = VarMap::new();
    let vb = seeded_var_builder(&backward, 3, DType::F32, &dev);
    minibatch_nn::linear(4, 4, vb.pp("b")).unwrap();
    minibatch_nn::linear(4, 4, vb.pp("a")).unwrap();
    let (f, b) = (snapshot(&forward), snapshot(&backward));
    assert_eq!(f, b);
    // Same shape, same init, different names: different values.
    assert_ne!(f[0].2, f[2].2, "a.weight vs b.weight");
}

/// Mean and population standard deviation.
fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn drawn(init: Init, shape: (usize, usize), seed: u64) -> Vec<f64> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &Device::Cpu);
    vb.get_with_hints(shape, "w", init)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn distributions_have_the_asked_moments_and_ranges() {
    let n = 200 * 500; // 1e5 draws: the standard error of the mean is std/316
    let v = drawn(
        Init::Randn {
            mean: 0.5,
            stdev: 2.0,
        },
        (200, 500),
        1,
    );
    let (m, s) = moments(&v);
    assert_eq!(v.len(), n);
    assert!((m - 0.5).abs() < 0.03, "normal mean {m}");
    assert!((s - 2.0).abs() < 0.03, "normal std {s}");
    // Tails: about 4.55 % beyond two standard deviations.
    let tail = v.iter().filter(|x| (*x - 0.5).abs() > 4.0).count() as f64 / n as f64;
    assert!((tail - 0.0455).abs() < 0.004, "normal 2-sigma tail {tail}");

    let v = drawn(Init::Uniform { lo: -3.0, up: 1.0 }, (200, 500), 2);
    let (m, s) = moments(&v);
    assert!(v.iter().all(|x| (-3.0..1.0).contains(x)), "uniform range");
    assert!((m + 1.0).abs() < 0.02, "uniform mean {m}");
    let want = 4.0 / 12f64.sqrt();
    assert!((s - want).abs() < 0.02, "uniform std {s} vs {want}");

    // candle-nn's Kaiming normal (fan in 500, ReLU gain √2): std √(2/500).
    let v = drawn(candle_nn::init::DEFAULT_KAIMING_NORMAL, (200, 500), 3);
    let (m, s) = moments(&v);
    let want = (2.0f64 / 500.0).sqrt();
    assert!(m.abs() < 5.0 * want / (n as f64).sqrt(), "kaiming mean {m}");
    assert!((s - want).abs() < 0.01 * want, "kaiming std {s} vs {want}");

    let v = drawn(candle_nn::init::DEFAULT_KAIMING_UNIFORM, (200, 500), 4);
    let bound = 3f64.sqrt() * want;
    assert!(v.iter().all(|x| x.abs() <= bound), "kaiming uniform range");
    let (_, s) = moments(&v);
    assert!((s - want).abs() < 0.01 * want, "kaiming uniform std {s}");

    let v = drawn(Init::Const(0.25), (3, 4), 5);
    assert_eq!(v, vec![0.25; 12]);
}

#[test]
fn linear_bias_is_uniform_within_one_over_sqrt_fan_in() {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 11, DType::F32, &Device::Cpu);
    let layer = minibatch_nn::linear(16, 4000, vb).unwrap();
    let b = layer.bias().unwrap().to_vec1::<f32>().unwrap();
    assert!(b.iter().all(|x| x.abs() <= 0.25), "bias beyond 1/sqrt(16)");
    let (m, s) = moments(&b.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(m.abs() < 0.01, "bias mean {m}");
    assert!((s - 0.5 / 12f64.sqrt()).abs() < 0.01, "bias std {s}");
}

#[test]
fn lower_precision_dtypes_hold_the_f64_draw_rounded() {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    let reference = drawn(init, (8, 8), 9);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 9, dtype, &Device::Cpu);
        let t = vb.get_with_hints((8, 8), "w", init).unwrap();
        assert_eq!(t.dtype(), dtype);
        let want = Tensor::new(reference.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let got = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(got, want, "{dtype:?}");
    }
}

#[test]
fn an_existing_var_is_kept_and_trains() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let w = Var::from_tensor(&Tensor::ones((3, 2), DType::F32, &dev).unwrap()).unwrap();
    varmap
        .data()
        .lock()
        .unwrap()
        .insert("fc.weight".into(), w.clone());
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &dev);
    assert!(vb.contains_tensor("fc.weight"));
    assert!(!vb.contains_tensor("fc.bias"));
    let layer = minibatch_nn::linear(2, 3, vb.pp("fc")).unwrap();
    assert!(vb.contains_tensor("fc.bias"), "a new var is inserted");
    assert_eq!(
        layer.weight().to_vec2::<f32>().unwrap(),
        vec![vec![1.0f32; 2]; 3]
    );
    // The layer holds the Var itself: setting it changes the layer's output.
    w.set(&Tensor::zeros((3, 2), DType::F32, &dev).unwrap())
        .unwrap();
    let x = Tensor::ones((1, 2), DType::F32, &dev).unwrap();
    let y = layer.forward(&x).unwrap();
    let bias = layer.bias().unwrap().unsqueeze(0).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), bias.to_vec2::<f32>().unwrap());
    assert_eq!(varmap.all_vars().len(), 2);
}

#[test]
fn mismatched_existing_vars_are_errors_naming_them() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &dev);
    minibatch_nn::linear(2, 3, vb.pp("fc")).unwrap();

    let err = minibatch_nn::linear(4, 3, vb.pp("fc"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fc.weight") && err.contains("[3, 2]"), "{err}");
    assert!(err.contains("[3, 4]"), "{err}");

    let vb64 = seeded_var_builder(&varmap, 0, DType::F64, &dev);
    let err = minibatch_nn::linear(2, 3, vb64.pp("fc"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc.weight") && err.contains("F32") && err.contains("F64"),
        "{err}"
    );

    let err = vb
        .get_unchecked("missing")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    let got = vb.get_unchecked("fc.weight").unwrap();
    assert_eq!(got.dims(), &[3, 2]);
}
