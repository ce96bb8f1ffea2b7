//! One MNIST epoch (938 batches of 64) of the mnist example's CNN,
//! conv(1→16,5)-relu-pool2-conv(16→32,5)-relu-pool2-fc(512→128)-relu-fc(128→10),
//! SGD lr 0.05 momentum 0.9, through `Trainer::fit`: built from
//! `minibatch_nn` layers (`conv2d`, `ops::max_pool2d`, `linear`) against the
//! same network from candle-nn layers (`candle_nn::conv2d`,
//! `Tensor::max_pool2d`, `candle_nn::linear`) and against PyTorch
//! (`../shared/peers/torch_cnn.py`, 2 threads), all in the same run.
//!
//! 1. Phases: a hand-written loop times forward+loss / backward / optimizer
//!    step per batch for each layer set.
//! 2. Interleaved rounds (`CNN_BENCH_ROUNDS`, default 2): a PyTorch epoch
//!    (a subprocess running `torch_cnn.py DATA 1`; skipped when
//!    `~/.venv-torch/bin/python` or `MINIBATCH_TORCH_PYTHON` is missing, or
//!    with `CNN_BENCH_SKIP_TORCH=1`), one minibatch_nn epoch, and
//!    `CNN_BENCH_CANDLE_STEPS` (default 150) steps of the candle-nn network,
//!    scaled to an epoch (it is ~10x slower). Best of each and the ratios are
//!    printed, so load from other processes hits all three alike.
//! 3. Peak memory per step, each in a fresh process (this binary run again,
//!    or Python for PyTorch): resident memory before the first step
//!    (`VmRSS` from `/proc/self/status`, after loading the data and building
//!    the model) and the high-water mark after 100 steps (`VmHWM`); their
//!    difference is what training steps add on top of data and weights.
//!    PyTorch is measured the same way (both read `/proc/self/status`).
//! 4. A criterion group timing 20 steps of each layer set.
//!
//! `CNN_BENCH_PHASES_ONLY=1` stops after the phases (`=ours`: after the
//! minibatch_nn phases, `CNN_BENCH_PHASE_STEPS` of them; for profiling).
//!
//! `cargo bench --bench cnn_epoch`

mod common;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use criterion::Criterion;
use minibatch_data::{mnist, DataLoader, TensorDataset};
use minibatch_optim::{Optimizer, Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};
use rand::{Rng, SeedableRng};

/// Which layers the network is built from.
#[derive(Clone, Copy, PartialEq)]
enum Layers {
    CandleNn,
    MinibatchNn,
}

impl Layers {
    fn name(self) -> &'static str {
        match self {
            Layers::CandleNn => "candle-nn",
            Layers::MinibatchNn => "minibatch_nn",
        }
    }
}

struct Cnn {
    layers: Layers,
    c1: Box<dyn Module>,
    c2: Box<dyn Module>,
    fc1: Box<dyn Module>,
    fc2: Box<dyn Module>,
}

impl Cnn {
    fn new(layers: Layers, vb: VarBuilder) -> Self {
        let c = Conv2dConfig::default();
        let conv = |i, o, name: &str| -> Box<dyn Module> {
            match layers {
                Layers::CandleNn => Box::new(candle_nn::conv2d(i, o, 5, c, vb.pp(name)).unwrap()),
                Layers::MinibatchNn => {
                    Box::new(minibatch_nn::conv2d(i, o, 5, c, vb.pp(name)).unwrap())
                }
            }
        };
        let linear = |i, o, name: &str| -> Box<dyn Module> {
            match layers {
                Layers::CandleNn => Box::new(candle_nn::linear(i, o, vb.pp(name)).unwrap()),
                Layers::MinibatchNn => Box::new(minibatch_nn::linear(i, o, vb.pp(name)).unwrap()),
            }
        };
        Self {
            layers,
            c1: conv(1, 16, "c1"),
            c2: conv(16, 32, "c2"),
            fc1: linear(512, 128, "fc1"),
            fc2: linear(128, 10, "fc2"),
        }
    }

    fn relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.layers {
            Layers::CandleNn => x.relu(),
            Layers::MinibatchNn => minibatch_nn::ops::relu(x),
        }
    }

    fn pool(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.layers {
            Layers::CandleNn => x.max_pool2d(2),
            Layers::MinibatchNn => minibatch_nn::ops::max_pool2d(x, 2),
        }
    }
}

impl Module for Cnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, 1, 28, 28))?;
        let x = self.pool(&self.relu(&self.c1.forward(&x)?)?)?;
        let x = self.pool(&self.relu(&self.c2.forward(&x)?)?)?;
        let x = x.flatten_from(1)?;
        self.fc2.forward(&self.relu(&self.fc1.forward(&x)?)?)
    }
}

fn data() -> TensorDataset {
    let dir = common::mnist_dir();
    mnist::load(dir, &Device::Cpu).unwrap().0
}

/// The network, its (seeded, PyTorch-style uniform) weights, a shuffled
/// loader of batch 64 and SGD lr 0.05 momentum 0.9.
fn setup(ds: &TensorDataset, layers: Layers) -> (Cnn, VarMap, DataLoader, Sgd) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = Cnn::new(layers, vb);
    {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for name in names {
            let var = &data[name];
            let fan_in: usize = data[&name.replace(".bias", ".weight")].dims()[1..]
                .iter()
                .product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let vals: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            var.set(&Tensor::from_vec(vals, var.shape(), var.device()).unwrap())
                .unwrap();
        }
    }
    let loader = DataLoader::builder(ds.clone())
        .batch_size(64)
        .shuffle(0)
        .build()
        .unwrap();
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    (m, vm, loader, opt)
}

/// A trainer over [`setup`], and its steps per epoch.
fn trainer(ds: &TensorDataset, layers: Layers) -> (Trainer<Cnn>, u64) {
    let (m, vm, loader, opt) = setup(ds, layers);
    let steps = loader.len() as u64;
    let t = Trainer::builder(m, vm, loader, opt)
        .progress(ProgressMode::Silent)
        .epochs(0)
        .build()
        .unwrap();
    (t, steps)
}

/// `steps` more optimizer steps through `Trainer::fit`.
fn fit_steps(t: &mut Trainer<Cnn>, steps: u64) {
    let target = t.global_step() + steps;
    t.set_epochs(u64::MAX / 2);
    t.set_max_steps(Some(target));
    t.fit().unwrap();
    assert_eq!(t.global_step(), target);
}

/// Hand-written loop over `steps` batches timing forward+loss, backward and
/// the optimizer step.
fn phases(ds: &TensorDataset, layers: Layers, steps: usize) {
    let (m, _vm, loader, mut opt) = setup(ds, layers);
    let (mut fwd, mut bwd, mut step) = (0f64, 0f64, 0f64);
    let mut n = 0;
    let mut cpu0 = 0.0;
    for (i, b) in loader.epoch(0).enumerate() {
        if i == 5 {
            cpu0 = common::cpu_seconds();
        }
        if i == steps + 5 {
            break;
        }
        let (x, y) = b.unwrap().into_pair().unwrap();
        let t1 = Instant::now();
        let loss = minibatch_nn::loss::cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        let grads = loss.backward().unwrap();
        let t3 = Instant::now();
        opt.step(&grads).unwrap();
        let t4 = Instant::now();
        if i >= 5 {
            fwd += (t2 - t1).as_secs_f64();
            bwd += (t3 - t2).as_secs_f64();
            step += (t4 - t3).as_secs_f64();
            n += 1;
        }
    }
    let cpu = common::cpu_seconds() - cpu0;
    let ms = |s: f64| 1e3 * s / n as f64;
    println!(
        "{:>12} per step (mean of {n}): forward+loss {:.2} ms, backward {:.2} ms, step {:.3} ms, total {:.2} ms; process CPU time {:.2} ms",
        layers.name(),
        ms(fwd),
        ms(bwd),
        ms(step),
        ms(fwd + bwd + step),
        ms(cpu)
    );
}

fn torch_python() -> Option<std::path::PathBuf> {
    if std::env::var("CNN_BENCH_SKIP_TORCH").as_deref() == Ok("1") {
        return None;
    }
    common::torch_python()
}

/// One PyTorch epoch of `torch_cnn.py`, in seconds (its own timer: the
/// training loop only, not the start-up).
fn torch_epoch(py: &std::path::Path) -> Option<f64> {
    let out = Command::new(py)
        .arg(common::peers_dir().join("torch_cnn.py"))
        .arg(common::mnist_dir())
        .arg("1")
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    // "torch CNN epoch times [4.31] best 4.31s test acc ..."
    let t = s
        .split("best ")
        .nth(1)?
        .split('s')
        .next()?
        .trim()
        .parse()
        .ok();
    if t.is_none() {
        eprintln!(
            "torch_cnn.py gave no time: {s}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t
}

fn interleaved(ds: &TensorDataset, rounds: usize, candle_steps: u64) {
    let py = torch_python();
    if py.is_none() {
        println!("PyTorch: skipped (no ~/.venv-torch/bin/python or $MINIBATCH_TORCH_PYTHON, or CNN_BENCH_SKIP_TORCH=1)");
    }
    let (mut ours, steps_per_epoch) = trainer(ds, Layers::MinibatchNn);
    let (mut theirs, _) = trainer(ds, Layers::CandleNn);
    fit_steps(&mut theirs, 3); // warm-up (allocator, thread pools)
    let (mut best_t, mut best_o, mut best_c) = (f64::MAX, f64::MAX, f64::MAX);
    for r in 0..rounds {
        let tt = py.as_deref().and_then(torch_epoch);
        let t = Instant::now();
        fit_steps(&mut ours, steps_per_epoch);
        let to = t.elapsed().as_secs_f64();
        let t = Instant::now();
        fit_steps(&mut theirs, candle_steps);
        let tc = t.elapsed().as_secs_f64() * steps_per_epoch as f64 / candle_steps as f64;
        println!(
            "round {r}: PyTorch {} | minibatch_nn {to:.2} s | candle-nn {tc:.1} s (from {candle_steps} steps)",
            tt.map_or("-".into(), |t| format!("{t:.2} s"))
        );
        best_o = best_o.min(to);
        best_c = best_c.min(tc);
        if let Some(tt) = tt {
            best_t = best_t.min(tt);
        }
    }
    println!(
        "best epoch of {rounds}: minibatch_nn {best_o:.2} s, candle-nn {best_c:.1} s ({:.1}x faster with minibatch_nn)",
        best_c / best_o
    );
    if best_t < f64::MAX {
        println!(
            "PyTorch {best_t:.2} s: minibatch_nn runs at {:.2}x PyTorch's speed (PyTorch time / ours), candle-nn at {:.3}x",
            best_t / best_o,
            best_t / best_c
        );
    }
}

const MEM_STEPS: usize = 100;

/// In a fresh process: RSS before training, high-water mark after
/// `MEM_STEPS` steps (hand-written loop, so no Trainer bookkeeping).
fn memory_child(layers: Layers) {
    let ds = data();
    let (m, _vm, loader, mut opt) = setup(&ds, layers);
    let before = common::status_kib("VmRSS");
    for b in loader.epoch(0).take(MEM_STEPS) {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let loss = minibatch_nn::loss::cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    println!("{before} {}", common::status_kib("VmHWM"));
}

const TORCH_MEM: &str = r#"
import sys, os
sys.path.insert(0, sys.argv[1])
import torch
from mnist_np import load
torch.set_num_threads(2)
def kib(key):
    for l in open("/proc/self/status"):
        if l.startswith(key):
            return int(l.split()[1])
x, y, _, _ = load(sys.argv[2])
X, Y = torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y)
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                        torch.nn.Conv2d(16, 32, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                        torch.nn.Flatten(), torch.nn.Linear(512, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
lossf = torch.nn.CrossEntropyLoss()
p = torch.randperm(len(X))
before = kib("VmRSS:")
for i in range(0, 64 * int(sys.argv[3]), 64):
    xb, yb = X[p[i:i + 64]], Y[p[i:i + 64]]
    loss = lossf(m(xb), yb); opt.zero_grad(); loss.backward(); opt.step()
print(before, kib("VmHWM:"))
"#;

fn parse_mem(out: &[u8]) -> Option<(u64, u64)> {
    let s = String::from_utf8_lossy(out);
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

fn memory() {
    let mut rows: Vec<(String, Option<(u64, u64)>)> = Vec::new();
    for layers in [Layers::MinibatchNn, Layers::CandleNn] {
        let out = common::fresh_process("CNN_EPOCH_MEMORY_CHILD", layers.name());
        rows.push((layers.name().into(), out.and_then(|o| parse_mem(&o.stdout))));
    }
    if let Some(py) = torch_python() {
        let out = Command::new(py)
            .args(["-c", TORCH_MEM])
            .arg(common::peers_dir())
            .arg(common::mnist_dir())
            .arg(MEM_STEPS.to_string())
            .output()
            .unwrap();
        rows.push(("PyTorch".into(), parse_mem(&out.stdout)));
    }
    for (name, m) in rows {
        match m {
            Some((before, hwm)) => println!(
                "{name:>12}: RSS before training {:.1} MiB, peak after {MEM_STEPS} steps {:.1} MiB: training adds {:.1} MiB",
                before as f64 / 1024.0,
                hwm as f64 / 1024.0,
                hwm.saturating_sub(before) as f64 / 1024.0
            ),
            None => println!("{name:>12}: memory not measured"),
        }
    }
}

fn criterion_group(ds: &TensorDataset, c: &mut Criterion) {
    let mut g = c.benchmark_group("cnn_20_steps_b64");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.warm_up_time(Duration::from_secs(2));
    for layers in [Layers::MinibatchNn, Layers::CandleNn] {
        let (mut t, _) = trainer(ds, layers);
        g.bench_function(layers.name(), |b| {
            b.iter(|| {
                fit_steps(&mut t, 20);
                black_box(t.global_step())
            })
        });
    }
    g.finish();
}

fn main() {
    if let Ok(kind) = std::env::var("CNN_EPOCH_MEMORY_CHILD") {
        let layers = if kind == Layers::CandleNn.name() {
            Layers::CandleNn
        } else {
            Layers::MinibatchNn
        };
        memory_child(layers);
        return;
    }
    let ds = data();
    let mut c = Criterion::default().configure_from_args();
    let only = std::env::var("CNN_BENCH_PHASES_ONLY").unwrap_or_default();
    phases(
        &ds,
        Layers::MinibatchNn,
        common::env_or("CNN_BENCH_PHASE_STEPS", 100),
    );
    if only == "ours" {
        return;
    }
    phases(&ds, Layers::CandleNn, 20);
    if only == "1" {
        return;
    }
    interleaved(
        &ds,
        common::env_or("CNN_BENCH_ROUNDS", 2),
        common::env_or("CNN_BENCH_CANDLE_STEPS", 150),
    );
    memory();
    criterion_group(&ds, &mut c);
    c.final_summary();
}
