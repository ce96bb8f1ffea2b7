//! One epoch of a [`StreamDataset`]: shard readers (inline or on worker
//! threads), the round-robin interleave, the shuffle buffer and batching.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::OnceLock;

use candle_core::Device;

use crate::batch::{Batch, Sample};
use crate::collate::collate;
use crate::error::{DataError, Result};
use crate::sampler::BatchSampler;
use crate::stream::{ShardIter, StreamDataset};
use crate::stream_order::{RoundRobin, ShuffleBuffer};
use crate::workers::Workers;

/// What one stream epoch needs; built by the [`DataLoader`](crate::DataLoader).
pub(crate) struct StreamPlan {
    /// The stream (this rank's view).
    pub(crate) stream: StreamDataset,
    /// The shuffle seed; `None` reads in shard order without a buffer.
    pub(crate) seed: Option<u64>,
    /// The epoch number.
    pub(crate) epoch: u64,
    /// Cuts the rank's item positions into batches.
    pub(crate) batches: BatchSampler,
    /// Where batches are moved, if anywhere.
    pub(crate) device: Option<Device>,
    /// Worker threads requested (0 = read on the calling thread).
    pub(crate) workers: usize,
    /// Chunks of messages each worker may hold ready.
    pub(crate) prefetch: usize,
}

/// One turn of a shard: its next item, or the end of the shard (after checking
/// it yields no more than declared), or a failure that stops the epoch.
enum Msg {
    Item(Result<Sample>),
    End,
    Fatal(DataError),
}

/// Reads one shard, enforcing its declared length.
struct ShardReader {
    shard: usize,
    declared: usize,
    read: usize,
    iter: Option<ShardIter>,
}

impl ShardReader {
    fn new(stream: &StreamDataset, shard: usize) -> Self {
        Self {
            shard,
            declared: stream.shard_len(shard),
            read: 0,
            iter: None,
        }
    }

    fn turn(&mut self, stream: &StreamDataset) -> Msg {
        let iter = match &mut self.iter {
            Some(it) => it,
            None => match stream.open(self.shard) {
                Ok(it) => self.iter.insert(it),
                Err(e) => return Msg::Fatal(e),
            },
        };
        let next = iter.next();
        let length_error = |more| DataError::StreamLength {
            shard: self.shard,
            declared: self.declared,
            yielded: self.read + usize::from(more),
            more,
        };
        if self.read < self.declared {
            match next {
                Some(item) => {
                    self.read += 1;
                    Msg::Item(item)
                }
                None => Msg::Fatal(length_error(false)),
            }
        } else {
            match next {
                Some(_) => Msg::Fatal(length_error(true)),
                None => {
                    self.iter = None; // release the shard's file early
                    Msg::End
                }
            }
        }
    }
}

/// Where the consumer gets each shard's turns from.
enum Source {
    /// Shard readers run on the consumer's thread (slot order).
    Inline(Vec<ShardReader>),
    /// Shard readers run on worker threads.
    Pool(Pool),
}

impl Source {
    fn turn(&mut self, stream: &StreamDataset, slot: usize) -> Msg {
        match self {
            Source::Inline(readers) => readers[slot].turn(stream),
            Source::Pool(pool) => pool.recv(slot),
        }
    }
}

/// Worker threads for one run: slot `j` of the epoch's shard order is read by
/// worker `j % n`, which takes its slots' turns in the same round-robin order
/// as the consumer and sends them in chunks over its own bounded channel.
struct Pool {
    workers: Workers<Vec<Msg>>,
    pending: Vec<VecDeque<Msg>>,
}

impl Pool {
    fn spawn(plan: &StreamPlan, shards: &[usize], n: usize) -> Self {
        let chunk = plan.batches.batch_size().clamp(1, 1024);
        let workers = Workers::spawn(
            n,
            plan.prefetch.max(1),
            "minibatch-stream-worker",
            |w| {
                let mine: Vec<usize> = shards.iter().copied().skip(w).step_by(n).collect();
                let stream = plan.stream.clone();
                move |tx: &SyncSender<Vec<Msg>>, stop: &AtomicBool| {
                    work(w, &stream, &mine, chunk, tx, stop)
                }
            },
            // Reported in place of this worker's first turn.
            |e| vec![Msg::Fatal(DataError::Worker(e))],
        );
        Self {
            pending: (0..n).map(|_| VecDeque::new()).collect(),
            workers,
        }
    }

    fn recv(&mut self, slot: usize) -> Msg {
        let w = slot % self.workers.len();
        if self.pending[w].is_empty() {
            match self.workers.recv(w) {
                Some(chunk) => self.pending[w].extend(chunk),
                None => {
                    return Msg::Fatal(DataError::Worker(format!(
                        "stream worker {w} stopped before its shards ended"
                    )))
                }
            }
        }
        self.pending[w].pop_front().unwrap_or_else(|| {
            Msg::Fatal(DataError::Worker(format!(
                "stream worker {w} sent an empty chunk"
            )))
        })
    }
}

/// The body of worker `w`: the round-robin over its shards, in chunks.
fn work(
    w: usize,
    stream: &StreamDataset,
    shards: &[usize],
    chunk: usize,
    tx: &SyncSender<Vec<Msg>>,
    stop: &AtomicBool,
) {
    let mut readers: Vec<ShardReader> = shards
        .iter()
        .map(|&s| ShardReader::new(stream, s))
        .collect();
    let mut rr = RoundRobin::new(readers.len());
    let mut out = Vec::with_capacity(chunk);
    while let Some(slot) = rr.current() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let msg =
            catch_unwind(AssertUnwindSafe(|| readers[slot].turn(stream))).unwrap_or_else(|p| {
                Msg::Fatal(DataError::worker_panic(
                    format!(
                        "stream worker {w} panicked reading shard {}",
                        readers[slot].shard
                    ),
                    p.as_ref(),
                ))
            });
        let fatal = matches!(msg, Msg::Fatal(_));
        match msg {
            Msg::End => rr.finish_current(),
            _ => rr.advance(),
        }
        out.push(msg);
        if fatal {
            let _ = tx.send(out);
            return;
        }
        if out.len() == chunk
            && tx
                .send(std::mem::replace(&mut out, Vec::with_capacity(chunk)))
                .is_err()
        {
            return; // the consumer went away
        }
    }
    if !out.is_empty() {
        let _ = tx.send(out);
    }
}

/// One pass over the rank's stream, from its first item.
struct Run {
    rr: RoundRobin,
    source: Source,
    buffer: ShuffleBuffer<Result<Sample>>,
    input_done: bool,
    /// Items emitted so far: the position of the next item.
    emitted: usize,
}

impl Run {
    fn start(plan: &StreamPlan) -> Self {
        let shards = plan.stream.shard_order(plan.seed, plan.epoch);
        let workers = plan.workers.min(shards.len());
        let source = if workers == 0 {
            Source::Inline(
                shards
                    .iter()
                    .map(|&s| ShardReader::new(&plan.stream, s))
                    .collect(),
            )
        } else {
            Source::Pool(Pool::spawn(plan, &shards, workers))
        };
        Self {
            rr: RoundRobin::new(shards.len()),
            source,
            buffer: plan.stream.shuffle_buffer_for(plan.seed, plan.epoch),
            input_done: false,
            emitted: 0,
        }
    }

    /// The next item in stream order; `Ok(None)` after the last one (which
    /// also means every shard was checked against its length); `Err` is a
    /// failure that stops the run.
    fn next_item(&mut self, stream: &StreamDataset) -> Result<Option<Result<Sample>>> {
        while !self.input_done {
            let Some(slot) = self.rr.current() else {
                self.input_done = true;
                break;
            };
            match self.source.turn(stream, slot) {
                Msg::Item(item) => {
                    self.rr.advance();
                    if let Some(out) = self.buffer.push(item) {
                        self.emitted += 1;
                        return Ok(Some(out));
                    }
                }
                Msg::End => self.rr.finish_current(),
                Msg::Fatal(e) => return Err(e),
            }
        }
        let out = self.buffer.drain_one();
        self.emitted += usize::from(out.is_some());
        Ok(out)
    }
}

/// The batch iterator of one stream epoch (the stream half of
/// [`Epoch`](crate::Epoch)).
pub(crate) struct StreamEpoch {
    plan: StreamPlan,
    pos: usize,
    run: Option<Run>,
    /// The batch at which a failure stopped the epoch, and its message.
    aborted: Option<(usize, String)>,
    order: OnceLock<Vec<usize>>,
}

impl StreamEpoch {
    pub(crate) fn new(plan: StreamPlan) -> Self {
        Self {
            plan,
            pos: 0,
            run: None,
            aborted: None,
            order: OnceLock::new(),
        }
    }

    pub(crate) fn num_batches(&self) -> usize {
        self.plan.batches.len()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.plan.epoch
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn workers(&self) -> usize {
        self.plan.workers.min(self.plan.stream.shards().len())
    }

    /// Item ids in this epoch's order (computed on first use).
    pub(crate) fn order(&self) -> &[usize] {
        self.order
            .get_or_init(|| self.plan.stream.order(self.plan.seed, self.plan.epoch))
    }

    /// Continues from batch `b`. A running pass that has not gone past that
    /// batch's first item keeps going (skipping forward); otherwise the next
    /// batch starts a new pass from the beginning of the stream.
    pub(crate) fn skip_to(&mut self, b: usize) {
        self.pos = b.min(self.num_batches());
        self.aborted = None;
    }

    pub(crate) fn next_batch(&mut self) -> Option<Result<Batch>> {
        let n = self.num_batches();
        if self.pos >= n {
            self.run = None;
            return None;
        }
        let b = self.pos;
        self.pos += 1;
        if let Some((at, msg)) = &self.aborted {
            return Some(Err(DataError::StreamAborted(format!(
                "batch {b} of epoch {} was not read: the stream stopped at batch {at}: {msg}",
                self.plan.epoch
            ))));
        }
        let out = self.build(b);
        if self.pos >= n {
            self.run = None; // stop the workers once the last batch is out
        }
        Some(out)
    }

    fn build(&mut self, b: usize) -> Result<Batch> {
        let range = self
            .plan
            .batches
            .batch_range(b, self.plan.stream.rank_len());
        if self.run.as_ref().is_some_and(|r| r.emitted > range.start) {
            self.run = None;
        }
        let last = b + 1 == self.num_batches();
        let stream = &self.plan.stream;
        let run = self.run.get_or_insert_with(|| Run::start(&self.plan));
        let mut fatal = None;
        let mut samples = Vec::with_capacity(range.len());
        let mut first_err = None;
        // Replay the items before the batch without collating them.
        while fatal.is_none() && run.emitted < range.end {
            let keep = run.emitted >= range.start;
            match run.next_item(stream) {
                Ok(Some(item)) if keep => match item {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    fatal = Some(DataError::StreamAborted(format!(
                        "the stream ended after {} items, before position {}",
                        run.emitted, range.end
                    )))
                }
                Err(e) => fatal = Some(e),
            }
        }
        // After the last batch, read what is left (a dropped tail, the shards'
        // final length checks) so a length mismatch is never silent.
        if fatal.is_none() && last {
            loop {
                match run.next_item(stream) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        fatal = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = fatal {
            self.run = None;
            self.aborted = Some((b, e.to_string()));
            return Err(e);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let batch = collate(&samples)?;
        match &self.plan.device {
            Some(d) => batch.to_device(d),
            None => Ok(batch),
        }
    }
}
