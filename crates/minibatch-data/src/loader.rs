//! `DataLoader` and its builder.

use std::sync::Arc;

use candle_core::Device;

use crate::dataset::Dataset;
use crate::epoch::{Epoch, Plan};
use crate::error::{DataError, Result};
use crate::sampler::{BatchSampler, DistributedSampler, RandomSampler, Sampler, SequentialSampler};
use crate::stream::StreamDataset;
use crate::stream_epoch::StreamPlan;

/// Turns a [`Dataset`] into seeded, shuffled, resumable mini-batches
/// (PyTorch's `DataLoader`).
///
/// The loader is immutable, `Send + Sync` and cheap to share by reference;
/// each call to [`epoch`](DataLoader::epoch) returns an independent iterator
/// whose order is a pure function of the sampler configuration and the epoch
/// number, so runs (and resumed runs, via [`Epoch::skip_to`]) are reproducible
/// to the bit and independent of `num_workers`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{DataLoader, TensorDataset};
/// let x = Tensor::arange(0f32, 20., &Device::Cpu).unwrap().reshape((10, 2)).unwrap();
/// let y = Tensor::arange(0u32, 10, &Device::Cpu).unwrap();
/// let loader = DataLoader::builder(TensorDataset::new(vec![x, y]).unwrap())
///     .batch_size(4)
///     .shuffle(42)
///     .build()
///     .unwrap();
/// assert_eq!(loader.len(), 3); // 4 + 4 + 2
/// let mut seen = 0;
/// for batch in loader.epoch(0) {
///     let (x, y) = batch.unwrap().into_pair().unwrap();
///     assert_eq!(x.dims()[0], y.dims()[0]);
///     seen += y.dims()[0];
/// }
/// assert_eq!(seen, 10);
/// ```
#[derive(Clone)]
pub struct DataLoader {
    dataset: Arc<dyn Dataset>,
    batches: BatchSampler,
    /// Set when `dataset` is a stream, read in order with this shuffle seed.
    stream: Option<(StreamDataset, Option<u64>)>,
    device: Option<Device>,
    num_workers: usize,
    prefetch: usize,
    force_workers: bool,
    /// `shuffle(seed)` as given, and whether a custom sampler was set (for [`DataLoader::sharded`]).
    shuffle: Option<u64>,
    custom_sampler: bool,
    shard: Option<Shard>,
}

/// One rank's share of a [`DataLoader`]'s samples in data-parallel training:
/// set with [`DataLoaderBuilder::shard`] or [`DataLoaderBuilder::shard_uneven`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// `false`: every rank gets the same count, the order padded by its
    /// head (training); `true`: every sample once, counts differing by
    /// at most one (evaluation).
    pub uneven: bool,
}

impl DataLoader {
    /// Starts configuring a loader over `dataset` (batch size 1, sequential
    /// order, keep the tail batch, no workers, prefetch 2).
    pub fn builder(dataset: impl Dataset + 'static) -> DataLoaderBuilder {
        DataLoaderBuilder::from_arc(Arc::new(dataset))
    }
    /// Batches per epoch.
    pub fn len(&self) -> usize {
        self.batches.len()
    }
    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
    /// The configured batch size (the last batch may be shorter unless `drop_last`).
    pub fn batch_size(&self) -> usize {
        self.batches.batch_size()
    }
    /// Samples yielded per epoch: the sampler's length, minus the dropped tail
    /// when `drop_last` is set.
    pub fn num_samples(&self) -> usize {
        self.batches.num_samples()
    }
    /// Whether the short tail batch is dropped.
    pub fn drop_last(&self) -> bool {
        self.batches.drop_last()
    }
    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }
    /// The sampler that orders each epoch. For a [`StreamDataset`] it is a
    /// [`SequentialSampler`] over the positions `0..len` of the rank's stream:
    /// the stream orders itself.
    pub fn sampler(&self) -> &Arc<dyn Sampler> {
        self.batches.sampler()
    }
    /// This rank's share, when the loader is sharded.
    pub fn shard(&self) -> Option<Shard> {
        self.shard
    }
    /// The same loader (dataset, batch size, seed, workers, device) with
    /// this rank's share of every epoch: what the builder's
    /// [`shard`](DataLoaderBuilder::shard) (`uneven = false`) or
    /// [`shard_uneven`](DataLoaderBuilder::shard_uneven) would have built.
    /// A loader with a custom sampler, a stream, or an other shard is
    /// [`DataError::InvalidConfig`].
    pub fn sharded(&self, rank: usize, world_size: usize, uneven: bool) -> Result<DataLoader> {
        let want = Shard {
            rank,
            world_size,
            uneven,
        };
        if self.shard == Some(want) {
            return Ok(self.clone());
        }
        if self.shard.is_some() {
            return Err(DataError::InvalidConfig(format!(
                "the loader is already sharded as {:?}; cannot make it {want:?}",
                self.shard
            )));
        }
        let mut b = DataLoaderBuilder::from_arc(Arc::clone(&self.dataset))
            .batch_size(self.batch_size())
            .drop_last(self.drop_last())
            .num_workers(self.num_workers)
            .force_workers(self.force_workers)
            .prefetch(self.prefetch);
        if self.custom_sampler {
            return Err(DataError::InvalidConfig(
                "a loader with a custom sampler cannot be sharded: build it with a \
                 DistributedSampler, or with shuffle(seed) and shard(rank, world_size)"
                    .into(),
            ));
        }
        if let Some(seed) = self.shuffle {
            b = b.shuffle(seed);
        }
        if let Some(d) = &self.device {
            b = b.to_device(d);
        }
        b = if uneven {
            b.shard_uneven(rank, world_size)
        } else {
            b.shard(rank, world_size)
        };
        b.build()
    }
    /// The device batches are moved to, if one was set.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }
    /// The number of background worker threads requested.
    pub fn num_workers(&self) -> usize {
        self.num_workers
    }
    /// Whether epochs really use worker threads; see
    /// [`DataLoaderBuilder::num_workers`] for the rule.
    pub fn uses_workers(&self) -> bool {
        uses_workers(
            self.num_workers,
            self.force_workers,
            self.dataset.as_ref(),
            self.device.as_ref(),
        )
    }
    /// The batches of epoch `epoch`, in order. The sample order is computed
    /// here (one sampler call); batches are built lazily as the iterator advances.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let workers = if self.uses_workers() {
            self.num_workers
        } else {
            0
        };
        if let Some((stream, seed)) = &self.stream {
            return Epoch::stream(StreamPlan {
                stream: stream.clone(),
                seed: *seed,
                epoch,
                batches: self.batches.clone(),
                device: self.device.clone(),
                workers,
                prefetch: self.prefetch,
            });
        }
        let plan = Plan {
            dataset: Arc::clone(&self.dataset),
            batches: self.batches.clone(),
            order: self.batches.sampler().indices(epoch),
            epoch,
            device: self.device.clone(),
        };
        Epoch::new(plan, workers, self.prefetch)
    }
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoader")
            .field("len", &self.len())
            .field("batches", &self.batches)
            .field("device", &self.device)
            .field("num_workers", &self.num_workers)
            .field("uses_workers", &self.uses_workers())
            .field("prefetch", &self.prefetch)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// The worker rule: threads run when asked for (`num_workers > 0`) unless the
/// batches are in-memory gathers that stay on the CPU and workers were not forced.
fn uses_workers(
    num_workers: usize,
    force: bool,
    dataset: &dyn Dataset,
    device: Option<&Device>,
) -> bool {
    num_workers > 0 && (force || !gathers_inline(dataset, device))
}

/// Whether batches are cheap in-memory gathers that stay on the CPU: the case
/// where the loader builds them on the calling thread by default.
fn gathers_inline(dataset: &dyn Dataset, device: Option<&Device>) -> bool {
    let moves_to_accelerator = device.is_some_and(|d| !d.is_cpu());
    dataset.is_in_memory() && !moves_to_accelerator
}

/// Configures a [`DataLoader`]; see [`DataLoader::builder`].
#[must_use]
pub struct DataLoaderBuilder {
    dataset: Arc<dyn Dataset>,
    batch_size: usize,
    shuffle: Option<u64>,
    sampler: Option<Arc<dyn Sampler>>,
    drop_last: bool,
    device: Option<Device>,
    num_workers: usize,
    prefetch: usize,
    force_workers: bool,
    shard: Option<Shard>,
}

impl DataLoaderBuilder {
    /// A builder over an already shared dataset.
    pub fn from_arc(dataset: Arc<dyn Dataset>) -> Self {
        Self {
            dataset,
            batch_size: 1,
            shuffle: None,
            sampler: None,
            drop_last: false,
            device: None,
            num_workers: 0,
            prefetch: 2,
            force_workers: false,
            shard: None,
        }
    }
    /// Samples per batch (must be >= 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// Shuffle every epoch with a [`RandomSampler`] seeded by `seed` (for a
    /// [`StreamDataset`]: permute its shards and shuffle through its buffer
    /// with `seed`). Cannot be combined with [`sampler`](Self::sampler).
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle = Some(seed);
        self
    }
    /// Use `sampler` to order each epoch. Cannot be combined with
    /// [`shuffle`](Self::shuffle), nor used with a [`StreamDataset`] (which
    /// has no random access; shard it with [`StreamDataset::distributed`]).
    pub fn sampler(mut self, sampler: impl Sampler + 'static) -> Self {
        self.sampler = Some(Arc::new(sampler));
        self
    }
    /// This process is rank `rank` of `world_size` in data-parallel
    /// training: each epoch it takes its share of the order that one
    /// process would use (the `(seed, epoch)` permutation of
    /// [`shuffle`](Self::shuffle), else `0..n`), in [`DistributedSampler`]'s
    /// layout: rank `r` takes positions `r, r + world_size, ...`, the order
    /// padded by its head to a multiple of `world_size` so every rank has the
    /// same number of batches. So `world_size` ranks at batch size `b` see,
    /// step by step, exactly the samples of one process at batch size
    /// `world_size * b`, when `world_size` divides the dataset's length (else
    /// the padding repeats `world_size - n % world_size` samples, as
    /// PyTorch's sampler does). `batch_size` is per rank.
    ///
    /// Not for a custom [`sampler`](Self::sampler) (give it a
    /// [`DistributedSampler`]) nor a [`StreamDataset`] (use
    /// [`StreamDataset::distributed`]): [`DataError::InvalidConfig`];
    /// `rank >= world_size` is [`DataError::InvalidRank`].
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use minibatch_data::{DataLoader, TensorDataset};
    /// let ds = || TensorDataset::new(vec![Tensor::arange(0u32, 12, &Device::Cpu).unwrap()]).unwrap();
    /// let ids = |l: &DataLoader| -> Vec<Vec<u32>> {
    ///     l.epoch(3).map(|b| b.unwrap().tensors()[0].to_vec1().unwrap()).collect()
    /// };
    /// let one = DataLoader::builder(ds()).batch_size(4).shuffle(7).build().unwrap();
    /// let r: Vec<_> = (0..2)
    ///     .map(|rank| DataLoader::builder(ds()).batch_size(2).shuffle(7).shard(rank, 2).build().unwrap())
    ///     .collect();
    /// for (k, batch) in ids(&one).iter().enumerate() {
    ///     let mut both = [ids(&r[0])[k].clone(), ids(&r[1])[k].clone()].concat();
    ///     let mut batch = batch.clone();
    ///     both.sort();
    ///     batch.sort();
    ///     assert_eq!(both, batch); // step k: the same samples, split over the ranks
    /// }
    /// ```
    pub fn shard(mut self, rank: usize, world_size: usize) -> Self {
        self.shard = Some(Shard {
            rank,
            world_size,
            uneven: false,
        });
        self
    }
    /// Like [`shard`](Self::shard), without padding: the ranks together
    /// see every sample exactly once ([`DistributedSampler::uneven`]), and
    /// their batch counts may differ by one. For evaluation, where each rank
    /// sums over its share and the sums are all-reduced.
    pub fn shard_uneven(mut self, rank: usize, world_size: usize) -> Self {
        self.shard = Some(Shard {
            rank,
            world_size,
            uneven: true,
        });
        self
    }
    /// Drop the last batch when it is shorter than the batch size.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }
    /// Move every batch to `device` (a no-op for data already there; for a
    /// dataset that fits on the GPU prefer [`TensorDataset::to_device`](crate::TensorDataset::to_device) once).
    pub fn to_device(mut self, device: &Device) -> Self {
        self.device = Some(device.clone());
        self
    }
    /// Build batches on this many background threads (0 = on the iterating
    /// thread). Batch order does not depend on it.
    ///
    /// **One exception, by default:** when the dataset is an in-memory one
    /// ([`Dataset::is_in_memory`]: a [`TensorDataset`](crate::TensorDataset),
    /// or `Subset`/`ConcatDataset`/`MapBatch` over them) and batches stay on the
    /// CPU, batches are gathered on the iterating thread anyway: such a gather
    /// is a row copy, cheaper than handing it to a thread that then competes
    /// with the training step for the cores (`cargo bench --bench data_loader`
    /// measures both). [`build`](Self::build) prints a one-line notice to
    /// stderr the first time this happens in a process;
    /// [`DataLoader::uses_workers`] tells whether threads run, and
    /// [`force_workers(true)`](Self::force_workers) runs them regardless.
    /// Batches moved to an accelerator with [`to_device`](Self::to_device)
    /// always use the workers, so the host-to-device copy overlaps the step.
    pub fn num_workers(mut self, num_workers: usize) -> Self {
        self.num_workers = num_workers;
        self
    }
    /// Run the `num_workers` threads even for in-memory datasets on the CPU,
    /// where the loader would otherwise gather batches inline (see
    /// [`num_workers`](Self::num_workers)). Default `false`.
    pub fn force_workers(mut self, force: bool) -> Self {
        self.force_workers = force;
        self
    }
    /// Batches each worker may hold ready ahead of the consumer (>= 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }
    /// Validates the configuration: batch size 0 ([`DataError::ZeroBatchSize`]),
    /// an empty dataset or sampler ([`DataError::EmptyDataset`]), `shuffle` together with
    /// `sampler` or `prefetch(0)` with workers ([`DataError::InvalidConfig`]).
    pub fn build(self) -> Result<DataLoader> {
        if self.batch_size == 0 {
            return Err(DataError::ZeroBatchSize);
        }
        if self.dataset.is_empty() {
            return Err(DataError::EmptyDataset(
                "the DataLoader's dataset has no samples".into(),
            ));
        }
        if self.num_workers > 0 && self.prefetch == 0 {
            return Err(DataError::InvalidConfig(
                "prefetch must be at least 1 when num_workers > 0".into(),
            ));
        }
        let n = self.dataset.len();
        let stream = self
            .dataset
            .as_stream()
            .and_then(|s| s.downcast_ref::<StreamDataset>())
            .cloned();
        if stream.is_some() && self.sampler.is_some() {
            return Err(DataError::InvalidConfig(
                "a StreamDataset is read in order and cannot take a sampler; use shuffle(seed) \
                 and StreamDataset::shuffle_buffer / distributed"
                    .into(),
            ));
        }
        if let Some(sh) = self.shard {
            if stream.is_some() {
                return Err(DataError::InvalidConfig(
                    "a StreamDataset is sharded by StreamDataset::distributed(rank, world_size), \
                     not by the loader's shard()"
                        .into(),
                ));
            }
            if self.sampler.is_some() {
                return Err(DataError::InvalidConfig(
                    "shard(rank, world_size) replaces the sampler; with a custom sampler, \
                     give it a DistributedSampler instead"
                        .into(),
                ));
            }
            if sh.world_size == 0 || sh.rank >= sh.world_size {
                return Err(DataError::InvalidRank {
                    rank: sh.rank,
                    world_size: sh.world_size,
                });
            }
        }
        let custom_sampler = self.sampler.is_some();
        let sampler: Arc<dyn Sampler> = match (self.shuffle, self.sampler) {
            _ if self.shard.is_some() => {
                let sh = self.shard.expect("checked");
                if sh.uneven {
                    Arc::new(DistributedSampler::uneven(
                        n,
                        sh.rank,
                        sh.world_size,
                        self.shuffle,
                    )?)
                } else {
                    Arc::new(DistributedSampler::new(
                        n,
                        sh.rank,
                        sh.world_size,
                        self.shuffle,
                        false,
                    )?)
                }
            }
            // A stream orders itself; the loader cuts its positions into batches.
            _ if stream.is_some() => Arc::new(SequentialSampler::new(n)),
            (Some(_), Some(_)) => return Err(DataError::InvalidConfig(
                "shuffle(seed) and sampler(..) are mutually exclusive; put the seed in the sampler"
                    .into(),
            )),
            (Some(seed), None) => Arc::new(RandomSampler::new(n, seed)),
            (None, Some(s)) => s,
            (None, None) => Arc::new(SequentialSampler::new(n)),
        };
        if sampler.is_empty() {
            return Err(DataError::EmptyDataset(
                "the DataLoader's sampler yields no indices".into(),
            ));
        }
        let batches = BatchSampler::from_arc(sampler, self.batch_size, self.drop_last)?;
        if self.num_workers > 0
            && !self.force_workers
            && gathers_inline(self.dataset.as_ref(), self.device.as_ref())
        {
            notice_inline_once(self.num_workers);
        }
        Ok(DataLoader {
            dataset: self.dataset,
            batches,
            stream: stream.map(|s| (s, self.shuffle)),
            device: self.device,
            num_workers: self.num_workers,
            prefetch: self.prefetch.max(1),
            force_workers: self.force_workers,
            shuffle: self.shuffle,
            custom_sampler,
            shard: self.shard,
        })
    }
}

impl std::fmt::Debug for DataLoaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoaderBuilder")
            .field("batch_size", &self.batch_size)
            .field("shuffle", &self.shuffle)
            .field("drop_last", &self.drop_last)
            .field("num_workers", &self.num_workers)
            .field("force_workers", &self.force_workers)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// Says once per process that `num_workers` is not used for an in-memory
/// dataset on the CPU, and how to change that.
fn notice_inline_once(num_workers: usize) {
    static NOTICE: std::sync::Once = std::sync::Once::new();
    NOTICE.call_once(|| {
        eprintln!(
            "minibatch-data: num_workers({num_workers}) is not used: batches of an in-memory \
             dataset on the CPU are gathered on the iterating thread, which is faster; \
             use DataLoaderBuilder::force_workers(true) to run the threads anyway \
             (this notice is printed once)"
        );
    });
}
