//! Replays every learning-rate schedule listed in the reference directory's
//! `index.json` against PyTorch's values.
//!
//! Generated with PyTorch 2.x, per schedule:
//!
//! ```python
//! opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
//! sched = getattr(torch.optim.lr_scheduler, cls)(opt, **kwargs)  # e.g. StepLR(opt, step_size=3, gamma=0.5)
//! for e in range(epochs):
//!     lr[e] = opt.param_groups[0]["lr"]      # the lr in force during epoch e
//!     opt.step()
//!     sched.step(metric[e]) if cls == "ReduceLROnPlateau" else sched.step()
//! ```
mod common;

use candle_core::{Device, Var};
use minibatch_optim::schedule::from_pytorch;
use minibatch_optim::{CosineAnnealingLR, LinearLR, LrScheduler, Optimizer, SequentialLR, Sgd};
use minibatch_testkit::{assert_close_slice, Tol};

fn sgd(lr: f64) -> Sgd {
    Sgd::minibatch_gd(vec![Var::new(&[0f32], &Device::Cpu).unwrap()], lr).unwrap()
}

/// `|got − PyTorch| ≤ 1e-15 + 1e-12 · |PyTorch|`.
const TOL: Tol = Tol::new(1e-15, 1e-12);

#[test]
fn schedules_match_pytorch() {
    let dir = common::reference_dir();
    let index = common::reference_index();
    let cases = index["schedulers"]
        .as_array()
        .expect("index.json: `schedulers` list");
    assert!(!cases.is_empty());
    let data = candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu)
        .expect("schedulers.safetensors");
    for case in cases {
        let name = case["name"].as_str().expect("schedule name");
        let class = case["class"].as_str().expect("schedule class");
        let epochs = case["epochs"].as_u64().expect("epochs") as usize;
        let base_lr = case["base_lr"].as_f64().expect("base_lr");
        let want: Vec<f64> = data[&format!("{name}.lr")].to_vec1().unwrap();
        assert_eq!(want.len(), epochs, "{name}: lr length vs epochs");
        let metric: Option<Vec<f64>> = data
            .get(&format!("{name}.metric"))
            .map(|t| t.to_vec1().unwrap());
        let mut opt = sgd(base_lr);
        let mut sched = from_pytorch(&mut opt, class, &case["kwargs"])
            .unwrap_or_else(|e| panic!("{name}: cannot build {class}: {e}"));
        for (e, &w) in want.iter().enumerate() {
            let got = opt.learning_rate();
            assert!(
                TOL.accepts(got, w),
                "{name} ({class}) epoch {e}: lr {got:e}, PyTorch {w:e}"
            );
            match &metric {
                Some(m) => sched.step_with_metric(&mut opt, m[e]).unwrap(),
                None => sched.step(&mut opt).unwrap(),
            }
            assert_eq!(
                sched.last_lr(),
                vec![opt.learning_rate()],
                "{name}: last_lr"
            );
        }
    }
}

#[test]
fn schedule_state_round_trip_resumes_identically() {
    let index = common::reference_index();
    for case in index["schedulers"].as_array().unwrap() {
        let class = case["class"].as_str().unwrap();
        let epochs = case["epochs"].as_u64().unwrap() as usize;
        let base_lr = case["base_lr"].as_f64().unwrap();
        let half = epochs / 2;
        let metric = |e: usize| 1.0 / (1.0 + (e % 4) as f64);
        let mut a = sgd(base_lr);
        let mut sa = from_pytorch(&mut a, class, &case["kwargs"]).unwrap();
        let mut lrs = vec![];
        for e in 0..epochs {
            lrs.push(a.learning_rate());
            sa.step_with_metric(&mut a, metric(e)).unwrap();
        }
        let mut b = sgd(base_lr);
        let mut sb = from_pytorch(&mut b, class, &case["kwargs"]).unwrap();
        for e in 0..half {
            sb.step_with_metric(&mut b, metric(e)).unwrap();
        }
        let saved = (sb.state(), b.state_bytes().unwrap());
        let mut c = sgd(base_lr);
        let mut sc = from_pytorch(&mut c, class, &case["kwargs"]).unwrap();
        sc.load_state(&saved.0).unwrap();
        c.load_state_bytes(&saved.1).unwrap();
        for (e, want) in lrs.iter().enumerate().skip(half) {
            assert_eq!(
                c.learning_rate().to_bits(),
                want.to_bits(),
                "{class}: resumed lr at epoch {e}"
            );
            sc.step_with_metric(&mut c, metric(e)).unwrap();
        }
    }
}

#[test]
fn unknown_class_or_kwarg_is_an_error_naming_it() {
    let mut opt = sgd(0.1);
    let e = from_pytorch(&mut opt, "PolynomialLR", &serde_json::json!({}))
        .err()
        .unwrap();
    assert!(e.to_string().contains("PolynomialLR"), "{e}");
    let e = from_pytorch(
        &mut opt,
        "StepLR",
        &serde_json::json!({"step_size": 2, "gama": 0.1}),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("gama"), "{e}");
}

#[test]
fn plateau_requires_a_metric_and_one_cycle_stops_at_total_steps() {
    let mut opt = sgd(0.1);
    let mut p = from_pytorch(&mut opt, "ReduceLROnPlateau", &serde_json::json!({})).unwrap();
    assert!(p.step(&mut opt).is_err());
    let mut o = from_pytorch(
        &mut opt,
        "OneCycleLR",
        &serde_json::json!({"max_lr": 0.1, "total_steps": 3}),
    )
    .unwrap();
    for _ in 0..3 {
        o.step(&mut opt).unwrap();
    }
    assert!(o.step(&mut opt).is_err());
}

/// PyTorch: `SequentialLR(opt, [LinearLR(opt, start_factor=0.1, total_iters=3),
/// CosineAnnealingLR(opt, T_max=4)], milestones=[3])` with lr 0.1 gives the
/// warm-up values, then a cosine restarted at the milestone from the base lr.
#[test]
fn sequential_warmup_then_cosine() {
    let mut opt = sgd(0.1);
    let warm = LinearLR::new(&mut opt, 0.1, 1.0, 3).unwrap();
    let cos = CosineAnnealingLR::new(&mut opt, 4, 0.0).unwrap();
    let mut seq =
        SequentialLR::new(&mut opt, vec![Box::new(warm), Box::new(cos)], vec![3]).unwrap();
    let mut lrs = vec![];
    for _ in 0..8 {
        lrs.push(opt.learning_rate());
        seq.step(&mut opt).unwrap();
    }
    let pi = std::f64::consts::PI;
    let cosv = |e: f64| 0.1 * (1.0 + (pi * e / 4.0).cos()) / 2.0;
    let want = [
        0.01,
        0.04,
        0.07,
        cosv(0.0),
        cosv(1.0),
        cosv(2.0),
        cosv(3.0),
        cosv(4.0),
    ];
    assert_close_slice(&lrs, &want, Tol::abs(1e-12).strict(), "lrs");
}

/// PyTorch: groups with lr 0.1 and 0.01 under `StepLR(step_size=1,
/// gamma=0.5)` each decay from their own base.
#[test]
fn per_group_base_lrs() {
    let v = |x: f32| Var::new(&[x], &Device::Cpu).unwrap();
    let cfg = |lr| minibatch_optim::SgdConfig {
        lr,
        ..Default::default()
    };
    let mut opt = Sgd::with_groups(vec![
        (vec![("a".into(), v(0.0))], cfg(0.1)),
        (vec![("b".into(), v(0.0))], cfg(0.01)),
    ])
    .unwrap();
    let mut s = minibatch_optim::StepLR::new(&mut opt, 1, 0.5).unwrap();
    s.step(&mut opt).unwrap();
    s.step(&mut opt).unwrap();
    let lrs: Vec<f64> = (0..2).map(|g| opt.group_lr(g).unwrap()).collect();
    assert_eq!(lrs, vec![0.025, 0.0025]);
    assert_eq!(s.last_lr(), lrs);
    // A schedule built for two groups refuses an optimizer with one.
    let mut single = sgd(0.1);
    assert!(s.step(&mut single).is_err());
}
