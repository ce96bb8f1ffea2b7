//! DataLoader behaviour on every available device: coverage, tails, worker
//! and resume independence, early drop, error propagation, bad input.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use minibatch_data::{
    available_devices, random_split, ConcatDataset, DataError, DataLoader, Dataset,
    DistributedSampler, FixedOrderSampler, FnDataset, Map, MapBatch, Sample, SplitSizes, Subset,
    TensorDataset,
};
use proptest::prelude::*;

/// Rows `i` of x are `[i, i + 0.5]`, y is `i`.
fn numbered(n: usize, device: &Device) -> TensorDataset {
    let x: Vec<f32> = (0..n).flat_map(|i| [i as f32, i as f32 + 0.5]).collect();
    let x = Tensor::from_vec(x, (n, 2), device).unwrap();
    let y = Tensor::arange(0u32, n as u32, device).unwrap();
    TensorDataset::new(vec![x, y]).unwrap()
}

/// A non-in-memory dataset (so workers really run) with the same content.
fn numbered_fn(n: usize, device: &Device) -> impl Dataset + 'static {
    let device = device.clone();
    FnDataset::new(n, move |i| {
        Ok(Sample::pair(
            Tensor::new(&[i as f32, i as f32 + 0.5], &device)?,
            Tensor::new(i as u32, &device)?,
        ))
    })
}

/// The labels of every batch, checking x agrees with y row by row.
fn labels(
    it: impl Iterator<Item = minibatch_data::Result<minibatch_data::Batch>>,
) -> Vec<Vec<u32>> {
    it.map(|b| {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let y = y.to_vec1::<u32>().unwrap();
        let x = x.to_vec2::<f32>().unwrap();
        for (row, &label) in x.iter().zip(&y) {
            assert_eq!(row, &vec![label as f32, label as f32 + 0.5]);
        }
        y
    })
    .collect()
}

#[test]
fn batches_cover_dataset_with_right_tail() {
    for device in available_devices() {
        for drop_last in [false, true] {
            let loader = DataLoader::builder(numbered(10, &device))
                .batch_size(4)
                .shuffle(3)
                .drop_last(drop_last)
                .build()
                .unwrap();
            let got = labels(loader.epoch(0));
            assert_eq!(got.len(), loader.len());
            let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
            let flat: Vec<usize> = got.concat().into_iter().map(|v| v as usize).collect();
            assert_eq!(flat.len(), loader.num_samples());
            if drop_last {
                assert_eq!(sizes, vec![4, 4]);
            } else {
                assert_eq!(sizes, vec![4, 4, 2]);
                let mut s = flat.clone();
                s.sort();
                assert_eq!(s, (0..10).collect::<Vec<_>>());
            }
            assert_eq!(flat, loader.epoch(0).order()[..flat.len()].to_vec());
            assert_ne!(labels(loader.epoch(0)), labels(loader.epoch(1)));
        }
    }
}

#[test]
fn workers_and_resume_do_not_change_order() {
    for device in available_devices() {
        let reference = DataLoader::builder(numbered(103, &device))
            .batch_size(8)
            .shuffle(11)
            .build()
            .unwrap();
        for epoch in [0, 5] {
            let want = labels(reference.epoch(epoch));
            for workers in [1, 2, 3, 7] {
                for prefetch in [1, 4] {
                    let loader = DataLoader::builder(numbered_fn(103, &device))
                        .batch_size(8)
                        .shuffle(11)
                        .num_workers(workers)
                        .prefetch(prefetch)
                        .build()
                        .unwrap();
                    assert!(loader.uses_workers());
                    assert_eq!(labels(loader.epoch(epoch)), want, "workers {workers}");
                    for skip in [0, 1, 5, 12, 13, 14, 100] {
                        let tail = labels(loader.epoch(epoch).skip_to(skip));
                        assert_eq!(tail, want[skip.min(want.len())..].to_vec(), "skip {skip}");
                    }
                }
            }
        }
    }
}

/// In-memory CPU data is gathered inline unless workers are forced; forced
/// workers really build the batches, in the same order.
#[test]
fn in_memory_workers_are_explicit() {
    /// Appends a column saying whether the batch was built on a worker thread.
    fn on_worker(
        b: minibatch_data::Batch,
        _ctx: minibatch_data::TransformContext<'_>,
    ) -> minibatch_data::Result<minibatch_data::Batch> {
        let name = std::thread::current().name().map(str::to_string);
        let worker = name.is_some_and(|n| n.starts_with("minibatch-worker"));
        let flag = Tensor::full(u32::from(worker), b.len(), &Device::Cpu)?;
        let mut t = b.into_tensors();
        t.push(flag);
        minibatch_data::Batch::new(t)
    }
    let build = |force: bool| {
        DataLoader::builder(MapBatch::new(numbered(37, &Device::Cpu), on_worker))
            .batch_size(5)
            .shuffle(4)
            .num_workers(2)
            .force_workers(force)
            .build()
            .unwrap()
    };
    let flags_and_labels = |l: &DataLoader| -> (Vec<u32>, Vec<u32>) {
        let mut flags = Vec::new();
        let mut labels = Vec::new();
        for b in l.epoch(1) {
            let t = b.unwrap().into_tensors();
            labels.extend(t[1].to_vec1::<u32>().unwrap());
            flags.extend(t[2].to_vec1::<u32>().unwrap());
        }
        (flags, labels)
    };
    let inline = build(false);
    assert_eq!(inline.num_workers(), 2);
    assert!(!inline.uses_workers());
    let (flags, want) = flags_and_labels(&inline);
    assert!(flags.iter().all(|&f| f == 0));
    let forced = build(true);
    assert!(forced.uses_workers());
    let (flags, got) = flags_and_labels(&forced);
    assert!(flags.iter().all(|&f| f == 1));
    assert_eq!(got, want);
    // Not in memory: the workers run without forcing.
    let fnds = DataLoader::builder(numbered_fn(10, &Device::Cpu))
        .num_workers(1)
        .build()
        .unwrap();
    assert!(fnds.uses_workers());
    assert!(format!("{fnds:?}").contains("uses_workers: true"));
}

#[test]
fn skip_to_after_partial_iteration_restarts_cleanly() {
    let loader = DataLoader::builder(numbered_fn(50, &Device::Cpu))
        .batch_size(5)
        .shuffle(1)
        .num_workers(2)
        .build()
        .unwrap();
    let want = labels(loader.epoch(0));
    let mut it = loader.epoch(0);
    let _ = it.next();
    let _ = it.next();
    let it = it.skip_to(7);
    assert_eq!(it.len(), 3);
    assert_eq!(labels(it), want[7..].to_vec());
}

#[test]
fn skip_to_does_not_build_skipped_batches() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let ds = FnDataset::new(40, move |i| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(Sample::new(vec![Tensor::new(i as u32, &Device::Cpu)?]))
    });
    let loader = DataLoader::builder(ds).batch_size(4).build().unwrap();
    let n = loader.epoch(0).skip_to(8).count();
    assert_eq!(n, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 8);
}

#[test]
fn dropping_a_worker_epoch_early_does_not_hang() {
    let loader = DataLoader::builder(numbered_fn(10_000, &Device::Cpu))
        .batch_size(2)
        .num_workers(3)
        .prefetch(2)
        .build()
        .unwrap();
    for _ in 0..20 {
        let mut it = loader.epoch(0);
        assert!(it.next().unwrap().is_ok());
        drop(it);
    }
    // An epoch never iterated starts no threads at all.
    drop(loader.epoch(1));
}

#[test]
fn errors_and_panics_propagate_as_err_items() {
    for workers in [0, 2] {
        let ds = FnDataset::new(12, |i| {
            if i == 5 {
                return Err(DataError::Structure("sample 5 is broken".into()));
            }
            if i == 9
                && std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("minibatch-worker"))
            {
                panic!("boom at 9");
            }
            Ok(Sample::new(vec![Tensor::new(i as u32, &Device::Cpu)?]))
        });
        let loader = DataLoader::builder(ds)
            .batch_size(2)
            .num_workers(workers)
            .build()
            .unwrap();
        let items: Vec<_> = loader.epoch(0).collect();
        assert_eq!(items.len(), 6);
        let err = items[2].as_ref().unwrap_err();
        assert!(err.to_string().contains("sample 5 is broken"), "{err}");
        if workers > 0 {
            let err = items[4].as_ref().unwrap_err();
            assert!(
                matches!(err, DataError::Worker(_)) && err.to_string().contains("boom at 9"),
                "{err}"
            );
        }
        assert!(items[5].is_ok());
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let ds = || numbered(10, &Device::Cpu);
    assert!(matches!(
        DataLoader::builder(ds()).batch_size(0).build(),
        Err(DataError::ZeroBatchSize)
    ));
    let empty = FnDataset::new(0, |_| unreachable!());
    assert!(matches!(
        DataLoader::builder(empty).build(),
        Err(DataError::EmptyDataset(_))
    ));
    let both = DataLoader::builder(ds())
        .shuffle(1)
        .sampler(FixedOrderSampler::new(vec![0]))
        .build();
    assert!(matches!(both, Err(DataError::InvalidConfig(_))));
    assert!(matches!(
        DataLoader::builder(ds()).num_workers(1).prefetch(0).build(),
        Err(DataError::InvalidConfig(_))
    ));

    let a = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::U32, &Device::Cpu).unwrap();
    let err = TensorDataset::new(vec![a, b]).unwrap_err();
    assert!(matches!(err, DataError::ShapeMismatch(_)));
    assert!(
        err.to_string().contains("3 rows") && err.to_string().contains("has 4"),
        "{err}"
    );
    assert!(matches!(
        TensorDataset::new(vec![]),
        Err(DataError::EmptyDataset(_))
    ));

    let err = ds().get_batch(&[1, 10]).unwrap_err();
    assert!(
        matches!(err, DataError::IndexOutOfRange { index: 10, len: 10 }),
        "{err}"
    );
    assert!(matches!(
        ds().get(11),
        Err(DataError::IndexOutOfRange { .. })
    ));

    // A replayed order pointing past the dataset fails that batch only.
    let loader = DataLoader::builder(ds())
        .sampler(FixedOrderSampler::new(vec![0, 1, 2, 99]))
        .batch_size(2)
        .build()
        .unwrap();
    let items: Vec<_> = loader.epoch(0).collect();
    assert!(items[0].is_ok());
    assert!(matches!(
        items[1],
        Err(DataError::IndexOutOfRange { index: 99, .. })
    ));

    for bad in [&[0.5, 0.6][..], &[1.2, -0.2], &[]] {
        assert!(
            matches!(random_split(ds(), bad, 0), Err(DataError::InvalidSplit(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        random_split(ds(), &[3usize, 3], 0),
        Err(DataError::InvalidSplit(_))
    ));
}

#[test]
fn fixed_order_replays_exactly() {
    for device in available_devices() {
        let order = vec![9, 0, 0, 3, 7, 7, 1];
        let loader = DataLoader::builder(numbered(10, &device))
            .sampler(FixedOrderSampler::new(order.clone()))
            .batch_size(3)
            .build()
            .unwrap();
        let got: Vec<u32> = labels(loader.epoch(4)).concat();
        assert_eq!(got, order.iter().map(|&i| i as u32).collect::<Vec<_>>());
    }
}

#[test]
fn split_subset_concat_compose() {
    for device in available_devices() {
        let parts =
            random_split(numbered(10, &device), SplitSizes::Fractions(&[0.7, 0.3]), 4).unwrap();
        assert_eq!((parts[0].len(), parts[1].len()), (7, 3));
        let mut all: Vec<usize> = parts.iter().flat_map(|p| p.indices().to_vec()).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let three = random_split(numbered(10, &device), &[1.0 / 3.0; 3], 4).unwrap();
        assert_eq!(
            three.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );

        let base: Arc<dyn Dataset> = Arc::new(numbered(10, &device));
        let sub = Subset::from_arc(Arc::clone(&base), vec![8, 2]).unwrap();
        assert!(matches!(
            Subset::from_arc(Arc::clone(&base), vec![10]),
            Err(DataError::IndexOutOfRange { .. })
        ));
        let cat = ConcatDataset::new(vec![Arc::new(sub), Arc::clone(&base)]).unwrap();
        assert_eq!(cat.len(), 12);
        let loader = DataLoader::builder(cat).batch_size(5).build().unwrap();
        let got = labels(loader.epoch(0)).concat();
        assert_eq!(got, vec![8, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }
}

#[test]
fn transforms_see_the_epoch() {
    for device in available_devices() {
        // x -> x + epoch * 1000 + index, per sample.
        let per_sample = Map::new(numbered(6, &device), |s: Sample, ctx| {
            let t = s.into_tensors();
            let shifted = (&t[0] + (ctx.epoch * 1000 + ctx.indices[0] as u64) as f64)?;
            Ok(Sample::new(vec![shifted, t[1].clone()]))
        });
        // x -> x * (epoch + 1), per batch.
        let per_batch = MapBatch::new(numbered(6, &device), |b: minibatch_data::Batch, ctx| {
            let t = b.into_tensors();
            minibatch_data::Batch::new(vec![(&t[0] * (ctx.epoch + 1) as f64)?, t[1].clone()])
        });
        let l1 = DataLoader::builder(per_sample)
            .batch_size(4)
            .shuffle(2)
            .build()
            .unwrap();
        let l2 = DataLoader::builder(per_batch)
            .batch_size(4)
            .shuffle(2)
            .num_workers(2)
            .build()
            .unwrap();
        for epoch in [0u64, 3] {
            for b in l1.epoch(epoch) {
                let (x, y) = b.unwrap().into_pair().unwrap();
                for (row, i) in x
                    .to_vec2::<f32>()
                    .unwrap()
                    .iter()
                    .zip(y.to_vec1::<u32>().unwrap())
                {
                    let base = (epoch * 1000) as f32 + i as f32;
                    assert_eq!(row, &vec![i as f32 + base, i as f32 + 0.5 + base]);
                }
            }
            for b in l2.epoch(epoch) {
                let (x, y) = b.unwrap().into_pair().unwrap();
                for (row, i) in x
                    .to_vec2::<f32>()
                    .unwrap()
                    .iter()
                    .zip(y.to_vec1::<u32>().unwrap())
                {
                    let k = (epoch + 1) as f32;
                    assert_eq!(row, &vec![i as f32 * k, (i as f32 + 0.5) * k]);
                }
            }
        }
    }
}

#[test]
fn distributed_loaders_partition_an_epoch() {
    let world = 3;
    let mut seen = Vec::new();
    for rank in 0..world {
        let s = DistributedSampler::new(20, rank, world, Some(5), true).unwrap();
        let loader = DataLoader::builder(numbered(20, &Device::Cpu))
            .sampler(s)
            .batch_size(4)
            .build()
            .unwrap();
        assert_eq!(loader.num_samples(), 6);
        seen.extend(labels(loader.epoch(2)).concat());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 18);
}

#[test]
fn to_device_moves_batches() {
    for device in available_devices() {
        let loader = DataLoader::builder(numbered(5, &Device::Cpu))
            .batch_size(2)
            .to_device(&device)
            .build()
            .unwrap();
        for b in loader.epoch(0) {
            assert!(b
                .unwrap()
                .tensors()
                .iter()
                .all(|t| t.device().same_device(&device)));
        }
        let moved = numbered(5, &Device::Cpu).to_device(&device).unwrap();
        assert!(moved.tensors()[0].device().same_device(&device));
    }
}

#[test]
fn loader_is_send_sync_and_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<DataLoader>();
    assert_send::<minibatch_data::Epoch>();
    let loader = DataLoader::builder(numbered(30, &Device::Cpu))
        .batch_size(7)
        .shuffle(9)
        .build()
        .unwrap();
    let want = labels(loader.epoch(1));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| labels(loader.epoch(1))))
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), want);
        }
    });
}

#[test]
fn parse_device_strings() {
    assert!(minibatch_data::parse_device("cpu").unwrap().is_cpu());
    assert!(minibatch_data::parse_device(" CPU ").unwrap().is_cpu());
    for bad in ["tpu", "cuda:x", ""] {
        assert!(matches!(
            minibatch_data::parse_device(bad),
            Err(DataError::Device(_))
        ));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let err = minibatch_data::parse_device("cuda:0").unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn resume_and_workers_match_uninterrupted(n in 1usize..60, bs in 1usize..9, seed: u64, epoch in 0u64..100, workers in 0usize..4, skip in 0usize..12, drop_last: bool) {
        // The generator only makes valid configurations (n >= 1, bs >= 1), so
        // a failed build fails the case instead of skipping it.
        let base = DataLoader::builder(numbered(n, &Device::Cpu)).batch_size(bs).shuffle(seed).drop_last(drop_last)
            .build().map_err(|e| TestCaseError::fail(format!("valid config rejected: {e}")))?;
        let want = labels(base.epoch(epoch));
        prop_assert_eq!(want.len(), base.len());
        let loader = DataLoader::builder(numbered_fn(n, &Device::Cpu)).batch_size(bs).shuffle(seed)
            .drop_last(drop_last).num_workers(workers).build().unwrap();
        prop_assert_eq!(labels(loader.epoch(epoch).skip_to(skip)), want[skip.min(want.len())..].to_vec());
        let flat = want.concat();
        if drop_last { prop_assert_eq!(flat.len(), n / bs * bs); } else { prop_assert_eq!(flat.len(), n); }
    }
}

#[test]
fn get_batch_matches_index_select_for_all_layouts_and_dtypes() {
    for device in available_devices() {
        let base = Tensor::arange(0f32, 60., &device)
            .unwrap()
            .reshape((6, 10))
            .unwrap();
        let tensors = vec![
            base.clone(),
            base.t().unwrap(), // non-contiguous (10, 6)
            base.narrow(1, 2, 3)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .t()
                .unwrap(),
            base.to_dtype(DType::F64).unwrap(),
            base.to_dtype(DType::U8).unwrap(),
            base.to_dtype(DType::I64).unwrap(),
            base.to_dtype(DType::BF16).unwrap(),
            base.narrow(0, 2, 4).unwrap(), // contiguous view with an offset
            base.reshape((6, 2, 5)).unwrap(),
        ];
        for t in tensors {
            let n = t.dims()[0];
            let ds = TensorDataset::new(vec![t.clone()]).unwrap();
            let ids: Vec<usize> = (0..n).rev().chain([0, n - 1]).collect();
            let got = ds.get_batch(&ids).unwrap().into_tensors().remove(0);
            let idx = Tensor::from_vec(
                ids.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                ids.len(),
                &device,
            )
            .unwrap();
            let want = t.contiguous().unwrap().index_select(&idx, 0).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.dtype(), want.dtype());
            let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{:?} {:?}", t.dims(), t.dtype());
        }
    }
}
