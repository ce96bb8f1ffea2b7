//! Progress reporting: an indicatif bar per epoch on a terminal, one line
//! per epoch otherwise.
//!
//! Epochs are numbered from 0 everywhere a user sees them: progress lines,
//! [`EpochRecord::epoch`], `Trainer::position`, the history files and
//! `DataLoader::epoch`. A line reads `epoch 3 (4 of 20)`: epoch number 3, the
//! fourth of the run's 20.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::history::EpochRecord;

/// How the trainer reports progress on stdout. Every mode but `Silent` prints
/// one line per finished epoch (losses, metrics, time, lr) and a summary line
/// at the end of [`fit`](crate::Trainer::fit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// [`Bar`](Self::Bar) when stdout is a terminal, [`Epochs`](Self::Epochs)
    /// otherwise (a log file gets one line per epoch).
    #[default]
    Auto,
    /// An indicatif bar during each epoch (cleared at its end), then the
    /// epoch's line.
    Bar,
    /// The epoch lines only.
    Epochs,
    /// Batch lines too: at most ten per epoch (every ⌈batches / 10⌉-th batch
    /// and the last), then the epoch's line.
    Plain,
    /// Nothing at all.
    Silent,
}

impl ProgressMode {
    fn resolve(self) -> ProgressMode {
        match self {
            ProgressMode::Auto if std::io::stdout().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Epochs,
            m => m,
        }
    }
}

/// `epoch 3 (4 of 20)`: the 0-based epoch number, then its rank in the run.
pub(crate) fn epoch_label(epoch: u64, epochs: u64) -> String {
    format!("epoch {epoch} ({} of {epochs})", epoch + 1)
}

/// The batches after which [`ProgressMode::Plain`] prints a line (1-based
/// counts): every ⌈total / 10⌉-th and the last.
fn plain_every(total: u64) -> u64 {
    total.div_ceil(10).max(1)
}

/// Live figures of the epoch in progress, handed to the reporter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Live {
    pub batch: u64,
    pub loss: f64,
    pub samples_per_s: f64,
    pub wait_share: f64,
}

pub(crate) struct EpochProgress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    epoch: u64,
    epochs: u64,
    total: u64,
    log_every: u64,
}

impl EpochProgress {
    pub fn start(mode: ProgressMode, epoch: u64, epochs: u64, total: u64, at: u64) -> Self {
        let mode = mode.resolve();
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(epoch_label(epoch, epochs));
            bar.set_position(at);
            bar
        });
        Self {
            mode,
            bar,
            epoch,
            epochs,
            total,
            log_every: plain_every(total),
        }
    }

    pub fn update(&mut self, live: Live) {
        let done = live.batch + 1;
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                    if done.is_multiple_of(8) || done == self.total {
                        bar.set_message(format!(
                            "loss {:.4} | {:.0} samples/s | data wait {:.0}%",
                            live.loss,
                            live.samples_per_s,
                            live.wait_share * 100.0
                        ));
                    }
                }
            }
            ProgressMode::Plain if done.is_multiple_of(self.log_every) || done == self.total => {
                println!(
                    "{} batch {}/{}: loss {:.4}, {:.0} samples/s, data wait {:.1}%",
                    epoch_label(self.epoch, self.epochs),
                    done,
                    self.total,
                    live.loss,
                    live.samples_per_s,
                    live.wait_share * 100.0
                );
            }
            _ => {}
        }
    }

    /// Clears the bar at the end of the epoch's batches.
    pub fn finish_quiet(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Leaves the bar where it stopped (training stopped mid-epoch).
    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// Prints the epoch's summary line.
    pub fn report(mode: ProgressMode, epochs: u64, r: &EpochRecord) {
        if mode == ProgressMode::Silent {
            return;
        }
        let mut line = format!(
            "{}: train loss {:.4}",
            epoch_label(r.epoch, epochs),
            r.train_loss
        );
        for (k, v) in &r.train_metrics {
            line.push_str(&format!(", train {k} {v:.4}"));
        }
        if let Some(v) = r.val_loss {
            line.push_str(&format!(", val loss {v:.4}"));
        }
        for (k, v) in &r.val_metrics {
            line.push_str(&format!(", val {k} {v:.4}"));
        }
        let (time, rate, wait) = (
            r.epoch_time_s.unwrap_or(f64::NAN),
            r.samples_per_s.unwrap_or(f64::NAN),
            r.data_wait_share.unwrap_or(f64::NAN),
        );
        line.push_str(&format!(
            " | {time:.2} s, {rate:.0} samples/s, data wait {:.1}%, lr {:.3e}",
            wait * 100.0,
            r.lr
        ));
        println!("{line}");
    }
}

/// What one [`fit`](crate::Trainer::fit) call did, for its summary line.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RunTotals {
    /// Epochs whose batches all ran in this call.
    pub full_epochs: u64,
    /// Epochs this call touched but did not run whole: resumed mid-epoch,
    /// stopped mid-epoch, or only finished (evaluation, callbacks) after a
    /// resume.
    pub partial_epochs: u64,
    /// Optimizer steps in all (this run and the ones before a resume).
    pub steps: u64,
    /// Training samples run in this call.
    pub samples: u64,
    /// Seconds of training (waiting for data and computing) in this call.
    pub train_s: f64,
    /// The part of `train_s` spent in the full epochs.
    pub full_train_s: f64,
}

/// The summary line, e.g. `done: 9 full epoch(s) and 1 partial, 1876 step(s)
/// in all, 6.10 s this run (0.55 s/epoch training, 109234 samples/s)`.
pub(crate) fn summary_line(t: &RunTotals, total_s: f64) -> String {
    let per_epoch = if t.full_epochs > 0 {
        format!(
            "{:.2} s/epoch training, ",
            t.full_train_s / t.full_epochs as f64
        )
    } else {
        String::new()
    };
    let partial = match t.partial_epochs {
        0 => String::new(),
        n => format!(" and {n} partial"),
    };
    let rate = if t.train_s > 0.0 {
        t.samples as f64 / t.train_s
    } else {
        0.0
    };
    format!(
        "done: {} full epoch(s){partial}, {} step(s) in all, {total_s:.2} s this run ({per_epoch}{rate:.0} samples/s)",
        t.full_epochs, t.steps
    )
}

pub(crate) fn summary(mode: ProgressMode, totals: &RunTotals, started: Instant) {
    if mode == ProgressMode::Silent {
        return;
    }
    println!("{}", summary_line(totals, started.elapsed().as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prints_at_most_ten_batch_lines_an_epoch() {
        for total in [1u64, 5, 10, 12, 19, 20, 99, 100, 101, 938] {
            let every = plain_every(total);
            let lines = (1..=total)
                .filter(|d| d % every == 0 || *d == total)
                .count();
            assert!((1..=10).contains(&lines), "{total} batches: {lines} lines");
        }
        assert_eq!(plain_every(12), 2);
    }

    #[test]
    fn epochs_are_numbered_from_zero_and_partial_ones_counted_apart() {
        assert_eq!(epoch_label(0, 20), "epoch 0 (1 of 20)");
        let t = RunTotals {
            full_epochs: 158,
            partial_epochs: 1,
            steps: 2066,
            samples: 1000,
            train_s: 2.0,
            full_train_s: 1.58,
        };
        let line = summary_line(&t, 3.0);
        assert!(
            line.starts_with("done: 158 full epoch(s) and 1 partial, 2066 step(s) in all, 3.00 s this run (0.01 s/epoch training, 500 samples/s)"),
            "{line}"
        );
        let t = RunTotals {
            partial_epochs: 0,
            ..t
        };
        assert!(summary_line(&t, 3.0).starts_with("done: 158 full epoch(s), 2066"));
    }
}
