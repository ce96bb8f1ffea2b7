//! StreamDataset through the DataLoader: coverage over shards, workers and
//! ranks, order independent of workers, resume, shuffling, errors, lengths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use minibatch_data::rng::{below, derive_rng, fisher_yates};
use minibatch_data::{
    Batch, DataError, DataLoader, Dataset, FixedOrderSampler, Result, Sample, ShardIter,
    StreamDataset,
};
use proptest::prelude::*;

/// Item `i` of shard `s` has id `offset(s) + i` and is the sample
/// `[x = [id, id + 0.5] f32, y = id u32]`.
fn numbered(lengths: &[usize]) -> StreamDataset {
    let offsets = offsets(lengths);
    let lens = lengths.to_vec();
    StreamDataset::new(lengths.to_vec(), move |s| {
        let start = offsets[s];
        Ok(Box::new((start..start + lens[s]).map(item)) as ShardIter)
    })
    .unwrap()
}

fn offsets(lengths: &[usize]) -> Vec<usize> {
    lengths
        .iter()
        .scan(0, |acc, &l| {
            let o = *acc;
            *acc += l;
            Some(o)
        })
        .collect()
}

fn item(id: usize) -> Result<Sample> {
    Ok(Sample::pair(
        Tensor::new(&[id as f32, id as f32 + 0.5], &Device::Cpu)?,
        Tensor::new(id as u32, &Device::Cpu)?,
    ))
}

/// The ids of every batch, checking x agrees with y row by row.
fn ids(it: impl Iterator<Item = Result<Batch>>) -> Vec<Vec<usize>> {
    it.map(|b| {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let y = y.to_vec1::<u32>().unwrap();
        for (row, &id) in x.to_vec2::<f32>().unwrap().iter().zip(&y) {
            assert_eq!(row, &vec![id as f32, id as f32 + 0.5]);
        }
        y.into_iter().map(|v| v as usize).collect()
    })
    .collect()
}

fn loader(
    stream: StreamDataset,
    batch: usize,
    seed: Option<u64>,
    workers: usize,
    prefetch: usize,
    drop_last: bool,
) -> Result<DataLoader> {
    let b = DataLoader::builder(stream)
        .batch_size(batch)
        .num_workers(workers)
        .prefetch(prefetch)
        .drop_last(drop_last);
    match seed {
        Some(s) => b.shuffle(s).build(),
        None => b.build(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Every item exactly once per epoch across all ranks; each rank's order
    /// is the documented one (`StreamDataset::order`) and the same with any
    /// number of workers.
    #[test]
    fn every_item_once_across_ranks_and_workers(
        lengths in prop::collection::vec(0usize..25, 1..7),
        world in 1usize..4,
        workers in 0usize..4,
        buffer in 1usize..12,
        batch in 1usize..7,
        seed in prop::option::of(any::<u64>()),
        epoch in 0u64..20,
    ) {
        prop_assume!(lengths.len() >= world); // fewer shards than ranks is an error, tested below
        let total: usize = lengths.iter().sum();
        let mut all = Vec::new();
        for rank in 0..world {
            let stream = numbered(&lengths).shuffle_buffer(buffer).unwrap().distributed(rank, world).unwrap();
            let rank_len = stream.len();
            let expect_order = stream.order(seed, epoch);
            prop_assert_eq!(expect_order.len(), rank_len);
            let built = loader(stream.clone(), batch, seed, workers, 2, false);
            if rank_len == 0 {
                // A rank whose shards are all empty cannot train: a typed error, not a silent skip.
                prop_assert!(matches!(built, Err(DataError::EmptyDataset(_))));
                continue;
            }
            let l = built.unwrap();
            prop_assert_eq!(l.len(), rank_len.div_ceil(batch));
            prop_assert_eq!(l.num_samples(), rank_len);
            let got = ids(l.epoch(epoch));
            prop_assert_eq!(got.len(), l.len());
            let flat = got.concat();
            prop_assert_eq!(&flat, &expect_order);
            prop_assert_eq!(l.epoch(epoch).order().to_vec(), expect_order);
            if workers > 0 {
                let inline = loader(stream, batch, seed, 0, 2, false).unwrap();
                prop_assert_eq!(ids(inline.epoch(epoch)), got);
            }
            all.extend(flat);
        }
        all.sort_unstable();
        prop_assert_eq!(all, (0..total).collect::<Vec<_>>());
    }

    /// Resuming at any batch yields the tail of the uninterrupted epoch.
    #[test]
    fn skip_to_is_the_tail_of_the_epoch(
        lengths in prop::collection::vec(1usize..30, 1..5),
        workers in 0usize..3,
        batch in 1usize..9,
        skip in 0usize..40,
        drop_last: bool,
        seed: u64,
    ) {
        let l = loader(numbered(&lengths).shuffle_buffer(7).unwrap(), batch, Some(seed), workers, 1, drop_last).unwrap();
        let full = ids(l.epoch(3));
        prop_assert_eq!(full.len(), l.len());
        let tail = ids(l.epoch(3).skip_to(skip));
        prop_assert_eq!(&tail[..], &full[skip.min(full.len())..]);
    }
}

#[test]
fn order_does_not_depend_on_workers_or_prefetch() {
    let lengths = [13, 0, 40, 7, 22, 1, 30];
    let want = ids(loader(numbered(&lengths), 5, Some(9), 0, 2, false)
        .unwrap()
        .epoch(4));
    assert_eq!(want.concat().len(), 113);
    for workers in [1, 2, 3, 8] {
        for prefetch in [1, 3] {
            let l = loader(numbered(&lengths), 5, Some(9), workers, prefetch, false).unwrap();
            assert!(l.uses_workers());
            assert_eq!(
                ids(l.epoch(4)),
                want,
                "workers {workers} prefetch {prefetch}"
            );
        }
    }
}

#[test]
fn unshuffled_stream_is_the_round_robin_of_its_shards() {
    let l = loader(numbered(&[3, 1, 2]), 4, None, 2, 2, false).unwrap();
    // shard 0 = ids 0..3, shard 1 = 3, shard 2 = 4..6
    assert_eq!(ids(l.epoch(0)), vec![vec![0, 3, 4, 1], vec![5, 2]]);
    assert_eq!(ids(l.epoch(1)), ids(l.epoch(0)));
}

/// The order follows the algorithm documented on `StreamDataset`, rebuilt
/// here from the public generator: shard permutation, round-robin, shuffle
/// buffer (fill k, then emit a uniformly chosen slot replaced by the new item,
/// then drain uniformly with swap-remove).
#[test]
fn shuffled_order_follows_the_documented_algorithm() {
    let lengths = [9usize, 4, 0, 15, 6];
    let (seed, epoch, k, world) = (77u64, 5u64, 6usize, 2usize);
    let offs = offsets(&lengths);
    for rank in 0..world {
        let mut shards: Vec<usize> = (rank..lengths.len()).step_by(world).collect();
        fisher_yates(
            &mut derive_rng(seed, epoch, StreamDataset::SHARD_ORDER_STREAM + rank as u64),
            &mut shards,
        );
        let mut queues: Vec<std::collections::VecDeque<usize>> = shards
            .iter()
            .map(|&s| (offs[s]..offs[s] + lengths[s]).collect())
            .collect();
        let mut interleaved = Vec::new();
        while queues.iter().any(|q| !q.is_empty()) {
            for q in queues.iter_mut() {
                interleaved.extend(q.pop_front());
            }
        }
        let mut rng = derive_rng(seed, epoch, StreamDataset::BUFFER_STREAM + rank as u64);
        let (mut buf, mut want) = (Vec::new(), Vec::new());
        for x in interleaved {
            if buf.len() < k {
                buf.push(x);
            } else {
                let i = below(&mut rng, buf.len() as u64) as usize;
                want.push(std::mem::replace(&mut buf[i], x));
            }
        }
        while !buf.is_empty() {
            let i = below(&mut rng, buf.len() as u64) as usize;
            want.push(buf.swap_remove(i));
        }
        let stream = numbered(&lengths)
            .shuffle_buffer(k)
            .unwrap()
            .distributed(rank, world)
            .unwrap();
        assert_eq!(stream.order(Some(seed), epoch), want);
        let l = loader(stream, 4, Some(seed), 2, 2, false).unwrap();
        assert_eq!(ids(l.epoch(epoch)).concat(), want);
    }
}

#[test]
fn shuffle_differs_between_epochs_and_repeats_for_the_same_epoch() {
    let l = loader(numbered(&[50, 50, 50]), 10, Some(3), 2, 2, false).unwrap();
    let e0 = ids(l.epoch(0));
    assert_eq!(ids(l.epoch(0)), e0);
    assert_ne!(ids(l.epoch(1)), e0);
    let again = loader(numbered(&[50, 50, 50]), 10, Some(3), 0, 2, false).unwrap();
    assert_eq!(ids(again.epoch(0)), e0);
    let other_seed = loader(numbered(&[50, 50, 50]), 10, Some(4), 0, 2, false).unwrap();
    assert_ne!(ids(other_seed.epoch(0)), e0);
    // The buffer really mixes: items move away from their interleaved place.
    let plain = ids(loader(numbered(&[50, 50, 50]), 10, None, 0, 2, false)
        .unwrap()
        .epoch(0))
    .concat();
    let moved = e0
        .concat()
        .iter()
        .zip(&plain)
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 100, "only {moved} of 150 items moved");
}

#[test]
fn skip_to_after_partial_iteration_forward_and_back() {
    for workers in [0, 2] {
        let l = loader(numbered(&[20, 17, 9]), 4, Some(1), workers, 1, true).unwrap();
        let full = ids(l.epoch(2));
        assert_eq!(full.len(), 11);
        let mut it = l.epoch(2);
        let first: Vec<_> = ids(it.by_ref().take(3));
        assert_eq!(first, full[..3]);
        assert_eq!(it.position(), 3);
        let it = it.skip_to(6); // forward: keeps reading the same pass
        assert_eq!(it.len(), 5);
        let mut it = it;
        assert_eq!(ids(it.by_ref().take(1)), full[6..7]);
        let it = it.skip_to(1); // back: a new pass from the start
        assert_eq!(ids(it), full[1..]);
    }
}

#[test]
fn skipped_batches_are_read_but_not_collated() {
    // Items 0 and 1 have different shapes: collating batch 0 fails, so an
    // epoch resumed at batch 1 must not collate it.
    let opened = Arc::new(AtomicUsize::new(0));
    let o = Arc::clone(&opened);
    let stream = StreamDataset::new(vec![6], move |_| {
        o.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new((0..6u32).map(|i| {
            let width = if i == 1 { 3 } else { 2 };
            Ok(Sample::new(vec![Tensor::new(
                vec![i; width],
                &Device::Cpu,
            )?]))
        })) as ShardIter)
    })
    .unwrap();
    let l = DataLoader::builder(stream).batch_size(2).build().unwrap();
    let items: Vec<_> = l.epoch(0).collect();
    assert!(matches!(items[0], Err(DataError::ShapeMismatch(_))));
    assert!(items[1].is_ok() && items[2].is_ok());
    let resumed: Vec<_> = l.epoch(0).skip_to(1).collect();
    assert_eq!(resumed.len(), 2);
    assert!(resumed.iter().all(|b| b.is_ok()));
    assert_eq!(opened.load(Ordering::SeqCst), 2, "one pass per epoch");
}

#[test]
fn item_errors_arrive_as_err_items_and_iteration_continues() {
    for workers in [0, 2] {
        let stream = StreamDataset::new(vec![10, 10], |s| {
            Ok(Box::new((0..10usize).map(move |i| {
                if s == 1 && i == 3 {
                    Err(DataError::Structure("line 4 of shard 1 is not JSON".into()))
                } else {
                    item(s * 10 + i)
                }
            })) as ShardIter)
        })
        .unwrap();
        let l = DataLoader::builder(stream)
            .batch_size(4)
            .num_workers(workers)
            .build()
            .unwrap();
        let items: Vec<_> = l.epoch(0).collect();
        assert_eq!(items.len(), 5);
        // Unshuffled round-robin: shard 1 item 3 is position 7, in batch 1.
        let err = items[1].as_ref().unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
        for (b, item) in items.iter().enumerate() {
            assert_eq!(item.is_ok(), b != 1, "batch {b}");
        }
    }
}

#[test]
fn factory_failures_and_panics_stop_the_epoch_with_typed_errors() {
    for workers in [0, 2] {
        let stream = StreamDataset::new(vec![8, 8], |s| {
            if s == 1 {
                return Err(DataError::Io {
                    path: "part-1.jsonl".into(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
                });
            }
            Ok(Box::new((0..8).map(item)) as ShardIter)
        })
        .unwrap();
        let l = DataLoader::builder(stream)
            .batch_size(4)
            .num_workers(workers)
            .build()
            .unwrap();
        let items: Vec<_> = l.epoch(0).collect();
        assert_eq!(items.len(), 4);
        assert!(matches!(items[0], Err(DataError::Io { .. })));
        for later in &items[1..] {
            let err = later.as_ref().unwrap_err();
            assert!(matches!(err, DataError::StreamAborted(_)), "{err}");
            assert!(err.to_string().contains("part-1.jsonl"), "{err}");
        }
    }
    let panicking = StreamDataset::new(vec![4, 4], |s| {
        Ok(Box::new((0..4).map(move |i| {
            if s == 0 && i == 2 {
                panic!("decoder bug");
            }
            item(i)
        })) as ShardIter)
    })
    .unwrap();
    let l = DataLoader::builder(panicking)
        .batch_size(2)
        .num_workers(2)
        .build()
        .unwrap();
    let items: Vec<_> = l.epoch(0).collect();
    assert_eq!(items.len(), 4);
    let err = items[2].as_ref().unwrap_err();
    assert!(
        matches!(err, DataError::Worker(_)) && err.to_string().contains("decoder bug"),
        "{err}"
    );
}

fn combos(a: &[usize], b: &[bool], c: &[Option<u64>]) -> Vec<(usize, bool, Option<u64>)> {
    let mut v = Vec::new();
    for &x in a {
        for &y in b {
            for &z in c {
                v.push((x, y, z));
            }
        }
    }
    v
}

/// Shard 1 yields `actual` items while `declared` are declared.
fn lying(declared: usize, actual: usize) -> StreamDataset {
    StreamDataset::new(vec![10, declared], move |s| {
        let n = if s == 1 { actual } else { 10 };
        Ok(Box::new((0..n).map(item)) as ShardIter)
    })
    .unwrap()
}

#[test]
fn length_mismatch_is_a_clear_error_never_a_hang_or_truncation() {
    // Unshuffled with drop_last, the extra item of (10, 11) lies in the dropped
    // tail: it must still be reported (in place of the last batch).
    for (workers, drop_last, seed) in combos(&[0, 2], &[false, true], &[None, Some(5)]) {
        {
            for (declared, actual) in [(10, 7), (10, 13), (10, 11), (0, 1)] {
                let l = loader(lying(declared, actual), 3, seed, workers, 2, drop_last).unwrap();
                let items: Vec<_> = l.epoch(0).collect();
                assert_eq!(items.len(), l.len());
                let (b, err) = items
                    .iter()
                    .enumerate()
                    .find_map(|(b, r)| r.as_ref().err().map(|e| (b, e)))
                    .unwrap_or_else(|| panic!("{declared} vs {actual}: no error"));
                let more = actual > declared;
                assert!(
                    matches!(err, DataError::StreamLength { shard: 1, declared: d, more: m, .. } if *d == declared && *m == more),
                    "{err}"
                );
                let msg = err.to_string();
                assert!(
                    msg.contains("shard 1") && msg.contains(&declared.to_string()),
                    "{msg}"
                );
                for later in &items[b + 1..] {
                    assert!(matches!(later, Err(DataError::StreamAborted(_))));
                }
            }
        }
    }
}

#[test]
fn count_reads_each_shard_once_and_reports_errors() {
    let s =
        StreamDataset::count(3, |s| Ok(Box::new((0..s * 5 + 1).map(item)) as ShardIter)).unwrap();
    assert_eq!(s.shard_lengths(), &[1, 6, 11]);
    assert_eq!(s.total_len(), 18);
    assert_eq!(s.len(), 18);
    let l = DataLoader::builder(s).batch_size(4).build().unwrap();
    assert_eq!(ids(l.epoch(0)).concat().len(), 18);

    let err = StreamDataset::count(2, |s| {
        Ok(Box::new((0..3).map(move |i| {
            if s == 1 && i == 2 {
                Err(DataError::Structure("bad record".into()))
            } else {
                item(i)
            }
        })) as ShardIter)
    })
    .unwrap_err();
    assert!(err.to_string().contains("bad record"), "{err}");
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let factory = |_| Ok(Box::new(std::iter::empty()) as ShardIter);
    assert!(matches!(
        StreamDataset::new(Vec::<usize>::new(), factory),
        Err(DataError::InvalidConfig(_))
    ));
    assert!(matches!(
        numbered(&[3]).shuffle_buffer(0),
        Err(DataError::InvalidConfig(_))
    ));
    assert!(matches!(
        numbered(&[3, 3]).distributed(2, 2),
        Err(DataError::InvalidRank { .. })
    ));
    assert!(matches!(
        numbered(&[3, 3]).distributed(0, 3),
        Err(DataError::InvalidConfig(_))
    ));
    assert!(matches!(
        DataLoader::builder(numbered(&[3, 3]))
            .sampler(FixedOrderSampler::new(vec![0]))
            .build(),
        Err(DataError::InvalidConfig(_))
    ));
    assert!(matches!(
        DataLoader::builder(numbered(&[0, 0])).build(),
        Err(DataError::EmptyDataset(_))
    ));
    let s = numbered(&[3]);
    assert!(matches!(s.get(0), Err(DataError::NotIndexable(_))));
    assert!(matches!(s.get_batch(&[0]), Err(DataError::NotIndexable(_))));
}

#[test]
fn dropping_a_stream_epoch_early_does_not_hang() {
    let l = loader(numbered(&[5000, 5000, 5000]), 2, Some(1), 3, 1, false).unwrap();
    for _ in 0..10 {
        let mut it = l.epoch(0);
        assert!(it.next().unwrap().is_ok());
        drop(it);
    }
    drop(l.epoch(1)); // never iterated: no threads
}

/// The shard iterators of different workers run at the same time: each
/// shard's first item waits (at most 20 s) until both have started.
#[test]
fn workers_read_shards_in_parallel() {
    let started = Arc::new((Mutex::new(0usize), Condvar::new()));
    let saw_both = Arc::new(AtomicUsize::new(0));
    let (st, sb) = (Arc::clone(&started), Arc::clone(&saw_both));
    let stream = StreamDataset::new(vec![3, 3], move |s| {
        let (st, sb) = (Arc::clone(&st), Arc::clone(&sb));
        Ok(Box::new((0..3usize).map(move |i| {
            if i == 0 {
                let (lock, cv) = &*st;
                let mut n = lock.lock().unwrap();
                *n += 1;
                cv.notify_all();
                let (n, _) = cv
                    .wait_timeout_while(n, Duration::from_secs(20), |n| *n < 2)
                    .unwrap();
                if *n >= 2 {
                    sb.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert!(std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("minibatch-stream-worker")));
            item(s * 3 + i)
        })) as ShardIter)
    })
    .unwrap();
    let l = DataLoader::builder(stream)
        .batch_size(2)
        .num_workers(2)
        .build()
        .unwrap();
    assert_eq!(ids(l.epoch(0)).concat().len(), 6);
    assert_eq!(saw_both.load(Ordering::SeqCst), 2);
}

#[test]
fn stream_loader_reports_its_shape() {
    let s = numbered(&[10, 10, 10, 10, 10]).distributed(1, 2).unwrap();
    assert_eq!(s.shards(), &[1, 3]);
    assert_eq!(s.len(), 20);
    assert_eq!(s.total_len(), 50);
    assert_eq!(s.item_id(3, 4), 34);
    let l = loader(s, 6, Some(0), 1, 2, true).unwrap();
    assert_eq!((l.len(), l.num_samples()), (3, 18));
    assert_eq!(l.epoch(0).len(), 3);
    assert!(l.dataset().as_stream().is_some());
}
