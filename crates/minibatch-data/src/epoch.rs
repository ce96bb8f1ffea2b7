//! `Epoch`: the batch iterator of one epoch, with optional worker threads.
//! Indexed datasets are handled here; streams in `stream_epoch`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use candle_core::Device;

use crate::batch::Batch;
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::sampler::BatchSampler;
use crate::stream_epoch::{StreamEpoch, StreamPlan};
use crate::workers::Workers;

/// What every batch of one epoch needs; built by the
/// [`DataLoader`](crate::DataLoader) and shared with worker threads.
pub(crate) struct Plan {
    /// The dataset batches are gathered from.
    pub(crate) dataset: Arc<dyn Dataset>,
    /// Cuts `order` into batches (the only place batch bounds are computed).
    pub(crate) batches: BatchSampler,
    /// The sampler's order for this epoch.
    pub(crate) order: Vec<usize>,
    /// The epoch number, passed to epoch-aware datasets.
    pub(crate) epoch: u64,
    /// Where batches are moved, if anywhere.
    pub(crate) device: Option<Device>,
}

impl Plan {
    fn num_batches(&self) -> usize {
        self.batches.len()
    }

    fn batch(&self, b: usize) -> Result<Batch> {
        let range = self.batches.batch_range(b, self.order.len());
        let batch = self
            .dataset
            .get_batch_in_epoch(&self.order[range], self.epoch)?;
        match &self.device {
            Some(d) => batch.to_device(d),
            None => Ok(batch),
        }
    }
}

/// Worker threads for one epoch, started at batch `start`: worker `w` builds
/// batches `start + w`, `start + w + n`, ... into its own bounded channel, and
/// the consumer reads the channels round-robin, so the order is exactly that
/// of the single-threaded loop.
struct Pool {
    start: usize,
    workers: Workers<Result<Batch>>,
}

impl Pool {
    fn spawn(plan: &Arc<Plan>, start: usize, n: usize, prefetch: usize) -> Self {
        let workers = Workers::spawn(
            n,
            prefetch,
            "minibatch-worker",
            |w| {
                let plan = Arc::clone(plan);
                move |tx: &SyncSender<Result<Batch>>, stop: &AtomicBool| {
                    let num_batches = plan.num_batches();
                    let mut b = start + w;
                    while b < num_batches && !stop.load(Ordering::Relaxed) {
                        let item =
                            catch_unwind(AssertUnwindSafe(|| plan.batch(b))).unwrap_or_else(|p| {
                                Err(DataError::worker_panic(
                                    format!("worker {w} panicked building batch {b}"),
                                    p.as_ref(),
                                ))
                            });
                        if tx.send(item).is_err() {
                            break; // the consumer went away
                        }
                        b += n;
                    }
                }
            },
            |e| Err(DataError::Worker(e)),
        );
        Self { start, workers }
    }

    fn recv(&self, b: usize) -> Result<Batch> {
        let w = (b - self.start) % self.workers.len();
        self.workers.recv(w).unwrap_or_else(|| {
            Err(DataError::Worker(format!(
                "worker {w} stopped before batch {b}"
            )))
        })
    }
}

/// The batches of one epoch: an `Iterator<Item = Result<Batch>>` returned by
/// [`DataLoader::epoch`](crate::DataLoader::epoch).
///
/// Batch `b` holds the samples at positions `b * batch_size ..` of the
/// epoch's order (the sampler's, or for a [`StreamDataset`](crate::StreamDataset)
/// the stream's). With workers, batches (or a stream's items) are built ahead
/// on background threads; dropping the iterator early stops and joins them
/// (after at most the item each is building). A failed batch is an `Err`
/// item; iteration may continue past it. The iterator always yields exactly
/// `len()` items.
pub struct Epoch {
    inner: Inner,
}

enum Inner {
    Indexed(Indexed),
    Stream(Box<StreamEpoch>),
}

/// An epoch over an indexed dataset.
struct Indexed {
    plan: Arc<Plan>,
    pos: usize,
    workers: usize,
    prefetch: usize,
    pool: Option<Pool>,
}

impl Epoch {
    /// The iterator over `plan`, on `workers` threads (0 = inline) holding up
    /// to `prefetch` batches each.
    pub(crate) fn new(plan: Plan, workers: usize, prefetch: usize) -> Self {
        Self {
            inner: Inner::Indexed(Indexed {
                plan: Arc::new(plan),
                pos: 0,
                workers,
                prefetch,
                pool: None,
            }),
        }
    }

    /// The iterator over a stream epoch.
    pub(crate) fn stream(plan: StreamPlan) -> Self {
        Self {
            inner: Inner::Stream(Box::new(StreamEpoch::new(plan))),
        }
    }

    /// Continues from batch `batch_index` (counted from the start of the
    /// epoch): the iterator then yields exactly the batches an uninterrupted
    /// run would yield from that index on, without building the skipped ones.
    /// An index `>= len()` of the loader yields nothing. Any worker threads
    /// already running are stopped and restarted at the new position.
    ///
    /// For a [`StreamDataset`](crate::StreamDataset) the items of the skipped
    /// batches are read again from the start of the stream (a deterministic
    /// replay) but not collated; a pass already running and not yet past the
    /// new position just reads on.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # use minibatch_data::{DataLoader, TensorDataset};
    /// # let ds = TensorDataset::new(vec![Tensor::arange(0u32, 10, &Device::Cpu).unwrap()]).unwrap();
    /// let loader = DataLoader::builder(ds).batch_size(3).shuffle(1).build().unwrap();
    /// let full: Vec<_> = loader.epoch(2).map(|b| b.unwrap().tensors()[0].to_vec1::<u32>().unwrap()).collect();
    /// let tail: Vec<_> = loader.epoch(2).skip_to(2).map(|b| b.unwrap().tensors()[0].to_vec1::<u32>().unwrap()).collect();
    /// assert_eq!(&full[2..], &tail[..]);
    /// ```
    pub fn skip_to(mut self, batch_index: usize) -> Self {
        match &mut self.inner {
            Inner::Indexed(e) => {
                e.pool = None;
                e.pos = batch_index.min(e.plan.num_batches());
            }
            Inner::Stream(e) => e.skip_to(batch_index),
        }
        self
    }

    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        match &self.inner {
            Inner::Indexed(e) => e.plan.epoch,
            Inner::Stream(e) => e.epoch(),
        }
    }

    /// The index of the next batch this iterator will yield.
    pub fn position(&self) -> usize {
        match &self.inner {
            Inner::Indexed(e) => e.pos,
            Inner::Stream(e) => e.position(),
        }
    }

    /// The sample order of this epoch (all batches, including skipped ones):
    /// the sampler's dataset indices. For a [`StreamDataset`](crate::StreamDataset)
    /// it is the item ids ([`StreamDataset::item_id`](crate::StreamDataset::item_id))
    /// in the order this rank reads them, replayed from the shard lengths on
    /// the first call (O(items) time and memory, nothing read).
    pub fn order(&self) -> &[usize] {
        match &self.inner {
            Inner::Indexed(e) => &e.plan.order,
            Inner::Stream(e) => e.order(),
        }
    }

    fn num_batches(&self) -> usize {
        match &self.inner {
            Inner::Indexed(e) => e.plan.num_batches(),
            Inner::Stream(e) => e.num_batches(),
        }
    }
}

impl Indexed {
    fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.pos >= self.plan.num_batches() {
            self.pool = None;
            return None;
        }
        let b = self.pos;
        self.pos += 1;
        if self.workers == 0 {
            return Some(self.plan.batch(b));
        }
        let pool = self
            .pool
            .get_or_insert_with(|| Pool::spawn(&self.plan, b, self.workers, self.prefetch));
        Some(pool.recv(b))
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match &mut self.inner {
            Inner::Indexed(e) => e.next_batch(),
            Inner::Stream(e) => e.next_batch(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.num_batches() - self.position();
        (left, Some(left))
    }
}

impl ExactSizeIterator for Epoch {}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, workers) = match &self.inner {
            Inner::Indexed(e) => ("indexed", e.workers),
            Inner::Stream(e) => ("stream", e.workers()),
        };
        f.debug_struct("Epoch")
            .field("kind", &kind)
            .field("epoch", &self.epoch())
            .field("pos", &self.position())
            .field("num_batches", &self.num_batches())
            .field("workers", &workers)
            .finish()
    }
}
