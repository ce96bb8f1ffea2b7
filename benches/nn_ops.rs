//! Forward + backward of minibatch-nn's softmax, log-softmax, layer norm, RMS
//! norm and rotary embeddings on transformer-like shapes, against the same
//! maths as composed candle ops (candle-nn's `ops::softmax`/`log_softmax`,
//! `layer_norm_slow`, `rms_norm_slow`, `rope_slow`, `rope_i_slow`: what a
//! candle model has to use to get gradients through these ops) and against
//! PyTorch eager, in the same run.
//!
//! Each step is `y = op(x)`, `loss = Σ y ⊙ r` (`r` a fixed random tensor),
//! `loss.backward()`, with `x` (and the norms' weight and bias) trainable,
//! the rope tables constant. PyTorch runs the same step
//! (`benches/torch_nn_ops.py`, `torch.set_num_threads(2)`).
//!
//! Before the criterion groups, the variants run interleaved (round after
//! round, so load from other processes hits all alike) and the best time per
//! step of each is printed with the ratios; the PyTorch script runs right
//! before and right after that (its best of both is used). Set
//! `MINIBATCH_TORCH_PYTHON` to the interpreter (default `~/.venv-torch/bin/python`);
//! without one, the PyTorch column is left out. `NN_OPS_ROUNDS` and
//! `NN_OPS_ITERS` (default 7 and 20) set the rounds and steps per round of
//! both; `RAYON_NUM_THREADS` sets the threads of both (default: candle's
//! count; PyTorch: 2). `NN_OPS_CASE=softmax` keeps the ops whose name
//! contains `softmax`.
//!
//! `cargo bench --bench nn_ops`

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_nn::{ops, rotary_emb, set_tensor_path};

/// One benchmarked op: its name (shared with the PyTorch script), and the
/// minibatch-nn version and the reference candle version of it.
struct Case {
    name: String,
    ours: Box<dyn Fn()>,
    theirs: Box<dyn Fn()>,
}

fn case(name: impl Into<String>, ours: impl Fn() + 'static, theirs: impl Fn() + 'static) -> Case {
    Case {
        name: name.into(),
        ours: Box::new(ours),
        theirs: Box::new(theirs),
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `Σ y ⊙ r`, backward; the gradients are dropped (black-boxed).
fn step(y: candle_core::Result<Tensor>, r: &Tensor) {
    let loss = (y.unwrap() * r).unwrap().sum_all().unwrap();
    black_box(loss.backward().unwrap());
}

type Rope = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

/// The inputs of every op.
#[derive(Clone)]
struct Inputs {
    x: Var,
    w: Var,
    b: Var,
    r: Tensor,
    s: Var,
    rs: Tensor,
    q: Var,
    rq: Tensor,
    qt: Var,
    rqt: Tensor,
    cos: Tensor,
    sin: Tensor,
}

fn inputs() -> Inputs {
    let theta = randn(&[64, 16], 8).affine(3.0, 0.0).unwrap();
    let var = |t: Tensor| Var::from_tensor(&t).unwrap();
    Inputs {
        // Norms: (16, 64, 128), weight and bias trainable.
        x: var(randn(&[16, 64, 128], 1)),
        w: var(randn(&[128], 2).affine(0.1, 1.0).unwrap()),
        b: var(randn(&[128], 3).affine(0.1, 0.0).unwrap()),
        r: randn(&[16, 64, 128], 4),
        // Attention scores: (16, 4, 64, 64).
        s: var(randn(&[16, 4, 64, 64], 5).affine(3.0, 0.0).unwrap()),
        rs: randn(&[16, 4, 64, 64], 6),
        // Rope on q: (16, 4, 64, 32) and (16, 64, 4, 32), tables (64, 16).
        q: var(randn(&[16, 4, 64, 32], 7)),
        rq: randn(&[16, 4, 64, 32], 9),
        qt: var(randn(&[16, 64, 4, 32], 10)),
        rqt: randn(&[16, 64, 4, 32], 11),
        cos: theta.cos().unwrap(),
        sin: theta.sin().unwrap(),
    }
}

const ROPES: [(&str, Rope, Rope); 2] = [
    (
        "rope (16,4,64,32)",
        rotary_emb::rope,
        candle_nn::rotary_emb::rope_slow,
    ),
    (
        "rope_i (16,4,64,32)",
        rotary_emb::rope_i,
        candle_nn::rotary_emb::rope_i_slow,
    ),
];

/// Training steps: minibatch-nn against the composed candle ops, and the
/// step without any op (`Σ x ⊙ r` and its backward: the part of every step
/// that is not the op).
fn step_cases(i: &Inputs) -> Vec<Case> {
    let mut v = Vec::new();
    let c = i.clone();
    let d = i.clone();
    v.push(case(
        "layer_norm (16,64,128)",
        move || step(ops::layer_norm(&c.x, &c.w, &c.b, 1e-5), &c.r),
        move || {
            step(
                candle_nn::ops::layer_norm_slow(&d.x, &d.w, &d.b, 1e-5),
                &d.r,
            )
        },
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "rms_norm (16,64,128)",
        move || step(ops::rms_norm(&c.x, &c.w, 1e-5), &c.r),
        move || step(candle_nn::ops::rms_norm_slow(&d.x, &d.w, 1e-5), &d.r),
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "no op (16,64,128)",
        move || step(Ok(c.x.as_tensor().clone()), &c.r),
        move || step(Ok(d.x.as_tensor().clone()), &d.r),
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "softmax_last_dim (16,4,64,64)",
        move || step(ops::softmax_last_dim(&c.s), &c.rs),
        move || step(candle_nn::ops::softmax(&d.s, 3), &d.rs),
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "log_softmax (16,4,64,64)",
        move || step(ops::log_softmax(&c.s, 3), &c.rs),
        move || step(candle_nn::ops::log_softmax(&d.s, 3), &d.rs),
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "no op (16,4,64,64)",
        move || step(Ok(c.s.as_tensor().clone()), &c.rs),
        move || step(Ok(d.s.as_tensor().clone()), &d.rs),
    ));
    for (name, ours, slow) in ROPES {
        let (c, d) = (i.clone(), i.clone());
        v.push(case(
            name,
            move || step(ours(&c.q, &c.cos, &c.sin), &c.rq),
            move || step(slow(&d.q, &d.cos, &d.sin), &d.rq),
        ));
    }
    // candle-nn has no composed rope_thd: this crate's tensor path is that formula.
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "rope_thd (16,64,4,32)",
        move || step(rotary_emb::rope_thd(&c.qt, &c.cos, &c.sin), &c.rqt),
        move || {
            set_tensor_path(true);
            step(rotary_emb::rope_thd(&d.qt, &d.cos, &d.sin), &d.rqt);
            set_tensor_path(false);
        },
    ));
    let (c, d) = (i.clone(), i.clone());
    v.push(case(
        "no op (16,4,64,32)",
        move || step(Ok(c.q.as_tensor().clone()), &c.rq),
        move || step(Ok(d.q.as_tensor().clone()), &d.rq),
    ));
    v
}

/// Forward passes on plain tensors (no graph): minibatch-nn's kernels
/// against candle-nn's fused ops (the ones without a backward pass).
fn forward_cases(i: &Inputs) -> Vec<Case> {
    let t = |v: &Var| v.as_tensor().detach();
    let (x, w, b, s, q, qt) = (t(&i.x), t(&i.w), t(&i.b), t(&i.s), t(&i.q), t(&i.qt));
    let (cos, sin) = (i.cos.clone(), i.sin.clone());
    let mut v = Vec::new();
    let (x1, w1, b1, x2, w2, b2) = (
        x.clone(),
        w.clone(),
        b.clone(),
        x.clone(),
        w.clone(),
        b.clone(),
    );
    v.push(case(
        "fwd layer_norm (16,64,128)",
        move || drop(black_box(ops::layer_norm(&x1, &w1, &b1, 1e-5).unwrap())),
        move || {
            drop(black_box(
                candle_nn::ops::layer_norm(&x2, &w2, &b2, 1e-5).unwrap(),
            ))
        },
    ));
    let (x1, w1, x2, w2) = (x.clone(), w.clone(), x.clone(), w.clone());
    v.push(case(
        "fwd rms_norm (16,64,128)",
        move || drop(black_box(ops::rms_norm(&x1, &w1, 1e-5).unwrap())),
        move || drop(black_box(candle_nn::ops::rms_norm(&x2, &w2, 1e-5).unwrap())),
    ));
    let (s1, s2) = (s.clone(), s.clone());
    v.push(case(
        "fwd softmax_last_dim (16,4,64,64)",
        move || drop(black_box(ops::softmax_last_dim(&s1).unwrap())),
        move || drop(black_box(candle_nn::ops::softmax_last_dim(&s2).unwrap())),
    ));
    let fused: [(&str, Rope, Rope, &Tensor); 3] = [
        (
            "fwd rope (16,4,64,32)",
            rotary_emb::rope,
            candle_nn::rotary_emb::rope,
            &q,
        ),
        (
            "fwd rope_i (16,4,64,32)",
            rotary_emb::rope_i,
            candle_nn::rotary_emb::rope_i,
            &q,
        ),
        (
            "fwd rope_thd (16,64,4,32)",
            rotary_emb::rope_thd,
            candle_nn::rotary_emb::rope_thd,
            &qt,
        ),
    ];
    for (name, ours, theirs, x) in fused {
        let (x1, c1, s1) = (x.clone(), cos.clone(), sin.clone());
        let (x2, c2, s2) = (x.clone(), cos.clone(), sin.clone());
        v.push(case(
            name,
            move || drop(black_box(ours(&x1, &c1, &s1).unwrap())),
            move || drop(black_box(theirs(&x2, &c2, &s2).unwrap())),
        ));
    }
    v
}

/// Seconds per call of `f`, timed over `iters` calls.
fn best_of(f: &dyn Fn(), iters: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

/// Runs the PyTorch twin; its lines are `name<TAB>best seconds`.
fn torch_times() -> Option<HashMap<String, f64>> {
    let python = common::torch_python()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_nn_ops.py");
    let out = Command::new(&python).arg(script).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "PyTorch script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let mut m = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((name, secs)) = line.split_once('\t') {
            if let Ok(s) = secs.trim().parse::<f64>() {
                m.insert(name.to_string(), s);
            }
        }
    }
    Some(m)
}

/// The best seconds per call of each case's two variants, over interleaved
/// rounds.
fn race(cases: &[Case], rounds: usize, iters: usize) -> Vec<(f64, f64)> {
    let mut best = vec![(f64::INFINITY, f64::INFINITY); cases.len()];
    for c in cases {
        // Warm-up: allocations, thread pools, caches.
        for _ in 0..5 {
            (c.ours)();
            (c.theirs)();
        }
    }
    for _ in 0..rounds {
        for (c, b) in cases.iter().zip(best.iter_mut()) {
            b.0 = b.0.min(best_of(&*c.ours, iters));
            b.1 = b.1.min(best_of(&*c.theirs, iters));
        }
    }
    best
}

fn table(
    title: &str,
    theirs: &str,
    cases: &[Case],
    best: &[(f64, f64)],
    torch: &Option<HashMap<String, f64>>,
) {
    println!("\n{title}");
    println!(
        "{:36} {:>11} {:>14} {:>11} {:>9} {:>11}",
        "op", "minibatch", theirs, "PyTorch", "vs candle", "vs PyTorch"
    );
    for (c, (ours, other)) in cases.iter().zip(best) {
        let t = torch.as_ref().and_then(|m| m.get(&c.name)).copied();
        let us = |s: f64| format!("{:.1} us", s * 1e6);
        println!(
            "{:36} {:>11} {:>14} {:>11} {:>8.2}x {:>11}",
            c.name,
            us(*ours),
            us(*other),
            t.map(us).unwrap_or_else(|| "-".into()),
            other / ours,
            t.map(|t| format!("{:.2}x", t / ours))
                .unwrap_or_else(|| "-".into()),
        );
    }
}

fn summary(steps: &[Case], forwards: &[Case]) {
    let (rounds, iters): (usize, usize) = (
        common::env_or("NN_OPS_ROUNDS", 7),
        common::env_or("NN_OPS_ITERS", 20),
    );
    let before = torch_times();
    let best_steps = race(steps, rounds, iters);
    let best_fwd = race(forwards, rounds, iters);
    let after = torch_times();
    let torch: Option<HashMap<String, f64>> = match (before, after) {
        (Some(a), Some(b)) => Some(
            a.into_iter()
                .map(|(k, v)| {
                    let w = b.get(&k).copied().unwrap_or(v);
                    (k, v.min(w))
                })
                .collect(),
        ),
        (a, b) => a.or(b),
    };
    let threads = candle_core::utils::get_num_threads();
    table(
        &format!("forward + backward per step, best of {rounds} interleaved rounds of {iters} steps ({threads} threads)"),
        "candle ops",
        steps,
        &best_steps,
        &torch,
    );
    table(
        "forward only, no graph",
        "candle-nn fused",
        forwards,
        &best_fwd,
        &torch,
    );
    println!("(ratios > 1: minibatch-nn is faster; \"no op\" is the step without the op: Σ x ⊙ r and its backward)\n");
}

fn bench(c: &mut Criterion) {
    let i = inputs();
    let (mut steps, mut forwards) = (step_cases(&i), forward_cases(&i));
    if let Ok(only) = std::env::var("NN_OPS_CASE") {
        steps.retain(|c| c.name.contains(&only));
        forwards.retain(|c| c.name.contains(&only));
    }
    summary(&steps, &forwards);
    for (cases, theirs) in [(&steps, "candle ops"), (&forwards, "candle-nn fused")] {
        for case in cases.iter() {
            let mut g = c.benchmark_group(&case.name);
            g.sample_size(20)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3));
            g.bench_function("minibatch-nn", |b| b.iter(|| (case.ours)()));
            g.bench_function(theirs, |b| b.iter(|| (case.theirs)()));
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
