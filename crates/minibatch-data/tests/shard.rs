//! `DataLoaderBuilder::shard`: N ranks at batch b see, step by step, exactly
//! the samples one process sees at batch N·b; `shard_uneven` covers every
//! sample once; `DataLoader::sharded` rebuilds a loader for a rank; bad
//! configurations are clear errors.

use candle_core::{Device, Tensor};
use minibatch_data::{
    DataError, DataLoader, DistributedSampler, Sample, Sampler, Shard, ShardIter, StreamDataset,
    TensorDataset,
};
use proptest::prelude::*;

fn ids(n: usize) -> TensorDataset {
    TensorDataset::new(vec![Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap()]).unwrap()
}

fn batches(l: &DataLoader, epoch: u64) -> Vec<Vec<u32>> {
    l.epoch(epoch)
        .map(|b| b.unwrap().tensors()[0].to_vec1::<u32>().unwrap())
        .collect()
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// The ranks' batch k together are the one-process batch k, when
    /// world_size divides n; rank r's batch holds positions r, r+N, ... of it.
    #[test]
    fn ranks_together_are_one_process(world in 1usize..5, per_rank in 1usize..7, m in 1usize..30,
                                      seed in 0u64..1000, epoch in 0u64..4, shuffle in any::<bool>()) {
        let n = world * m;
        let build = |bs: usize| {
            let b = DataLoader::builder(ids(n)).batch_size(bs);
            if shuffle { b.shuffle(seed) } else { b }
        };
        let one = build(world * per_rank).build().unwrap();
        let ranks: Vec<_> = (0..world)
            .map(|r| build(per_rank).shard(r, world).build().unwrap())
            .collect();
        let one_b = batches(&one, epoch);
        for r in &ranks {
            prop_assert_eq!(r.len(), one.len());
        }
        let rank_b: Vec<_> = ranks.iter().map(|l| batches(l, epoch)).collect();
        for (k, global) in one_b.iter().enumerate() {
            let parts: Vec<u32> = (0..world).flat_map(|r| rank_b[r][k].clone()).collect();
            prop_assert_eq!(sorted(parts), sorted(global.clone()));
            for (r, rb) in rank_b.iter().enumerate() {
                let want: Vec<u32> = global.iter().skip(r).step_by(world).copied().collect();
                prop_assert_eq!(&rb[k], &want);
            }
        }
    }

    /// The uneven shards partition every epoch exactly.
    #[test]
    fn uneven_shards_partition(world in 1usize..6, n in 1usize..60, bs in 1usize..9, seed in 0u64..100) {
        prop_assume!(n >= world);
        let mut all = Vec::new();
        for r in 0..world {
            let l = DataLoader::builder(ids(n)).batch_size(bs).shuffle(seed).shard_uneven(r, world).build().unwrap();
            prop_assert_eq!(l.shard(), Some(Shard { rank: r, world_size: world, uneven: true }));
            all.extend(batches(&l, 1).concat());
        }
        prop_assert_eq!(sorted(all), (0..n as u32).collect::<Vec<_>>());
    }
}

#[test]
fn shard_is_distributed_samplers_layout() {
    // the same indices as PyTorch's DistributedSampler(shuffle=True, seed) over our permutation
    for r in 0..3 {
        let l = DataLoader::builder(ids(10))
            .batch_size(100)
            .shuffle(5)
            .shard(r, 3)
            .build()
            .unwrap();
        let want = DistributedSampler::new(10, r, 3, Some(5), false)
            .unwrap()
            .indices(2);
        let got: Vec<usize> = batches(&l, 2)
            .concat()
            .into_iter()
            .map(|i| i as usize)
            .collect();
        assert_eq!(got, want);
        assert_eq!(l.num_samples(), 4); // 10 padded to 12
    }
}

#[test]
fn sharded_rebuilds_a_loader_for_a_rank() {
    let one = DataLoader::builder(ids(24))
        .batch_size(3)
        .shuffle(9)
        .build()
        .unwrap();
    assert_eq!(one.shard(), None);
    let r1 = one.sharded(1, 2, false).unwrap();
    let direct = DataLoader::builder(ids(24))
        .batch_size(3)
        .shuffle(9)
        .shard(1, 2)
        .build()
        .unwrap();
    assert_eq!(batches(&r1, 4), batches(&direct, 4));
    assert_eq!(r1.batch_size(), 3);
    // idempotent for the same shard, an error for another
    assert_eq!(
        batches(&r1.sharded(1, 2, false).unwrap(), 0),
        batches(&r1, 0)
    );
    let err = r1.sharded(0, 2, false).unwrap_err();
    assert!(
        matches!(err, DataError::InvalidConfig(ref m) if m.contains("already sharded")),
        "{err}"
    );
    // a custom sampler cannot be re-sharded
    let custom = DataLoader::builder(ids(24))
        .sampler(DistributedSampler::new(24, 0, 2, Some(1), false).unwrap())
        .build()
        .unwrap();
    let err = custom.sharded(0, 2, false).unwrap_err();
    assert!(
        matches!(err, DataError::InvalidConfig(ref m) if m.contains("custom sampler")),
        "{err}"
    );
}

#[test]
fn bad_shards_are_clear_errors() {
    let err = DataLoader::builder(ids(8)).shard(2, 2).build().unwrap_err();
    assert!(
        matches!(
            err,
            DataError::InvalidRank {
                rank: 2,
                world_size: 2
            }
        ),
        "{err}"
    );
    let err = DataLoader::builder(ids(8)).shard(0, 0).build().unwrap_err();
    assert!(matches!(err, DataError::InvalidRank { .. }), "{err}");
    let err = DataLoader::builder(ids(8))
        .sampler(DistributedSampler::new(8, 0, 2, None, false).unwrap())
        .shard(0, 2)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, DataError::InvalidConfig(ref m) if m.contains("replaces the sampler")),
        "{err}"
    );
    // a rank with no sample of an uneven shard
    let err = DataLoader::builder(ids(2))
        .shard_uneven(2, 3)
        .build()
        .unwrap_err();
    assert!(matches!(err, DataError::EmptyDataset(_)), "{err}");
    let stream = StreamDataset::new(vec![4], |_| {
        let items = (0..4u32).map(|i| Ok(Sample::new(vec![Tensor::new(i, &Device::Cpu)?])));
        Ok(Box::new(items) as ShardIter)
    })
    .unwrap();
    let err = DataLoader::builder(stream).shard(0, 2).build().unwrap_err();
    assert!(
        matches!(err, DataError::InvalidConfig(ref m) if m.contains("StreamDataset")),
        "{err}"
    );
}
