//! `StreamDataset`: data that can only be read in order (PyTorch's
//! `IterableDataset`), sharded, shuffled through a buffer, resumable.

use std::sync::Arc;

use rayon::prelude::*;

use crate::batch::{Batch, Sample};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::rng::{derive_rng, fisher_yates};
use crate::stream_order::{RoundRobin, ShuffleBuffer};

/// The iterator a [`StreamDataset`]'s factory returns for one shard: that
/// shard's samples, in order. An `Err` item is a sample that failed (it keeps
/// its place in the stream and makes its batch an `Err`).
pub type ShardIter = Box<dyn Iterator<Item = Result<Sample>> + Send>;

type Factory = dyn Fn(usize) -> Result<ShardIter> + Send + Sync;

/// A dataset read in order from one iterator per shard: a huge JSONL, CSV or
/// text file (one shard per file or per byte range), a generator, a socket
/// replay; PyTorch's `IterableDataset`.
///
/// Give it to [`DataLoader::builder`](crate::DataLoader::builder) like any
/// dataset. The loader then reads it as a stream instead of indexing it, and
/// keeps its usual guarantees: the order is a pure function of
/// `(seed, epoch)`, the same for any `num_workers`, and an epoch resumes at any
/// batch with [`Epoch::skip_to`](crate::Epoch::skip_to).
///
/// # The order of an epoch
///
/// For rank `r` of `world_size` (see [`distributed`](Self::distributed)):
///
/// 1. **Shards**: the rank reads the shards `s` with `s % world_size == r`
///    (each shard belongs to exactly one rank: no duplicates, no gaps). With
///    `shuffle(seed)` on the loader, their order is permuted each epoch by
///    Fisher-Yates over `derive_rng(seed, epoch, SHARD_ORDER_STREAM + r)`
///    ([`rng::derive_rng`](crate::rng::derive_rng), [`Self::SHARD_ORDER_STREAM`]).
/// 2. **Interleave**: one item from each shard in turn (round-robin), skipping
///    shards that have ended: `s0[0], s1[0], s2[0], s0[1], ...`.
/// 3. **Shuffle buffer** (with `shuffle(seed)` only): torchdata's `Shuffler`
///    with `k` = [`shuffle_buffer`](Self::shuffle_buffer) items: the first `k`
///    items fill the buffer; then each new item takes the place of a
///    uniformly chosen buffered one, which is emitted; at the end the buffer
///    drains in random order. Draws come from
///    `derive_rng(seed, epoch, BUFFER_STREAM + r)` ([`Self::BUFFER_STREAM`]). An item moves at most `k`
///    places earlier; memory is `k` samples.
/// 4. **Batches**: consecutive items, cut by the loader's batch size (the
///    short tail kept or dropped as `drop_last` says).
///
/// Steps 1-3 depend only on the shard lengths and the generator, so the order
/// is known without reading: [`order`](Self::order) replays it on item ids.
///
/// # Length
///
/// The loader needs the number of items up front (batches per epoch, the
/// Trainer's progress and resume). Either declare each shard's length
/// ([`new`](Self::new): free, e.g. from the line counts you stored next to the
/// files) or let [`count`](Self::count) read every shard once at build (cost:
/// one full pass over the data, shards in parallel). Every epoch then checks
/// that each shard yields exactly its length: fewer or more items is a
/// [`DataError::StreamLength`] naming the shard, returned in place of the batch
/// being built; the rest of that epoch's batches are
/// [`DataError::StreamAborted`]. Never a hang, never a silent truncation.
///
/// # Workers
///
/// With `num_workers(n)`, the rank's shards are dealt to `min(n, shards)`
/// threads (shard `j` of the epoch's shard order to thread `j % n`), which
/// pull their iterators (reading and decoding in parallel) into bounded
/// channels; the calling thread interleaves, shuffles and collates them in
/// the order above, so the order does not depend on `n`. Use at least as many
/// shards per rank as workers; a stream with one shard is read by one thread.
///
/// # Resume
///
/// `loader.epoch(e).skip_to(b)` replays the epoch from its start, reading (but
/// not collating) the items of the first `b` batches, and then yields exactly
/// the batches an uninterrupted epoch yields from `b` on. The cost of a resume
/// is reading those items again.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_data::{DataLoader, Sample, ShardIter, StreamDataset};
/// # fn main() -> minibatch_data::Result<()> {
/// // Four shards of 25 numbered "lines" each, parsed on the loader's workers.
/// let stream = StreamDataset::new(vec![25; 4], |shard| {
///     let lines = (0..25).map(move |i| format!("{}", shard * 25 + i));
///     let samples = lines.map(|line| {
///         let v: u32 = line.parse().map_err(|_| minibatch_data::DataError::Structure(line.clone()))?;
///         Ok(Sample::new(vec![Tensor::new(v, &Device::Cpu)?]))
///     });
///     Ok(Box::new(samples) as ShardIter)
/// })?
/// .shuffle_buffer(16)?;
/// let loader = DataLoader::builder(stream).batch_size(10).shuffle(7).num_workers(2).build()?;
/// assert_eq!(loader.len(), 10);
/// let mut seen: Vec<u32> = Vec::new();
/// for batch in loader.epoch(0) {
///     seen.extend(batch?.tensors()[0].to_vec1::<u32>()?);
/// }
/// seen.sort();
/// assert_eq!(seen, (0..100).collect::<Vec<_>>());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct StreamDataset {
    factory: Arc<Factory>,
    lengths: Arc<[usize]>,
    offsets: Arc<[usize]>,
    buffer: usize,
    rank: usize,
    world_size: usize,
    shards: Arc<[usize]>,
    len: usize,
}

impl StreamDataset {
    /// The `stream` argument of [`derive_rng`] for the shard order of rank
    /// `r`: `SHARD_ORDER_STREAM + r`.
    pub const SHARD_ORDER_STREAM: u64 = 0x5354_524d_0000_0000; // "STRM" << 32
    /// The `stream` argument of [`derive_rng`] for the shuffle buffer of rank
    /// `r`: `BUFFER_STREAM + r`.
    pub const BUFFER_STREAM: u64 = 0x5354_524d_8000_0000;
    /// The shuffle buffer size unless [`shuffle_buffer`](Self::shuffle_buffer) sets one.
    pub const DEFAULT_BUFFER: usize = 1000;

    /// A stream of `shard_lengths.len()` shards, shard `s` holding
    /// `shard_lengths[s]` items, read from `factory(s)`. The factory is called
    /// once per shard per epoch (and again when an epoch is resumed), on a
    /// worker thread when the loader has workers.
    ///
    /// No shards is [`DataError::InvalidConfig`].
    pub fn new<F>(shard_lengths: impl Into<Vec<usize>>, factory: F) -> Result<Self>
    where
        F: Fn(usize) -> Result<ShardIter> + Send + Sync + 'static,
    {
        Self::from_parts(Arc::new(factory), shard_lengths.into())
    }

    /// A stream of `num_shards` shards whose lengths are found by reading every
    /// shard once, here (shards in parallel on rayon's pool). The cost is one
    /// full pass over the data, decoding included; declare the lengths with
    /// [`new`](Self::new) when you know them. The first error a shard or one
    /// of its items returns is returned.
    pub fn count<F>(num_shards: usize, factory: F) -> Result<Self>
    where
        F: Fn(usize) -> Result<ShardIter> + Send + Sync + 'static,
    {
        let factory: Arc<Factory> = Arc::new(factory);
        let lengths = (0..num_shards)
            .into_par_iter()
            .map(|s| {
                let mut n = 0usize;
                for item in factory(s)? {
                    item?;
                    n += 1;
                }
                Ok(n)
            })
            .collect::<Result<Vec<usize>>>()?;
        Self::from_parts(factory, lengths)
    }

    fn from_parts(factory: Arc<Factory>, lengths: Vec<usize>) -> Result<Self> {
        if lengths.is_empty() {
            return Err(DataError::InvalidConfig(
                "a StreamDataset needs at least one shard".into(),
            ));
        }
        let mut offsets = Vec::with_capacity(lengths.len());
        let mut total = 0usize;
        for &l in &lengths {
            offsets.push(total);
            total = total.checked_add(l).ok_or_else(|| {
                DataError::InvalidConfig("the shard lengths overflow usize".into())
            })?;
        }
        let mut s = Self {
            factory,
            lengths: lengths.into(),
            offsets: offsets.into(),
            buffer: Self::DEFAULT_BUFFER,
            rank: 0,
            world_size: 1,
            shards: Arc::from(Vec::new()),
            len: 0,
        };
        s.assign_shards();
        Ok(s)
    }

    fn assign_shards(&mut self) {
        let shards: Vec<usize> = (self.rank..self.lengths.len())
            .step_by(self.world_size)
            .collect();
        self.len = shards.iter().map(|&s| self.lengths[s]).sum();
        self.shards = shards.into();
    }

    /// Shuffle through a buffer of `k` items when the loader shuffles
    /// (default [`DEFAULT_BUFFER`](Self::DEFAULT_BUFFER)). Larger is more random and holds
    /// more samples in memory. `k == 0` is [`DataError::InvalidConfig`].
    pub fn shuffle_buffer(mut self, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(DataError::InvalidConfig(
                "the shuffle buffer needs at least 1 item".into(),
            ));
        }
        self.buffer = k;
        Ok(self)
    }

    /// This process is rank `rank` of `world_size` in data-parallel training:
    /// it reads the shards `s` with `s % world_size == rank`, so the ranks
    /// together read every item exactly once per epoch. Every rank must build
    /// the same stream and use the same loader seed.
    ///
    /// `world_size == 0` or `rank >= world_size` is [`DataError::InvalidRank`];
    /// fewer shards than ranks is [`DataError::InvalidConfig`]. Ranks get
    /// different item counts when their shards differ in length (each rank's
    /// loader reports its own `len()`); make the shards equally long when the
    /// ranks must take the same number of steps.
    pub fn distributed(mut self, rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(DataError::InvalidRank { rank, world_size });
        }
        if self.lengths.len() < world_size {
            return Err(DataError::InvalidConfig(format!(
                "{} shards cannot be split over {world_size} ranks: every rank needs a shard",
                self.lengths.len()
            )));
        }
        self.rank = rank;
        self.world_size = world_size;
        self.assign_shards();
        Ok(self)
    }

    /// The number of shards (all ranks).
    pub fn num_shards(&self) -> usize {
        self.lengths.len()
    }
    /// The declared (or counted) length of every shard.
    pub fn shard_lengths(&self) -> &[usize] {
        &self.lengths
    }
    /// The shards this rank reads, ascending.
    pub fn shards(&self) -> &[usize] {
        &self.shards
    }
    /// Items over all ranks. (`Dataset::len` is this rank's share.)
    pub fn total_len(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0) + self.lengths.last().copied().unwrap_or(0)
    }
    /// The shuffle buffer size.
    pub fn buffer_size(&self) -> usize {
        self.buffer
    }
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// The id of item `index` of shard `shard`: `index` plus the lengths of
    /// all shards before it (ids run over all ranks' items, `0..total_len()`).
    pub fn item_id(&self, shard: usize, index: usize) -> usize {
        self.offsets[shard] + index
    }

    /// The ids (see [`item_id`](Self::item_id)) of this rank's items in the
    /// order the loader yields them in `epoch`, when it shuffles with `seed`
    /// (`None`: no shuffling). Computed from the shard lengths alone, without
    /// reading anything; O(items) time and memory.
    pub fn order(&self, seed: Option<u64>, epoch: u64) -> Vec<usize> {
        let shards = self.shard_order(seed, epoch);
        let mut rr = RoundRobin::new(shards.len());
        let mut read = vec![0usize; shards.len()];
        let mut buffer = self.shuffle_buffer_for(seed, epoch);
        let mut out = Vec::with_capacity(self.len);
        while let Some(slot) = rr.current() {
            let s = shards[slot];
            if read[slot] < self.lengths[s] {
                out.extend(buffer.push(self.offsets[s] + read[slot]));
                read[slot] += 1;
                rr.advance();
            } else {
                rr.finish_current();
            }
        }
        while let Some(id) = buffer.drain_one() {
            out.push(id);
        }
        out
    }

    /// This rank's shards in the order of `epoch`.
    pub(crate) fn shard_order(&self, seed: Option<u64>, epoch: u64) -> Vec<usize> {
        let mut shards = self.shards.to_vec();
        if let Some(seed) = seed {
            let stream = Self::SHARD_ORDER_STREAM.wrapping_add(self.rank as u64);
            fisher_yates(&mut derive_rng(seed, epoch, stream), &mut shards);
        }
        shards
    }

    /// The shuffle buffer of `epoch` (a pass-through without a seed).
    pub(crate) fn shuffle_buffer_for<T>(&self, seed: Option<u64>, epoch: u64) -> ShuffleBuffer<T> {
        let rng =
            seed.map(|s| derive_rng(s, epoch, Self::BUFFER_STREAM.wrapping_add(self.rank as u64)));
        ShuffleBuffer::new(self.buffer, rng)
    }

    /// The declared length of `shard`.
    pub(crate) fn shard_len(&self, shard: usize) -> usize {
        self.lengths[shard]
    }

    /// Calls the factory for `shard`.
    pub(crate) fn open(&self, shard: usize) -> Result<ShardIter> {
        (self.factory)(shard)
    }

    /// This rank's number of items.
    pub(crate) fn rank_len(&self) -> usize {
        self.len
    }
}

/// A stream is read in order by the [`DataLoader`](crate::DataLoader); it has
/// no random access. `len` is this rank's number of items; `get` and
/// `get_batch` are [`DataError::NotIndexable`] (as PyTorch's
/// `IterableDataset.__getitem__` raises), which is also what wrappers that
/// index (`Subset`, `Map`, ...) get when put around a stream.
impl Dataset for StreamDataset {
    fn len(&self) -> usize {
        self.rank_len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        Err(not_indexable(&[index]))
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        Err(not_indexable(indices))
    }
    fn as_stream(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

fn not_indexable(indices: &[usize]) -> DataError {
    DataError::NotIndexable(format!(
        "a StreamDataset is read in order, so it cannot return items {indices:?}; \
         give it to DataLoader::builder directly and transform items in its shard iterators"
    ))
}

impl std::fmt::Debug for StreamDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDataset")
            .field("num_shards", &self.lengths.len())
            .field("total_len", &self.total_len())
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("len", &self.len)
            .field("buffer", &self.buffer)
            .finish_non_exhaustive()
    }
}
