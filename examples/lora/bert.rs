//! The BERT part of the `lora` example: a LoRA fine-tune (PEFT's
//! `task_type="SEQ_CLS"`) of a BERT checkpoint with a classification head
//! on the licence-sentence task of `finetune_bert` (its data code, copied:
//! the same sentences, split, tokenization and accuracy).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use minibatch::data::{DataLoader, TensorDataset};
use minibatch::models::bert::{BertForSequenceClassification, Config};
use minibatch::models::checkpoint::{load_tensors, safetensors_files};
use minibatch::models::lora::{self, LoraConfig};
use minibatch::nn::{loss::cross_entropy, seeded_var_builder, set_rng_step};
use minibatch::optim::{AdamConfig, AdamW, AdamWConfig, LinearLR, LrScheduler, Optimizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The labels: 0 Apache-2.0, 1 GPL-3, 2 MPL-2.0.
pub const LICENCES: [&str; 3] = ["Apache-2.0", "GPL-3", "MPL-2.0"];

/// The sentences of one licence text (see the module docs), in text order.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut para = String::new();
    let flush = |para: &mut String, out: &mut Vec<String>| {
        let words: Vec<&str> = para.split_whitespace().collect();
        let mut cur: Vec<&str> = Vec::new();
        for w in words {
            cur.push(w);
            if w.ends_with(['.', ';', '?', '!']) {
                if cur.len() >= 5 {
                    out.push(cur.join(" "));
                }
                cur.clear();
            }
        }
        if cur.len() >= 5 {
            out.push(cur.join(" "));
        }
        para.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            para.push(' ');
            para.push_str(line);
        }
    }
    flush(&mut para, &mut out);
    out
}

/// `(train, test)` lists of `(sentence, label)`.
type Split = (Vec<(String, u32)>, Vec<(String, u32)>);

/// The stratified seeded split of `finetune_bert` (see its module docs).
pub fn build_split(data_dir: &Path, test_share: f64, seed: u64) -> Result<Split> {
    if !(test_share > 0.0 && test_share < 1.0) {
        bail!("--test-share must be in (0, 1), got {test_share}");
    }
    let mut per_licence = Vec::new();
    // sentence -> the licences it occurs in
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (label, name) in LICENCES.iter().enumerate() {
        let path = data_dir.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the licence text {}", path.display()))?;
        let mut unique = Vec::new();
        for s in sentences(&text) {
            let entry = seen.entry(s.clone()).or_default();
            if !entry.contains(&label) {
                entry.push(label);
                unique.push(s);
            }
        }
        per_licence.push(unique);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (label, list) in per_licence.into_iter().enumerate() {
        let mut list: Vec<String> = list.into_iter().filter(|s| seen[s].len() == 1).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (0x11ce_0000 + label as u64));
        list.shuffle(&mut rng);
        let n_test = ((list.len() as f64) * test_share).round() as usize;
        for (i, s) in list.into_iter().enumerate() {
            let item = (s, label as u32);
            if i < n_test {
                test.push(item);
            } else {
                train.push(item);
            }
        }
    }
    Ok((train, test))
}

/// `(ids, mask, labels)`: `(n, max_len)` u32, `(n, max_len)` u32, `(n,)` u32.
pub fn encode(
    tok: &tokenizers::Tokenizer,
    items: &[(String, u32)],
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    let mut len = 0;
    for (s, label) in items {
        let e = tok
            .encode(s.as_str(), true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {s:?}: {e}"))?;
        len = e.get_ids().len();
        ids.extend_from_slice(e.get_ids());
        mask.extend_from_slice(e.get_attention_mask());
        labels.push(*label);
    }
    let n = items.len();
    Ok(vec![
        Tensor::from_vec(ids, (n, len), dev)?,
        Tensor::from_vec(mask, (n, len), dev)?,
        Tensor::from_vec(labels, n, dev)?,
    ])
}

/// Share of `test` the model classifies right (eval mode: no dropout).
pub fn accuracy(model: &BertForSequenceClassification, test: &DataLoader) -> Result<f64> {
    let (mut right, mut n) = (0usize, 0usize);
    for batch in test.epoch(0) {
        let batch = batch?;
        let [ids, mask, y] = batch.tensors() else {
            bail!("want (ids, mask, label) batches")
        };
        let logits = model.forward(ids, &ids.zeros_like()?, Some(mask))?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let y = y.to_vec1::<u32>()?;
        right += pred.iter().zip(&y).filter(|(p, y)| p == y).count();
        n += y.len();
    }
    Ok(right as f64 / n.max(1) as f64)
}

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
