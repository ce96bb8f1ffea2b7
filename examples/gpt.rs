//! A small GPT learns multi-digit addition: a decoder-only transformer built
//! from `minibatch::nn`, trained by the `Trainer` with a masked loss.
//!
//! ```text
//! cargo run --release --example gpt                                  # 3-digit addition: 100 % held out, ~1.5 min
//! cargo run --release --example gpt -- --digits 4 --epochs 8
//! cargo run --release --example gpt -- --checkpoint-dir runs/gpt-ckpt --max-steps 500  # then ...
//! cargo run --release --example gpt -- --checkpoint-dir runs/gpt-ckpt --resume          # ... continue
//! cargo run --release --example gpt -- --candle-nn-layers            # candle-nn's layers: the gradient guard stops it
//! ```
//!
//! **Task.** Problems `a+b=c` with `a`, `b` drawn uniformly from
//! `0..10^digits`, written with leading zeros; the answer `c` has
//! `digits + 1` digits and is written **least significant digit first**
//! (`123+456=` is answered `9750`, i.e. 0579 reversed), so every answer digit
//! depends only on the operand digits of its place and the carry from the
//! digit written just before it. That makes addition learnable by a tiny
//! model in a few minutes. Tokens: `0`-`9`, `+` (10), `=` (11). A seed draws
//! the held-out test problems first, then the training problems among the
//! remaining ones: no test problem is ever trained on.
//!
//! **Batches** are `(tokens, targets, mask)`: the tokens of the problem but
//! its last, the same shifted by one (next-token targets) and a mask that
//! is 1 on the answer positions only. The loss, given to the `Trainer` as a
//! general step, is the mean negative log-likelihood over the masked
//! positions: the model is not trained to predict the (random) operands.
//!
//! **Model** (`examples/gpt/model.rs`, shared with `benches/gpt_step.rs`):
//! GPT-2's layout: token and learned position embeddings, `--layers`
//! pre-norm blocks of causal self-attention and a GELU MLP (4x wide), a final
//! layer norm and a linear head, from `minibatch::nn`'s `Linear`,
//! `LayerNorm`, `ops::scaled_dot_product_attention` (one fused causal
//! attention op), `ops::gelu` and `ops::log_softmax`.
//!
//! **Recipe:** AdamW (betas 0.9/0.99, weight decay 0.1), linear warm-up then
//! cosine decay per optimizer step (`SequentialLR` of `LinearLR` and
//! `CosineAnnealingLR`), `clip_grad_norm` 1.0, optional gradient
//! accumulation (`--accumulate`), checkpoints and `--resume` as in the mnist
//! example. Everything is seeded: the same output every run.
//!
//! **Output:** per epoch the held-out exact-match accuracy (`val_exact_match`:
//! teacher-forced, every answer digit right, which is the same as greedy
//! decoding getting the whole answer right); at the end the accuracy of greedy
//! decoding on the held-out problems and a few sampled completions.
//!
//! `--candle-nn-layers` builds the same model from candle-nn 0.11's layers
//! (`candle_nn::LayerNorm`, `candle_nn::ops::softmax_last_dim`): their fused
//! CPU kernels have no backward pass, so only the LM head would train. The
//! Trainer's gradient guard stops the run at the first step with an error
//! naming the parameters without a gradient, which the example prints.

#[path = "gpt/model.rs"]
mod model;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, IndexOp, Module, Tensor, D};
use clap::Parser;
use minibatch::data::{parse_device, Batch, DataLoader, TensorDataset};
use minibatch::dist::ProcessGroupExt;
use minibatch::optim::{
    AdamConfig, AdamW, AdamWConfig, CosineAnnealingLR, LinearLR, LrScheduler, Norm, SequentialLR,
};
use minibatch::train::{
    Clip, Metric, Mode, ProgressMode, RunningMean, ScheduleEvery, StepOutput, TrainError, Trainer,
};
use model::{defaults, masked_loss, Gpt, GptConfig, Layers};
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Train a small GPT on multi-digit addition with minibatch")]
struct Args {
    /// digits per operand
    #[arg(long, default_value_t = defaults::DIGITS)]
    digits: usize,
    /// training problems (drawn once, without the held-out ones)
    #[arg(long, default_value_t = 50_000)]
    train_size: usize,
    /// held-out test problems
    #[arg(long, default_value_t = 2_000)]
    test_size: usize,
    /// width of the residual stream
    #[arg(long, default_value_t = defaults::D_MODEL)]
    d_model: usize,
    #[arg(long, default_value_t = defaults::HEADS)]
    heads: usize,
    /// transformer blocks
    #[arg(long, default_value_t = defaults::LAYERS)]
    layers: usize,
    #[arg(long, default_value_t = 6)]
    epochs: u64,
    /// samples per batch (per rank with --distributed)
    #[arg(long, default_value_t = defaults::BATCH)]
    batch_size: usize,
    /// micro-batches per optimizer step (gradient accumulation)
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// peak learning rate
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// linear warm-up steps (from lr/100 to lr), then cosine decay to lr/10
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// seeds the problems, the weights and the shuffling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// greedy completions printed at the end
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// build the model from candle-nn's layers (shows the gradient guard)
    #[arg(long)]
    candle_nn_layers: bool,
    /// write checkpoints here (every epoch, and every --checkpoint-every steps)
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// continue from the latest checkpoint in --checkpoint-dir
    #[arg(long)]
    resume: bool,
    /// stop after this many optimizer steps in total (e.g. to try --resume)
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value = "runs/gpt")]
    out_dir: PathBuf,
    /// data-parallel over MPI: `mpirun -np N target/release/examples/gpt --distributed`
    /// (build with `--features mpi`); rank 0 prints and writes
    #[arg(long)]
    distributed: bool,
    /// threads of each rank's candle pool (default: the cores / the ranks on this machine)
    #[arg(long)]
    threads: Option<usize>,
}

const PLUS: u32 = 10;
const EQUALS: u32 = 11;
const VOCAB: usize = defaults::VOCAB;
/// The target of positions outside the mask, for the metric.
const IGNORE: u32 = u32::MAX;

/// Problems `(a, b)` of the addition task.
type Problems = Vec<(u64, u64)>;

/// The addition task: `digits`-digit operands, the answer reversed.
#[derive(Clone, Copy)]
struct Task {
    digits: usize,
}

impl Task {
    /// Tokens of a whole problem: `a + b = c` (reversed).
    fn len(&self) -> usize {
        3 * self.digits + 3
    }
    /// Tokens before the answer (`a+b=`).
    fn prompt_len(&self) -> usize {
        2 * self.digits + 2
    }
    fn answer_len(&self) -> usize {
        self.digits + 1
    }
    fn encode(&self, a: u64, b: u64) -> Vec<u32> {
        let mut s = Vec::with_capacity(self.len());
        push_digits(&mut s, a, self.digits);
        s.push(PLUS);
        push_digits(&mut s, b, self.digits);
        s.push(EQUALS);
        let mut c = a + b;
        for _ in 0..self.answer_len() {
            s.push((c % 10) as u32);
            c /= 10;
        }
        s
    }
    /// Draws `n_test` distinct held-out problems, then `n_train` distinct
    /// training problems that are not among them.
    fn split(&self, seed: u64, n_train: usize, n_test: usize) -> Result<(Problems, Problems)> {
        let max = 10u64.pow(self.digits as u32);
        if (n_train + n_test) as f64 > 0.5 * (max * max) as f64 {
            bail!(
                "{n_train} + {n_test} problems is more than half of the {} {}-digit ones",
                max * max,
                self.digits
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xadd);
        let mut seen = HashSet::with_capacity(n_train + n_test);
        let mut draw = |n: usize| {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let p = (rng.random_range(0..max), rng.random_range(0..max));
                if seen.insert(p) {
                    v.push(p);
                }
            }
            v
        };
        let test = draw(n_test);
        let train = draw(n_train);
        Ok((train, test))
    }
    /// `(tokens, targets, mask)` of `problems`: `(n, len - 1)` `u32`, `u32`, `f32`.
    fn tensors(&self, problems: &[(u64, u64)], device: &Device) -> Result<Vec<Tensor>> {
        let t = self.len() - 1;
        let n = problems.len();
        let (mut x, mut y) = (Vec::with_capacity(n * t), Vec::with_capacity(n * t));
        for &(a, b) in problems {
            let s = self.encode(a, b);
            x.extend_from_slice(&s[..t]);
            y.extend_from_slice(&s[1..]);
        }
        // Target position i predicts token i + 1: the answer starts at token prompt_len.
        let first = self.prompt_len() - 1;
        let mask: Vec<f32> = (0..n * t)
            .map(|i| if i % t >= first { 1.0 } else { 0.0 })
            .collect();
        Ok(vec![
            Tensor::from_vec(x, (n, t), device)?,
            Tensor::from_vec(y, (n, t), device)?,
            Tensor::from_vec(mask, (n, t), device)?,
        ])
    }
    fn show(&self, a: u64, b: u64, answer_reversed: &[u32]) -> String {
        let written: String = answer_reversed
            .iter()
            .map(|d| char::from(b'0' + *d as u8))
            .collect();
        let value: String = written.chars().rev().collect();
        let w = self.digits;
        format!("{a:0w$}+{b:0w$}={written}  (reads {value})")
    }
}

fn push_digits(s: &mut Vec<u32>, mut v: u64, digits: usize) {
    let start = s.len();
    for _ in 0..digits {
        s.push((v % 10) as u32);
        v /= 10;
    }
    s[start..].reverse();
}

/// Share of sequences whose masked positions are all predicted right
/// (argmax of the logits). `output`: logits `(b, t, vocab)`; `target`:
/// `(b, t)` `u32`, [`IGNORE`] outside the mask.
#[derive(Default)]
struct ExactMatch(RunningMean);

impl Metric for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }
    fn reset(&mut self) {
        self.0 = RunningMean::default();
    }
    fn update(&mut self, output: &Tensor, target: &Tensor) -> candle_core::Result<()> {
        let pred = output.argmax(D::Minus1)?.to_vec2::<u32>()?;
        let target = target.to_vec2::<u32>()?;
        let right = pred
            .iter()
            .zip(&target)
            .filter(|(p, t)| p.iter().zip(t.iter()).all(|(p, t)| *t == IGNORE || p == t))
            .count();
        self.0
            .add(right as f64 / pred.len().max(1) as f64, pred.len() as u64);
        Ok(())
    }
    fn value(&self) -> f64 {
        self.0.mean()
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.0).unwrap_or_default()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> minibatch::train::Result<()> {
        self.0 = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::Config(format!("exact_match state: {e}")))?;
        Ok(())
    }
}

/// The Trainer's step: the masked loss, and (logits, targets outside the
/// mask set to IGNORE) for the exact-match metric.
fn step(model: &Gpt, batch: &Batch, _train: bool) -> candle_core::Result<StepOutput> {
    let [x, y, mask] = batch.tensors() else {
        candle_core::bail!("the gpt step wants (tokens, targets, mask) batches");
    };
    let logits = model.forward(x)?;
    let loss = masked_loss(model, &logits, y, mask)?;
    let ignore = Tensor::full(IGNORE, y.shape(), y.device())?;
    let y_metric = mask.ne(0f32)?.where_cond(y, &ignore)?;
    Ok(StepOutput::new(loss).with_metrics(logits.detach(), y_metric))
}

/// Greedy decoding: appends `n` tokens to `prompts` `(b, p)`, each the
/// argmax of the model's next-token logits; returns the `(b, n)` new tokens.
fn greedy(model: &Gpt, prompts: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let p = prompts.dim(1)?;
    let mut seq = prompts.clone();
    for _ in 0..n {
        let t = seq.dim(1)?;
        let next = model.forward(&seq)?.i((.., t - 1, ..))?.argmax(D::Minus1)?;
        seq = Tensor::cat(&[&seq, &next.unsqueeze(1)?], 1)?;
    }
    seq.narrow(1, p, n)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let group = minibatch::dist::launch(a.distributed)?;
    // before the first candle op: candle builds its pool once
    let threads = minibatch::dist::threads::configure_threads(group.local_size(), a.threads);
    let main_rank = group.rank() == 0;
    let device = parse_device(&a.device)?;
    let task = Task { digits: a.digits };
    if a.digits == 0 || a.digits > 9 {
        bail!("--digits must be in 1..=9");
    }
    let (train, test) = task.split(a.seed, a.train_size, a.test_size)?;
    let mut train_loader = DataLoader::builder(TensorDataset::new(task.tensors(&train, &device)?)?)
        .batch_size(a.batch_size)
        .shuffle(a.seed);
    if a.distributed {
        // this rank's share: the schedule below counts the rank's steps
        train_loader = train_loader.shard(group.rank(), group.world_size());
    }
    let train_loader = train_loader.build()?;
    let test_loader = DataLoader::builder(TensorDataset::new(task.tensors(&test, &device)?)?)
        .batch_size(1000)
        .build()?;

    let cfg = GptConfig {
        vocab: VOCAB,
        block: task.len() - 1,
        d_model: a.d_model,
        n_head: a.heads,
        n_layer: a.layers,
    };
    let layers = if a.candle_nn_layers {
        Layers::CandleNn
    } else {
        Layers::Minibatch
    };
    let (net, vm) = model::build(cfg, layers, &device, a.seed)?;
    let n_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();

    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWConfig {
            adam: AdamConfig {
                lr: a.lr,
                beta1: 0.9,
                beta2: 0.99,
                weight_decay: a.weight_decay,
                ..AdamWConfig::default().adam
            },
        },
    )?;
    let steps_per_epoch = train_loader.len().div_ceil(a.accumulate.max(1)) as u64;
    let total = a.epochs * steps_per_epoch;
    let warmup = a.warmup.min(total.saturating_sub(1)).max(1);
    let warm: Box<dyn LrScheduler> = Box::new(LinearLR::new(&mut opt, 0.01, 1.0, warmup)?);
    let cosine: Box<dyn LrScheduler> = Box::new(CosineAnnealingLR::new(
        &mut opt,
        total - warmup,
        a.lr / 10.0,
    )?);
    let sched = SequentialLR::new(&mut opt, vec![warm, cosine], vec![warmup])?;

    if a.distributed && main_rank {
        println!(
            "data-parallel: {} ranks ({}), {threads} threads each, global batch {}",
            group.world_size(),
            group.backend(),
            group.world_size() * a.batch_size
        );
    }
    println!(
        "GPT {} layers, d_model {}, {} heads: {n_params} parameters{}; {}-digit addition, {} train / {} held-out problems",
        a.layers,
        a.d_model,
        a.heads,
        if a.candle_nn_layers { " (candle-nn layers)" } else { "" },
        a.digits,
        train.len(),
        test.len(),
    );
    println!(
        "batch {} x {} accumulated, {} steps/epoch, {} epochs, AdamW lr {} (warm-up {warmup}, cosine), clip 1.0, device {:?}",
        a.batch_size, a.accumulate, steps_per_epoch, a.epochs, a.lr, device
    );

    let mut b = Trainer::builder(net, vm, train_loader, opt)
        .step(step)
        .metric(ExactMatch::default())
        .val_loader(test_loader)
        .scheduler(sched, ScheduleEvery::Step)
        .clip(Clip::Norm {
            max_norm: 1.0,
            norm: Norm::L2,
        })
        .accumulate(a.accumulate)
        .epochs(a.epochs)
        .progress(ProgressMode::Auto)
        .out_dir(&a.out_dir);
    if a.distributed {
        b = b.distributed(group.clone());
    }
    if let Some(n) = a.max_steps {
        b = b.max_steps(n);
    }
    if let Some(dir) = &a.checkpoint_dir {
        b = b
            .checkpoint_dir(dir)
            .save_best("val_exact_match", Mode::Max)
            .keep_last(2);
        if let Some(n) = a.checkpoint_every {
            b = b.checkpoint_every_steps(n);
        }
        if a.resume {
            // corrupt checkpoints are skipped, with a warning naming each
            b = b.resume_from_latest_valid(dir);
        }
    } else if a.resume {
        bail!("--resume needs --checkpoint-dir");
    }
    // a resume prints where it resumed and what came from the checkpoint
    let mut trainer = b.build()?;

    let t0 = Instant::now();
    match trainer.fit() {
        Ok(_) => {}
        Err(e @ TrainError::MissingGradients { .. }) if a.candle_nn_layers => {
            println!("\nThe Trainer's gradient guard stopped the candle-nn model:\n  {e}");
            println!(
                "(candle-nn 0.11's fused LayerNorm and softmax_last_dim have no backward pass; \
                 the default run builds the same model from minibatch::nn)"
            );
            return Ok(());
        }
        Err(e) => group.fail(&e),
    }
    let train_s = t0.elapsed().as_secs_f64();
    if !main_rank {
        return Ok(());
    }
    if a.candle_nn_layers {
        bail!("the candle-nn model trained without the guard stopping it");
    }

    // Greedy decoding on every held-out problem.
    let model = trainer.model();
    let mut right = 0;
    let mut shown = Vec::new();
    for chunk in test.chunks(1000) {
        let tensors = task.tensors(chunk, &device)?;
        let prompts = tensors[0].narrow(1, 0, task.prompt_len())?;
        let answers = greedy(model, &prompts, task.answer_len())?.to_vec2::<u32>()?;
        for (&(x, y), got) in chunk.iter().zip(&answers) {
            let want = &task.encode(x, y)[task.prompt_len()..];
            let ok = got.as_slice() == want;
            right += ok as usize;
            if shown.len() < a.samples {
                shown.push(format!(
                    "  {}  {}",
                    task.show(x, y, got),
                    if ok { "ok" } else { "WRONG" }
                ));
            }
        }
    }
    println!(
        "held-out exact match (greedy): {:.2}% ({right}/{}) after {} steps, {:.1} s of training",
        100.0 * right as f64 / test.len() as f64,
        test.len(),
        trainer.global_step(),
        train_s
    );
    println!(
        "CPU {:.1} s (this process, all threads) for {:.1} s of wall",
        minibatch::dist::threads::cpu_time().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "sampled completions (held-out problems, answer written least significant digit first):"
    );
    for s in shown {
        println!("{s}");
    }
    println!(
        "wrote {0}/history_epochs.csv, {0}/history_steps.csv, {0}/history.json and {0}/history.svg",
        a.out_dir.display()
    );
    Ok(())
}
