//! Sampler behaviour: golden orders, permutation/coverage properties, distributed shards.

use minibatch_data::rng::{below, derive_rng, permutation};
use minibatch_data::{
    BatchSampler, DataError, DistributedSampler, FixedOrderSampler, RandomSampler, Sampler,
    SequentialSampler, SubsetRandomSampler, WeightedRandomSampler,
};
use proptest::prelude::*;

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v
}

/// Pins the documented generator (ChaCha8 keyed by seed/epoch/stream, Lemire
/// reduction, hand-written Fisher-Yates). If this changes, every recorded run's
/// order changes: only update it deliberately.
#[test]
fn golden_order_seed_42() {
    let s = RandomSampler::new(10, 42);
    assert_eq!(s.indices(0), GOLDEN_E0.to_vec());
    assert_eq!(s.indices(1), GOLDEN_E1.to_vec());
}
// Computed independently by `python3 crates/minibatch-data/tests/golden_order.py`,
// a from-scratch Python ChaCha8 + Lemire + Fisher-Yates following the derivation
// documented in `minibatch_data::rng`.
const GOLDEN_E0: [usize; 10] = [6, 3, 2, 7, 4, 9, 5, 8, 1, 0];
const GOLDEN_E1: [usize; 10] = [6, 3, 4, 2, 7, 5, 8, 1, 0, 9];

#[test]
fn orders_are_pure_functions_of_seed_and_epoch() {
    let a = RandomSampler::new(1000, 7);
    let b = RandomSampler::new(1000, 7);
    assert_eq!(a.indices(3), b.indices(3));
    assert_ne!(a.indices(3), a.indices(4));
    assert_ne!(a.indices(3), RandomSampler::new(1000, 8).indices(3));
}

#[test]
fn below_is_roughly_uniform() {
    let mut rng = derive_rng(1, 2, 3);
    let mut counts = [0usize; 7];
    for _ in 0..70_000 {
        counts[below(&mut rng, 7) as usize] += 1;
    }
    for c in counts {
        assert!((9_000..11_000).contains(&c), "{counts:?}");
    }
}

#[test]
fn sequential_and_fixed_order() {
    assert_eq!(SequentialSampler::new(4).indices(9), vec![0, 1, 2, 3]);
    let f = FixedOrderSampler::new(vec![3, 3, 1, 0]);
    assert_eq!(f.len(), 4);
    assert_eq!(f.indices(0), vec![3, 3, 1, 0]);
    assert_eq!(f.indices(5), vec![3, 3, 1, 0]);
}

#[test]
fn with_replacement_draws_in_range() {
    let s = RandomSampler::with_replacement(5, 1000, 3).unwrap();
    let v = s.indices(0);
    assert_eq!(v.len(), 1000);
    assert!(v.iter().all(|&i| i < 5));
    for k in 0..5 {
        assert!(v.contains(&k));
    }
    assert!(matches!(
        RandomSampler::with_replacement(0, 3, 1),
        Err(DataError::EmptyDataset(_))
    ));
}

#[test]
fn weighted_sampler_follows_weights_and_rejects_bad_ones() {
    let s = WeightedRandomSampler::new(vec![1.0, 0.0, 3.0], 40_000, true, 5).unwrap();
    let v = s.indices(2);
    let c0 = v.iter().filter(|&&i| i == 0).count();
    let c2 = v.iter().filter(|&&i| i == 2).count();
    assert_eq!(c0 + c2, v.len(), "index 1 has weight 0");
    let ratio = c2 as f64 / c0 as f64;
    assert!((2.7..3.3).contains(&ratio), "ratio {ratio}");

    let w = WeightedRandomSampler::new(vec![1.0, 0.0, 2.0, 5.0], 3, false, 5).unwrap();
    for e in 0..10 {
        assert_eq!(sorted(w.indices(e)), vec![0, 2, 3]);
    }
    for bad in [
        vec![1.0, -1.0],
        vec![f64::NAN],
        vec![0.0, 0.0],
        vec![],
        vec![f64::INFINITY],
    ] {
        let err = WeightedRandomSampler::new(bad.clone(), 1, true, 0).unwrap_err();
        assert!(
            matches!(err, DataError::InvalidWeights(_)),
            "{bad:?}: {err}"
        );
    }
    assert!(matches!(
        WeightedRandomSampler::new(vec![1.0, 0.0], 2, false, 0),
        Err(DataError::InvalidWeights(_))
    ));
}

#[test]
fn distributed_rejects_bad_rank() {
    for (rank, world) in [(2, 2), (0, 0), (5, 3)] {
        let err = DistributedSampler::new(10, rank, world, None, false).unwrap_err();
        assert!(matches!(err, DataError::InvalidRank { .. }));
        assert!(err.to_string().contains(&format!("rank {rank}")));
    }
}

#[test]
fn distributed_matches_torch_layout() {
    // torch: DistributedSampler(range(10), num_replicas=4, rank=r, shuffle=False)
    // pads to 12 with indices [0, 1] and takes every 4th position.
    let expect = [vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]];
    for (r, e) in expect.iter().enumerate() {
        assert_eq!(
            &DistributedSampler::new(10, r, 4, None, false)
                .unwrap()
                .indices(0),
            e
        );
    }
    let dropped = [vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]];
    for (r, e) in dropped.iter().enumerate() {
        assert_eq!(
            &DistributedSampler::new(10, r, 4, None, true)
                .unwrap()
                .indices(0),
            e
        );
    }
}

#[test]
fn batch_sampler_rejects_zero() {
    assert!(matches!(
        BatchSampler::new(SequentialSampler::new(3), 0, false),
        Err(DataError::ZeroBatchSize)
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn permutation_samplers_yield_each_index_once(n in 0usize..300, seed: u64, epoch in 0u64..1000) {
        let expect: Vec<usize> = (0..n).collect();
        prop_assert_eq!(sorted(RandomSampler::new(n, seed).indices(epoch)), expect.clone());
        prop_assert_eq!(sorted(permutation(n, seed, epoch)), expect.clone());
        prop_assert_eq!(sorted(SequentialSampler::new(n).indices(epoch)), expect);
        let subset: Vec<usize> = (0..n).map(|i| i * 3 + 1).collect();
        prop_assert_eq!(sorted(SubsetRandomSampler::new(subset.clone(), seed).indices(epoch)), subset);
    }

    #[test]
    fn batch_sampler_covers_order_with_right_tail(n in 1usize..200, bs in 1usize..40, drop_last: bool, seed: u64) {
        let s = BatchSampler::new(RandomSampler::new(n, seed), bs, drop_last).unwrap();
        let batches = s.batches(1);
        prop_assert_eq!(batches.len(), s.len());
        let flat: Vec<usize> = batches.iter().flatten().copied().collect();
        prop_assert_eq!(s.num_samples(), flat.len());
        let order = RandomSampler::new(n, seed).indices(1);
        prop_assert_eq!(&flat[..], &order[..flat.len()]);
        for b in &batches[..batches.len().saturating_sub(1)] {
            prop_assert_eq!(b.len(), bs);
        }
        if drop_last {
            prop_assert_eq!(flat.len(), n / bs * bs);
        } else {
            prop_assert_eq!(flat.len(), n);
            prop_assert_eq!(batches.last().unwrap().len(), n - (n.div_ceil(bs) - 1) * bs);
        }
    }

    #[test]
    fn distributed_shards_equal_and_disjoint(n in 1usize..300, world in 1usize..9, seed: Option<u64>, epoch in 0u64..50, drop_last: bool) {
        let shards: Vec<Vec<usize>> = (0..world)
            .map(|r| DistributedSampler::new(n, r, world, seed, drop_last).unwrap().indices(epoch))
            .collect();
        let len = shards[0].len();
        for (r, s) in shards.iter().enumerate() {
            prop_assert_eq!(s.len(), len);
            prop_assert_eq!(DistributedSampler::new(n, r, world, seed, drop_last).unwrap().len(), len);
            prop_assert!(s.iter().all(|&i| i < n));
        }
        let all = sorted(shards.concat());
        if drop_last {
            prop_assert_eq!(len, n / world);
            let mut dedup = all.clone();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), all.len(), "shards overlap");
        } else {
            prop_assert_eq!(len, n.div_ceil(world));
            let mut dedup = all.clone();
            dedup.dedup();
            prop_assert_eq!(dedup, (0..n).collect::<Vec<_>>(), "every index covered");
        }
    }
}
