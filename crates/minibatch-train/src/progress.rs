//! Progress reporting: an indicatif bar per epoch on a terminal, plain log
//! lines otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::history::EpochRecord;

/// How the trainer reports progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stdout is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Always an indicatif bar (drawn on stdout).
    Bar,
    /// Plain log lines on stdout (about ten per epoch plus a summary line).
    Plain,
    /// Nothing at all.
    Silent,
}

impl ProgressMode {
    fn resolve(self) -> ProgressMode {
        match self {
            ProgressMode::Auto if std::io::stdout().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        }
    }
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
            bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
            bar.set_position(at);
            bar
        });
        Self {
            mode,
            bar,
            epoch,
            epochs,
            total,
            log_every: (total / 10).max(1),
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
                    "epoch {}/{} batch {}/{}: loss {:.4}, {:.0} samples/s, data wait {:.1}%",
                    self.epoch + 1,
                    self.epochs,
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
            "epoch {}/{}: train loss {:.4}",
            r.epoch + 1,
            epochs,
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
        line.push_str(&format!(
            " | {:.2} s, {:.0} samples/s, data wait {:.1}%, lr {:.3e}",
            r.epoch_time_s,
            r.samples_per_s,
            r.data_wait_share * 100.0,
            r.lr
        ));
        println!("{line}");
    }
}

pub(crate) fn summary(
    mode: ProgressMode,
    epochs: u64,
    steps: u64,
    samples: u64,
    started: Instant,
    train_s: f64,
) {
    if mode == ProgressMode::Silent {
        return;
    }
    let total = started.elapsed().as_secs_f64();
    let per_epoch = if epochs > 0 {
        train_s / epochs as f64
    } else {
        0.0
    };
    println!(
        "done: {epochs} full epoch(s), {steps} step(s) in all, {total:.2} s this run ({per_epoch:.2} s/epoch training, {:.0} samples/s)",
        if train_s > 0.0 { samples as f64 / train_s } else { 0.0 }
    );
}
