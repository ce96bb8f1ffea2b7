//! AveragedModel (SWA, EMA) and SWALR against PyTorch's
//! `torch.optim.swa_utils` (fixture: `tests/fixtures/make_swa.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use minibatch_optim::{
    AveragedModel, Averaging, CosineAnnealingLR, LrScheduler, Optimizer, Sgd, SgdConfig, SwaAnneal,
    SWALR,
};
use minibatch_testkit::Tol;

const SHAPES: usize = 3;
const STEPS: usize = 8;

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/swa.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("swa.safetensors")
}

fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
}

/// `minibatch_testkit::assert_close` relative to the largest expected value
/// (0: the same bits).
fn assert_close(actual: &Tensor, expected: &Tensor, rel: f64, what: &str) {
    let tol = if rel == 0.0 {
        Tol::bits()
    } else {
        Tol::rel_to_max(rel)
    };
    minibatch_testkit::assert_close(actual, expected, tol, what);
}

fn averaging(name: &str) -> Averaging {
    match name {
        "swa" => Averaging::Swa,
        "ema0.9" => Averaging::Ema { decay: 0.9 },
        "ema0.3" => Averaging::Ema { decay: 0.3 },
        _ => unreachable!(),
    }
}

fn run_average_cases(tensor_path: bool) {
    let f = fixture();
    for (tag, dtype, tol) in [("f32", DType::F32, 1e-6), ("f64", DType::F64, 1e-14)] {
        for avg in ["swa", "ema0.9", "ema0.3"] {
            let params: Vec<(String, Var)> = (0..SHAPES)
                .map(|i| {
                    let t = get(&f, &format!("{tag}.init.{i}"));
                    assert_eq!(t.dtype(), dtype);
                    (format!("p{i}"), Var::from_tensor(t).unwrap())
                })
                .collect();
            let mut model = AveragedModel::new(params.clone(), averaging(avg)).unwrap();
            model.set_tensor_path(tensor_path);
            for (i, (name, _)) in params.iter().enumerate() {
                assert_close(
                    model.get(name).unwrap(),
                    get(&f, &format!("{tag}.init.{i}")),
                    0.0,
                    "init copy",
                );
            }
            for k in 0..STEPS {
                for (i, (_, v)) in params.iter().enumerate() {
                    v.set(get(&f, &format!("{tag}.values.{k}.{i}"))).unwrap();
                }
                model.update_parameters().unwrap();
                assert_eq!(model.n_averaged(), k as u64 + 1);
                for (i, (name, _)) in params.iter().enumerate() {
                    let what =
                        format!("{tag} {avg} (tensor path {tensor_path}) update {k} param {i}");
                    let tol = if k == 0 || avg == "swa" { 0.0 } else { tol };
                    assert_close(
                        model.get(name).unwrap(),
                        get(&f, &format!("{tag}.{avg}.after.{k}.{i}")),
                        tol,
                        &what,
                    );
                }
            }
        }
    }
}

#[test]
fn averages_match_pytorch() {
    run_average_cases(false);
}

#[test]
fn averages_match_pytorch_on_the_tensor_path() {
    run_average_cases(true);
}

fn two_groups() -> Sgd {
    let a = Var::new(&[0f32], &Device::Cpu).unwrap();
    let b = Var::new(&[0f32], &Device::Cpu).unwrap();
    let cfg = |lr| SgdConfig {
        lr,
        ..Default::default()
    };
    Sgd::with_groups(vec![
        (vec![("a".into(), a)], cfg(0.1)),
        (vec![("b".into(), b)], cfg(0.05)),
    ])
    .unwrap()
}

fn expect_lrs(f: &HashMap<String, Tensor>, name: &str) -> Vec<Vec<f64>> {
    get(f, &format!("swalr.{name}.lr")).to_vec2().unwrap()
}

fn check_lrs(opt: &mut Sgd, sched: &mut dyn LrScheduler, want: &[Vec<f64>], what: &str) {
    for (k, w) in want.iter().enumerate() {
        let got = [opt.group_lr(0).unwrap(), opt.group_lr(1).unwrap()];
        for g in 0..2 {
            assert!(
                (got[g] - w[g]).abs() <= 1e-15 * w[g].abs(),
                "{what} step {k} group {g}: lr {:e}, PyTorch {:e}",
                got[g],
                w[g]
            );
        }
        sched.step(opt).unwrap();
    }
}

#[test]
fn swalr_matches_pytorch() {
    let f = fixture();
    let mut opt = two_groups();
    let mut s = SWALR::new(&mut opt, &[0.02, 0.01], 5, SwaAnneal::Cos).unwrap();
    check_lrs(&mut opt, &mut s, &expect_lrs(&f, "cos5"), "cos5");

    let mut opt = two_groups();
    let mut s = SWALR::new(&mut opt, &[0.03], 3, SwaAnneal::Linear).unwrap();
    check_lrs(&mut opt, &mut s, &expect_lrs(&f, "linear3"), "linear3");

    let mut opt = two_groups();
    let mut s = SWALR::new(&mut opt, &[0.02], 0, SwaAnneal::Cos).unwrap();
    check_lrs(&mut opt, &mut s, &expect_lrs(&f, "cos0"), "cos0");

    // built through the PyTorch-name constructor, chained after a cosine phase
    let want = expect_lrs(&f, "after_cosine");
    let mut opt = two_groups();
    let mut cos = CosineAnnealingLR::new(&mut opt, 10, 0.0).unwrap();
    check_lrs(&mut opt, &mut cos, &want[..4], "after_cosine (cosine part)");
    let kwargs = serde_json::json!({"swa_lr": 0.01, "anneal_epochs": 4});
    let mut s = minibatch_optim::schedule::from_pytorch(&mut opt, "SWALR", &kwargs).unwrap();
    check_lrs(&mut opt, &mut s, &want[4..], "after_cosine (SWALR part)");
}

#[test]
fn swalr_rejects_bad_arguments() {
    let mut opt = two_groups();
    let e = SWALR::new(&mut opt, &[0.1, 0.2, 0.3], 5, SwaAnneal::Cos).unwrap_err();
    assert!(
        e.to_string()
            .contains("3 swa_lr values for 2 parameter groups"),
        "{e}"
    );
    let e = SWALR::new(&mut opt, &[-0.1], 5, SwaAnneal::Cos).unwrap_err();
    assert!(e.to_string().contains("swa_lr"), "{e}");
    let kwargs = serde_json::json!({"swa_lr": 0.1, "anneal_strategy": "exp"});
    let e = minibatch_optim::schedule::from_pytorch(&mut opt, "SWALR", &kwargs)
        .err()
        .unwrap();
    assert!(e.to_string().contains("`exp`"), "{e}");
}

#[test]
fn swalr_state_resumes_to_the_bit() {
    let mut a = two_groups();
    let mut s = SWALR::new(&mut a, &[0.02], 6, SwaAnneal::Cos).unwrap();
    for _ in 0..3 {
        s.step(&mut a).unwrap();
    }
    let state = s.state();
    let mut b = two_groups();
    b.load_state_bytes(&a.state_bytes().unwrap()).unwrap();
    let mut r = SWALR::new(&mut b, &[0.02], 6, SwaAnneal::Cos).unwrap();
    b.load_state_bytes(&a.state_bytes().unwrap()).unwrap();
    r.load_state(&state).unwrap();
    for _ in 0..6 {
        s.step(&mut a).unwrap();
        r.step(&mut b).unwrap();
        assert_eq!(
            a.group_lr(0).unwrap().to_bits(),
            b.group_lr(0).unwrap().to_bits()
        );
        assert_eq!(s.last_lr(), r.last_lr());
    }
    let mut other = SWALR::new(&mut b, &[0.02], 5, SwaAnneal::Cos).unwrap();
    assert!(other.load_state(&state).is_err());
}

/// SGD with momentum, cosine annealing, then SWALR with an equal-weight
/// average from step 6: the whole `torch.optim.swa_utils` recipe.
#[test]
fn swa_run_matches_pytorch() {
    let f = fixture();
    let params: Vec<(String, Var)> = (0..SHAPES)
        .map(|i| {
            (
                format!("p{i}"),
                Var::from_tensor(get(&f, &format!("run.init.{i}"))).unwrap(),
            )
        })
        .collect();
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = Sgd::named(params.clone(), cfg).unwrap();
    let mut cosine = CosineAnnealingLR::new(&mut opt, 12, 0.0).unwrap();
    let mut swa = AveragedModel::new(params.clone(), Averaging::Swa).unwrap();
    let mut swa_sched: Option<SWALR> = None;
    let want_lr: Vec<f64> = get(&f, "run.lr").to_vec1().unwrap();
    for (k, &want) in want_lr.iter().enumerate() {
        let lr = opt.learning_rate();
        assert!(
            (lr - want).abs() <= 1e-15 * want,
            "step {k}: lr {lr:e} vs {want:e}"
        );
        // d/dp sum(p * g) = g exactly
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (i, (_, v)) in params.iter().enumerate() {
            let g = get(&f, &format!("run.grad.{k}.{i}"));
            loss = loss
                .add(&v.as_tensor().mul(g).unwrap().sum_all().unwrap())
                .unwrap();
        }
        opt.backward_step(&loss).unwrap();
        if k < 6 {
            cosine.step(&mut opt).unwrap();
        } else {
            let s = match &mut swa_sched {
                Some(s) => s,
                None => swa_sched.insert(SWALR::new(&mut opt, &[0.05], 3, SwaAnneal::Cos).unwrap()),
            };
            swa.update_parameters().unwrap();
            s.step(&mut opt).unwrap();
        }
    }
    assert_eq!(swa.n_averaged(), 6);
    for (i, (name, v)) in params.iter().enumerate() {
        assert_close(
            v.as_tensor(),
            get(&f, &format!("run.param.{i}")),
            1e-5,
            &format!("param {i}"),
        );
        assert_close(
            swa.get(name).unwrap(),
            get(&f, &format!("run.swa.{i}")),
            1e-5,
            &format!("swa {i}"),
        );
    }
}

fn tiny_varmap() -> (VarMap, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _ = candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    let vars = minibatch_optim::varmap_vars(&varmap).unwrap();
    (varmap, vars)
}

fn nudge(vars: &[(String, Var)], k: f64) {
    for (_, v) in vars {
        let t = v.as_tensor().affine(0.9, k).unwrap();
        v.set(&t).unwrap();
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn averaged_state_resumes_to_the_bit() {
    for rule in [Averaging::Swa, Averaging::Ema { decay: 0.99 }] {
        let (_vm, vars) = tiny_varmap();
        let mut a = AveragedModel::new(vars.clone(), rule).unwrap();
        for k in 0..3 {
            nudge(&vars, 0.1 * k as f64);
            a.update_parameters().unwrap();
        }
        let bytes = a.state_bytes().unwrap();
        assert_eq!(
            bytes,
            a.state_bytes().unwrap(),
            "state bytes are deterministic"
        );
        let mut b = AveragedModel::new(vars.clone(), rule).unwrap();
        b.load_state_bytes(&bytes).unwrap();
        assert_eq!(b.n_averaged(), 3);
        for k in 3..6 {
            nudge(&vars, 0.1 * k as f64);
            a.update_parameters().unwrap();
            b.update_parameters().unwrap();
        }
        for (name, t) in a.averages() {
            assert_eq!(bits(t), bits(b.get(name).unwrap()), "{rule:?} {name}");
        }
        // another rule, decay or parameter set is refused, leaving b as it was
        let before = b.state_bytes().unwrap();
        let other_rule = match rule {
            Averaging::Swa => Averaging::Ema { decay: 0.99 },
            Averaging::Ema { .. } => Averaging::Swa,
        };
        let mut c = AveragedModel::new(vars.clone(), other_rule).unwrap();
        assert!(c.load_state_bytes(&bytes).is_err());
        let mut d = AveragedModel::new(vars[..1].to_vec(), rule).unwrap();
        let e = d.load_state_bytes(&bytes).unwrap_err();
        assert!(e.to_string().contains("holds"), "{e}");
        assert!(b.load_state_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert_eq!(b.state_bytes().unwrap(), before);
    }
}

#[test]
fn with_averaged_swaps_in_and_restores_the_bits() {
    let (varmap, vars) = tiny_varmap();
    let mut ema = AveragedModel::from_varmap(&varmap, Averaging::Ema { decay: 0.5 }).unwrap();
    for k in 0..4 {
        nudge(&vars, 0.3 * k as f64);
        ema.update_parameters().unwrap();
    }
    let own: Vec<Vec<u32>> = vars.iter().map(|(_, v)| bits(v.as_tensor())).collect();
    let seen: Vec<Vec<u32>> = ema
        .with_averaged(|| vars.iter().map(|(_, v)| bits(v.as_tensor())).collect())
        .unwrap();
    for ((name, _), s) in vars.iter().zip(&seen) {
        assert_eq!(
            s,
            &bits(ema.get(name).unwrap()),
            "{name}: averaged weights inside"
        );
    }
    let after: Vec<Vec<u32>> = vars.iter().map(|(_, v)| bits(v.as_tensor())).collect();
    assert_eq!(own, after, "own weights restored");
    assert_ne!(own, seen);
    // also after a panic in the closure
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ema.with_averaged(|| panic!("boom")).unwrap();
    }));
    assert!(r.is_err());
    let after: Vec<Vec<u32>> = vars.iter().map(|(_, v)| bits(v.as_tensor())).collect();
    assert_eq!(own, after, "own weights restored after a panic");
    // a separate copy for a second model
    let copy = ema.to_varmap().unwrap();
    let copied = minibatch_optim::varmap_vars(&copy).unwrap();
    assert_eq!(copied.len(), 2);
    for (name, v) in &copied {
        assert_eq!(bits(v.as_tensor()), bits(ema.get(name).unwrap()));
    }
    ema.copy_to_params().unwrap();
    for (name, v) in &vars {
        assert_eq!(bits(v.as_tensor()), bits(ema.get(name).unwrap()));
    }
}

#[test]
fn averaged_model_rejects_bad_input() {
    let (_vm, vars) = tiny_varmap();
    let e = AveragedModel::new(vec![], Averaging::Swa).unwrap_err();
    assert!(e.to_string().contains("no parameter"), "{e}");
    let e = AveragedModel::new(vars.clone(), Averaging::Ema { decay: 1.5 }).unwrap_err();
    assert!(e.to_string().contains("decay"), "{e}");
    let twice = vec![vars[0].clone(), vars[0].clone()];
    let e = AveragedModel::new(twice, Averaging::Swa).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    let e = AveragedModel::new(vec![("ids".into(), ints)], Averaging::Swa).unwrap_err();
    assert!(e.to_string().contains("ids"), "{e}");
}

#[test]
fn bf16_averages_compute_in_f32() {
    let v = Var::from_tensor(
        &Tensor::new(&[1.0f32, 2.0, -3.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    let mut swa = AveragedModel::new(vec![("w".into(), v.clone())], Averaging::Swa).unwrap();
    swa.update_parameters().unwrap();
    v.set(
        &Tensor::new(&[3.0f32, 4.0, 5.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    swa.update_parameters().unwrap();
    let got: Vec<f32> = swa
        .get("w")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, [2.0, 3.0, 1.0]);
    assert_eq!(swa.get("w").unwrap().dtype(), DType::BF16);
}
