//! Continues training a causal language model (a Llama-architecture
//! checkpoint, or GPT-2 with `--arch gpt2`) on a text file, through
//! `minibatch::data::TokenWindows` and the `Trainer`.
//!
//! ```text
//! cargo run --release --example finetune_lm                     # small random-init Llama on data/licenses/GPL-3, bytes
//! cargo run --release --example finetune_lm -- --arch gpt2      # the same with a small random-init GPT-2
//! cargo run --release --example finetune_lm -- --model-dir path/to/llama-checkpoint --text my.txt
//! cargo run --release --example finetune_lm -- --arch gpt2 --model-dir path/to/gpt2-checkpoint
//! ```
//!
//! **Model.** With `--model-dir` (a Hugging Face folder with `config.json`
//! and `model.safetensors`, or the shards of `model.safetensors.index.json`)
//! the port (`minibatch::models::llama::Llama` or `gpt2::Gpt2`) is built over
//! a `VarMap` and filled by `checkpoint::load_pretrained`: every parameter
//! is a trainable Var taken from the checkpoint (a missing tensor is an error
//! naming it). Without `--model-dir` it is a small random-init model
//! (`--hidden`, `--layers`, `--heads`; Llama with half as many KV heads,
//! GPT-2 without dropout), seeded by `minibatch::nn::seeded_var_builder`,
//! whose tokens are the text's bytes (vocabulary 256).
//!
//! **Tokens.** A checkpoint folder with `tokenizer.json` is tokenized by the
//! `tokenizers` crate (no special tokens added, the file's truncation and
//! padding settings off: the text is one long sequence); otherwise the tokens are the
//! bytes of the text, which needs a vocabulary of at least 256 (an error says
//! so). The first `1 - --val-share` of the tokens are the training set, the
//! rest the validation set; both are written as flat token files (`u16`, or
//! `u32` above 65,536 tokens) to `--out-dir` and read back by `TokenWindows`
//! (`--block` tokens a window, the training windows' boundaries moved every
//! epoch by a seeded offset).
//!
//! **Training.** The `Trainer` with a step computing the next-token
//! cross-entropy over every position, AdamW (betas 0.9/0.95, weight decay
//! 0.1), a linear warm-up then cosine decay, `clip_grad_norm` 1.0. It prints
//! the validation loss before training, the train and validation loss of
//! every epoch (nats per token), and a greedy continuation of the start of
//! the validation text. Everything is seeded: the same output every run but
//! for the times.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, ModuleT, Tensor, D};
use candle_nn::VarMap;
use clap::{Parser, ValueEnum};
use minibatch::data::{Batch, DataLoader, Dataset, TokenDType, TokenWindows};
use minibatch::models::checkpoint::load_pretrained;
use minibatch::models::{gpt2, llama};
use minibatch::nn::{loss::cross_entropy, seeded_var_builder};
use minibatch::optim::{
    AdamConfig, AdamW, AdamWConfig, CosineAnnealingLR, LinearLR, LrScheduler, Norm, SequentialLR,
};
use minibatch::train::{Clip, ProgressMode, ScheduleEvery, StepOutput, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arch {
    Llama,
    Gpt2,
}

#[derive(Parser, Debug)]
#[command(about = "Continue training a Llama or GPT-2 language model on a text file")]
struct Args {
    /// the architecture of --model-dir (or of the random-init model)
    #[arg(long, value_enum, default_value = "llama")]
    arch: Arch,
    /// a Hugging Face checkpoint folder (config.json + model.safetensors); none: a small random-init model on bytes
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// the text to train on
    #[arg(long, default_value = "data/licenses/GPL-3")]
    text: PathBuf,
    /// tokens per training window
    #[arg(long, default_value_t = 64)]
    block: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 6)]
    epochs: u64,
    /// peak learning rate (default: 3e-3 for a random-init model, 5e-5 for a checkpoint)
    #[arg(long)]
    lr: Option<f64>,
    /// share of the tokens (the end of the text) held out for validation
    #[arg(long, default_value_t = 0.1)]
    val_share: f64,
    /// random-init model: width
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// random-init model: layers
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// random-init model: attention heads
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// tokens of the greedy continuation printed at the end (0: none)
    #[arg(long, default_value_t = 64)]
    sample_tokens: usize,
    /// seeds the weights of a random-init model and the windows' order and offsets
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// where the token files go
    #[arg(long, default_value = "runs/finetune_lm")]
    out_dir: PathBuf,
}

/// The model the Trainer drives: either port, one `ModuleT`.
enum Lm {
    Llama(Box<llama::Llama>),
    Gpt2(Box<gpt2::Gpt2>),
}

impl ModuleT for Lm {
    fn forward_t(&self, ids: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Lm::Llama(m) => m.forward_t(ids, train),
            Lm::Gpt2(m) => m.forward_t(ids, train),
        }
    }
}

/// How text becomes tokens and back.
enum Tokens {
    Bytes,
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl Tokens {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokens::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokens::Tokenizer(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing the text: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokens::Bytes => Ok(String::from_utf8_lossy(
                &ids.iter().map(|&i| i as u8).collect::<Vec<u8>>(),
            )
            .into_owned()),
            Tokens::Tokenizer(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
        }
    }
}

/// The model and how many parameters it has, plus a line saying what it is.
fn build_model(a: &Args, dev: &Device) -> Result<(Lm, VarMap, usize, String)> {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, a.seed, DType::F32, dev);
    let (model, vocab, what) = match (&a.model_dir, a.arch) {
        (Some(dir), arch) => {
            let config = dir.join("config.json");
            if !config.is_file() {
                bail!(
                    "{} has no config.json: --model-dir must be a Hugging Face checkpoint folder \
                     (config.json and model.safetensors)",
                    dir.display()
                );
            }
            let (model, vocab, prefix) = match arch {
                Arch::Llama => {
                    let cfg = llama::Config::from_file(&config)?;
                    let v = cfg.vocab_size;
                    (Lm::Llama(Box::new(llama::Llama::load(vb, &cfg)?)), v, None)
                }
                Arch::Gpt2 => {
                    let cfg = gpt2::Config::from_file(&config)?;
                    let v = cfg.vocab_size;
                    // the hub's gpt2 files name tensors without "transformer."
                    (
                        Lm::Gpt2(Box::new(gpt2::Gpt2::load(vb, &cfg)?)),
                        v,
                        Some("transformer"),
                    )
                }
            };
            let report = load_pretrained(&vm, dir, prefix, false)?;
            let what = format!(
                "{arch:?} from {}: {} tensors loaded{}",
                dir.display(),
                report.loaded.len(),
                if report.unused.is_empty() {
                    String::new()
                } else {
                    format!(" ({} in the files unused)", report.unused.len())
                }
            );
            (model, vocab, what)
        }
        (None, Arch::Llama) => {
            let cfg = llama::Config::small(256, a.hidden, a.layers, a.heads, (a.heads / 2).max(1));
            let what = format!(
                "random-init Llama: hidden {}, {} layers, {} heads, {} KV heads, intermediate {}, vocab 256 (bytes)",
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.kv_heads(),
                cfg.intermediate_size
            );
            (
                Lm::Llama(Box::new(llama::Llama::load(vb, &cfg)?)),
                256,
                what,
            )
        }
        (None, Arch::Gpt2) => {
            let cfg = gpt2::Config::from_json(&format!(
                r#"{{"vocab_size": 256, "n_positions": {}, "n_embd": {}, "n_layer": {}, "n_head": {},
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}"#,
                a.block, a.hidden, a.layers, a.heads
            ))?;
            let what = format!(
                "random-init GPT-2: n_embd {}, {} layers, {} heads, n_positions {}, tied head, vocab 256 (bytes)",
                cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions
            );
            (Lm::Gpt2(Box::new(gpt2::Gpt2::load(vb, &cfg)?)), 256, what)
        }
    };
    Ok((model, vm, vocab, what))
}

/// Writes `tokens` as a flat little-endian token file.
fn write_tokens(path: &Path, tokens: &[u32], dtype: TokenDType) -> Result<()> {
    let bytes: Vec<u8> = match dtype {
        TokenDType::U16 => tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect(),
        TokenDType::U32 => tokens.iter().flat_map(|&t| t.to_le_bytes()).collect(),
    };
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The Trainer's step: next-token cross-entropy over every position.
fn step(model: &Lm, batch: &Batch, train: bool) -> candle_core::Result<StepOutput> {
    let [x, y] = batch.tensors() else {
        candle_core::bail!("the language-model step wants (tokens, targets) batches");
    };
    // (b, t, vocab) logits against (b, t) next tokens: every position a row.
    let logits = model.forward_t(x, train)?;
    let loss = cross_entropy(&logits, y)?;
    Ok(StepOutput::new(loss))
}

/// Greedy decoding of `n` tokens after `prompt`.
fn greedy(model: &Lm, prompt: &[u32], n: usize, max_len: usize, dev: &Device) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let start = seq.len().saturating_sub(max_len);
        let x = Tensor::new(&seq[start..], dev)?.unsqueeze(0)?;
        let logits = model.forward_t(&x, false)?;
        let last = logits.i((0, x.dim(1)? - 1))?;
        seq.push(last.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    Ok(seq[prompt.len()..].to_vec())
}

fn main() -> Result<()> {
    // Reuse freed tensor memory instead of faulting fresh pages in every step
    // (glibc; changes no result, only the speed: see minibatch::nn::malloc).
    minibatch::nn::malloc::keep_freed_memory();
    let a = Args::parse();
    let t_start = Instant::now();
    let dev = Device::Cpu;
    if !(a.val_share > 0.0 && a.val_share < 1.0) {
        bail!("--val-share must be in (0, 1), got {}", a.val_share);
    }
    if a.block == 0 || a.batch_size == 0 || a.epochs == 0 {
        bail!("--block, --batch-size and --epochs must be at least 1");
    }
    let (model, vm, vocab, what) = build_model(&a, &dev)?;
    let n_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    println!("{what}; {n_params} parameters");

    // Tokens: the checkpoint's tokenizer.json, else bytes.
    let tokens = match a.model_dir.as_ref().map(|d| d.join("tokenizer.json")) {
        Some(p) if p.is_file() => {
            let mut t = tokenizers::Tokenizer::from_file(&p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            // the whole text is one sequence: no truncation or padding from the file
            t.with_truncation(None)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            t.with_padding(None);
            Tokens::Tokenizer(Box::new(t))
        }
        _ => {
            if vocab < 256 {
                bail!(
                    "the model's vocabulary has {vocab} tokens and there is no tokenizer.json in \
                     --model-dir: the text's bytes need a vocabulary of at least 256"
                );
            }
            Tokens::Bytes
        }
    };
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("cannot read --text {}", a.text.display()))?;
    let ids = tokens.encode(&text)?;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("the tokenizer gives token {bad}, at or above the model's vocabulary ({vocab})");
    }
    let n_val = ((ids.len() as f64) * a.val_share).round() as usize;
    let n_train = ids.len() - n_val;
    if n_train < 2 * a.block + 1 || n_val < a.block + 1 {
        bail!(
            "{} gives {} tokens: {n_train} to train and {n_val} to validate on, too few for \
             windows of --block {} (need {} and {})",
            a.text.display(),
            ids.len(),
            a.block,
            2 * a.block + 1,
            a.block + 1
        );
    }
    let dtype = if vocab <= 1 << 16 {
        TokenDType::U16
    } else {
        TokenDType::U32
    };
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("cannot create {}", a.out_dir.display()))?;
    let (train_path, val_path) = (a.out_dir.join("train.bin"), a.out_dir.join("val.bin"));
    write_tokens(&train_path, &ids[..n_train], dtype)?;
    write_tokens(&val_path, &ids[n_train..], dtype)?;
    let train_ds = TokenWindows::open(&train_path, dtype, a.block)?.epoch_offsets(a.seed)?;
    let val_ds = TokenWindows::open(&val_path, dtype, a.block)?;
    println!(
        "{}: {} {} tokens, {n_train} train ({} windows of {}) / {n_val} validation ({} windows)",
        a.text.display(),
        ids.len(),
        match tokens {
            Tokens::Bytes => "byte".to_string(),
            Tokens::Tokenizer(_) => "tokenizer.json".to_string(),
        },
        train_ds.len(),
        a.block,
        val_ds.len()
    );
    let train_loader = DataLoader::builder(train_ds)
        .batch_size(a.batch_size)
        .shuffle(a.seed)
        .build()?;
    let val_loader = DataLoader::builder(val_ds)
        .batch_size(a.batch_size)
        .build()?;

    let lr =
        a.lr.unwrap_or(if a.model_dir.is_some() { 5e-5 } else { 3e-3 });
    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWConfig {
            adam: AdamConfig {
                lr,
                beta1: 0.9,
                beta2: 0.95,
                weight_decay: 0.1,
                ..AdamWConfig::default().adam
            },
        },
    )?;
    let total = a.epochs * train_loader.len() as u64;
    let warmup = (total / 10).clamp(1, total.saturating_sub(1).max(1));
    let warm: Box<dyn LrScheduler> = Box::new(LinearLR::new(&mut opt, 0.01, 1.0, warmup)?);
    let cosine: Box<dyn LrScheduler> = Box::new(CosineAnnealingLR::new(
        &mut opt,
        (total - warmup).max(1),
        lr / 10.0,
    )?);
    let sched = SequentialLR::new(&mut opt, vec![warm, cosine], vec![warmup])?;
    println!(
        "batch {}, {} steps/epoch, {} epochs, AdamW lr {lr} (warm-up {warmup} steps, cosine to lr/10), clip 1.0",
        a.batch_size,
        train_loader.len(),
        a.epochs
    );

    let mut trainer = Trainer::builder(model, vm, train_loader, opt)
        .step(step)
        .val_loader(val_loader.clone())
        .scheduler(sched, ScheduleEvery::Step)
        .clip(Clip::Norm {
            max_norm: 1.0,
            norm: Norm::L2,
        })
        .epochs(a.epochs)
        .progress(ProgressMode::Epochs)
        .build()?;
    let before = trainer.evaluate(&val_loader)?;
    println!(
        "before training: validation loss {:.4} nats/token",
        before.loss
    );
    let t_train = Instant::now();
    trainer.fit()?;
    let train_s = t_train.elapsed().as_secs_f64();
    let last = trainer
        .history()
        .epochs
        .last()
        .context("the Trainer ran no epoch")?;
    println!(
        "after {} epochs ({} steps): train loss {:.4}, validation loss {:.4} nats/token (before: {:.4}); {train_s:.1} s of training",
        trainer.history().epochs.len(),
        last.steps,
        last.train_loss,
        last.val_loss.unwrap_or(f64::NAN),
        before.loss
    );

    if a.sample_tokens > 0 {
        let prompt = &ids[n_train..(n_train + 32).min(ids.len())];
        let max_len = match trainer.model() {
            Lm::Llama(_) => usize::MAX,
            Lm::Gpt2(m) => m.config().n_positions,
        };
        let out = greedy(trainer.model(), prompt, a.sample_tokens, max_len, &dev)?;
        println!(
            "greedy continuation of the validation text:\n  prompt: {:?}\n  model:  {:?}",
            tokens.decode(prompt)?,
            tokens.decode(&out)?
        );
    }
    println!(
        "whole run {:.1} s wall, {:.1} s CPU (all threads)",
        t_start.elapsed().as_secs_f64(),
        minibatch::dist::threads::cpu_time().as_secs_f64()
    );
    Ok(())
}
