//! Unit tests of the optimizer machinery: validation, skipping, state
//! save/load, corruption, mismatches, groups, bf16, chunking.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use minibatch_optim::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, GenericOptimizer, OptimError,
    Optimizer, RmsProp, RmsPropConfig, Sgd, SgdConfig, UpdateRule,
};
use minibatch_testkit::{assert_close_slice, Tol};

fn det_tensor(n: usize, seed: u64, dtype: DType) -> Tensor {
    // A deterministic pseudo-random sequence in [-1, 1).
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn grads_for(vars: &[Var], step: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, v) in vars.iter().enumerate() {
        let t = det_tensor(v.elem_count(), 1000 * step + i as u64, v.dtype())
            .reshape(v.shape())
            .unwrap();
        g.insert(v.as_tensor(), t);
    }
    g
}

fn make_vars(sizes: &[usize], dtype: DType) -> Vec<(String, Var)> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let v = Var::from_tensor(&det_tensor(n, 77 + i as u64, dtype)).unwrap();
            (format!("layer{i}.weight"), v)
        })
        .collect()
}

fn values(vars: &[(String, Var)]) -> Vec<Vec<u64>> {
    vars.iter()
        .map(|(_, v)| {
            v.as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

/// Save after `k` steps, load into a fresh optimizer over fresh copies of
/// the parameters, continue: bit-identical to running straight through.
fn round_trip<R: UpdateRule>(cfg: R, tensor_path: bool) {
    let sizes = [70_000, 13, 1];
    for dtype in [DType::F32, DType::F64] {
        let straight = make_vars(&sizes, dtype);
        let mut a = GenericOptimizer::named(straight.clone(), cfg.clone()).unwrap();
        a.set_tensor_path(tensor_path);
        let plain: Vec<Var> = straight.iter().map(|(_, v)| v.clone()).collect();
        for s in 0..6 {
            a.step(&grads_for(&plain, s)).unwrap();
        }

        let first = make_vars(&sizes, dtype);
        let mut b = GenericOptimizer::named(first.clone(), cfg.clone()).unwrap();
        b.set_tensor_path(tensor_path);
        let plain_b: Vec<Var> = first.iter().map(|(_, v)| v.clone()).collect();
        for s in 0..3 {
            b.step(&grads_for(&plain_b, s)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        b.save_state(&path).unwrap();

        // Fresh parameters with b's current values, fresh optimizer.
        let resumed: Vec<(String, Var)> = first
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut c = GenericOptimizer::named(resumed.clone(), cfg.clone()).unwrap();
        c.set_tensor_path(tensor_path);
        c.load_state(&path).unwrap();
        let plain_c: Vec<Var> = resumed.iter().map(|(_, v)| v.clone()).collect();
        for s in 3..6 {
            c.step(&grads_for(&plain_c, s)).unwrap();
        }
        assert_eq!(
            values(&straight),
            values(&resumed),
            "{} {dtype:?} tensor_path={tensor_path}",
            R::KIND
        );
        assert_eq!(c.step_count("layer0.weight"), 6);
    }
}

#[test]
fn state_round_trip_is_bit_identical() {
    for tp in [false, true] {
        round_trip(
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-3,
                ..Default::default()
            },
            tp,
        );
        round_trip(
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
            tp,
        );
        round_trip(
            AdamConfig {
                amsgrad: true,
                weight_decay: 0.1,
                ..Default::default()
            },
            tp,
        );
        round_trip(AdamWConfig::default(), tp);
        round_trip(
            RmsPropConfig {
                momentum: 0.5,
                centered: true,
                ..Default::default()
            },
            tp,
        );
        round_trip(
            AdagradConfig {
                lr_decay: 0.01,
                initial_accumulator_value: 0.1,
                ..Default::default()
            },
            tp,
        );
    }
}

#[test]
fn fused_chunked_path_matches_tensor_path() {
    // > 64k elements: the fused path splits the tensor over the thread pool.
    for cfg in [
        AdamConfig::default(),
        AdamConfig {
            amsgrad: true,
            maximize: true,
            ..Default::default()
        },
    ] {
        let a = make_vars(&[300_001], DType::F64);
        let b = make_vars(&[300_001], DType::F64);
        let mut oa = Adam::named(a.clone(), cfg).unwrap();
        let mut ob = Adam::named(b.clone(), cfg).unwrap();
        ob.set_tensor_path(true);
        for s in 0..4 {
            oa.step(&grads_for(&[a[0].1.clone()], s)).unwrap();
            ob.step(&grads_for(&[b[0].1.clone()], s)).unwrap();
        }
        let (x, y) = (
            a[0].1.as_tensor().to_vec1::<f64>().unwrap(),
            b[0].1.as_tensor().to_vec1::<f64>().unwrap(),
        );
        assert_close_slice(&x, &y, Tol::new(1e-15, 1e-12), "fused vs tensor-op Adam");
    }
}

#[test]
fn params_without_gradients_are_skipped() {
    let vars = make_vars(&[4, 3], DType::F32);
    let mut opt = Adam::named(vars.clone(), AdamConfig::default()).unwrap();
    let before = values(&vars);
    let mut grads = GradStore::default();
    grads.insert(vars[0].1.as_tensor(), det_tensor(4, 1, DType::F32));
    opt.step(&grads).unwrap();
    opt.step(&grads).unwrap();
    let after = values(&vars);
    assert_ne!(before[0], after[0]);
    assert_eq!(before[1], after[1]);
    assert_eq!(opt.step_count("layer0.weight"), 2);
    assert_eq!(opt.step_count("layer1.weight"), 0);
    assert!(opt
        .state_tensor("layer1.weight", "exp_avg")
        .unwrap()
        .is_none());
    // The state file holds only the updated parameter.
    let bytes = opt.state_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "layer0.weight.exp_avg",
            "layer0.weight.exp_avg_sq",
            "layer0.weight.step"
        ]
    );
    // Then the second parameter gets its first step (bias correction t = 1).
    let mut g2 = GradStore::default();
    g2.insert(
        vars[1].1.as_tensor(),
        Tensor::new(&[1f32, -1.0, 0.5], &Device::Cpu).unwrap(),
    );
    opt.step(&g2).unwrap();
    assert_eq!(opt.step_count("layer1.weight"), 1);
    let p = vars[1].1.as_tensor().to_vec1::<f32>().unwrap();
    let p0 = det_tensor(3, 78, DType::F32).to_vec1::<f32>().unwrap();
    // Adam's first step moves each element by lr * sign(g) (up to eps).
    assert!((p0[0] - p[0] - 1e-3).abs() < 1e-6 && (p[1] - p0[1] - 1e-3).abs() < 1e-6);
}

#[test]
fn invalid_hyperparameters_are_named() {
    let v = || vec![Var::zeros(2, DType::F32, &Device::Cpu).unwrap()];
    let msg = |e: OptimError| e.to_string();
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            lr: -1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("`lr`"));
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            lr: f64::NAN,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("`lr`"));
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            momentum: -0.1,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("momentum"));
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            nesterov: true,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("nesterov"));
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("nesterov"));
    assert!(msg(Sgd::new(
        v(),
        SgdConfig {
            weight_decay: -1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("weight_decay"));
    assert!(msg(Adam::new(
        v(),
        AdamConfig {
            beta1: 1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("betas[0]"));
    assert!(msg(AdamW::new(
        v(),
        AdamWConfig {
            adam: AdamConfig {
                beta2: -0.5,
                ..AdamWConfig::default().adam
            }
        }
    )
    .unwrap_err())
    .contains("betas[1]"));
    assert!(msg(Adam::new(
        v(),
        AdamConfig {
            eps: -1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("eps"));
    assert!(msg(RmsProp::new(
        v(),
        RmsPropConfig {
            alpha: -1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("alpha"));
    assert!(msg(Adagrad::new(
        v(),
        AdagradConfig {
            lr_decay: -1.0,
            ..Default::default()
        }
    )
    .unwrap_err())
    .contains("lr_decay"));
    // Duplicate names and unsupported dtypes.
    let x = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    assert!(msg(Sgd::named(
        vec![("a".into(), x.clone()), ("a".into(), x)],
        SgdConfig::default()
    )
    .unwrap_err())
    .contains("`a`"));
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    assert!(matches!(
        Sgd::new(vec![ints], SgdConfig::default()),
        Err(OptimError::UnsupportedDtype { .. })
    ));
    // A schedule or user setting a negative lr is caught at the next step.
    let mut opt = Sgd::new(v(), SgdConfig::default()).unwrap();
    opt.set_learning_rate(-0.1);
    let vars = opt.vars();
    assert!(opt.step(&grads_for(&vars, 0)).is_err());
}

#[test]
fn gradient_mismatch_is_an_error() {
    let vars = make_vars(&[4], DType::F32);
    let mut opt = Sgd::named(vars.clone(), SgdConfig::default()).unwrap();
    let mut grads = GradStore::default();
    grads.insert(vars[0].1.as_tensor(), det_tensor(3, 0, DType::F32));
    let e = opt.step(&grads).unwrap_err().to_string();
    assert!(e.contains("layer0.weight") && e.contains("shape"), "{e}");
    grads.insert(vars[0].1.as_tensor(), det_tensor(4, 0, DType::F64));
    assert!(opt.step(&grads).unwrap_err().to_string().contains("dtype"));
}

fn trained(cfg: AdamConfig) -> (Vec<(String, Var)>, Adam) {
    let vars = make_vars(&[5, 3], DType::F32);
    let mut opt = Adam::named(vars.clone(), cfg).unwrap();
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    opt.step(&grads_for(&plain, 0)).unwrap();
    (vars, opt)
}

#[test]
fn corrupt_or_mismatched_state_is_an_error_and_leaves_the_optimizer_unchanged() {
    let (_, opt) = trained(AdamConfig::default());
    let bytes = opt.state_bytes().unwrap();
    let (_, mut fresh) = trained(AdamConfig::default());
    let snapshot = |o: &Adam| {
        let t = o.state_tensor("layer0.weight", "exp_avg").unwrap().unwrap();
        (
            t.to_vec1::<f32>().unwrap(),
            o.step_count("layer0.weight"),
            o.learning_rate(),
        )
    };
    let before = snapshot(&fresh);
    // Truncated, garbage, empty.
    for bad in [
        &bytes[..bytes.len() / 2],
        &b"not a state file"[..],
        &[][..],
        &bytes[..7],
    ] {
        let e = fresh.load_state_bytes(bad).unwrap_err();
        assert!(matches!(e, OptimError::CorruptState(_)), "{e}");
    }
    // A flipped byte in the JSON header.
    let mut flipped = bytes.clone();
    flipped[10] ^= 0x55;
    assert!(fresh.load_state_bytes(&flipped).is_err());
    assert_eq!(snapshot(&fresh), before);
    // Missing file.
    let e = fresh
        .load_state(std::path::Path::new("/nonexistent/dir/opt.safetensors"))
        .unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/dir/opt.safetensors"),
        "{e}"
    );

    // Wrong kind.
    let sgd = Sgd::named(make_vars(&[5, 3], DType::F32), SgdConfig::default()).unwrap();
    let mut adam = trained(AdamConfig::default()).1;
    let e = adam
        .load_state_bytes(&sgd.state_bytes().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("SGD") && e.contains("Adam"), "{e}");
    // Wrong names.
    let renamed: Vec<(String, Var)> = make_vars(&[5, 3], DType::F32)
        .into_iter()
        .enumerate()
        .map(|(i, (_, v))| (format!("other{i}"), v))
        .collect();
    let mut other = Adam::named(renamed, AdamConfig::default()).unwrap();
    let e = other.load_state_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("layer0.weight") && e.contains("other0"), "{e}");
    // Wrong shapes.
    let mut shaped = Adam::named(make_vars(&[5, 4], DType::F32), AdamConfig::default()).unwrap();
    let e = shaped.load_state_bytes(&bytes).unwrap_err().to_string();
    assert!(
        e.contains("layer1.weight.exp_avg") && e.contains("shape"),
        "{e}"
    );
    // Wrong dtype (f64 parameters keep f64 state).
    let mut wide = Adam::named(make_vars(&[5, 3], DType::F64), AdamConfig::default()).unwrap();
    let e = wide.load_state_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("dtype"), "{e}");
    // Different state layout (amsgrad adds a buffer): the missing key is named.
    let mut ams = trained(AdamConfig {
        amsgrad: true,
        ..Default::default()
    })
    .1;
    let ams_bytes = ams.state_bytes().unwrap();
    let mut plain = trained(AdamConfig::default()).1;
    // Loading restores the saved hyperparameters (amsgrad) as PyTorch does.
    plain.load_state_bytes(&ams_bytes).unwrap();
    assert!(plain.rule(0).unwrap().amsgrad);
    assert!(ams.load_state_bytes(&bytes).is_ok());
}

#[test]
fn groups_have_their_own_hyperparameters_and_lr_is_restored() {
    let a = make_vars(&[3], DType::F64);
    let b: Vec<(String, Var)> = make_vars(&[2], DType::F64)
        .into_iter()
        .map(|(_, v)| ("head.bias".to_string(), v))
        .collect();
    let mut opt = Sgd::with_groups(vec![
        (
            a.clone(),
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        ),
        (
            b.clone(),
            SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..Default::default()
            },
        ),
    ])
    .unwrap();
    assert_eq!(opt.param_groups().len(), 2);
    assert_eq!(opt.learning_rate(), 0.1);
    let a0 = a[0].1.as_tensor().to_vec1::<f64>().unwrap();
    let b0 = b[0].1.as_tensor().to_vec1::<f64>().unwrap();
    let mut grads = GradStore::default();
    grads.insert(
        a[0].1.as_tensor(),
        Tensor::new(&[1f64, 1.0, 1.0], &Device::Cpu).unwrap(),
    );
    grads.insert(
        b[0].1.as_tensor(),
        Tensor::new(&[1f64, 1.0], &Device::Cpu).unwrap(),
    );
    opt.step(&grads).unwrap();
    let a1 = a[0].1.as_tensor().to_vec1::<f64>().unwrap();
    let b1 = b[0].1.as_tensor().to_vec1::<f64>().unwrap();
    assert!((a0[0] - a1[0] - 0.1).abs() < 1e-15);
    assert!((b0[0] - b1[0] - 0.01).abs() < 1e-15);
    // Schedules change group lrs; the state file carries them.
    opt.set_group_lr(1, 0.005).unwrap();
    let bytes = opt.state_bytes().unwrap();
    let mut fresh = Sgd::with_groups(vec![
        (
            a,
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        ),
        (
            b,
            SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..Default::default()
            },
        ),
    ])
    .unwrap();
    fresh.load_state_bytes(&bytes).unwrap();
    assert_eq!(fresh.group_lr(1), Some(0.005));
    assert_eq!(fresh.vars().len(), 2);
}

#[test]
fn bf16_and_f16_params_follow_the_f32_trajectory() {
    for dtype in [DType::BF16, DType::F16] {
        let full = make_vars(&[100_000], DType::F32);
        let half: Vec<(String, Var)> = full
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap(),
                )
            })
            .collect();
        let cfg = AdamWConfig {
            adam: AdamConfig {
                lr: 1e-2,
                ..AdamWConfig::default().adam
            },
        };
        let mut of = AdamW::named(full.clone(), cfg).unwrap();
        let mut oh = AdamW::named(half.clone(), cfg).unwrap();
        for s in 0..3 {
            let gf = grads_for(&[full[0].1.clone()], s);
            of.step(&gf).unwrap();
            let mut gh = GradStore::default();
            gh.insert(
                half[0].1.as_tensor(),
                gf.get(full[0].1.as_tensor())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            oh.step(&gh).unwrap();
        }
        let x = full[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let y = half[0]
            .1
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let tol = if dtype == DType::BF16 { 2e-2 } else { 2e-3 };
        // The f32 run is the reference: `tol · max(|full|, 0.1)`.
        let f64s = |v: &[f32]| v.iter().map(|&p| p as f64).collect::<Vec<_>>();
        assert_close_slice(
            &f64s(&y),
            &f64s(&x),
            Tol::rel(tol).floor(0.1),
            &format!("{dtype:?} parameters vs f32"),
        );
        let st = oh
            .state_tensor("layer0.weight", "exp_avg")
            .unwrap()
            .unwrap();
        assert_eq!(st.dtype(), DType::F32, "half params keep f32 state");
    }
}

#[test]
fn works_as_candle_nn_optimizer_and_boxed() {
    use candle_nn::Optimizer as CandleOptimizer;
    let w = Var::new(&[2.0f32], &Device::Cpu).unwrap();
    let mut opt: Sgd = CandleOptimizer::new(
        vec![w.clone()],
        SgdConfig {
            lr: 0.25,
            ..Default::default()
        },
    )
    .unwrap();
    let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
    CandleOptimizer::backward_step(&mut opt, &loss).unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
    let mut boxed: Box<dyn Optimizer> = Box::new(opt);
    boxed.set_learning_rate(0.5);
    boxed
        .backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![0.0]);
    assert_eq!(boxed.name(), "SGD");
}

#[test]
fn from_varmap_sorts_names() {
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let _ = candle_nn::linear(3, 2, vb.pp("zeta")).unwrap();
    let _ = candle_nn::linear(2, 1, vb.pp("alpha")).unwrap();
    let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
    let names = opt.param_groups()[0].names().to_vec();
    assert_eq!(
        names,
        ["alpha.bias", "alpha.weight", "zeta.bias", "zeta.weight"]
    );
}
