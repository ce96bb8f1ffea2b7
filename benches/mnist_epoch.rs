//! One MNIST epoch (60,000 rows, batch 64, SGD lr 0.05 momentum 0.9) of the
//! two MLPs of issue 9's performance targets, 784-128-10 and 784-512-512-10,
//! three ways, interleaved in one run:
//!
//! * `candle loop`: a plain candle loop (`candle_nn::Linear`, `Tensor::relu`,
//!   `candle_nn::loss::cross_entropy`, our loader and SGD): the baseline;
//! * `nn loop`: the same loop with `minibatch::nn`'s `Linear`, `ops::relu`
//!   and `loss::cross_entropy`;
//! * `Trainer`: `Trainer::fit` over the `minibatch::nn` model with its
//!   defaults (fused cross-entropy, top-1 accuracy on every batch, history).
//!
//! Then PyTorch's figures of the same session: `torch_e2e.py` (the recipe's
//! DataLoader and hand-indexed loops, best of 3 epochs) is run right before
//! and right after our rounds when `../shared/peers/torch_e2e.py` and the
//! interpreter (`MINIBATCH_TORCH_PYTHON`, default `~/.venv-torch/bin/python`)
//! exist, and the ratios to its best (hand-indexed) loop are printed.
//!
//! **Peak memory per step**: each configuration also runs in a fresh child
//! process (this binary, re-run with `MNIST_MEM_CHILD` set): after loading
//! the data, building the model and one warm-up step, it resets the kernel's
//! high-water mark (`echo 5 > /proc/self/clear_refs`), runs 200 steps and
//! reports `VmHWM - VmRSS` (the peak resident memory the steps added on top
//! of data, weights and optimizer state) and the whole process's `VmHWM`.
//! PyTorch's is measured by the same procedure in a child Python process.
//!
//! Before all that, one epoch of each hand-written loop is timed phase by
//! phase (fetch / forward+loss / backward / step) for the 784-512-512-10 MLP.
//!
//! `cargo bench --bench mnist_epoch`; `MNIST_BENCH_ROUNDS` (default 5)
//! rounds; `MNIST_BENCH_CRITERION=0` skips the criterion groups;
//! `MNIST_BENCH_ONLY=trainer` only runs `MNIST_BENCH_ROUNDS` Trainer epochs of
//! both MLPs (for profilers).

mod common;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_data::{mnist, DataLoader, TensorDataset};
use minibatch_optim::{Optimizer, Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};

const MLPS: [&[usize]; 2] = [&[784, 128, 10], &[784, 512, 512, 10]];

/// Which layers, activation and loss the MLP is built from.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Candle,
    Nn,
}

/// The ways an epoch is run.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    CandleLoop,
    NnLoop,
    Trainer,
}

const VARIANTS: [Variant; 3] = [Variant::CandleLoop, Variant::NnLoop, Variant::Trainer];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::CandleLoop => "candle loop",
            Variant::NnLoop => "nn loop",
            Variant::Trainer => "Trainer",
        }
    }
    fn kind(self) -> Kind {
        match self {
            Variant::CandleLoop => Kind::Candle,
            _ => Kind::Nn,
        }
    }
}

struct Mlp {
    layers: Vec<Box<dyn Module>>,
    kind: Kind,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = match self.kind {
                    Kind::Candle => h.relu()?,
                    Kind::Nn => minibatch_nn::ops::relu(&h)?,
                };
            }
        }
        Ok(h)
    }
}

fn loss(kind: Kind, logits: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    match kind {
        Kind::Candle => candle_nn::loss::cross_entropy(logits, y),
        Kind::Nn => minibatch_nn::loss::cross_entropy(logits, y),
    }
}

fn data() -> TensorDataset {
    mnist::load(common::mnist_dir(), &Device::Cpu).unwrap().0
}

fn setup(ds: &TensorDataset, sizes: &[usize], kind: Kind) -> (Mlp, VarMap, DataLoader, Sgd) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let layers = sizes
        .windows(2)
        .enumerate()
        .map(|(i, io)| -> Box<dyn Module> {
            let vb = vb.pp(format!("fc{i}"));
            match kind {
                Kind::Candle => Box::new(candle_nn::linear(io[0], io[1], vb).unwrap()),
                Kind::Nn => Box::new(minibatch_nn::linear(io[0], io[1], vb).unwrap()),
            }
        })
        .collect();
    let loader = DataLoader::builder(ds.clone())
        .batch_size(64)
        .shuffle(0)
        .build()
        .unwrap();
    let config = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let opt = Sgd::from_varmap(&vm, config).unwrap();
    (Mlp { layers, kind }, vm, loader, opt)
}

fn trainer(ds: &TensorDataset, sizes: &[usize]) -> Trainer<Mlp> {
    let (m, vm, loader, opt) = setup(ds, sizes, Kind::Nn);
    Trainer::builder(m, vm, loader, opt)
        .progress(ProgressMode::Silent)
        .epochs(0)
        .build()
        .unwrap()
}

/// One epoch of a hand-written loop, `max_steps` at most.
fn hand_loop(m: &Mlp, loader: &DataLoader, opt: &mut Sgd, epoch: u64, max_steps: usize) -> f32 {
    let mut last = 0f32;
    for b in loader.epoch(epoch).take(max_steps) {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let l = loss(m.kind, &m.forward(&x).unwrap(), &y).unwrap();
        opt.backward_step(&l).unwrap();
        last = l.to_scalar::<f32>().unwrap();
    }
    last
}

fn tag(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("-")
}

/// Phase timers of one epoch of a hand-written loop.
fn phases(ds: &TensorDataset, sizes: &[usize], kind: Kind) {
    let (m, _vm, loader, mut opt) = setup(ds, sizes, kind);
    hand_loop(&m, &loader, &mut opt, 0, usize::MAX); // warm-up
    let (mut fetch, mut fwd, mut bwd, mut step) = (0f64, 0f64, 0f64, 0f64);
    let t = Instant::now();
    let mut it = loader.epoch(1);
    loop {
        let t0 = Instant::now();
        let Some(b) = it.next() else { break };
        let (x, y) = b.unwrap().into_pair().unwrap();
        let t1 = Instant::now();
        let l = loss(kind, &m.forward(&x).unwrap(), &y).unwrap();
        let _ = l.to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        let grads = l.backward().unwrap();
        let t3 = Instant::now();
        opt.step(&grads).unwrap();
        let t4 = Instant::now();
        fetch += (t1 - t0).as_secs_f64();
        fwd += (t2 - t1).as_secs_f64();
        bwd += (t3 - t2).as_secs_f64();
        step += (t4 - t3).as_secs_f64();
    }
    let total = t.elapsed().as_secs_f64();
    let name = if kind == Kind::Candle {
        "candle loop"
    } else {
        "nn loop"
    };
    println!(
        "phases, MLP {}, {name}: {total:.3} s: fetch {:.1}%, forward+loss {:.1}%, backward {:.1}%, step {:.1}%",
        tag(sizes),
        100.0 * fetch / total,
        100.0 * fwd / total,
        100.0 * bwd / total,
        100.0 * step / total
    );
}

/// Best and median of a list of seconds.
fn best_median(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2])
}

/// `rounds` interleaved epochs of every (MLP, variant); returns the best
/// epoch of each.
fn interleaved(ds: &TensorDataset, rounds: usize) -> Vec<Vec<f64>> {
    let mut hands: Vec<Vec<_>> = MLPS
        .iter()
        .map(|s| vec![setup(ds, s, Kind::Candle), setup(ds, s, Kind::Nn)])
        .collect();
    let mut trainers: Vec<_> = MLPS.iter().map(|s| trainer(ds, s)).collect();
    let mut times = vec![vec![Vec::new(); VARIANTS.len()]; MLPS.len()];
    for r in 0..rounds as u64 {
        for (k, _) in MLPS.iter().enumerate() {
            for (v, variant) in VARIANTS.iter().enumerate() {
                let t = Instant::now();
                match variant {
                    Variant::Trainer => {
                        trainers[k].set_epochs(r + 1);
                        trainers[k].fit().unwrap();
                    }
                    _ => {
                        let (m, _vm, loader, opt) = &mut hands[k][v];
                        hand_loop(m, loader, opt, r, usize::MAX);
                    }
                }
                times[k][v].push(t.elapsed().as_secs_f64());
            }
        }
    }
    let mut best = vec![];
    for (k, sizes) in MLPS.iter().enumerate() {
        let mut row = vec![];
        for (v, variant) in VARIANTS.iter().enumerate() {
            let (b, med) = best_median(&times[k][v]);
            println!(
                "MLP {:>14} {:12} best {b:.4} s  median {med:.4} s  {:.0} samples/s  (all: {})",
                tag(sizes),
                variant.name(),
                60000.0 / b,
                times[k][v]
                    .iter()
                    .map(|t| format!("{t:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            row.push(b);
        }
        println!(
            "MLP {:>14} Trainer (minibatch::nn) vs plain candle loop: {:.2}x faster",
            tag(sizes),
            row[0] / row[2]
        );
        best.push(row);
    }
    best
}

/// PyTorch's best epoch per (MLP, loop) from `torch_e2e.py`, if it can run.
fn torch_e2e() -> Vec<(String, String, f64)> {
    let script = common::peers_dir().join("torch_e2e.py");
    let Some(python) = common::torch_python().filter(|_| script.exists()) else {
        println!(
            "PyTorch figures skipped: no {}, or no interpreter (${})",
            script.display(),
            common::TORCH_PYTHON_VAR
        );
        return vec![];
    };
    let data = common::mnist_dir();
    let out = Command::new(&python)
        .arg(&script)
        .arg(&data)
        .arg("3")
        .output()
        .expect("run torch_e2e.py");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = vec![];
    for line in text.lines() {
        println!("  {line}");
        // torch     MLP 784-128-10 index loop    best 0.3712s median ...
        let Some(rest) = line.strip_prefix("torch     MLP ") else {
            continue;
        };
        let (tag, rest) = rest.split_once(' ').unwrap_or_default();
        let Some((mode, rest)) = rest.split_once(" best ") else {
            continue;
        };
        let secs = rest
            .split('s')
            .next()
            .and_then(|s| s.trim().parse::<f64>().ok());
        if let Some(secs) = secs {
            res.push((tag.to_string(), mode.trim().to_string(), secs));
        }
    }
    res
}

/// The child process of the memory measurement: prints
/// `MEM <step peak kB> <process VmHWM kB>`.
fn memory_child(spec: &str) {
    let (k, v) = spec.split_once(':').unwrap();
    let sizes = MLPS[k.parse::<usize>().unwrap()];
    let variant = VARIANTS[v.parse::<usize>().unwrap()];
    let ds = data();
    let steps = 200;
    let (m, vm, loader, mut opt) = setup(&ds, sizes, variant.kind());
    let batches: Vec<_> = loader
        .epoch(0)
        .take(steps + 1)
        .map(|b| b.unwrap())
        .collect();
    drop(loader);
    let (peak, hwm) = if variant == Variant::Trainer {
        // The Trainer's step mechanics (train_batch: step, loss, accuracy,
        // backward, optimizer step) over the same batches.
        let loader = DataLoader::builder(ds.clone())
            .batch_size(64)
            .build()
            .unwrap();
        let mut t = Trainer::builder(m, vm, loader, opt)
            .progress(ProgressMode::Silent)
            .build()
            .unwrap();
        t.train_batch(&batches[0]).unwrap();
        common::reset_peak();
        let base = common::status_kib("VmRSS");
        for b in &batches[1..] {
            t.train_batch(b).unwrap();
        }
        let hwm = common::status_kib("VmHWM");
        (hwm.saturating_sub(base), hwm)
    } else {
        let step = |opt: &mut Sgd, b: &minibatch_data::Batch| {
            let (x, y) = b.clone().into_pair().unwrap();
            let l = loss(m.kind, &m.forward(&x).unwrap(), &y).unwrap();
            opt.backward_step(&l).unwrap();
            l.to_scalar::<f32>().unwrap()
        };
        step(&mut opt, &batches[0]);
        common::reset_peak();
        let base = common::status_kib("VmRSS");
        for b in &batches[1..] {
            step(&mut opt, b);
        }
        let hwm = common::status_kib("VmHWM");
        (hwm.saturating_sub(base), hwm)
    };
    println!("MEM {peak} {hwm}");
}

/// PyTorch's MLP step under the same measurement (hand-indexed loop).
const TORCH_MEM: &str = r#"
import sys, os
sys.path.insert(0, sys.argv[1])
import torch
from mnist_np import load
torch.set_num_threads(2)
def kb(field):
    for l in open('/proc/self/status'):
        if l.startswith(field): return int(l.split()[1])
sizes = [int(s) for s in sys.argv[3].split('-')]
x, y, _, _ = load(sys.argv[2]); X, Y = torch.from_numpy(x), torch.from_numpy(y)
torch.manual_seed(0)
layers = []
for i, o in zip(sizes[:-1], sizes[1:]):
    layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1])
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
lossf = torch.nn.CrossEntropyLoss()
p = torch.randperm(len(X))
def step(i):
    xb, yb = X[p[i:i + 64]], Y[p[i:i + 64]]
    loss = lossf(model(xb), yb)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss.item()
step(0)
open('/proc/self/clear_refs', 'w').write('5')
base = kb('VmRSS:')
for s in range(1, 201):
    step(64 * s)
hwm = kb('VmHWM:')
print('MEM', hwm - base, hwm)
"#;

fn parse_mem(out: &[u8]) -> Option<(u64, u64)> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().find(|l| l.starts_with("MEM "))?;
    let mut it = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Peak memory per step of every (MLP, variant) and of PyTorch, each in a
/// fresh process.
fn memory() {
    println!("peak memory per step (VmHWM growth over 200 steps after one warm-up step, fresh process each):");
    for (k, sizes) in MLPS.iter().enumerate() {
        for (v, variant) in VARIANTS.iter().enumerate() {
            let out = common::fresh_process("MNIST_MEM_CHILD", &format!("{k}:{v}"))
                .expect("run the memory child");
            match parse_mem(&out.stdout) {
                Some((peak, hwm)) => println!(
                    "  MLP {:>14} {:12} step peak {:7.1} MiB   process VmHWM {:7.1} MiB",
                    tag(sizes),
                    variant.name(),
                    peak as f64 / 1024.0,
                    hwm as f64 / 1024.0
                ),
                None => println!(
                    "  MLP {} {}: no figure ({})",
                    tag(sizes),
                    variant.name(),
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        if let Some(python) = common::torch_python() {
            let data = common::mnist_dir();
            let out = Command::new(&python)
                .arg("-c")
                .arg(TORCH_MEM)
                .arg(common::peers_dir())
                .arg(&data)
                .arg(tag(sizes))
                .output()
                .expect("run python");
            match parse_mem(&out.stdout) {
                Some((peak, hwm)) => println!(
                    "  MLP {:>14} {:12} step peak {:7.1} MiB   process VmHWM {:7.1} MiB",
                    tag(sizes),
                    "PyTorch",
                    peak as f64 / 1024.0,
                    hwm as f64 / 1024.0
                ),
                None => println!(
                    "  PyTorch: no figure ({})",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    if let Ok(spec) = std::env::var("MNIST_MEM_CHILD") {
        memory_child(&spec);
        std::process::exit(0);
    }
    let ds = data();
    let rounds: usize = common::env_or("MNIST_BENCH_ROUNDS", 5);
    if std::env::var("MNIST_BENCH_ONLY").as_deref() == Ok("trainer") {
        for sizes in MLPS {
            let mut t = trainer(&ds, sizes);
            for r in 0..rounds as u64 {
                let start = Instant::now();
                t.set_epochs(r + 1);
                t.fit().unwrap();
                println!(
                    "Trainer MLP {}: {:.3} s",
                    tag(sizes),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        std::process::exit(0);
    }
    phases(&ds, MLPS[1], Kind::Candle);
    phases(&ds, MLPS[1], Kind::Nn);
    let torch_before = torch_e2e();
    let best = interleaved(&ds, rounds);
    let torch_after = torch_e2e();
    for (k, sizes) in MLPS.iter().enumerate() {
        let t = tag(sizes);
        let pick = |mode: &str| {
            torch_before
                .iter()
                .chain(&torch_after)
                .filter(|(tg, m, _)| *tg == t && m == mode)
                .map(|(_, _, s)| *s)
                .fold(f64::INFINITY, f64::min)
        };
        let (index, loader) = (pick("index loop"), pick("DataLoader"));
        if index.is_finite() {
            println!(
                "MLP {t:>14}: Trainer {:.4} s vs PyTorch hand-indexed {index:.4} s: {:.2}x PyTorch's speed (DataLoader loop {loader:.4} s: {:.2}x)",
                best[k][2],
                index / best[k][2],
                loader / best[k][2],
            );
        }
    }
    memory();
    if std::env::var("MNIST_BENCH_CRITERION").as_deref() == Ok("0") {
        return;
    }
    for sizes in MLPS {
        let mut g = c.benchmark_group(format!("mnist_epoch_mlp{}_b64", tag(sizes)));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(20));
        g.warm_up_time(Duration::from_secs(3));
        {
            let (m, _vm, loader, mut opt) = setup(&ds, sizes, Kind::Candle);
            let mut e = 0;
            g.bench_function("candle_loop", |b| {
                b.iter(|| {
                    e += 1;
                    black_box(hand_loop(&m, &loader, &mut opt, e, usize::MAX))
                })
            });
        }
        let mut t = trainer(&ds, sizes);
        let mut e = 0;
        g.bench_function("trainer_nn", |b| {
            b.iter(|| {
                e += 1;
                t.set_epochs(e);
                black_box(t.fit().unwrap().epochs.len())
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
