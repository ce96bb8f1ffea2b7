//! One MNIST epoch (60,000 rows) of an MLP 784-128-10, batch 64, SGD lr 0.05
//! momentum 0.9: through `Trainer::fit` against, in the same run, a
//! hand-written candle loop doing the same work with the same optimizer and
//! the same DataLoader (the Trainer's extra work: a loss read-back per step,
//! top-1 accuracy on every batch, history records, timing).
//!
//! Both are run twice: with `candle_nn::Linear` layers, and with
//! `minibatch_nn::Linear` (same maths and forward bits, a backward pass
//! that skips the unused gradient of the input batch and the transpose chain).
//!
//! Before the criterion groups, one epoch of the hand-written loop is timed
//! phase by phase (fetch / forward+loss / backward / step) for each layer
//! type and printed, then the loops run interleaved (so load from other
//! processes hits all alike) and the best epoch of each is printed.
//!
//! `cargo bench --bench mnist_epoch`

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_data::{mnist, DataLoader, TensorDataset};
use minibatch_optim::{Optimizer, Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};

/// Which layer type the MLP is built from.
#[derive(Clone, Copy)]
enum Layers {
    CandleNn,
    Lean,
}

impl Layers {
    fn name(self) -> &'static str {
        match self {
            Layers::CandleNn => "candle_nn::Linear",
            Layers::Lean => "minibatch_nn::Linear",
        }
    }
    fn linear(self, i: usize, o: usize, vb: VarBuilder) -> Box<dyn Module> {
        match self {
            Layers::CandleNn => Box::new(candle_nn::linear(i, o, vb).unwrap()),
            Layers::Lean => Box::new(minibatch_nn::linear(i, o, vb).unwrap()),
        }
    }
}

struct Mlp(Box<dyn Module>, Box<dyn Module>);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.relu()?)
    }
}

fn data() -> TensorDataset {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    mnist::load(dir, &Device::Cpu).unwrap().0
}

fn setup(ds: &TensorDataset, layers: Layers) -> (Mlp, VarMap, DataLoader, Sgd) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = Mlp(
        layers.linear(784, 128, vb.pp("fc1")),
        layers.linear(128, 10, vb.pp("fc2")),
    );
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

fn hand_loop(m: &Mlp, loader: &DataLoader, opt: &mut Sgd, epoch: u64) -> f32 {
    let mut last = 0f32;
    for b in loader.epoch(epoch) {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let loss = candle_nn::loss::cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();
        opt.backward_step(&loss).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
    }
    last
}

fn phases(ds: &TensorDataset, layers: Layers) {
    let (m, _vm, loader, mut opt) = setup(ds, layers);
    hand_loop(&m, &loader, &mut opt, 0); // warm-up
    let (mut fetch, mut fwd, mut bwd, mut step) = (0f64, 0f64, 0f64, 0f64);
    let t = Instant::now();
    let mut it = loader.epoch(1);
    loop {
        let t0 = Instant::now();
        let Some(b) = it.next() else { break };
        let (x, y) = b.unwrap().into_pair().unwrap();
        let t1 = Instant::now();
        let loss = candle_nn::loss::cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        let grads = loss.backward().unwrap();
        let t3 = Instant::now();
        opt.step(&grads).unwrap();
        let t4 = Instant::now();
        fetch += (t1 - t0).as_secs_f64();
        fwd += (t2 - t1).as_secs_f64();
        bwd += (t3 - t2).as_secs_f64();
        step += (t4 - t3).as_secs_f64();
    }
    let total = t.elapsed().as_secs_f64();
    println!(
        "hand-written epoch, {}: {total:.3} s ({:.0} samples/s): fetch {:.1}%, forward+loss {:.1}%, backward {:.1}%, step {:.1}%",
        layers.name(),
        60000.0 / total,
        100.0 * fetch / total,
        100.0 * fwd / total,
        100.0 * bwd / total,
        100.0 * step / total
    );
}

/// Interleaved epochs: for each layer type a hand-written loop and the
/// Trainer, so that load from other processes hits all four alike.
fn interleaved(ds: &TensorDataset, rounds: usize) {
    let kinds = [Layers::CandleNn, Layers::Lean];
    let mut hands: Vec<_> = kinds.iter().map(|&l| setup(ds, l)).collect();
    let mut trainers: Vec<_> = kinds
        .iter()
        .map(|&l| {
            let (m, vm, loader, opt) = setup(ds, l);
            Trainer::builder(m, vm, loader, opt)
                .progress(ProgressMode::Silent)
                .epochs(0)
                .build()
                .unwrap()
        })
        .collect();
    let mut best = [[f64::MAX; 2]; 2];
    for r in 0..rounds as u64 {
        for k in 0..kinds.len() {
            let (m, _vm, loader, opt) = &mut hands[k];
            let t = Instant::now();
            hand_loop(m, loader, opt, r);
            best[k][0] = best[k][0].min(t.elapsed().as_secs_f64());
            trainers[k].set_epochs(r + 1);
            let t = Instant::now();
            trainers[k].fit().unwrap();
            best[k][1] = best[k][1].min(t.elapsed().as_secs_f64());
        }
    }
    for (k, l) in kinds.iter().enumerate() {
        let [hand, trainer] = best[k];
        println!(
            "best of {rounds} interleaved epochs, {}: hand-written {hand:.3} s ({:.0} samples/s), Trainer {trainer:.3} s ({:.0} samples/s, {:+.1}% overhead)",
            l.name(),
            60000.0 / hand,
            60000.0 / trainer,
            100.0 * (trainer / hand - 1.0),
        );
    }
    println!(
        "Trainer with minibatch_nn::Linear vs hand-written loop with candle_nn::Linear: {:.2}x faster",
        best[0][0] / best[1][1]
    );
}

fn bench(c: &mut Criterion) {
    let ds = data();
    phases(&ds, Layers::CandleNn);
    phases(&ds, Layers::Lean);
    let rounds = std::env::var("MNIST_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    interleaved(&ds, rounds);
    let mut g = c.benchmark_group("mnist_epoch_mlp128_b64");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.warm_up_time(Duration::from_secs(3));
    {
        let (m, _vm, loader, mut opt) = setup(&ds, Layers::CandleNn);
        let mut e = 0;
        g.bench_function("hand_written_loop", |b| {
            b.iter(|| {
                e += 1;
                black_box(hand_loop(&m, &loader, &mut opt, e))
            })
        });
    }
    for (name, layers) in [
        ("trainer_fit", Layers::CandleNn),
        ("trainer_fit_lean_linear", Layers::Lean),
    ] {
        let (m, vm, loader, opt) = setup(&ds, layers);
        let mut t = Trainer::builder(m, vm, loader, opt)
            .progress(ProgressMode::Silent)
            .epochs(0)
            .build()
            .unwrap();
        let mut e = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                e += 1;
                t.set_epochs(e);
                black_box(t.fit().unwrap().epochs.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
