//! The DataLoader's data paths, each against a baseline measured in the same run.
//!
//! 1. `mnist_train_epoch_b64`: one shuffled epoch of MNIST train (60000x784
//!    f32, batch 64, in memory, CPU) through the loader (inline, the default
//!    for in-memory data, and with 2 forced worker threads) against the ideal
//!    (plain row copies into preallocated buffers, same order) and a bare
//!    candle `index_select` loop.
//! 2. `mnist_epoch_b64_with_step`: the same epoch with a stand-in training
//!    step on each batch (an MLP 784-128-10 forward, two candle matmuls), inline
//!    against 2 forced workers: whether threads that gather ahead pay off once
//!    the step competes with them for the cores.
//! 3. `stream_csv_8192_b64`: a `StreamDataset` of 8192 MNIST rows stored as
//!    CSV text lines in 8 shards, parsed to f32 on the loader's threads and
//!    shuffled through a 1000-item buffer, with 0 and 2 workers (and 0
//!    workers unshuffled), against plain single-threaded loops over the same
//!    lines: parse into samples and `collate` them (the same per-sample work
//!    without the stream machinery), and parse straight into batch buffers.
//!
//! Run: `cargo bench --bench data_loader`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use minibatch_data::{collate, mnist, DataLoader, Dataset, Sample, ShardIter, StreamDataset};

const BATCH: usize = 64;
const STREAM_ROWS: usize = 8192;
const SHARDS: usize = 8;

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let (train, _) = mnist::load(&dir, &Device::Cpu).expect("MNIST in data/mnist");
    let x = train.tensors()[0].clone();
    let y = train.tensors()[1].clone();
    let n = train.len();
    let threaded = DataLoader::builder(train.clone())
        .batch_size(BATCH)
        .shuffle(42)
        .num_workers(2)
        .prefetch(4)
        .force_workers(true)
        .build()
        .unwrap();
    assert!(threaded.uses_workers());
    let loader = DataLoader::builder(train)
        .batch_size(BATCH)
        .shuffle(42)
        .build()
        .unwrap();
    let order = loader.epoch(0).order().to_vec();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ys: Vec<u32> = y.to_vec1().unwrap();
    let width = xs.len() / n;

    let mut g = c.benchmark_group("mnist_train_epoch_b64");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6));

    g.bench_function("dataloader", |b| {
        b.iter(|| {
            for batch in loader.epoch(0) {
                black_box(batch.unwrap());
            }
        })
    });

    g.bench_function("dataloader_forced_2_workers", |b| {
        b.iter(|| {
            for batch in threaded.epoch(0) {
                black_box(batch.unwrap());
            }
        })
    });

    let mut xbuf = vec![0f32; BATCH * width];
    let mut ybuf = vec![0u32; BATCH];
    g.bench_function("ideal_slice_copy", |b| {
        b.iter(|| {
            for chunk in order.chunks(BATCH) {
                for (k, &i) in chunk.iter().enumerate() {
                    xbuf[k * width..(k + 1) * width]
                        .copy_from_slice(&xs[i * width..(i + 1) * width]);
                    ybuf[k] = ys[i];
                }
                black_box((&xbuf, &ybuf));
            }
        })
    });

    g.bench_function("bare_index_select", |b| {
        b.iter(|| {
            for chunk in order.chunks(BATCH) {
                let ids: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(ids, chunk.len(), &Device::Cpu).unwrap();
                black_box((
                    x.index_select(&idx, 0).unwrap(),
                    y.index_select(&idx, 0).unwrap(),
                ));
            }
        })
    });
    g.finish();

    // A stand-in training step: an MLP forward pass on each batch.
    let w1 = Tensor::randn(0f32, 0.05, (784, 128), &Device::Cpu).unwrap();
    let w2 = Tensor::randn(0f32, 0.05, (128, 10), &Device::Cpu).unwrap();
    let step = |batch: minibatch_data::Batch| {
        let (x, _) = batch.into_pair().unwrap();
        let h = x.matmul(&w1).unwrap().relu().unwrap();
        black_box(h.matmul(&w2).unwrap());
    };
    let mut g = c.benchmark_group("mnist_epoch_b64_with_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("inline", |b| {
        b.iter(|| loader.epoch(0).for_each(|batch| step(batch.unwrap())))
    });
    g.bench_function("forced_2_workers", |b| {
        b.iter(|| threaded.epoch(0).for_each(|batch| step(batch.unwrap())))
    });
    g.finish();

    stream_bench(c, &xs, &ys, width);
}

/// MNIST rows as CSV lines: `label,p0,p1,...,p783` with pixels as 0..=255 integers.
fn csv_lines(xs: &[f32], ys: &[u32], width: usize, rows: usize) -> Vec<String> {
    (0..rows)
        .map(|i| {
            let mut line = ys[i].to_string();
            for v in &xs[i * width..(i + 1) * width] {
                line.push(',');
                line.push_str(&((v * 255.0).round() as u8).to_string());
            }
            line
        })
        .collect()
}

/// Parses one CSV line into `(pixels / 255, label)`.
fn parse(line: &str, width: usize) -> (Vec<f32>, u32) {
    let mut fields = line.split(',');
    let label: u32 = fields.next().unwrap().parse().unwrap();
    let mut px = Vec::with_capacity(width);
    px.extend(fields.map(|f| f.parse::<u8>().unwrap() as f32 / 255.0));
    (px, label)
}

fn stream_bench(c: &mut Criterion, xs: &[f32], ys: &[u32], width: usize) {
    let lines: Arc<Vec<String>> = Arc::new(csv_lines(xs, ys, width, STREAM_ROWS));
    let per_shard = STREAM_ROWS / SHARDS;
    let make = |workers: usize, shuffle: bool| {
        let lines = Arc::clone(&lines);
        let stream = StreamDataset::new(vec![per_shard; SHARDS], move |s| {
            let lines = Arc::clone(&lines);
            let it = (s * per_shard..(s + 1) * per_shard).map(move |i| {
                let (px, label) = parse(&lines[i], width);
                Ok(Sample::pair(
                    Tensor::from_vec(px, width, &Device::Cpu)?,
                    Tensor::new(label, &Device::Cpu)?,
                ))
            });
            Ok(Box::new(it) as ShardIter)
        })
        .unwrap()
        .shuffle_buffer(1000)
        .unwrap();
        let b = DataLoader::builder(stream)
            .batch_size(BATCH)
            .num_workers(workers)
            .prefetch(4);
        if shuffle { b.shuffle(42) } else { b }.build().unwrap()
    };
    let inline = make(0, true);
    let two = make(2, true);
    let unshuffled = make(0, false);
    let mut g = c.benchmark_group("stream_csv_8192_b64");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    g.bench_function("stream_0_workers", |b| {
        b.iter(|| {
            inline
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.bench_function("stream_2_workers", |b| {
        b.iter(|| {
            two.epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.bench_function("stream_0_workers_unshuffled", |b| {
        b.iter(|| {
            unshuffled
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    // Baseline: the same per-sample work (parse, two tensors per sample,
    // `collate`) in shard order on one thread, without the stream machinery.
    g.bench_function("plain_parse_samples_collate", |b| {
        b.iter(|| {
            for chunk in lines.chunks(BATCH) {
                let samples: Vec<Sample> = chunk
                    .iter()
                    .map(|line| {
                        let (px, label) = parse(line, width);
                        Sample::pair(
                            Tensor::from_vec(px, width, &Device::Cpu).unwrap(),
                            Tensor::new(label, &Device::Cpu).unwrap(),
                        )
                    })
                    .collect();
                black_box(collate(&samples).unwrap());
            }
        })
    });
    // Baseline: parse the same lines in file order and stack batches of 64, one thread.
    g.bench_function("plain_parse_and_stack", |b| {
        b.iter(|| {
            for chunk in lines.chunks(BATCH) {
                let mut x = Vec::with_capacity(chunk.len() * width);
                let mut y = Vec::with_capacity(chunk.len());
                for line in chunk {
                    let (px, label) = parse(line, width);
                    x.extend_from_slice(&px);
                    y.push(label);
                }
                black_box((
                    Tensor::from_vec(x, (chunk.len(), width), &Device::Cpu).unwrap(),
                    Tensor::from_vec(y, chunk.len(), &Device::Cpu).unwrap(),
                ));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
