//! The BERT part of the `lora` example: a LoRA fine-tune (PEFT's
//! `task_type="SEQ_CLS"`) of a BERT checkpoint with a classification head
//! on the licence-sentence task of `finetune_bert` (its data code, shared in
//! `examples/common/licence_task.rs`: the same sentences, split,
//! tokenization and accuracy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use minibatch::data::{DataLoader, TensorDataset};
use minibatch::models::bert::{BertForSequenceClassification, Config};
use minibatch::models::checkpoint::{load_tensors, safetensors_files};
use minibatch::models::lora::{self, LoraConfig};
use minibatch::nn::{loss::cross_entropy, seeded_var_builder, set_rng_step};
use minibatch::optim::{AdamConfig, AdamW, AdamWConfig, LinearLR, LrScheduler, Optimizer};

pub use crate::licence_task::LICENCES;
use crate::licence_task::{accuracy, build_split, encode};

/// What the BERT run needs from the command line.
pub struct BertArgs {
    /// The checkpoint directory (config.json, model.safetensors, tokenizer.json).
    pub model_dir: PathBuf,
    /// The folder of the licence texts.
    pub data_dir: PathBuf,
    /// The adapter config.
    pub lora: LoraConfig,
    /// Epochs, batch size, peak learning rate, tokens per sentence.
    pub epochs: u64,
    /// Sentences per batch.
    pub batch_size: usize,
    /// Peak AdamW learning rate (linear decay to a tenth).
    pub lr: f64,
    /// Tokens per sentence (truncated and padded to it).
    pub max_len: usize,
    /// Seeds the split, the adapters and head, the shuffling and dropout.
    pub seed: u64,
    /// Where the adapter is saved.
    pub out: PathBuf,
}

/// The base checkpoint's tensors under `BertForSequenceClassification`'s
/// names: a `BertModel` checkpoint (all-MiniLM-L6-v2: `embeddings.*`,
/// `encoder.*`, `pooler.*`) gets `bert.` before its names.
fn base_builder(dir: &Path, dev: &Device) -> Result<VarBuilder<'static>> {
    let ts = load_tensors(&safetensors_files(dir)?, DType::F32, dev)?;
    let ts: HashMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, t)| {
            if k.starts_with("bert.") || k.starts_with("classifier.") {
                (k, t)
            } else {
                (format!("bert.{k}"), t)
            }
        })
        .collect();
    if !ts.contains_key("bert.pooler.dense.weight") {
        bail!(
            "{}: no pooler.dense weights (the head reads the pooler, which LoRA keeps frozen)",
            dir.display()
        );
    }
    Ok(VarBuilder::from_tensors(ts, DType::F32, dev))
}

/// The LoRA run: prints the test accuracy before and after, saves the
/// adapter to `a.out` and checks that it reloads to the same accuracy.
pub fn run(a: &BertArgs) -> Result<()> {
    let dir = &a.model_dir;
    if a.max_len < 2 || a.batch_size == 0 || a.epochs == 0 {
        bail!("--max-len must be at least 2, --batch-size and --epochs at least 1");
    }
    let dev = Device::Cpu;
    let t_start = Instant::now();
    let (train, test) = build_split(&a.data_dir, 0.3, a.seed)?;
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("cannot read {}/tokenizer.json: {e}", dir.display()))?;
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: a.max_len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("truncation to {}: {e}", a.max_len))?;
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(a.max_len),
        ..Default::default()
    }));
    let loader = DataLoader::builder(TensorDataset::new(encode(&tok, &train, &dev)?)?)
        .batch_size(a.batch_size)
        .shuffle(a.seed)
        .build()?;
    let test_loader = DataLoader::builder(TensorDataset::new(encode(&tok, &test, &dev)?)?)
        .batch_size(64)
        .build()?;
    println!("sentences: {} train / {} test", train.len(), test.len());

    let mut cfg = Config::from_file(dir.join("config.json"))?;
    cfg.num_labels = Some(LICENCES.len());
    let adapters = VarMap::new();
    let model = BertForSequenceClassification::load_lora(
        base_builder(dir, &dev)?,
        &cfg,
        &a.lora,
        seeded_var_builder(&adapters, a.seed, DType::F32, &dev),
    )?;
    let n: usize = adapters.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "base {} frozen; LoRA r {} alpha {} dropout {} on {} + the classifier (modules_to_save): {n} trained parameters in {} tensors",
        dir.display(),
        a.lora.r,
        a.lora.alpha,
        a.lora.dropout,
        a.lora.target_modules.join(", "),
        adapters.all_vars().len()
    );
    println!(
        "before fine-tuning: test accuracy {:.2}%",
        100.0 * accuracy(&model, &test_loader)?
    );

    let mut opt = AdamW::from_varmap(
        &adapters,
        AdamWConfig {
            adam: AdamConfig {
                lr: a.lr,
                weight_decay: 0.01,
                ..AdamWConfig::default().adam
            },
        },
    )?;
    let total = a.epochs * loader.len() as u64;
    let mut sched = LinearLR::new(&mut opt, 1.0, 0.1, total)?;
    let mut step = 0u64;
    let mut acc = f64::NAN;
    for epoch in 0..a.epochs {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            let [ids, mask, y] = batch.tensors() else {
                bail!("want (ids, mask, label) batches")
            };
            set_rng_step(step);
            let logits = model.forward_t(ids, &ids.zeros_like()?, Some(mask), true)?;
            let loss = cross_entropy(&logits, y)?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
            sched.step(&mut opt)?;
            step += 1;
            sum += f64::from(loss.to_scalar::<f32>()?) * y.dim(0)? as f64;
            n += y.dim(0)?;
        }
        acc = accuracy(&model, &test_loader)?;
        println!(
            "epoch {epoch}: train loss {:.4}, test accuracy {:.2}%",
            sum / n.max(1) as f64,
            100.0 * acc
        );
    }
    println!(
        "after fine-tuning: test accuracy {:.2}% after {step} steps of batch {}",
        100.0 * acc,
        a.batch_size
    );
    lora::save_adapter(&adapters, &a.lora, &a.out)?;
    let again = VarMap::new();
    let reloaded = BertForSequenceClassification::load_lora(
        base_builder(dir, &dev)?,
        &cfg,
        &a.lora,
        VarBuilder::from_varmap(&again, DType::F32, &dev),
    )?;
    lora::load_adapter_into(&again, &a.out)?;
    println!(
        "adapter saved to {} (reloaded: test accuracy {:.2}%)",
        a.out.display(),
        100.0 * accuracy(&reloaded, &test_loader)?
    );
    eprintln!("{:.1} s in all", t_start.elapsed().as_secs_f64());
    Ok(())
}
