//! `OneCycleLR` momentum cycling (`cycle_momentum`, PyTorch's default):
//! trajectories against PyTorch's closed form, β₁ for Adam, errors for
//! optimizers without momentum, and resuming from saved state.

use candle_core::{Device, Var};
use minibatch_optim::schedule::{from_pytorch, Anneal};
use minibatch_optim::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, LrScheduler, OneCycleLR,
    OneCycleOptions, Optimizer, RmsProp, RmsPropConfig, Sgd, SgdConfig,
};
use minibatch_testkit::{assert_close_slice, Tol};

const PI: f64 = std::f64::consts::PI;

fn var() -> Var {
    Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap()
}

fn sgd(momentum: f64) -> Sgd {
    Sgd::new(
        vec![var()],
        SgdConfig {
            lr: 0.1,
            momentum,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `|a − b| ≤ 1e-12`.
const TOL: Tol = Tol::abs(1e-12);

/// PyTorch's `_annealing_cos(start, end, pct)`.
fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

/// Momentum of the two-phase cos schedule, written out independently:
/// phase 1 (steps 0..=p1) max -> base, phase 2 (p1..=total-1) base -> max.
fn two_phase_momentum(step: u64, total: u64, pct_start: f64, base: f64, max: f64) -> f64 {
    let p1 = pct_start * total as f64 - 1.0;
    let s = step as f64;
    if s <= p1 {
        cos_anneal(max, base, s / p1)
    } else {
        cos_anneal(base, max, (s - p1) / (total as f64 - 1.0 - p1))
    }
}

/// One optimizer step on `sum((w - 3)^2)`.
fn train_step(opt: &mut dyn Optimizer) {
    let w = opt.vars()[0].clone();
    let loss = (w.as_tensor() - 3.0)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    opt.backward_step(&loss).unwrap();
}

fn values(opt: &dyn Optimizer) -> Vec<f64> {
    opt.vars()[0].as_tensor().to_vec1().unwrap()
}

#[test]
fn sgd_momentum_follows_pytorch_two_phase_cycle() {
    // PyTorch builds SGD with momentum 0 and OneCycleLR still sets 0.95.
    let mut opt = sgd(0.0);
    let mut sched = OneCycleLR::new(&mut opt, 0.1, 20).unwrap();
    let mut got = vec![];
    for step in 0..20u64 {
        let m = opt.momentum(0).unwrap();
        got.push(m);
        assert_eq!(sched.last_momentum(), vec![m]);
        assert_eq!(opt.rule(0).unwrap().momentum, m, "rule in sync at {step}");
        let want = two_phase_momentum(step, 20, 0.3, 0.85, 0.95);
        assert!(
            TOL.accepts(m, want),
            "step {step}: momentum {m}, want {want}"
        );
        train_step(&mut opt);
        sched.step(&mut opt).unwrap();
    }
    // Hand-checked points: start at max_momentum, bottom at the end of the
    // warm-up (step 0.3 * 20 - 1 = 5, where the lr peaks), back at the top on
    // the last step, half-way (0.90) in the middle of phase 2 (step 12).
    assert!(TOL.accepts(got[0], 0.95));
    assert!(TOL.accepts(got[5], 0.85));
    assert!(TOL.accepts(got[12], 0.90));
    assert!(TOL.accepts(got[19], 0.95));
    // Momentum is monotone within each phase.
    assert!(got[..6].windows(2).all(|w| w[1] < w[0]), "{got:?}");
    assert!(got[5..].windows(2).all(|w| w[1] > w[0]), "{got:?}");
    // The momentum switched on at construction created a momentum buffer.
    assert!(opt
        .state_tensor("param.0", "momentum_buffer")
        .unwrap()
        .is_some());
}

#[test]
fn lr_peaks_where_momentum_bottoms() {
    let mut opt = sgd(0.9);
    let mut sched = OneCycleLR::new(&mut opt, 0.1, 20).unwrap();
    for _ in 0..5 {
        sched.step(&mut opt).unwrap();
    }
    assert!(TOL.accepts(opt.learning_rate(), 0.1));
    assert!(TOL.accepts(opt.momentum(0).unwrap(), 0.85));
}

#[test]
fn the_optimizer_uses_the_scheduled_momentum() {
    // A run with OneCycleLR equals a run that sets the same lr and momentum
    // by hand before each step.
    let mut a = sgd(0.0);
    let mut sched = OneCycleLR::new(&mut a, 0.1, 10).unwrap();
    let mut b = sgd(0.0);
    for step in 0..10u64 {
        let m = two_phase_momentum(step, 10, 0.3, 0.85, 0.95);
        b.set_momentum(0, m).unwrap();
        b.set_learning_rate(a.learning_rate());
        train_step(&mut a);
        train_step(&mut b);
        let (va, vb) = (values(&a), values(&b));
        assert_close_slice(&va, &vb, Tol::abs(1e-14), &format!("step {step}"));
        sched.step(&mut a).unwrap();
    }
}

#[test]
fn three_phase_linear_momentum() {
    let mut opt = sgd(0.9);
    let opts = OneCycleOptions {
        anneal: Anneal::Linear,
        three_phase: true,
        base_momentum: 0.8,
        max_momentum: 0.9,
        ..Default::default()
    };
    let mut sched = OneCycleLR::with_options(&mut opt, 1.0, 10, opts).unwrap();
    // Phase ends: 0.3*10-1 = 2, 2*0.3*10-2 = 4, 9. Momentum: 0.9 -> 0.8
    // over steps 0..2, 0.8 -> 0.9 over 2..4, then 0.9.
    let want = [0.9, 0.85, 0.8, 0.85, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9];
    for (step, w) in want.iter().enumerate() {
        let m = opt.momentum(0).unwrap();
        assert!(TOL.accepts(m, *w), "step {step}: {m} vs {w}");
        sched.step(&mut opt).unwrap();
    }
}

#[test]
fn adam_and_adamw_cycle_beta1_only() {
    let mut adam = Adam::new(vec![var()], AdamConfig::default()).unwrap();
    let mut sched = OneCycleLR::new(&mut adam, 0.01, 10).unwrap();
    for step in 0..10u64 {
        let want = two_phase_momentum(step, 10, 0.3, 0.85, 0.95);
        let r = adam.rule(0).unwrap();
        assert!(
            TOL.accepts(r.beta1, want),
            "Adam step {step}: {} vs {want}",
            r.beta1
        );
        assert_eq!(r.beta2, 0.999);
        assert_eq!(adam.momentum(0), Some(r.beta1));
        train_step(&mut adam);
        sched.step(&mut adam).unwrap();
    }
    let mut adamw = AdamW::new(vec![var()], AdamWConfig::default()).unwrap();
    let mut sched = OneCycleLR::new(&mut adamw, 0.01, 10).unwrap();
    assert_eq!(adamw.rule(0).unwrap().adam.beta1, 0.95);
    sched.step(&mut adamw).unwrap();
    sched.step(&mut adamw).unwrap();
    assert!(TOL.accepts(adamw.rule(0).unwrap().adam.beta1, 0.85));
    assert_eq!(adamw.rule(0).unwrap().adam.beta2, 0.999);
}

#[test]
fn rmsprop_momentum_switched_on_before_the_first_step() {
    let mut opt = RmsProp::new(vec![var()], RmsPropConfig::default()).unwrap();
    let mut sched = OneCycleLR::new(&mut opt, 0.01, 5).unwrap();
    assert_eq!(opt.momentum(0), Some(0.95));
    for _ in 0..5 {
        train_step(&mut opt);
        sched.step(&mut opt).unwrap();
    }
    assert!(opt
        .state_tensor("param.0", "momentum_buffer")
        .unwrap()
        .is_some());
}

#[test]
fn adagrad_needs_cycle_momentum_off() {
    let mut opt = Adagrad::new(vec![var()], AdagradConfig::default()).unwrap();
    let e = OneCycleLR::new(&mut opt, 0.1, 10).err().unwrap();
    assert!(e.to_string().contains("momentum or beta1"), "{e}");
    let e = from_pytorch(
        &mut opt,
        "OneCycleLR",
        &serde_json::json!({"max_lr": 0.1, "total_steps": 10}),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("cycle_momentum"), "{e}");
    let opts = OneCycleOptions {
        cycle_momentum: false,
        ..Default::default()
    };
    let mut sched = OneCycleLR::with_options(&mut opt, 0.1, 10, opts).unwrap();
    assert!(TOL.accepts(opt.learning_rate(), 0.004));
    assert!(sched.last_momentum().is_empty());
    for _ in 0..10 {
        train_step(&mut opt);
        sched.step(&mut opt).unwrap();
    }
    assert_eq!(opt.momentum(0), None);
}

#[test]
fn cycle_momentum_false_leaves_momentum_alone() {
    let mut opt = sgd(0.9);
    let opts = OneCycleOptions {
        cycle_momentum: false,
        ..Default::default()
    };
    let mut sched = OneCycleLR::with_options(&mut opt, 0.1, 10, opts).unwrap();
    for _ in 0..10 {
        assert_eq!(opt.momentum(0), Some(0.9));
        train_step(&mut opt);
        sched.step(&mut opt).unwrap();
    }
    let mut opt = sgd(0.9);
    let mut sched = from_pytorch(
        &mut opt,
        "OneCycleLR",
        &serde_json::json!({"max_lr": 0.1, "total_steps": 4, "cycle_momentum": false}),
    )
    .unwrap();
    sched.step(&mut opt).unwrap();
    assert_eq!(opt.momentum(0), Some(0.9));
}

#[test]
fn from_pytorch_reads_the_momentum_kwargs() {
    let mut opt = sgd(0.0);
    let mut sched = from_pytorch(
        &mut opt,
        "OneCycleLR",
        &serde_json::json!({"max_lr": 0.1, "total_steps": 20,
                            "base_momentum": 0.7, "max_momentum": 0.9}),
    )
    .unwrap();
    assert_eq!(opt.momentum(0), Some(0.9));
    for _ in 0..5 {
        sched.step(&mut opt).unwrap();
    }
    assert!(TOL.accepts(opt.momentum(0).unwrap(), 0.7));
    let e = from_pytorch(
        &mut opt,
        "OneCycleLR",
        &serde_json::json!({"max_lr": 0.1, "total_steps": 20, "base_momentum": "x"}),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("base_momentum"), "{e}");
}

#[test]
fn nesterov_and_invalid_momentum_bounds() {
    let nesterov = || {
        Sgd::new(
            vec![var()],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let mut opt = nesterov();
    let mut sched = OneCycleLR::new(&mut opt, 0.1, 10).unwrap();
    for _ in 0..10 {
        train_step(&mut opt);
        sched.step(&mut opt).unwrap();
    }
    // Nesterov needs momentum > 0: a cycle reaching 0 is refused up front and
    // the optimizer keeps its momentum.
    let mut opt = nesterov();
    let opts = OneCycleOptions {
        base_momentum: 0.0,
        ..Default::default()
    };
    let e = OneCycleLR::with_options(&mut opt, 0.1, 10, opts)
        .err()
        .unwrap();
    assert!(e.to_string().contains("nesterov"), "{e}");
    assert_eq!(opt.momentum(0), Some(0.9));
    // Adam's beta1 must stay below 1.
    let mut adam = Adam::new(vec![var()], AdamConfig::default()).unwrap();
    let opts = OneCycleOptions {
        max_momentum: 1.0,
        ..Default::default()
    };
    assert!(OneCycleLR::with_options(&mut adam, 0.1, 10, opts).is_err());
    assert_eq!(adam.rule(0).unwrap().beta1, 0.9);
}

#[test]
fn set_momentum_errors() {
    let mut opt = sgd(0.9);
    assert!(opt.set_momentum(1, 0.5).is_err());
    assert_eq!(opt.momentum(1), None);
    assert!(opt.set_momentum(0, -0.5).is_err());
    assert_eq!(opt.momentum(0), Some(0.9));
    train_step(&mut opt);
    // Changing a value keeps the buffers: fine.
    opt.set_momentum(0, 0.5).unwrap();
    assert_eq!(opt.momentum(0), Some(0.5));
    // Dropping the momentum buffer of a parameter with state is refused.
    let e = opt.set_momentum(0, 0.0).err().unwrap();
    assert!(e.to_string().contains("state"), "{e}");
    assert_eq!(opt.momentum(0), Some(0.5));
    train_step(&mut opt);
    // Adagrad has no momentum.
    let mut ada = Adagrad::new(vec![var()], AdagradConfig::default()).unwrap();
    assert!(ada.set_momentum(0, 0.9).is_err());
}

#[test]
fn momentum_survives_a_save_and_load() {
    let total = 12u64;
    // Straight run.
    let mut a = sgd(0.0);
    let mut sa = OneCycleLR::new(&mut a, 0.1, total).unwrap();
    let mut straight = vec![];
    for _ in 0..total {
        train_step(&mut a);
        sa.step(&mut a).unwrap();
        straight.push((values(&a), a.momentum(0).unwrap(), a.learning_rate()));
    }
    // Stopped half-way, saved, resumed into a fresh optimizer and schedule.
    let half = 5;
    let mut b = sgd(0.0);
    let mut sb = OneCycleLR::new(&mut b, 0.1, total).unwrap();
    for _ in 0..half {
        train_step(&mut b);
        sb.step(&mut b).unwrap();
    }
    let state = sb.state();
    assert!(state["last_momentum"].is_array(), "{state}");
    let bytes = b.state_bytes().unwrap();
    let mut c = sgd(0.0);
    let mut sc = OneCycleLR::new(&mut c, 0.1, total).unwrap();
    sc.load_state(&serde_json::from_str(&state.to_string()).unwrap())
        .unwrap();
    c.load_state_bytes(&bytes).unwrap();
    // The parameters themselves are the model's checkpoint.
    c.vars()[0].set(b.vars()[0].as_tensor()).unwrap();
    assert_eq!(c.momentum(0), b.momentum(0));
    assert_eq!(sc.last_momentum(), sb.last_momentum());
    for (i, (v, m, lr)) in straight.iter().enumerate().skip(half) {
        train_step(&mut c);
        sc.step(&mut c).unwrap();
        assert_eq!(&values(&c), v, "step {i}");
        assert_eq!(c.momentum(0).unwrap().to_bits(), m.to_bits(), "step {i}");
        assert_eq!(c.learning_rate().to_bits(), lr.to_bits(), "step {i}");
    }
    // A state saved with momentum cycling off does not load into one with it on.
    let mut d = sgd(0.9);
    let off = OneCycleLR::with_options(
        &mut d,
        0.1,
        total,
        OneCycleOptions {
            cycle_momentum: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(sc.load_state(&off.state()).is_err());
    // A state from before momentum cycling (no momentum keys) still loads.
    let mut old = off.state();
    for k in ["cycle_momentum", "momentums", "last_momentum"] {
        old.as_object_mut().unwrap().remove(k);
    }
    sc.load_state(&old).unwrap();
}
