//! One training step of the gpt example's model (`examples/gpt/model.rs`,
//! the example's default shape): forward, masked loss, backward,
//! `clip_grad_norm` 1.0 and an AdamW step, with
//!
//! * `minibatch`: the model from `minibatch::nn`'s layers (fused `Linear`,
//!   `LayerNorm`, `softmax_last_dim`, `log_softmax` with fused backward passes);
//! * `candle_ops`: the same model from plain candle tensor ops (candle-nn's
//!   `Linear`, its generic `ops::softmax`/`log_softmax`, a layer norm written in
//!   tensor ops: candle-nn's fused norm and `softmax_last_dim` have no
//!   backward, so this is what a candle model needs to train);
//! * PyTorch eager (`benches/torch_gpt_step.py`, 2 threads): the same ops
//!   (`manual`) and idiomatic PyTorch with `scaled_dot_product_attention` and
//!   `cross_entropy(ignore_index)` (`sdpa_ce`).
//!
//! Before the criterion group, the two candle variants run interleaved (round
//! after round, so load from other processes hits both alike) and their
//! minimum and median times per step are printed with the ratios to
//! PyTorch's, whose script runs right before and right after (the better of
//! the two runs counts). Then the peak memory: each variant runs in a fresh
//! process (this bench re-executes itself) that reports `VmHWM` from
//! `/proc/self/status` after the steps, and `VmHWM` minus the `VmRSS` just
//! before the first step (the step's own memory: activations, gradients,
//! optimizer state); the PyTorch script reports the same two figures.
//! `GPT_STEP_PHASES=1` also prints where the time of a step goes (forward,
//! backward, clip, optimizer).
//!
//! Set `MINIBATCH_TORCH_PYTHON` to the interpreter (default `~/.venv-torch/bin/python`);
//! without one, the PyTorch column is left out.
//!
//! `cargo bench --bench gpt_step`

mod common;
#[path = "../examples/gpt/model.rs"]
mod model;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{Device, Module, Tensor, Var};
use candle_nn::VarMap;
use criterion::Criterion;
use minibatch_optim::{clip_grad_norm, AdamConfig, AdamW, AdamWConfig, Norm, Optimizer};
use model::{defaults, masked_loss, Gpt, GptConfig, Layers};
use rand::{Rng, SeedableRng};

const VARIANTS: [(&str, Layers); 2] = [
    ("minibatch", Layers::Minibatch),
    ("candle_ops", Layers::CandleOps),
];

/// A model, its optimizer and one fixed batch.
struct Setup {
    model: Gpt,
    vars: Vec<Var>,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    _vm: VarMap,
}

fn setup(layers: Layers) -> Setup {
    let dev = Device::Cpu;
    let t = defaults::seq_len(defaults::DIGITS);
    let cfg = GptConfig {
        vocab: defaults::VOCAB,
        block: t,
        d_model: defaults::D_MODEL,
        n_head: defaults::HEADS,
        n_layer: defaults::LAYERS,
    };
    let (model, vm) = model::build(cfg, layers, &dev, 0).unwrap();
    let opt = AdamW::from_varmap(
        &vm,
        AdamWConfig {
            adam: AdamConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.99,
                weight_decay: 0.1,
                ..AdamWConfig::default().adam
            },
        },
    )
    .unwrap();
    let vars = opt.vars();
    let b = defaults::BATCH;
    let answer = defaults::answer_len(defaults::DIGITS);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..defaults::VOCAB as u32))
        .collect();
    let y: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..10)).collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t >= t - answer { 1.0 } else { 0.0 })
        .collect();
    Setup {
        model,
        vars,
        opt,
        x: Tensor::from_vec(x, (b, t), &dev).unwrap(),
        y: Tensor::from_vec(y, (b, t), &dev).unwrap(),
        mask: Tensor::from_vec(mask, (b, t), &dev).unwrap(),
        _vm: vm,
    }
}

/// Seconds spent in forward (with the loss), backward, clip and optimizer.
#[derive(Default, Clone, Copy)]
struct Phases([f64; 4]);

impl Setup {
    fn step(&mut self, phases: Option<&mut Phases>) {
        let t0 = Instant::now();
        let logits = self.model.forward(&self.x).unwrap();
        let loss = masked_loss(&self.model, &logits, &self.y, &self.mask).unwrap();
        let t1 = Instant::now();
        let mut grads = loss.backward().unwrap();
        let t2 = Instant::now();
        black_box(clip_grad_norm(&mut grads, &self.vars, 1.0, Norm::L2).unwrap());
        let t3 = Instant::now();
        self.opt.step(&grads).unwrap();
        let t4 = Instant::now();
        if let Some(p) = phases {
            for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)].iter().enumerate() {
                p.0[i] += (*b - *a).as_secs_f64();
            }
        }
    }
}

/// In the child process: runs the steps of one variant and prints
/// `VmHWM` and `VmHWM - VmRSS before the first step`, in MiB, and the CPU
/// time per step in ms (all threads; robust to load from other processes).
fn memory_child(name: &str) {
    let layers = VARIANTS.iter().find(|v| v.0 == name).expect("variant").1;
    let mut s = setup(layers);
    let rss0 = common::status_kib("VmRSS");
    for _ in 0..5 {
        s.step(None);
    }
    let (c0, n) = (common::cpu_seconds(), 40);
    for _ in 0..n {
        s.step(None);
    }
    let cpu_ms = 1e3 * (common::cpu_seconds() - c0) / n as f64;
    let hwm = common::status_kib("VmHWM");
    println!(
        "{:.1}\t{:.1}\t{cpu_ms:.1}",
        hwm as f64 / 1024.0,
        (hwm - rss0) as f64 / 1024.0
    );
}

/// `[peak MiB, step MiB, CPU ms per step]` of a variant, measured in a fresh process.
fn memory(name: &str) -> Option<[f64; 3]> {
    let out = common::fresh_process("GPT_STEP_MEMORY", name)?;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.trim().split('\t').map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// PyTorch's lines: `name -> [min ms, median ms, CPU ms per step, peak MiB, step MiB]`.
fn torch() -> Option<Vec<(String, [f64; 5])>> {
    let python = common::torch_python()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_gpt_step.py");
    let out = Command::new(&python).arg(script).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "torch_gpt_step.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split('\t');
        let name = f.next()?.to_string();
        let mut v = [0.0; 5];
        for x in v.iter_mut() {
            *x = f.next()?.parse().ok()?;
        }
        rows.push((name, v));
    }
    Some(rows)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn interleaved() {
    let torch_before = torch();
    let mut setups: Vec<Setup> = VARIANTS.iter().map(|v| setup(v.1)).collect();
    for s in setups.iter_mut() {
        for _ in 0..5 {
            s.step(None);
        }
    }
    let rounds = 12;
    let per_round = 5;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut phases = vec![Phases::default(); setups.len()];
    for _ in 0..rounds {
        for (i, s) in setups.iter_mut().enumerate() {
            for _ in 0..per_round {
                let t = Instant::now();
                s.step(Some(&mut phases[i]));
                times[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    drop(setups);
    let torch_after = torch();
    // The better (lower) of PyTorch's two runs, per variant and column.
    let torch: Option<Vec<(String, [f64; 5])>> = match (torch_before, torch_after) {
        (Some(a), Some(b)) => Some(
            a.into_iter()
                .zip(b)
                .map(|((n, x), (_, y))| {
                    let v = [
                        x[0].min(y[0]),
                        x[1].min(y[1]),
                        x[2].min(y[2]),
                        x[3].max(y[3]),
                        x[4].max(y[4]),
                    ];
                    (n, v)
                })
                .collect(),
        ),
        (a, b) => a.or(b),
    };
    let n = (rounds * per_round) as f64;
    println!(
        "gpt step (batch {}, {} tokens, d_model {}, {} heads, {} layers), ms per step, {} interleaved steps each:",
        defaults::BATCH,
        defaults::seq_len(defaults::DIGITS),
        defaults::D_MODEL,
        defaults::HEADS,
        defaults::LAYERS,
        rounds * per_round
    );
    println!(
        "  {:<18} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "variant", "min", "median", "CPU ms", "peak MiB", "step MiB"
    );
    let mut mins = Vec::new();
    for (i, (name, _)) in VARIANTS.iter().enumerate() {
        let min = times[i].iter().copied().fold(f64::INFINITY, f64::min);
        let med = median(&mut times[i]);
        let [peak, step, cpu] = memory(name).unwrap_or([f64::NAN; 3]);
        mins.push((min, med, cpu));
        println!("  {name:<18} {min:>9.3} {med:>9.3} {cpu:>9.1} {peak:>10.1} {step:>10.1}");
    }
    if let Some(rows) = &torch {
        for (name, v) in rows {
            println!(
                "  {:<18} {:>9.3} {:>9.3} {:>9.1} {:>10.1} {:>10.1}",
                format!("torch_{name}"),
                v[0],
                v[1],
                v[2],
                v[3],
                v[4]
            );
        }
        for (name, v) in rows {
            println!(
                "  torch_{name} / minibatch: {:.2}x on min, {:.2}x on median, {:.2}x on CPU time (> 1: minibatch faster)",
                v[0] / mins[0].0,
                v[1] / mins[0].1,
                v[2] / mins[0].2
            );
        }
    }
    println!(
        "  candle_ops / minibatch: {:.2}x on min, {:.2}x on median",
        mins[1].0 / mins[0].0,
        mins[1].1 / mins[0].1
    );
    if std::env::var_os("GPT_STEP_PHASES").is_some() {
        for (i, (name, _)) in VARIANTS.iter().enumerate() {
            let p = phases[i].0;
            let ms = |s: f64| 1e3 * s / n;
            println!(
                "  {name} phases (mean ms): forward+loss {:.3}, backward {:.3}, clip {:.3}, AdamW {:.3}",
                ms(p[0]),
                ms(p[1]),
                ms(p[2]),
                ms(p[3])
            );
        }
    }
}

fn main() {
    if let Ok(name) = std::env::var("GPT_STEP_MEMORY") {
        memory_child(&name);
        return;
    }
    // `cargo test --benches` / `--list` run the binary too: no timing there.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--test" || a == "--list") {
        interleaved();
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut g = c.benchmark_group("gpt_step");
    for (name, layers) in VARIANTS {
        let mut s = setup(layers);
        g.bench_function(name, |b| b.iter(|| s.step(None)));
    }
    g.finish();
    c.final_summary();
}
