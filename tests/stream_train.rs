//! Training through the Trainer from a StreamDataset: a linear classifier on
//! three separable clusters read from 4 shards, shuffled through a buffer.
//! It learns, and the run is bit-identical with 0 and 2 loader workers (the
//! stream's order does not depend on them).

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear, VarBuilder, VarMap};
use minibatch::data::{rng, DataLoader, Sample, ShardIter, StreamDataset};
use minibatch::optim::{Sgd, SgdConfig};
use minibatch::train::{ProgressMode, Trainer};

const PER_SHARD: usize = 150;

/// Item `i` of shard `s`: class `(s * PER_SHARD + i) % 3`, a point near that
/// class's centre with noise from `derive_rng(7, 0, id)`.
fn stream() -> StreamDataset {
    StreamDataset::new(vec![PER_SHARD; 4], |s| {
        let items = (0..PER_SHARD).map(move |i| {
            let id = s * PER_SHARD + i;
            let class = (id % 3) as u32;
            let centre = [[2f32, 0.], [-1., 1.7], [-1., -1.7]][class as usize];
            let mut r = rng::derive_rng(7, 0, id as u64);
            let noise = |r: &mut rng::ChaCha8Rng| (rng::unit_f64(r) as f32 - 0.5) * 0.8;
            let x = [centre[0] + noise(&mut r), centre[1] + noise(&mut r)];
            Ok(Sample::pair(
                Tensor::new(&x, &Device::Cpu)?,
                Tensor::new(class, &Device::Cpu)?,
            ))
        });
        Ok(Box::new(items) as ShardIter)
    })
    .unwrap()
    .shuffle_buffer(64)
    .unwrap()
}

/// Trains 3 epochs with `workers` loader threads; returns the final weights
/// and the first and last epoch's training loss and accuracy.
fn train(workers: usize) -> (Vec<f32>, f64, f64, f64) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = linear(2, 3, vb).unwrap();
    // candle's initialisation is not seeded: start from fixed weights.
    for (name, var) in vm.data().lock().unwrap().iter() {
        let fill = if name.ends_with("weight") {
            0.1f32
        } else {
            0.0
        };
        var.set(&Tensor::full(fill, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let loader = DataLoader::builder(stream())
        .batch_size(32)
        .shuffle(11)
        .num_workers(workers)
        .build()
        .unwrap();
    assert_eq!(loader.len(), 19); // ceil(600 / 32)
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut trainer = Trainer::builder(model, vm.clone(), loader, opt)
        .epochs(3)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let history = trainer.fit().unwrap().clone();
    let (first, last) = (&history.epochs[0], &history.epochs[2]);
    let accuracy = last.train_metrics["accuracy"];
    let mut weights = Vec::new();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for n in names {
        weights.extend(data[&n].flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (weights, first.train_loss, last.train_loss, accuracy)
}

#[test]
fn trainer_learns_from_a_stream_identically_with_and_without_workers() {
    let (w0, first, last, acc) = train(0);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(acc > 0.95, "accuracy {acc}");
    let (w2, first2, last2, _) = train(2);
    assert_eq!(w0, w2);
    assert_eq!((first, last), (first2, last2));
}
