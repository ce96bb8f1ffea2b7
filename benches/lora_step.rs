//! One LoRA fine-tuning step of a Llama (`minibatch_models::llama` with
//! `load_lora`, r 8 on q/k/v/o, the base frozen): forward, cross-entropy
//! over every position, backward, AdamW over the adapters only; beside
//! PyTorch eager with transformers' `LlamaForCausalLM` and PEFT
//! (`benches/torch_lora_step.py`, 2 threads, the same shapes).
//!
//! PyTorch's script runs right before and right after the Rust steps (the
//! better of its two runs counts), so load from other processes hits both
//! alike; the figures are the minimum and median ms per step, the CPU time
//! per step (all threads), and, each side in a fresh process, the peak RSS
//! (`VmHWM`) and the step's own memory (`VmHWM` minus `VmRSS` just before
//! the first step: activations, gradients, optimizer state).
//!
//! Shape (environment, defaults in brackets): `LORA_BATCH` [8], `LORA_SEQ`
//! [128], `LORA_HIDDEN` [256], `LORA_LAYERS` [4], `LORA_VOCAB` [4096],
//! `LORA_INTER` [688] (intermediate size), `LORA_R` [8]; 8 heads, 4
//! key-value heads;
//! `LORA_STEPS` [10] timed steps on each side.
//! Both sides run with freed memory kept for reuse
//! (`minibatch_nn::malloc::keep_freed_memory`, the same glibc settings for
//! the Python process); `MINIBATCH_BENCH_MALLOC=default` runs both with
//! glibc's defaults.
//!
//! With `MINILM_DIR` set (all-MiniLM-L6-v2's folder: config.json,
//! model.safetensors), a MiniLM LoRA step too: `BertForSequenceClassification::load_lora`
//! over the frozen checkpoint (`frozen_var_builder`, names read under `bert.`),
//! r 8 (alpha 16, dropout 0) on query/key/value/attention.output.dense, the
//! 2-label classifier trained (PEFT's SEQ_CLS `modules_to_save`),
//! cross-entropy on random labels, AdamW over the trained parameters only;
//! batch `MINILM_BATCH` [32] x `MINILM_SEQ` [128] random tokens, no padding.
//! Its PyTorch twin is `torch_lora_step.py --arch bert` (transformers'
//! `BertForSequenceClassification` from the same folder + PEFT SEQ_CLS).
//!
//! `cargo bench --bench lora_step` (PyTorch from `MINIBATCH_TORCH_PYTHON`,
//! default `~/.venv-torch/bin/python`; without it the PyTorch lines are
//! left out).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use minibatch_models::llama::{Config, Llama};
use minibatch_models::lora::LoraConfig;
use minibatch_optim::{AdamConfig, AdamW, AdamWConfig, Optimizer};
use rand::{Rng, SeedableRng};

struct Shape {
    batch: usize,
    seq: usize,
    hidden: usize,
    layers: usize,
    vocab: usize,
    inter: usize,
    r: usize,
}

fn shape() -> Shape {
    Shape {
        batch: common::env_or("LORA_BATCH", 8),
        seq: common::env_or("LORA_SEQ", 128),
        hidden: common::env_or("LORA_HIDDEN", 256),
        layers: common::env_or("LORA_LAYERS", 4),
        vocab: common::env_or("LORA_VOCAB", 4096),
        inter: common::env_or("LORA_INTER", 688),
        r: common::env_or("LORA_R", 8),
    }
}

struct Setup {
    model: Llama,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    n_base: usize,
    n_adapter: usize,
    _adapters: VarMap,
}

fn setup(s: &Shape) -> Setup {
    let dev = Device::Cpu;
    let mut cfg = Config::small(s.vocab, s.hidden, s.layers, 8, 4);
    cfg.intermediate_size = s.inter;
    cfg.max_position_embeddings = s.seq.max(128);
    // A random base, then frozen: plain tensors, no Vars.
    let base_map = VarMap::new();
    Llama::load(
        minibatch_nn::seeded_var_builder(&base_map, 0, DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = base_map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let n_base = tensors.values().map(|t| t.elem_count()).sum();
    drop(base_map);
    let lora = LoraConfig {
        r: s.r,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
    };
    let adapters = VarMap::new();
    let model = Llama::load_lora(
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
        &cfg,
        &lora,
        minibatch_nn::seeded_var_builder(&adapters, 1, DType::F32, &dev),
    )
    .unwrap();
    let n_adapter = adapters.all_vars().iter().map(|v| v.elem_count()).sum();
    let opt = AdamW::from_varmap(
        &adapters,
        AdamWConfig {
            adam: AdamConfig {
                lr: 1e-4,
                ..AdamWConfig::default().adam
            },
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let n = s.batch * s.seq;
    let mut ids = |_| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..s.vocab as u32))
            .collect()
    };
    let x = Tensor::from_vec(ids(0), (s.batch, s.seq), &dev).unwrap();
    let y = Tensor::from_vec(ids(1), (s.batch, s.seq), &dev).unwrap();
    Setup {
        model,
        opt,
        x,
        y,
        n_base,
        n_adapter,
        _adapters: adapters,
    }
}

impl Setup {
    fn step(&mut self) {
        // (b, t, vocab) logits against (b, t) next tokens.
        let logits = self.model.forward_masked(&self.x, None, true).unwrap();
        let loss = minibatch_nn::loss::cross_entropy(&logits, &self.y).unwrap();
        let grads = loss.backward().unwrap();
        self.opt.step(&grads).unwrap();
    }
}

/// In the child process: `peak MiB, step MiB, CPU ms per step`.
fn memory_child() {
    let s = shape();
    let mut st = setup(&s);
    let rss0 = common::status_kib("VmRSS");
    for _ in 0..3 {
        st.step();
    }
    let (c0, n) = (common::cpu_seconds(), 10);
    for _ in 0..n {
        st.step();
    }
    let cpu_ms = 1e3 * (common::cpu_seconds() - c0) / n as f64;
    let hwm = common::status_kib("VmHWM");
    println!(
        "{:.1}\t{:.1}\t{cpu_ms:.1}",
        hwm as f64 / 1024.0,
        (hwm - rss0) as f64 / 1024.0
    );
}

/// PyTorch's `[min ms, median ms, CPU ms, peak MiB, step MiB]`.
fn torch(s: &Shape) -> Option<[f64; 5]> {
    let python = common::torch_python()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_lora_step.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["--batch", &s.batch.to_string()])
        .args(["--seq", &s.seq.to_string()])
        .args(["--hidden", &s.hidden.to_string()])
        .args(["--layers", &s.layers.to_string()])
        .args(["--vocab", &s.vocab.to_string()])
        .args(["--inter", &s.inter.to_string()])
        .args(["--r", &s.r.to_string()])
        .args([
            "--steps",
            &common::env_or("LORA_STEPS", 10usize).to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "torch_lora_step.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last()?;
    let mut v = [0.0; 5];
    let mut f = line.split('\t').skip(1);
    for x in v.iter_mut() {
        *x = f.next()?.parse().ok()?;
    }
    Some(v)
}

struct BertSetup {
    model: minibatch_models::bert::BertForSequenceClassification,
    opt: AdamW,
    x: Tensor,
    mask: Tensor,
    y: Tensor,
    n_adapter: usize,
    _adapters: VarMap,
}

fn bert_setup(dir: &str, batch: usize, seq: usize) -> BertSetup {
    use minibatch_models::bert::{BertForSequenceClassification, Config};
    let dev = Device::Cpu;
    let mut cfg = Config::from_file(std::path::Path::new(dir).join("config.json")).unwrap();
    cfg.num_labels = Some(2);
    let base = minibatch_models::checkpoint::frozen_var_builder(dir, DType::F32, &dev)
        .unwrap()
        .rename_f(|n| n.strip_prefix("bert.").unwrap_or(n).to_string());
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: ["query", "key", "value", "attention.output.dense"]
            .map(String::from)
            .to_vec(),
    };
    let adapters = VarMap::new();
    let model = BertForSequenceClassification::load_lora(
        base,
        &cfg,
        &lora,
        minibatch_nn::seeded_var_builder(&adapters, 1, DType::F32, &dev),
    )
    .unwrap();
    let n_adapter = adapters.all_vars().iter().map(|v| v.elem_count()).sum();
    let opt = AdamW::from_varmap(
        &adapters,
        AdamWConfig {
            adam: AdamConfig {
                lr: 1e-4,
                ..AdamWConfig::default().adam
            },
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..2u32)).collect();
    BertSetup {
        model,
        opt,
        x: Tensor::from_vec(ids, (batch, seq), &dev).unwrap(),
        mask: Tensor::ones((batch, seq), DType::U32, &dev).unwrap(),
        y: Tensor::from_vec(labels, batch, &dev).unwrap(),
        n_adapter,
        _adapters: adapters,
    }
}

impl BertSetup {
    fn step(&mut self) {
        let logits = self
            .model
            .forward_t(
                &self.x,
                &self.x.zeros_like().unwrap(),
                Some(&self.mask),
                true,
            )
            .unwrap();
        let loss = minibatch_nn::loss::cross_entropy(&logits, &self.y).unwrap();
        let grads = loss.backward().unwrap();
        self.opt.step(&grads).unwrap();
    }
}

fn minilm_shape() -> (usize, usize) {
    (
        common::env_or("MINILM_BATCH", 32),
        common::env_or("MINILM_SEQ", 128),
    )
}

/// In the child process (`LORA_STEP_MEMORY=bert`): the MiniLM step's
/// `peak MiB, step MiB, CPU ms per step`.
fn bert_memory_child(dir: &str) {
    let (b, t) = minilm_shape();
    let mut st = bert_setup(dir, b, t);
    let rss0 = common::status_kib("VmRSS");
    st.step();
    let (c0, n) = (common::cpu_seconds(), common::env_or("LORA_STEPS", 3usize));
    for _ in 0..n {
        st.step();
    }
    let cpu_ms = 1e3 * (common::cpu_seconds() - c0) / n as f64;
    let hwm = common::status_kib("VmHWM");
    println!(
        "{:.1}\t{:.1}\t{cpu_ms:.1}",
        hwm as f64 / 1024.0,
        (hwm - rss0) as f64 / 1024.0
    );
}

/// PyTorch's MiniLM `[min ms, median ms, CPU ms, peak MiB, step MiB]`.
fn torch_bert(dir: &str, batch: usize, seq: usize, steps: usize) -> Option<[f64; 5]> {
    let python = common::torch_python()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_lora_step.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["--arch", "bert", "--model-dir", dir])
        .args(["--batch", &batch.to_string()])
        .args(["--seq", &seq.to_string()])
        .args(["--steps", &steps.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "torch_lora_step.py --arch bert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last()?;
    let mut v = [0.0; 5];
    let mut f = line.split('\t').skip(1);
    for x in v.iter_mut() {
        *x = f.next()?.parse().ok()?;
    }
    Some(v)
}

/// The MiniLM LoRA step beside PyTorch's, the same columns as the Llama's.
fn bench_minilm(dir: &str) {
    let (b, t) = minilm_shape();
    let steps = common::env_or("LORA_STEPS", 10usize);
    let before = torch_bert(dir, b, t, steps);
    let mut st = bert_setup(dir, b, t);
    st.step();
    let timed = time_steps(steps, || st.step());
    let n_adapter = st.n_adapter;
    drop(st);
    let torch = better(before, torch_bert(dir, b, t, steps));
    print_table(
        &format!(
            "LoRA step: MiniLM ({dir}, frozen), r 8 on query/key/value/attention.output.dense + classifier ({n_adapter} trained), batch {b} x {t} tokens; ms per step over {steps} steps:"
        ),
        &timed,
        our_memory("bert"),
        torch,
    );
}

/// Our step's `min`, `median` wall ms and CPU ms per step.
struct Timed {
    min: f64,
    median: f64,
    cpu: f64,
}

/// `steps` timed calls of `step`.
fn time_steps(steps: usize, mut step: impl FnMut()) -> Timed {
    let mut times = Vec::with_capacity(steps);
    let c0 = common::cpu_seconds();
    for _ in 0..steps {
        let t = Instant::now();
        step();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu = 1e3 * (common::cpu_seconds() - c0) / steps.max(1) as f64;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    Timed {
        min,
        median: median(&mut times),
        cpu,
    }
}

/// The better of PyTorch's runs before and after ours: the lower times, the
/// higher memory.
fn better(a: Option<[f64; 5]>, b: Option<[f64; 5]>) -> Option<[f64; 5]> {
    match (a, b) {
        (Some(a), Some(b)) => Some([
            a[0].min(b[0]),
            a[1].min(b[1]),
            a[2].min(b[2]),
            a[3].max(b[3]),
            a[4].max(b[4]),
        ]),
        (a, b) => a.or(b),
    }
}

/// Our `[peak MiB, step MiB, CPU ms]` from a fresh process of this binary
/// (`LORA_STEP_MEMORY=key`); NaN where it could not be read.
fn our_memory(key: &str) -> [f64; 3] {
    common::fresh_process("LORA_STEP_MEMORY", key)
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).to_string();
            let v: Vec<f64> = t
                .trim()
                .split('\t')
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 3).then(|| [v[0], v[1], v[2]])
        })
        .unwrap_or([f64::NAN; 3])
}

/// The table of one workload: ours, PyTorch's (when it ran) and the ratios.
fn print_table(title: &str, ours: &Timed, mem: [f64; 3], torch: Option<[f64; 5]>) {
    let Timed { min, median, cpu } = *ours;
    let [peak, step_mib, _] = mem;
    println!("{title}");
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "variant", "min", "median", "CPU ms", "peak MiB", "step MiB"
    );
    println!(
        "  {:<14} {min:>9.1} {median:>9.1} {cpu:>9.1} {peak:>10.1} {step_mib:>10.1}",
        "minibatch"
    );
    if let Some(t) = torch {
        println!(
            "  {:<14} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1}",
            "torch_peft", t[0], t[1], t[2], t[3], t[4]
        );
        println!(
            "  torch_peft / minibatch: {:.2}x on min, {:.2}x on median, {:.2}x on CPU time (> 1: minibatch faster); step memory {:.2}x",
            t[0] / min,
            t[1] / median,
            t[2] / cpu,
            t[4] / step_mib
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let malloc = common::malloc_setting();
    let minilm = std::env::var("MINILM_DIR").ok();
    if std::env::var("LORA_STEP_MEMORY").as_deref() == Ok("bert") {
        if let Some(dir) = &minilm {
            bert_memory_child(dir);
        }
        return;
    }
    if std::env::var_os("LORA_STEP_MEMORY").is_some() {
        memory_child();
        return;
    }
    // `cargo test --benches` / `--list` run the binary too: no timing there.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    println!("allocator: {malloc}");
    let s = shape();
    let before = torch(&s);
    let mut st = setup(&s);
    for _ in 0..3 {
        st.step();
    }
    let steps = common::env_or("LORA_STEPS", 10usize);
    let timed = time_steps(steps, || st.step());
    let (n_base, n_adapter) = (st.n_base, st.n_adapter);
    drop(st);
    let torch = better(before, torch(&s));
    print_table(
        &format!(
            "LoRA step: Llama {} layers, hidden {}, vocab {} ({n_base} base parameters, frozen), r {} on q/k/v/o ({n_adapter} trained), batch {} x {} tokens; ms per step over {steps} steps:",
            s.layers, s.hidden, s.vocab, s.r, s.batch, s.seq
        ),
        &timed,
        our_memory("1"),
        torch,
    );
    if let Some(dir) = &minilm {
        bench_minilm(dir);
    }
}
