//! Saving where a run stands in checkpoints and resuming from them,
//! including from the newest checkpoint that is still intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::{self, CheckpointState, LoadedCheckpoint, RankRunning, WorldState};
use crate::error::{Result, TrainError};
use crate::history::History;
use crate::model::Model;
use crate::progress::ProgressMode;
use crate::state::{RunState, SkippedCheckpoint};
use crate::trainer::Trainer;

/// States keyed by `name#k`, the k-th part of that name (0-based), so that
/// two parts of one kind (two `EarlyStopping`s) keep their own state. Parts
/// without state (`null`) are left out.
fn keyed<'a>(parts: impl Iterator<Item = (&'a str, Value)>) -> BTreeMap<String, Value> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, state) in parts {
        let k = seen.entry(name).or_default();
        if !state.is_null() {
            out.insert(format!("{name}#{k}"), state);
        }
        *k += 1;
    }
    out
}

/// The `name#k` keys of `names`, in order.
fn keys<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    names
        .map(|name| {
            let k = seen.entry(name).or_default();
            *k += 1;
            format!("{name}#{}", *k - 1)
        })
        .collect()
}

impl<M: Model> Trainer<M> {
    /// This rank's rank and the world size (0 of 1 without `.distributed`).
    fn rank_world(&self) -> (usize, usize) {
        self.dist.as_ref().map_or((0, 1), |d| d.rank_world())
    }

    /// Whether this rank writes the files (rank 0, or not distributed).
    fn writes(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.is_main())
    }

    /// Every rank's running figures of the epoch in progress (empty in one
    /// process): a collective under `.distributed`.
    fn gather_running(&self) -> Result<Vec<RankRunning>> {
        let Some(d) = self.dist.as_ref().filter(|d| d.rank_world().1 > 1) else {
            return Ok(Vec::new());
        };
        let mine = RankRunning {
            epoch_loss: self.run.epoch_loss,
            metrics: keyed(self.metrics.iter().map(|m| (m.name(), m.state()))),
        };
        let bytes = serde_json::to_vec(&mine).map_err(|e| {
            TrainError::Config(format!("cannot serialise the running figures: {e}"))
        })?;
        d.gather_bytes(&bytes)?
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| {
                    TrainError::Config(format!("running figures of rank {r} do not parse: {e}"))
                })
            })
            .collect()
    }

    fn checkpoint_state(&self, ranks: Vec<RankRunning>) -> CheckpointState {
        let (_, world) = self.rank_world();
        let batch = self.train.batch_size() as u64;
        CheckpointState {
            format: checkpoint::FORMAT_VERSION,
            run: RunState {
                history: self.run.history.without_timings(),
                ..self.run.clone()
            },
            batches_per_epoch: self.train.len() as u64,
            samples_per_epoch: self.train.num_samples() as u64,
            accumulate: self.cfg.accumulate as u64,
            optimizer: self.optimizer.name().to_string(),
            scheduler: self.scheduler.as_ref().map(|(s, _)| s.state()),
            metrics: keyed(self.metrics.iter().map(|m| (m.name(), m.state()))),
            callbacks: keyed(self.callbacks.iter().map(|c| (c.name(), c.state()))),
            tensors: BTreeMap::new(),
            files: BTreeMap::new(),
            world: WorldState {
                world_size: world as u64,
                batch_per_rank: batch,
                global_batch: batch * world as u64,
                ranks,
            },
        }
    }

    /// Writes checkpoint `name` under `dir` (the losses must have been read).
    fn write_named(&self, dir: &Path, name: &str, ranks: Vec<RankRunning>) -> Result<PathBuf> {
        let mut st = self.checkpoint_state(ranks);
        let opt = self.optimizer.state_bytes()?;
        checkpoint::write_checkpoint(dir, name, &self.varmap, &opt, &mut st)
    }

    /// Writes a checkpoint of the current state now (into the configured
    /// checkpoint directory), moves the `latest` pointer and prunes old ones.
    /// The pending losses are read first (a logging point): a non-finite one
    /// is an error and nothing is written.
    ///
    /// Under [`distributed`](crate::TrainerBuilder::distributed) every rank
    /// must call it (the trainer does, at the same steps everywhere): the
    /// ranks' running figures of the epoch are gathered into the checkpoint,
    /// and rank 0 alone writes it.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        if self.cfg.checkpoint.is_none() {
            return Err(TrainError::Config(
                "save_checkpoint needs checkpoint_dir".into(),
            ));
        }
        self.log_point()?;
        let ranks = self.gather_running()?;
        let c = self.cfg.checkpoint.as_ref().expect("checked above");
        if !self.writes() {
            // rank 0 alone writes; the others name what it wrote
            self.saved_at_step = Some(self.run.step);
            return Ok(c.dir.join(format!("step-{:09}", self.run.step)));
        }
        let path = self.write_step(&c.dir, ranks)?;
        let best = checkpoint::read_pointer(&c.dir, "best")?;
        let latest = format!("step-{:09}", self.run.step);
        let mut protect = vec![latest.as_str()];
        if let Some(b) = &best {
            protect.push(b.as_str());
        }
        checkpoint::prune(&c.dir, "step-", c.keep_last, &protect)?;
        self.last_checkpoint = Some(path.clone());
        self.saved_at_step = Some(self.run.step);
        Ok(path)
    }

    /// Writes a checkpoint `step-<N>` under `dir` and points `dir/latest` at
    /// it (after reading the pending losses, as [`save_checkpoint`](Self::save_checkpoint);
    /// under `.distributed` a collective too, rank 0 alone writes).
    pub fn save_checkpoint_to(&mut self, dir: &Path) -> Result<PathBuf> {
        self.log_point()?;
        let ranks = self.gather_running()?;
        if !self.writes() {
            return Ok(dir.join(format!("step-{:09}", self.run.step)));
        }
        let p = self.write_step(dir, ranks)?;
        self.last_checkpoint = Some(p.clone());
        Ok(p)
    }

    fn write_step(&self, dir: &Path, ranks: Vec<RankRunning>) -> Result<PathBuf> {
        let name = format!("step-{:09}", self.run.step);
        let p = self.write_named(dir, &name, ranks)?;
        checkpoint::set_pointer(dir, "latest", &name)?;
        Ok(p)
    }

    /// At the end of an epoch: keeps the checkpoint of the best epoch so far
    /// (when `save_best` is set) as `best-step-<N>`.
    pub(crate) fn save_best_checkpoint(&mut self) -> Result<()> {
        let Some((c, (monitor, mode))) = self
            .cfg
            .checkpoint
            .as_ref()
            .and_then(|c| c.best.as_ref().map(|b| (c, b)))
        else {
            return Ok(());
        };
        let Some(rec) = self.run.history.epochs.last() else {
            return Ok(());
        };
        let v = rec.require(monitor)?;
        if !mode.improves(v, self.run.best, 0.0) {
            return Ok(());
        }
        // the checkpoint holds the new best value (the same on every rank:
        // the epoch figures are combined over the ranks)
        self.run.best = Some(v);
        let dir = c.dir.clone();
        let ranks = self.gather_running()?;
        if !self.writes() {
            return Ok(()); // rank 0 alone writes
        }
        let dir = dir.as_path();
        let name = format!("best-step-{:09}", self.run.step);
        self.write_named(dir, &name, ranks)?;
        checkpoint::set_pointer(dir, "best", &name)?;
        checkpoint::prune(dir, "best-step-", 1, &[&name])?;
        Ok(())
    }

    /// Restores everything from a checkpoint (a checkpoint directory or a
    /// root with a `latest` pointer): weights (bit for bit), optimizer state,
    /// schedule, metrics, callbacks and the [`RunState`](crate::RunState) (position, counters,
    /// history).
    ///
    /// The optimizer's hyperparameters (its learning rate included) are the
    /// checkpoint's, not the ones it was built with, as a resume needs: one
    /// line on stdout (unless [`ProgressMode::Silent`]) says where the run
    /// resumes and what came from the checkpoint, naming both learning rates
    /// when they differ; [`resume_note`](Self::resume_note) returns it.
    ///
    /// Errors ([`TrainError::Checkpoint`] naming the path): a corrupt or
    /// incomplete checkpoint, or one written by another setup (other tensor
    /// names or shapes, optimizer, loader length, accumulation, schedule
    /// presence, a stateful callback or metric this trainer lacks). A
    /// callback or metric of this trainer without saved state starts fresh.
    ///
    /// Under [`distributed`](crate::TrainerBuilder::distributed) every rank
    /// calls it (the builder does, for `resume_from`): rank 0 reads the
    /// checkpoint and broadcasts its files, so every rank takes rank 0's
    /// weights, optimizer state and run state (and its own running epoch
    /// figures); the other ranks need no access to `path`. A checkpoint
    /// resumes only with the world size that wrote it: another one is a
    /// [`TrainError::Checkpoint`] naming both (world size, batch per rank,
    /// global batch).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ck = match &self.dist {
            Some(d) => {
                d.share_checkpoint(d.is_main().then(|| checkpoint::read_checkpoint(path)))?
            }
            None => checkpoint::read_checkpoint(path)?,
        };
        self.restore(ck)
    }

    /// Restores from the newest checkpoint under the checkpoint root `root`
    /// that reads back intact (`step-*` and `best-step-*` directories,
    /// newest step first). Each corrupt one passed over is reported on stderr
    /// (`warning: skipping checkpoint <path>: <reason>`) and listed by
    /// [`skipped_checkpoints`](Self::skipped_checkpoints); when one was
    /// skipped, the `latest` pointer is moved to the checkpoint restored.
    ///
    /// Errors: no checkpoint under `root`, none intact (the error lists each
    /// with its reason), or the intact one does not fit this trainer (as
    /// [`load_checkpoint`](Self::load_checkpoint)). Under `.distributed`,
    /// rank 0 looks (and reports what it skipped) and broadcasts the one it
    /// found, as [`load_checkpoint`](Self::load_checkpoint).
    pub fn load_latest_valid_checkpoint(&mut self, root: &Path) -> Result<&[SkippedCheckpoint]> {
        self.skipped.clear();
        if let Some(main) = self.dist.as_ref().map(|d| d.is_main()) {
            let found = main.then(|| self.find_latest_valid(root));
            let d = self.dist.as_ref().expect("checked above");
            let ck = d.share_checkpoint(found)?;
            self.restore(ck)?;
            return Ok(&self.skipped);
        }
        let ck = self.find_latest_valid(root)?;
        self.restore(ck)?;
        Ok(&self.skipped)
    }

    /// The newest intact checkpoint under `root` (the skipped ones listed
    /// in `self.skipped`, the `latest` pointer moved past them).
    fn find_latest_valid(&mut self, root: &Path) -> Result<LoadedCheckpoint> {
        let candidates = checkpoint::list_checkpoints(root)?;
        if candidates.is_empty() {
            return Err(TrainError::ckpt(
                root,
                "no checkpoint (step-* or best-step-* directory) in it",
            ));
        }
        for dir in candidates {
            match checkpoint::read_checkpoint(&dir) {
                Ok(ck) => {
                    if !self.skipped.is_empty() {
                        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                            checkpoint::set_pointer(root, "latest", name)?;
                        }
                    }
                    return Ok(ck);
                }
                Err(e) => {
                    eprintln!("warning: skipping checkpoint {}: {e}", dir.display());
                    self.skipped.push(SkippedCheckpoint {
                        path: dir,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let list: Vec<String> = self
            .skipped
            .iter()
            .map(|s| format!("{} ({})", s.path.display(), s.reason))
            .collect();
        Err(TrainError::ckpt(
            root,
            format!("no intact checkpoint: {}", list.join("; ")),
        ))
    }

    fn restore(&mut self, ck: LoadedCheckpoint) -> Result<()> {
        let LoadedCheckpoint {
            path,
            state: st,
            model,
            optimizer,
        } = ck;
        let bad = |reason: String| TrainError::ckpt(&path, reason);
        let (rank, world) = self.rank_world();
        let batch = self.train.batch_size() as u64;
        let w = &st.world;
        if w.world_size != world as u64 {
            return Err(bad(format!(
                "written by {} rank(s) at batch {} per rank (global batch {}), this run has {world} rank(s) at batch {batch} per rank (global batch {}): a checkpoint resumes only with the world size that wrote it (mpirun -np {})",
                w.world_size,
                w.batch_per_rank,
                w.global_batch,
                batch * world as u64,
                w.world_size
            )));
        }
        if world > 1 && w.ranks.len() != world {
            return Err(bad(format!(
                "holds the running figures of {} rank(s), written by {}",
                w.ranks.len(),
                w.world_size
            )));
        }
        if st.optimizer != self.optimizer.name() {
            return Err(bad(format!(
                "written by optimizer {:?}, this trainer uses {:?}",
                st.optimizer,
                self.optimizer.name()
            )));
        }
        let (nb, ns) = (self.train.len() as u64, self.train.num_samples() as u64);
        if st.batches_per_epoch != nb || st.samples_per_epoch != ns {
            return Err(bad(format!(
                "written with {} batches / {} samples per epoch, this loader has {nb} / {ns} (different dataset or batch size?)",
                st.batches_per_epoch, st.samples_per_epoch
            )));
        }
        if st.accumulate != self.cfg.accumulate as u64 {
            return Err(bad(format!(
                "written with accumulate = {}, this trainer uses {}",
                st.accumulate, self.cfg.accumulate
            )));
        }
        if st.run.batch > nb {
            return Err(bad(format!(
                "batch position {} beyond {nb} batches",
                st.run.batch
            )));
        }
        let metric_keys = keys(self.metrics.iter().map(|m| m.name()));
        let callback_keys = keys(self.callbacks.iter().map(|c| c.name()));
        for (what, saved, ours) in [
            ("metric", &st.metrics, &metric_keys),
            ("callback", &st.callbacks, &callback_keys),
        ] {
            if let Some(k) = saved.keys().find(|k| !ours.contains(k)) {
                return Err(bad(format!(
                    "holds the state of {what} {k}, which this trainer lacks (it has {ours:?})"
                )));
            }
        }
        match (&mut self.scheduler, &st.scheduler) {
            (Some((s, _)), Some(v)) => s.load_state(v)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(bad(
                    "has no schedule state but this trainer has a schedule".into()
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "has a schedule state but this trainer has no schedule".into()
                ))
            }
        }
        checkpoint::load_weights(&self.varmap, &model, &path)?;
        let built_lr = self.optimizer.learning_rate();
        self.optimizer.load_state_bytes(&optimizer)?;
        let lr = self.optimizer.learning_rate();
        // each rank its own running figures of the epoch in progress
        let own = (world > 1).then(|| &st.world.ranks[rank]);
        let metric_states = own.map_or(&st.metrics, |r| &r.metrics);
        for (m, key) in self.metrics.iter_mut().zip(&metric_keys) {
            match metric_states.get(key) {
                Some(v) => m.load_state(v).map_err(|e| bad(e.to_string()))?,
                None => m.reset(),
            }
        }
        for (c, key) in self.callbacks.iter_mut().zip(&callback_keys) {
            if let Some(v) = st.callbacks.get(key) {
                c.load_state(v).map_err(|e| bad(e.to_string()))?;
            }
        }
        if let Some(acc) = &mut self.accumulator {
            acc.reset();
        }
        self.log.clear();
        self.run = st.run;
        if let Some(r) = own {
            self.run.epoch_loss = r.epoch_loss;
        }
        self.clock = Default::default();
        // The checkpoint holds no timings: take those of the earlier epochs
        // from the history file the earlier run wrote, when it is there.
        if let Some(dir) = &self.cfg.out_dir {
            if let Ok(text) = std::fs::read_to_string(dir.join("history.json")) {
                if let Ok(earlier) = History::from_json(&text) {
                    self.run.history.fill_timings_from(&earlier);
                }
            }
        }
        let mut taken = vec![
            "weights".to_string(),
            if lr.to_bits() == built_lr.to_bits() {
                format!("optimizer state and hyperparameters (lr {lr})")
            } else {
                format!(
                    "optimizer state and hyperparameters (lr {lr}, in place of the {built_lr} it was built with)"
                )
            },
        ];
        if self.scheduler.is_some() {
            taken.push("schedule state".into());
        }
        if !st.metrics.is_empty() || !st.callbacks.is_empty() {
            taken.push("metric and callback states".into());
        }
        taken.push(format!(
            "history ({} epoch(s), {} step(s))",
            self.run.history.epochs.len(),
            self.run.step
        ));
        let note = format!(
            "resumed from {} at epoch {}, batch {} of {nb}, step {}; from the checkpoint: {}",
            path.display(),
            self.run.epoch,
            self.run.batch,
            self.run.step,
            taken.join(", ")
        );
        if self.cfg.progress != ProgressMode::Silent {
            println!("{note}");
        }
        self.resume_note = Some(note);
        self.saved_at_step = Some(self.run.step);
        self.last_checkpoint = Some(path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_keyed_by_name_and_rank() {
        let parts = [
            ("early_stopping", Value::from(1)),
            ("step_hook", Value::Null),
            ("early_stopping", Value::from(2)),
        ];
        let m = keyed(parts.iter().map(|(n, v)| (*n, v.clone())));
        assert_eq!(m.len(), 2);
        assert_eq!(m["early_stopping#0"], Value::from(1));
        assert_eq!(m["early_stopping#1"], Value::from(2));
        assert_eq!(
            keys(parts.iter().map(|(n, _)| *n)),
            ["early_stopping#0", "step_hook#0", "early_stopping#1"]
        );
    }
}
