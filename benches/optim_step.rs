//! One optimizer step on 10M f32 parameters: minibatch-optim's fused in-place
//! update against candle_nn's optimizers, the same maths in candle tensor ops,
//! and the memory-bandwidth bound (a plain in-place slice loop), on 1 thread
//! and on the whole rayon pool. The fused update runs on candle's CPU thread
//! pool (all its threads; its size is fixed when it starts, by
//! `RAYON_NUM_THREADS` or the core count).
//!
//! `cargo bench --bench optim_step` (set `OPTIM_BENCH_N` for another size).

use std::hint::black_box;
use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
use rayon::prelude::*;

fn n_params() -> usize {
    std::env::var("OPTIM_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000)
}

fn setup(n: usize) -> (Var, GradStore) {
    let p = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap()).unwrap();
    let g = Tensor::randn(0f32, 1e-3, n, &Device::Cpu).unwrap();
    let mut grads = GradStore::default();
    grads.insert(p.as_tensor(), g);
    (p, grads)
}

/// The bandwidth bound of momentum SGD: read θ, g, b; write θ, b.
fn momentum_loop(p: &mut [f32], g: &[f32], b: &mut [f32], lr: f32, mom: f32) {
    for ((p, g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
        *b = *b * mom + *g;
        *p -= lr * *b;
    }
}

/// The same Adam maths as a plain loop (bandwidth bound: 4 reads, 3 writes).
#[allow(clippy::too_many_arguments)]
fn adam_loop(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: f32,
    bc2: f32,
    eps: f32,
) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m += 0.1 * (*g - *m);
        *v = *v * 0.999 + 0.001 * *g * *g;
        *p += step * *m / (v.sqrt() / bc2 + eps);
    }
}

const CHUNK: usize = 1 << 16;

fn bench_sgd(c: &mut Criterion) {
    let n = n_params();
    let mut group = c.benchmark_group(format!("sgd_momentum_step_{n}"));
    let cfg = SgdConfig {
        lr: 1e-3,
        momentum: 0.9,
        ..Default::default()
    };

    {
        let (p, grads) = setup(n);
        let mut opt = Sgd::new(vec![p], cfg).unwrap();
        opt.step(&grads).unwrap();
        group.bench_function("minibatch fused, candle pool", |b| {
            b.iter(|| opt.step(black_box(&grads)).unwrap())
        });
    }
    {
        let (p, grads) = setup(n);
        let mut opt = Sgd::new(vec![p], cfg).unwrap();
        opt.set_tensor_path(true);
        opt.step(&grads).unwrap();
        group.bench_function("same maths in candle tensor ops", |b| {
            b.iter(|| opt.step(black_box(&grads)).unwrap())
        });
    }
    {
        let (p, grads) = setup(n);
        let mut opt = <candle_nn::SGD as candle_nn::Optimizer>::new(vec![p], 1e-3).unwrap();
        group.bench_function("candle_nn::SGD (no momentum)", |b| {
            b.iter(|| candle_nn::Optimizer::step(&mut opt, black_box(&grads)).unwrap())
        });
    }
    {
        let mut p = vec![0.5f32; n];
        let g = vec![1e-3f32; n];
        let mut m = vec![0f32; n];
        group.bench_function("bound: slice loop, 1 thread", |b| {
            b.iter(|| momentum_loop(black_box(&mut p), &g, &mut m, 1e-3, 0.9))
        });
        group.bench_function("bound: slice loop, rayon pool", |b| {
            b.iter(|| {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), m)| momentum_loop(p, g, m, 1e-3, 0.9))
            })
        });
    }
    group.finish();
}

fn bench_adam(c: &mut Criterion) {
    let n = n_params();
    let mut group = c.benchmark_group(format!("adam_step_{n}"));
    {
        let (p, grads) = setup(n);
        let mut opt = Adam::new(vec![p], AdamConfig::default()).unwrap();
        opt.step(&grads).unwrap();
        group.bench_function("minibatch fused, candle pool", |b| {
            b.iter(|| opt.step(black_box(&grads)).unwrap())
        });
    }
    {
        let (p, grads) = setup(n);
        let mut opt = Adam::new(vec![p], AdamConfig::default()).unwrap();
        opt.set_tensor_path(true);
        opt.step(&grads).unwrap();
        group.bench_function("same maths in candle tensor ops", |b| {
            b.iter(|| opt.step(black_box(&grads)).unwrap())
        });
    }
    {
        let (p, grads) = setup(n);
        let params = candle_nn::ParamsAdamW {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(vec![p], params).unwrap();
        group.bench_function("candle_nn::AdamW", |b| {
            b.iter(|| candle_nn::Optimizer::step(&mut opt, black_box(&grads)).unwrap())
        });
    }
    {
        let mut p = vec![0.5f32; n];
        let g = vec![1e-3f32; n];
        let mut m = vec![0f32; n];
        let mut v = vec![0f32; n];
        group.bench_function("bound: slice loop, 1 thread", |b| {
            b.iter(|| {
                adam_loop(
                    black_box(&mut p),
                    &g,
                    &mut m,
                    &mut v,
                    black_box(-1e-3),
                    black_box(0.5),
                    black_box(1e-8),
                )
            })
        });
        group.bench_function("bound: slice loop, rayon pool", |b| {
            b.iter(|| {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        adam_loop(
                            p,
                            g,
                            m,
                            v,
                            black_box(-1e-3),
                            black_box(0.5),
                            black_box(1e-8),
                        )
                    })
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! { name = benches; config = config(); targets = bench_sgd, bench_adam }
criterion_main!(benches);
