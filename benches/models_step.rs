//! One fine-tuning step (forward, loss, backward, AdamW) of the
//! `minibatch::models` ports against transformers (eager attention, 2
//! threads), interleaved in the same run:
//!
//! * `minilm`: `BertForSequenceClassification` with all-MiniLM-L6-v2's
//!   config (22.7M parameters), 2 labels, train mode (dropout 0.1 on the
//!   hidden states and the attention weights, as transformers trains it),
//!   batch 32, sequence 128, a mask of ones, cross-entropy on random labels.
//!   With `MINILM_DIR` set, the weights come from that checkpoint folder
//!   (both sides); without, both are a random init of the same config.
//! * `llama`: `Llama` with hidden 512, 8 layers, 8 heads, 4 KV heads,
//!   intermediate 1024, vocab 8192 and tied embeddings (23.1M parameters,
//!   18.9M of them in the decoder layers), random init, batch 8, sequence
//!   256, next-token cross-entropy over every position of random tokens.
//!
//! AdamW lr 1e-4, betas 0.9/0.999, weight decay 0.01, over every parameter,
//! on both sides. PyTorch runs `benches/torch_models_step.py` as a server
//! (one fresh process per workload, the interpreter from
//! `MINIBATCH_TORCH_PYTHON`, default `~/.venv-torch/bin/python`): each round
//! runs one step of ours, then one of PyTorch's, so load from other processes
//! hits both alike. After `MODELS_STEP_WARMUP` rounds (default 3),
//! `MODELS_STEP_ROUNDS` (default 5) are timed; the bench prints the median
//! and minimum wall time of a step, its CPU time (getrusage, user + system,
//! all threads), the peak RSS of a fresh process per side (`VmHWM`; ours
//! re-runs this binary for it) and the memory the steps add to it (`VmHWM`
//! minus the `VmRSS` before the first step), and the ratios PyTorch / ours
//! (above 1: ours faster). `MODELS_STEP_ONLY=minilm` (or `llama`) runs one
//! workload; `MODELS_STEP_PHASES=1` adds where our step's time goes.
//! Both sides run with freed memory kept for reuse
//! (`minibatch_nn::malloc::keep_freed_memory`, and the same glibc settings for
//! the Python process); `MINIBATCH_BENCH_MALLOC=default` runs both with
//! glibc's defaults.
//!
//! `cargo bench --bench models_step`

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use minibatch_models::bert::{self, BertForSequenceClassification};
use minibatch_models::checkpoint::load_pretrained;
use minibatch_models::llama::Llama;
use minibatch_nn::{loss::cross_entropy, seeded_var_builder, set_rng_step};
use minibatch_optim::{AdamW, Optimizer};
use rand::{Rng, SeedableRng};

/// all-MiniLM-L6-v2's `config.json` (sentence-transformers' checkpoint), 2 labels.
const MINILM_CONFIG: &str = r#"{
  "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
  "hidden_size": 384, "initializer_range": 0.02, "intermediate_size": 1536,
  "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
  "num_attention_heads": 12, "num_hidden_layers": 6, "pad_token_id": 0,
  "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 30522,
  "num_labels": 2
}"#;

/// `MODELS_STEP_DROPOUT=0`: MiniLM without dropout (both sides).
fn no_dropout() -> bool {
    std::env::var("MODELS_STEP_DROPOUT").is_ok_and(|v| v == "0")
}

const WORKLOADS: [&str; 2] = ["minilm", "llama"];

enum Net {
    Bert(Box<BertForSequenceClassification>),
    Llama(Box<Llama>),
}

/// A model, its optimizer and one fixed batch.
struct Setup {
    net: Net,
    opt: AdamW,
    inputs: Vec<Tensor>,
    weights: String,
    n_params: usize,
    steps: u64,
    _vm: VarMap,
}

fn setup(workload: &str) -> Setup {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (net, inputs, weights) = match workload {
        "minilm" => {
            let dir = std::env::var_os("MINILM_DIR").map(std::path::PathBuf::from);
            let mut cfg = match &dir {
                Some(d) => bert::Config::from_file(d.join("config.json")).unwrap(),
                None => bert::Config::from_json(MINILM_CONFIG).unwrap(),
            };
            cfg.num_labels = Some(2);
            if no_dropout() {
                cfg.hidden_dropout_prob = 0.0;
                cfg.attention_probs_dropout_prob = 0.0;
            }
            let model = BertForSequenceClassification::load(vb, &cfg).unwrap();
            let weights = match &dir {
                Some(d) => {
                    load_pretrained(&vm, d, Some("bert"), true).unwrap();
                    format!("all-MiniLM-L6-v2 from {}", d.display())
                }
                None => "random init of all-MiniLM-L6-v2's config".to_string(),
            };
            let (b, t) = (32, 128);
            let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(1000..30522)).collect();
            let labels: Vec<u32> = (0..b).map(|_| rng.random_range(0..2)).collect();
            let ids = Tensor::from_vec(ids, (b, t), &dev).unwrap();
            let inputs = vec![
                ids.clone(),
                ids.zeros_like().unwrap(),
                ids.ones_like().unwrap(),
                Tensor::from_vec(labels, b, &dev).unwrap(),
            ];
            (Net::Bert(Box::new(model)), inputs, weights)
        }
        "llama" => {
            let model = Llama::load(vb, &common::llama_20m()).unwrap();
            let (b, t) = (8, 256);
            let mut toks = || -> Tensor {
                let v: Vec<u32> = (0..b * t)
                    .map(|_| rng.random_range(0..common::LLAMA_20M_VOCAB as u32))
                    .collect();
                Tensor::from_vec(v, (b, t), &dev).unwrap()
            };
            let inputs = vec![toks(), toks()];
            (
                Net::Llama(Box::new(model)),
                inputs,
                "random init".to_string(),
            )
        }
        other => panic!("unknown workload {other}"),
    };
    let opt = AdamW::from_varmap(&vm, common::models_adamw()).unwrap();
    let n_params = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    Setup {
        net,
        opt,
        inputs,
        weights,
        n_params,
        steps: 0,
        _vm: vm,
    }
}

impl Setup {
    /// One step; adds the seconds of forward + loss, backward and AdamW to `phases`.
    fn step(&mut self, phases: &mut [f64; 3]) {
        let t0 = Instant::now();
        set_rng_step(self.steps);
        self.steps += 1;
        let loss = match &self.net {
            Net::Bert(m) => {
                let [ids, types, mask, labels] = &self.inputs[..] else {
                    unreachable!()
                };
                let logits = m.forward_t(ids, types, Some(mask), true).unwrap();
                cross_entropy(&logits, labels).unwrap()
            }
            Net::Llama(m) => {
                let [x, y] = &self.inputs[..] else {
                    unreachable!()
                };
                // (b, t, vocab) logits against (b, t) next tokens.
                let logits = candle_core::ModuleT::forward_t(m.as_ref(), x, true).unwrap();
                cross_entropy(&logits, y).unwrap()
            }
        };
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let t2 = Instant::now();
        self.opt.step(&grads).unwrap();
        drop(grads);
        let t3 = Instant::now();
        for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3)].iter().enumerate() {
            phases[i] += (*b - *a).as_secs_f64();
        }
    }
}

/// In the child process: `VmHWM` and `VmHWM - VmRSS before the first step`, in MiB.
fn memory_child(workload: &str) {
    let mut s = setup(workload);
    let rss0 = common::status_kib("VmRSS");
    let mut p = [0.0; 3];
    for _ in 0..3 {
        s.step(&mut p);
    }
    let hwm = common::status_kib("VmHWM");
    println!(
        "{:.1}\t{:.1}",
        hwm as f64 / 1024.0,
        (hwm.saturating_sub(rss0)) as f64 / 1024.0
    );
}

fn memory(workload: &str) -> Option<[f64; 2]> {
    let out = common::fresh_process("MODELS_STEP_MEMORY", workload)?;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.trim().split('\t').map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??])
}

/// The PyTorch server of one workload.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    header: String,
}

impl Torch {
    fn start(workload: &str) -> Option<Torch> {
        let python = common::torch_python()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_models_step.py");
        let mut child = Command::new(&python)
            .args([script, "--workload", workload])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| eprintln!("cannot start {}: {e}", python.display()))
            .ok()?;
        let stdin = child.stdin.take()?;
        let mut stdout = BufReader::new(child.stdout.take()?);
        let mut header = String::new();
        stdout.read_line(&mut header).ok()?;
        if !header.starts_with("ready") {
            eprintln!("torch_models_step.py did not start (its stderr is above)");
            let _ = child.kill();
            return None;
        }
        Some(Torch {
            child,
            stdin,
            stdout,
            header: header.trim().to_string(),
        })
    }
    fn line(&mut self, cmd: &str) -> Option<String> {
        writeln!(self.stdin, "{cmd}").ok()?;
        self.stdin.flush().ok()?;
        let mut l = String::new();
        self.stdout.read_line(&mut l).ok()?;
        Some(l.trim().to_string())
    }
    /// `(wall ms, CPU ms)` of one step.
    fn step(&mut self) -> Option<(f64, f64)> {
        let l = self.line("steps 1")?;
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != 3 || f[0] != "times" {
            eprintln!("torch_models_step.py answered {l:?}");
            return None;
        }
        Some((f[1].parse().ok()?, f[2].parse().ok()?))
    }
    /// `[peak MiB, step MiB]`; ends the process.
    fn quit(mut self) -> Option<[f64; 2]> {
        let l = self.line("quit")?;
        let _ = self.child.wait();
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != 3 || f[0] != "mem" {
            return None;
        }
        Some([f[1].parse().ok()?, f[2].parse().ok()?])
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn run(workload: &str, warmup: usize, rounds: usize) {
    let mut torch = Torch::start(workload);
    let mut ours = setup(workload);
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    let (mut twall, mut tcpu) = (Vec::new(), Vec::new());
    let mut phases = [0.0; 3];
    for r in 0..warmup + rounds {
        let timed = r >= warmup;
        let mut p = [0.0; 3];
        let c0 = common::rusage_cpu_seconds();
        let t0 = Instant::now();
        ours.step(&mut p);
        let w = t0.elapsed().as_secs_f64() * 1e3;
        let c = (common::rusage_cpu_seconds() - c0) * 1e3;
        let tt = torch.as_mut().and_then(|t| t.step());
        if timed {
            wall.push(w);
            cpu.push(c);
            for i in 0..3 {
                phases[i] += p[i];
            }
            if let Some((a, b)) = tt {
                twall.push(a);
                tcpu.push(b);
            }
        }
    }
    let (weights, n_params) = (ours.weights.clone(), ours.n_params);
    drop(ours);
    let tmem = torch.map(|t| {
        let h = t.header.clone();
        (h, t.quit())
    });
    let mem = memory(workload).unwrap_or([f64::NAN; 2]);
    let shape = match workload {
        "minilm" if no_dropout() => {
            "BertForSequenceClassification, batch 32 x 128 tokens, dropout off (MODELS_STEP_DROPOUT=0)"
        }
        "minilm" => "BertForSequenceClassification, batch 32 x 128 tokens, dropout 0.1",
        _ => "Llama 512/8 layers/8 heads/4 KV heads/intermediate 1024/vocab 8192 tied, batch 8 x 256 tokens",
    };
    println!(
        "{workload}: {shape}; {n_params} parameters, {weights}; {warmup} warm-up + {rounds} timed interleaved rounds"
    );
    println!(
        "  {:<10} {:>11} {:>9} {:>13} {:>10} {:>10}",
        "side", "median ms", "min ms", "CPU ms (med)", "peak MiB", "step MiB"
    );
    println!(
        "  {:<10} {:>11.1} {:>9.1} {:>13.1} {:>10.1} {:>10.1}",
        "minibatch",
        median(&wall),
        min(&wall),
        median(&cpu),
        mem[0],
        mem[1]
    );
    if let Some((header, tm)) = &tmem {
        let tm = tm.unwrap_or([f64::NAN; 2]);
        println!(
            "  {:<10} {:>11.1} {:>9.1} {:>13.1} {:>10.1} {:>10.1}",
            "torch",
            median(&twall),
            min(&twall),
            median(&tcpu),
            tm[0],
            tm[1]
        );
        println!("  (torch: {})", header.replace('\t', " "));
        println!(
            "  torch / minibatch: {:.2}x on median wall, {:.2}x on min wall, {:.2}x on CPU time (> 1: minibatch faster); step memory {:.2}x of torch's",
            median(&twall) / median(&wall),
            min(&twall) / min(&wall),
            median(&tcpu) / median(&cpu),
            mem[1] / tm[1]
        );
    } else {
        println!("  (no PyTorch interpreter: set MINIBATCH_TORCH_PYTHON)");
    }
    if std::env::var_os("MODELS_STEP_PHASES").is_some() {
        let ms = |s: f64| 1e3 * s / rounds.max(1) as f64;
        println!(
            "  minibatch phases (mean ms): forward+loss {:.1}, backward {:.1}, AdamW {:.1}",
            ms(phases[0]),
            ms(phases[1]),
            ms(phases[2])
        );
    }
}

fn main() {
    let malloc = common::malloc_setting();
    if let Ok(w) = std::env::var("MODELS_STEP_MEMORY") {
        memory_child(&w);
        return;
    }
    // `cargo test --benches` / `--list` run the binary too: no timing there.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let warmup = common::env_or("MODELS_STEP_WARMUP", 3usize);
    let rounds = common::env_or("MODELS_STEP_ROUNDS", 5usize).max(1);
    let only = std::env::var("MODELS_STEP_ONLY").ok();
    println!("allocator: {malloc}");
    for w in WORKLOADS {
        if only.as_deref().is_none_or(|o| o == w) {
            run(w, warmup, rounds);
        }
    }
}
