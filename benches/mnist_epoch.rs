//! One MNIST epoch (60,000 rows) of an MLP 784-128-10, batch 64, SGD lr 0.05
//! momentum 0.9: through `Trainer::fit` against, in the same run, a
//! hand-written candle loop doing the same work with the same optimizer and
//! the same DataLoader (the Trainer's extra work: a loss read-back per step,
//! top-1 accuracy on every batch, history records, timing).
//!
//! Before the criterion groups, one epoch of the hand-written loop is timed
//! phase by phase (fetch / forward+loss / backward / step) and printed.
//!
//! `cargo bench --bench mnist_epoch`

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_data::{mnist, DataLoader, TensorDataset};
use minibatch_optim::{Optimizer, Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};

struct Mlp(Linear, Linear);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.relu()?)
    }
}

fn data() -> TensorDataset {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    mnist::load(dir, &Device::Cpu).unwrap().0
}

fn setup(ds: &TensorDataset) -> (Mlp, VarMap, DataLoader, Sgd) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = Mlp(
        linear(784, 128, vb.pp("fc1")).unwrap(),
        linear(128, 10, vb.pp("fc2")).unwrap(),
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

fn phases(ds: &TensorDataset) {
    let (m, _vm, loader, mut opt) = setup(ds);
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
        "hand-written epoch: {total:.3} s ({:.0} samples/s): fetch {:.1}%, forward+loss {:.1}%, backward {:.1}%, step {:.1}%",
        60000.0 / total,
        100.0 * fetch / total,
        100.0 * fwd / total,
        100.0 * bwd / total,
        100.0 * step / total
    );
}

/// Interleaved epochs (hand loop, Trainer, Trainer without the accuracy
/// metric) so that load from other processes hits all three alike.
fn interleaved(ds: &TensorDataset, rounds: usize) {
    let (m, _vm, loader, mut opt) = setup(ds);
    let mk = |metrics: bool| {
        let (m, vm, loader, opt) = setup(ds);
        let mut b = Trainer::builder(m, vm, loader, opt)
            .progress(ProgressMode::Silent)
            .epochs(0);
        if !metrics {
            b = b.no_default_metrics();
        }
        b.build().unwrap()
    };
    let (mut t1, mut t2) = (mk(true), mk(false));
    let mut best = [f64::MAX; 3];
    for r in 0..rounds as u64 {
        let t = Instant::now();
        hand_loop(&m, &loader, &mut opt, r);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        for (i, tr) in [&mut t1, &mut t2].into_iter().enumerate() {
            tr.set_epochs(r + 1);
            let t = Instant::now();
            tr.fit().unwrap();
            best[i + 1] = best[i + 1].min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "best of {rounds} interleaved epochs: hand-written {:.3} s ({:.0} samples/s), Trainer {:.3} s ({:.0} samples/s, {:+.1}%), Trainer without accuracy {:.3} s ({:+.1}%)",
        best[0],
        60000.0 / best[0],
        best[1],
        60000.0 / best[1],
        100.0 * (best[1] / best[0] - 1.0),
        best[2],
        100.0 * (best[2] / best[0] - 1.0)
    );
}

fn bench(c: &mut Criterion) {
    let ds = data();
    phases(&ds);
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
        let (m, _vm, loader, mut opt) = setup(&ds);
        let mut e = 0;
        g.bench_function("hand_written_loop", |b| {
            b.iter(|| {
                e += 1;
                black_box(hand_loop(&m, &loader, &mut opt, e))
            })
        });
    }
    {
        let (m, vm, loader, opt) = setup(&ds);
        let mut t = Trainer::builder(m, vm, loader, opt)
            .progress(ProgressMode::Silent)
            .epochs(0)
            .build()
            .unwrap();
        let mut e = 0;
        g.bench_function("trainer_fit", |b| {
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
