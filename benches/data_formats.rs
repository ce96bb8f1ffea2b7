//! Datasets read from files, each against a baseline measured in the same run.
//!
//! 1. `mmap_epoch_b64`: one shuffled epoch of MNIST train (60000x784 f32 +
//!    labels, 188 MB) through the loader from a memory-mapped `.safetensors`
//!    file (written once to a temp dir, removed at the end; the page cache is
//!    warm after criterion's warm-up) against the same tensors in memory
//!    (`TensorDataset`). Target: mapped / memory <= 1.3x.
//! 2. `image_folder_256_png`: an epoch of 256 PNG images (64x48 RGB, 2
//!    classes) decoded, resized to 32x32, randomly cropped to 28 and flipped,
//!    batch 32, with 0 and 2 loader workers; throughput in images/s.
//! 3. `token_windows_u16_b32x256`: a shuffled epoch of 256-token windows (batch
//!    32) over a 4M-token u16 file; throughput in batches/s, against copying
//!    the same windows out of an in-memory `Vec<u16>`.
//!
//! Run: `cargo bench --bench data_formats`

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minibatch_data::{
    mnist, DataLoader, ImageFolder, ImageOptions, SafetensorsDataset, TokenDType, TokenWindows,
};

const BATCH: usize = 64;

fn mmap_epoch(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let (train, _) = mnist::load(&dir, &Device::Cpu).expect("MNIST in data/mnist");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mnist_train.safetensors");
    let map: HashMap<String, Tensor> = [
        ("x".to_string(), train.tensors()[0].clone()),
        ("y".to_string(), train.tensors()[1].clone()),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    let mapped = DataLoader::builder(SafetensorsDataset::open(&path, &["x", "y"]).unwrap())
        .batch_size(BATCH)
        .shuffle(42)
        .build()
        .unwrap();
    let memory = DataLoader::builder(train)
        .batch_size(BATCH)
        .shuffle(42)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("mmap_epoch_b64");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(8));
    g.bench_function("safetensors_mmap", |b| {
        b.iter(|| {
            mapped
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.bench_function("tensor_dataset_in_memory", |b| {
        b.iter(|| {
            memory
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.finish();
    drop(mapped);
    std::fs::remove_file(&path).unwrap();
}

fn image_folder(c: &mut Criterion) {
    const N: usize = 256;
    let tmp = tempfile::tempdir().unwrap();
    for class in ["a", "b"] {
        std::fs::create_dir(tmp.path().join(class)).unwrap();
    }
    for k in 0..N as u32 {
        let class = if k % 2 == 0 { "a" } else { "b" };
        image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4 + k) as u8, (y * 5) as u8, ((x ^ y) * 3 + k) as u8])
        })
        .save(tmp.path().join(class).join(format!("{k:03}.png")))
        .unwrap();
    }
    let opts = ImageOptions::default()
        .resize(32, 32)
        .random_crop(28)
        .hflip(0.5)
        .normalize(&[0.5; 3], &[0.25; 3]);
    let make = |workers| {
        DataLoader::builder(ImageFolder::open(tmp.path(), opts.clone()).unwrap())
            .batch_size(32)
            .shuffle(1)
            .num_workers(workers)
            .build()
            .unwrap()
    };
    let (inline, two) = (make(0), make(2));
    let mut g = c.benchmark_group("image_folder_256_png");
    g.throughput(Throughput::Elements(N as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    g.bench_function("0_workers", |b| {
        b.iter(|| {
            inline
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.bench_function("2_workers", |b| {
        b.iter(|| {
            two.epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    g.finish();
}

fn token_windows(c: &mut Criterion) {
    const TOKENS: usize = 4 << 20;
    const BLOCK: usize = 256;
    const B: usize = 32;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("train.bin");
    let tokens: Vec<u16> = (0..TOKENS).map(|k| ((k * 7919) % 50_257) as u16).collect();
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    let lm = TokenWindows::open(&path, TokenDType::U16, BLOCK)
        .unwrap()
        .epoch_offsets(7)
        .unwrap();
    let o = lm.offset(0);
    let loader = DataLoader::builder(lm)
        .batch_size(B)
        .drop_last(true)
        .shuffle(3)
        .build()
        .unwrap();
    let batches = loader.len();
    let order = loader.epoch(0).order().to_vec();
    let mut g = c.benchmark_group("token_windows_u16_b32x256");
    g.throughput(Throughput::Elements(batches as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6));
    g.bench_function("token_windows_mmap", |b| {
        b.iter(|| {
            loader
                .epoch(0)
                .for_each(|batch| drop(black_box(batch.unwrap())))
        })
    });
    // Baseline: the same windows copied (and widened to u32) out of memory into fresh vectors.
    g.bench_function("vec_u16_copy_baseline", |b| {
        b.iter(|| {
            for chunk in order.chunks_exact(B) {
                let mut x = Vec::with_capacity(B * BLOCK);
                let mut y = Vec::with_capacity(B * BLOCK);
                for &i in chunk {
                    let s = o + i * BLOCK;
                    x.extend(tokens[s..s + BLOCK].iter().map(|&t| t as u32));
                    y.extend(tokens[s + 1..s + BLOCK + 1].iter().map(|&t| t as u32));
                }
                black_box((
                    Tensor::from_vec(x, (B, BLOCK), &Device::Cpu).unwrap(),
                    Tensor::from_vec(y, (B, BLOCK), &Device::Cpu).unwrap(),
                ));
            }
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    mmap_epoch(c);
    image_folder(c);
    token_windows(c);
}

criterion_group!(benches, bench);
criterion_main!(benches);
