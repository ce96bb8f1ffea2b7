//! Data-parallel training in the [`Trainer`](crate::Trainer): what
//! [`TrainerBuilder::distributed`](crate::TrainerBuilder::distributed) sets up.
//!
//! With a group of N ranks, each rank runs the same trainer on its shard of
//! every batch (the loaders are sharded here, DistributedSampler's layout),
//! and after backward, at the accumulation boundary only (like DDP's
//! `no_sync`), the gradients are averaged in buckets
//! ([`GradBuckets`](minibatch_dist::GradBuckets)), before clipping: N ranks
//! at batch b take the steps of one process at batch N·b. At build the
//! parameters are broadcast from rank 0 (after a resume too, so every rank
//! continues from rank 0's weights). Epoch figures (train loss and metrics,
//! validation over the whole set, each rank its uneven shard) are combined
//! across ranks as sample-weighted means, identical on every rank, so early
//! stopping, plateau schedules and `save_best` decide the same everywhere;
//! a stop asked by any rank stops all. Only rank 0 prints, writes history,
//! plots and checkpoints.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::Var;
use minibatch_data::DataLoader;
use minibatch_dist::{broadcast_vars, GradBuckets, ProcessGroup, ProcessGroupExt};

use crate::checkpoint::{CheckpointState, LoadedCheckpoint};
use crate::error::{Result, TrainError};
use crate::evaluate::Evaluation;
use crate::history::EpochRecord;

/// The trainer's group and gradient buckets.
pub(crate) struct Distributed {
    pub group: Arc<dyn ProcessGroup>,
    pub buckets: GradBuckets,
}

impl From<minibatch_dist::DistError> for TrainError {
    fn from(e: minibatch_dist::DistError) -> Self {
        TrainError::Config(format!("distributed: {e}"))
    }
}

impl Distributed {
    /// Shards the loaders for this rank (train padded to equal counts,
    /// validation uneven, every sample once), checks that every rank has
    /// the same number of batches and parameters, and lays out the buckets.
    pub fn setup(
        group: Arc<dyn ProcessGroup>,
        train: &mut DataLoader,
        val: &mut Option<DataLoader>,
        vars: &[Var],
    ) -> Result<Self> {
        let (rank, world) = (group.rank(), group.world_size());
        let shard = |l: &DataLoader, uneven: bool| {
            l.sharded(rank, world, uneven).map_err(|e| {
                TrainError::Config(format!("distributed: rank {rank} of {world}: {e}"))
            })
        };
        if world > 1 {
            *train = shard(train, false)?;
            if let Some(v) = val.as_mut() {
                *v = shard(v, true)?;
            }
        }
        group.check_same("train batches per epoch", train.len() as u64)?;
        group.check_same("trained parameters", vars.len() as u64)?;
        let elems: u64 = vars.iter().map(|v| v.elem_count() as u64).sum();
        group.check_same("trained parameter elements", elems)?;
        Ok(Self {
            buckets: GradBuckets::with_default_size(vars)?,
            group,
        })
    }

    /// Every rank takes rank 0's parameters.
    pub fn broadcast(&self, vars: &[Var]) -> Result<()> {
        broadcast_vars(self.group.as_ref(), vars, 0)?;
        Ok(())
    }

    /// The gradients averaged over the ranks (one collective per bucket).
    pub fn reduce(&mut self, grads: &mut GradStore) -> Result<()> {
        self.buckets.all_reduce_mean(self.group.as_ref(), grads)?;
        Ok(())
    }

    /// The reduction's timings so far (collective and copy time, steps).
    pub fn stats(&self) -> minibatch_dist::ReduceStats {
        self.buckets.stats()
    }

    /// This rank's rank and the world size.
    pub fn rank_world(&self) -> (usize, usize) {
        (self.group.rank(), self.group.world_size())
    }

    /// Every rank's `mine`, in rank order, on every rank (a length
    /// all-gather, then one broadcast from each rank).
    pub fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lens = self.group.all_gather_u64(mine.len() as u64)?;
        let me = self.group.rank();
        lens.iter()
            .enumerate()
            .map(|(root, &n)| {
                let mut buf = if root == me {
                    mine.to_vec()
                } else {
                    vec![0u8; n as usize]
                };
                self.group.broadcast_bytes(&mut buf, root)?;
                Ok(buf)
            })
            .collect()
    }

    /// Rank 0's checkpoint on every rank: rank 0 passes what it read
    /// (`found`; the others pass `None`, they need no access to the
    /// checkpoint directory) and every rank gets its files: weights,
    /// optimizer state and `trainer.json`, byte for byte. An error reading
    /// it on rank 0 is an error on every rank.
    pub fn share_checkpoint(
        &self,
        found: Option<Result<LoadedCheckpoint>>,
    ) -> Result<LoadedCheckpoint> {
        let (mut header, parts, err) = match found {
            Some(Ok(ck)) => {
                let state = serde_json::to_vec(&ck.state).map_err(|e| {
                    TrainError::ckpt(&ck.path, format!("cannot serialise trainer.json: {e}"))
                })?;
                let path = ck.path.to_string_lossy().into_owned().into_bytes();
                let parts = vec![path, state, ck.model, ck.optimizer];
                let mut h = vec![0u64];
                h.extend(parts.iter().map(|p| p.len() as u64));
                (h, parts, None)
            }
            Some(Err(e)) => {
                let msg = e.to_string().into_bytes();
                (vec![1, msg.len() as u64, 0, 0, 0], vec![msg], Some(e))
            }
            None => (vec![0u64; 5], Vec::new(), None),
        };
        self.group.broadcast(&mut header, 0)?;
        if header[0] != 0 {
            let mut msg = parts.into_iter().next().unwrap_or_default();
            msg.resize(header[1] as usize, 0);
            self.group.broadcast_bytes(&mut msg, 0)?;
            return Err(err.unwrap_or_else(|| {
                TrainError::Config(format!(
                    "distributed: rank 0 could not resume: {}",
                    String::from_utf8_lossy(&msg)
                ))
            }));
        }
        let mut parts = if parts.is_empty() {
            header[1..].iter().map(|&n| vec![0u8; n as usize]).collect()
        } else {
            parts
        };
        for p in parts.iter_mut() {
            self.group.broadcast_bytes(p, 0)?;
        }
        let optimizer = parts.pop().unwrap_or_default();
        let model = parts.pop().unwrap_or_default();
        let state = parts.pop().unwrap_or_default();
        let path = std::path::PathBuf::from(
            String::from_utf8_lossy(&parts.pop().unwrap_or_default()).into_owned(),
        );
        let state: CheckpointState = serde_json::from_slice(&state).map_err(|e| {
            TrainError::ckpt(
                &path,
                format!("trainer.json from rank 0 does not parse: {e}"),
            )
        })?;
        Ok(LoadedCheckpoint {
            path,
            state,
            model,
            optimizer,
        })
    }

    /// Whether this rank prints and writes files.
    pub fn is_main(&self) -> bool {
        self.group.rank() == 0
    }

    /// Whether any rank asked to stop.
    pub fn any(&self, stop: bool) -> Result<bool> {
        Ok(self
            .group
            .all_gather_u64(stop as u64)?
            .iter()
            .any(|s| *s != 0))
    }

    /// The sample-weighted mean of `value` over the ranks (`count` samples
    /// here), in rank order: the same bits on every rank.
    fn mean(&self, value: f64, count: u64) -> Result<f64> {
        let values = self.group.all_gather_f64(value)?;
        let counts = self.group.all_gather_u64(count)?;
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Ok(f64::NAN);
        }
        let sum: f64 = values
            .iter()
            .zip(&counts)
            .filter(|(_, c)| **c > 0)
            .map(|(v, c)| v * *c as f64)
            .sum();
        Ok(sum / total as f64)
    }

    /// The epoch's train figures combined over the ranks (`samples` here).
    pub fn combine_train(&self, rec: &mut EpochRecord, samples: u64) -> Result<()> {
        rec.train_loss = self.mean(rec.train_loss, samples)?;
        for v in rec.train_metrics.values_mut() {
            *v = self.mean(*v, samples)?;
        }
        let wall = self.group.all_gather_f64(rec.epoch_time_s.unwrap_or(0.0))?;
        let slowest = wall.iter().copied().fold(0.0, f64::max);
        let all: u64 = self.group.all_gather_u64(samples)?.iter().sum();
        rec.epoch_time_s = Some(slowest);
        rec.samples_per_s = if slowest > 0.0 {
            Some(all as f64 / slowest)
        } else {
            Some(0.0)
        };
        Ok(())
    }

    /// A validation combined over the ranks' uneven shards: the whole set.
    pub fn combine_eval(&self, ev: &mut Evaluation) -> Result<()> {
        let n = ev.samples;
        ev.loss = self.mean(ev.loss, n)?;
        for v in ev.metrics.values_mut() {
            *v = self.mean(*v, n)?;
        }
        ev.samples = self.group.all_gather_u64(n)?.iter().sum();
        Ok(())
    }
}
