//! Data-parallel training on this machine against PyTorch DDP (gloo), in
//! the same run: 2 ranks × 1 thread each, and 1 process × 1 thread for the
//! scaling efficiency (the 2-rank throughput divided by twice the 1-rank
//! throughput), on four workloads:
//!
//! * `mlp`: one MNIST epoch of the 784-512-512-10 MLP, SGD lr 0.05 momentum
//!   0.9, batch 64 per rank (469 steps a rank at 2 ranks, 938 in one
//!   process), through `Trainer::fit` with `.distributed(group)` (no
//!   validation); PyTorch: `../shared/peers/torch_ddp.py DATA mlp WORLD 1`.
//! * `cnn`: the same with the mnist example's CNN (conv 1→16 5, pool, conv
//!   16→32 5, pool, fc 512→128, fc 128→10); `torch_ddp.py DATA cnn WORLD 1`.
//! * `gpt`: `DDP_BENCH_GPT_STEPS` (default 100) training steps of the gpt
//!   example's model at its default shape (batch 64 per rank, AdamW, clip
//!   1.0) after 5 warm-up steps, each rank its own fixed random batch; a
//!   hand-written loop with `GradBuckets` (what the Trainer runs);
//!   PyTorch: `benches/torch_ddp_gpt.py WORLD STEPS` (the model of
//!   `torch_gpt_step.py` in DDP, the same number of steps).
//! * `llama`: the ~20M Llama of `benches/models_step.rs`
//!   (`minibatch::models::llama`, hidden 512, 8 layers, 8 heads, 4 KV heads,
//!   intermediate 1024, vocab 8192, tied embeddings, random init), batch
//!   `DDP_BENCH_LLAMA_BATCH` (default 8) sequences of 256 tokens per rank,
//!   next-token cross-entropy over every position, AdamW lr 1e-4, betas
//!   0.9/0.999, weight decay 0.01 (the models bench's recipe, no clipping);
//!   2 warm-up steps, then `DDP_BENCH_LLAMA_STEPS` (default 10) timed ones.
//!   Every rank builds the model from seed 0 and takes rank 0's weights
//!   (`broadcast_vars`), and draws its own fixed batch of random tokens
//!   (seed 1 + rank), a hand-written loop with `GradBuckets` as for gpt.
//!   PyTorch: `benches/torch_ddp_llama.py WORLD STEPS BATCH 256 2`
//!   (transformers' `LlamaForCausalLM` with the same config and eager
//!   attention, the same recipe, in DDP). At 1 thread a step takes a few
//!   seconds, so each of its commands takes about a minute at the default
//!   10 steps and a round of 4 commands several: it is not in the default
//!   set, run it with `DDP_BENCH_WORKLOADS=llama`.
//!
//! Full epochs for mlp and cnn (the twin runs full epochs), a fixed number
//! of steps for gpt and llama (both sides). Throughput is from the training time
//! alone (after loading, between barriers, the slowest rank). Ours also
//! reports the all-reduce time per step (inside the collectives, and
//! packing the buckets). For both, the whole command's wall time and CPU
//! time (all processes, from `getrusage(RUSAGE_CHILDREN)`, startup and data
//! loading included) are printed beside.
//!
//! Rounds (`DDP_BENCH_ROUNDS`, default 2) run every workload, ours and
//! PyTorch's in turn, at 2 ranks and at 1 (the order alternating from round
//! to round), so load from other processes hits both alike; the best of the
//! rounds counts. `DDP_BENCH_WORKLOADS` (default `gpt,mlp,cnn`; `llama`, or
//! `gpt,mlp,cnn,llama` for all four) picks them.
//!
//! Both sides run with freed memory kept for reuse: the driver sets
//! `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (what
//! `minibatch_nn::malloc::keep_freed_memory` sets) in the environment of
//! every rank and twin, as the other benches do;
//! `MINIBATCH_BENCH_MALLOC=default` runs both with glibc's defaults.
//!
//! Ours runs as `mpirun -np N --bind-to none` on this very bench binary
//! (the rank program, selected by `DDP_BENCH_RANK`); it needs the `mpi`
//! feature and Open MPI's `mpirun`. PyTorch: `MINIBATCH_TORCH_PYTHON`
//! (default `~/.venv-torch/bin/python`); without one the PyTorch column is
//! left out.
//!
//! ```sh
//! cargo bench --features mpi --bench ddp                               # gpt, mlp, cnn
//! DDP_BENCH_WORKLOADS=llama cargo bench --features mpi --bench ddp     # the ~20M Llama step
//! ```

mod common;
#[path = "../examples/gpt/model.rs"]
mod model;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Conv2dConfig, VarMap};
use minibatch::data::{mnist, DataLoader};
use minibatch::dist::{broadcast_vars, threads, GradBuckets, Mpi, ProcessGroup, ProcessGroupExt};
use minibatch::models::llama;
use minibatch::nn::loss::cross_entropy;
use minibatch::nn::ops::{max_pool2d, relu};
use minibatch::nn::{conv2d, linear, seeded_var_builder, Conv2d, Linear};
use minibatch::optim::{
    clip_grad_norm, AdamConfig, AdamW, AdamWConfig, Norm, Optimizer, Sgd, SgdConfig,
};
use minibatch::train::{ProgressMode, Trainer};
use rand::{Rng, SeedableRng};

/// In a rank process: the workload to run.
const RANK_VAR: &str = "DDP_BENCH_RANK";
const BATCH: usize = 64;
/// The llama workload: timed steps, batch per rank (sequences of
/// [`LLAMA_SEQ`] tokens), warm-up steps, vocabulary.
const LLAMA_STEPS_VAR: &str = "DDP_BENCH_LLAMA_STEPS";
const LLAMA_STEPS: usize = 10;
const LLAMA_BATCH_VAR: &str = "DDP_BENCH_LLAMA_BATCH";
const LLAMA_BATCH: usize = 8;
const LLAMA_SEQ: usize = 256;
const LLAMA_WARMUP: usize = 2;
const LLAMA_VOCAB: usize = common::LLAMA_20M_VOCAB;

struct Mlp(Linear, Linear, Linear);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = relu(&self.0.forward(x)?)?;
        let x = relu(&self.1.forward(&x)?)?;
        self.2.forward(&x)
    }
}

struct Cnn {
    c1: Conv2d,
    c2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl Module for Cnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, 1, 28, 28))?;
        let x = max_pool2d(&relu(&self.c1.forward(&x)?)?, 2)?;
        let x = max_pool2d(&relu(&self.c2.forward(&x)?)?, 2)?;
        let x = x.flatten_from(1)?;
        self.fc2.forward(&relu(&self.fc1.forward(&x)?)?)
    }
}

/// What a rank program measured (rank 0 prints it as one `RESULT` line).
struct Measured {
    /// Training seconds (slowest rank).
    train_s: f64,
    /// Samples per second over all ranks.
    samples_per_s: f64,
    /// Milliseconds per step inside the collectives, and packing the buckets.
    reduce_ms: f64,
    copy_ms: f64,
}

fn epoch_rank(group: Arc<dyn ProcessGroup>, cnn: bool) -> anyhow::Result<Measured> {
    let dev = Device::Cpu;
    let (train, _) = mnist::load(common::mnist_dir(), &dev)?;
    let world = group.world_size();
    let loader = DataLoader::builder(train)
        .batch_size(BATCH)
        .shuffle(0)
        .shard(group.rank(), world)
        .build()?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
    let model: Box<dyn Module> = if cnn {
        let c = Conv2dConfig::default();
        Box::new(Cnn {
            c1: conv2d(1, 16, 5, c, vb.pp("c1"))?,
            c2: conv2d(16, 32, 5, c, vb.pp("c2"))?,
            fc1: linear(512, 128, vb.pp("fc1"))?,
            fc2: linear(128, 10, vb.pp("fc2"))?,
        })
    } else {
        Box::new(Mlp(
            linear(784, 512, vb.pp("fc1"))?,
            linear(512, 512, vb.pp("fc2"))?,
            linear(512, 10, vb.pp("fc3"))?,
        ))
    };
    let model = move |x: &Tensor, _train: bool| model.forward(x);
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let mut b = Trainer::builder(minibatch::train::model_fn(model), vm, loader, opt)
        .epochs(1)
        .progress(ProgressMode::Silent);
    if world > 1 {
        b = b.distributed(group.clone());
    }
    let mut t = b.build()?;
    let rec = t.fit()?.epochs[0].clone();
    let stats = t.reduce_stats().unwrap_or_default();
    let steps = stats.steps.max(1) as f64;
    Ok(Measured {
        train_s: rec.epoch_time_s.unwrap_or(f64::NAN),
        samples_per_s: rec.samples_per_s.unwrap_or(f64::NAN),
        reduce_ms: 1e3 * stats.collective.as_secs_f64() / steps,
        copy_ms: 1e3 * stats.copy.as_secs_f64() / steps,
    })
}

fn gpt_rank(group: Arc<dyn ProcessGroup>) -> anyhow::Result<Measured> {
    use model::{defaults, masked_loss, GptConfig, Layers};
    let steps: usize = common::env_or("DDP_BENCH_GPT_STEPS", 100);
    let dev = Device::Cpu;
    let rank = group.rank();
    let t = defaults::seq_len(defaults::DIGITS);
    let cfg = GptConfig {
        vocab: defaults::VOCAB,
        block: t,
        d_model: defaults::D_MODEL,
        n_head: defaults::HEADS,
        n_layer: defaults::LAYERS,
    };
    let (model, vm) = model::build(cfg, Layers::Minibatch, &dev, 0)?;
    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWConfig {
            adam: AdamConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.99,
                weight_decay: 0.1,
                ..AdamWConfig::default().adam
            },
        },
    )?;
    let vars = opt.vars();
    broadcast_vars(group.as_ref(), &vars, 0)?;
    let mut buckets = GradBuckets::with_default_size(&vars)?;
    let b = BATCH;
    let answer = defaults::answer_len(defaults::DIGITS);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1 + rank as u64);
    let x: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..defaults::VOCAB as u32))
        .collect();
    let y: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..10)).collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t >= t - answer { 1.0 } else { 0.0 })
        .collect();
    let x = Tensor::from_vec(x, (b, t), &dev)?;
    let y = Tensor::from_vec(y, (b, t), &dev)?;
    let mask = Tensor::from_vec(mask, (b, t), &dev)?;
    let step = |buckets: &mut GradBuckets| -> anyhow::Result<()> {
        let logits = model.forward(&x)?;
        let loss = masked_loss(&model, &logits, &y, &mask)?;
        let mut grads = loss.backward()?;
        buckets.all_reduce_mean(group.as_ref(), &mut grads)?;
        clip_grad_norm(&mut grads, &vars, 1.0, Norm::L2)?;
        opt.step(&grads)?;
        Ok(())
    };
    timed_steps(group.as_ref(), &mut buckets, 5, steps, b, step)
}

/// Runs `step` `warmup` times, then `steps` times between two barriers;
/// the slowest rank's time counts, `batch` samples a step on each rank.
fn timed_steps(
    group: &dyn ProcessGroup,
    buckets: &mut GradBuckets,
    warmup: usize,
    steps: usize,
    batch: usize,
    mut step: impl FnMut(&mut GradBuckets) -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    for _ in 0..warmup {
        step(buckets)?;
    }
    let before = buckets.stats();
    group.barrier()?;
    let t0 = Instant::now();
    for _ in 0..steps {
        step(buckets)?;
    }
    group.barrier()?;
    let dt = t0.elapsed().as_secs_f64();
    let dt = group.all_gather_f64(dt)?.into_iter().fold(0.0, f64::max);
    let after = buckets.stats();
    let per = |a: Duration, b: Duration| 1e3 * (a - b).as_secs_f64() / steps as f64;
    Ok(Measured {
        train_s: dt,
        samples_per_s: (steps * group.world_size() * batch) as f64 / dt,
        reduce_ms: per(after.collective, before.collective),
        copy_ms: per(after.copy, before.copy),
    })
}

fn llama_rank(group: Arc<dyn ProcessGroup>) -> anyhow::Result<Measured> {
    let steps: usize = common::env_or(LLAMA_STEPS_VAR, LLAMA_STEPS);
    let b: usize = common::env_or(LLAMA_BATCH_VAR, LLAMA_BATCH);
    let t = LLAMA_SEQ;
    let dev = Device::Cpu;
    let rank = group.rank();
    let vm = VarMap::new();
    // Every rank seeded alike, and rank 0's weights broadcast anyway (what
    // DDP does at construction).
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
    let model = llama::Llama::load(vb, &common::llama_20m())?;
    let mut opt = AdamW::from_varmap(&vm, common::models_adamw())?;
    let vars = opt.vars();
    broadcast_vars(group.as_ref(), &vars, 0)?;
    let mut buckets = GradBuckets::with_default_size(&vars)?;
    // Each rank its own batch of random tokens (its shard), targets over
    // every position.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1 + rank as u64);
    let mut tokens = |shape: &[usize]| -> anyhow::Result<Tensor> {
        let v: Vec<u32> = (0..b * t)
            .map(|_| rng.random_range(0..LLAMA_VOCAB as u32))
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let x = tokens(&[b, t])?;
    let y = tokens(&[b, t])?;
    let step = |buckets: &mut GradBuckets| -> anyhow::Result<()> {
        // (b, t, vocab) logits against (b, t) next tokens.
        let logits = model.forward_t(&x, true)?;
        let loss = cross_entropy(&logits, &y)?;
        let mut grads = loss.backward()?;
        buckets.all_reduce_mean(group.as_ref(), &mut grads)?;
        opt.step(&grads)?;
        Ok(())
    };
    timed_steps(group.as_ref(), &mut buckets, LLAMA_WARMUP, steps, b, step)
}

/// The rank program: `DDP_BENCH_RANK=<workload>` under mpirun.
fn rank_main(workload: &str) {
    let group: Arc<dyn ProcessGroup> = Mpi::init().expect("MPI init");
    threads::configure_threads(group.local_size(), Some(1));
    let cpu0 = threads::cpu_time();
    let m = match workload {
        "mlp" => epoch_rank(group.clone(), false),
        "cnn" => epoch_rank(group.clone(), true),
        "gpt" => gpt_rank(group.clone()),
        "llama" => llama_rank(group.clone()),
        w => Err(anyhow::anyhow!("unknown workload {w:?}")),
    };
    let m = group.or_abort(m);
    let cpu = (threads::cpu_time() - cpu0).as_secs_f64();
    let cpu: f64 = group.or_abort(group.all_gather_f64(cpu)).iter().sum();
    if group.rank() == 0 {
        println!(
            "RESULT {} {} {} {} {}",
            m.train_s, m.samples_per_s, m.reduce_ms, m.copy_ms, cpu
        );
    }
}

/// Children's CPU seconds (user + system) so far, of the waited-for ones.
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own; no other
    // invariant.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut r);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }
}

/// One run: throughput, training seconds, all-reduce ms per step (ours),
/// the command's wall and CPU seconds.
#[derive(Clone, Copy, Debug)]
struct Run {
    samples_per_s: f64,
    train_s: f64,
    reduce_ms: f64,
    copy_ms: f64,
    rank_cpu_s: f64,
    wall_s: f64,
    cpu_s: f64,
}

/// Runs `cmd`, returns its stdout and the wall and CPU seconds it took
/// (`None`, with its output on stderr, when it fails).
fn timed(mut cmd: Command) -> Option<(String, f64, f64)> {
    let (c0, t0) = (children_cpu(), Instant::now());
    let out = cmd.output().ok()?;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), children_cpu() - c0);
    if !out.status.success() {
        eprintln!(
            "failed: {cmd:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some((String::from_utf8_lossy(&out.stdout).into_owned(), wall, cpu))
}

fn ours(workload: &str, world: usize) -> Option<Run> {
    let exe = std::env::current_exe().ok()?;
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-np",
        &world.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(exe)
    .env(RANK_VAR, workload)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let (out, wall_s, cpu_s) = timed(cmd)?;
    let line = out.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(Run {
        train_s: v[0],
        samples_per_s: v[1],
        reduce_ms: v[2],
        copy_ms: v[3],
        rank_cpu_s: v[4],
        wall_s,
        cpu_s,
    })
}

/// The fixed-step workloads' knobs, read once by the driver and handed to
/// the PyTorch twins (the ranks read the same variables themselves).
struct Steps {
    gpt: usize,
    llama: usize,
    llama_batch: usize,
}

fn torch(py: &Path, workload: &str, world: usize, steps: &Steps) -> Option<Run> {
    let mut cmd = Command::new(py);
    let benches = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
    // gpt and llama: a fixed number of steps; None: full MNIST epochs.
    let fixed = match workload {
        "gpt" => {
            cmd.arg(benches.join("torch_ddp_gpt.py"))
                .args([world.to_string(), steps.gpt.to_string()]);
            Some(steps.gpt)
        }
        "llama" => {
            cmd.arg(benches.join("torch_ddp_llama.py")).args([
                world.to_string(),
                steps.llama.to_string(),
                steps.llama_batch.to_string(),
                LLAMA_SEQ.to_string(),
                LLAMA_WARMUP.to_string(),
            ]);
            Some(steps.llama)
        }
        _ => {
            cmd.arg(common::peers_dir().join("torch_ddp.py"))
                .arg(common::mnist_dir())
                .args([workload, &world.to_string(), "1"]);
            None
        }
    };
    let (out, wall_s, cpu_s) = timed(cmd)?;
    let (train_s, samples_per_s) = if let Some(n) = fixed {
        // workload<TAB>world<TAB>ms per step<TAB>samples/s
        let prefix = format!("{workload}\t");
        let f: Vec<f64> = out
            .lines()
            .find(|l| l.starts_with(&prefix))?
            .split('\t')
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        (f[1] * n as f64 / 1e3, f[2])
    } else {
        // "... best 12.345s  4860 samples/s"
        let best = out.split(" best ").nth(1)?;
        let s: f64 = best.split('s').next()?.trim().parse().ok()?;
        (s, 60000.0 / s)
    };
    Some(Run {
        samples_per_s,
        train_s,
        reduce_ms: f64::NAN,
        copy_ms: f64::NAN,
        rank_cpu_s: f64::NAN,
        wall_s,
        cpu_s,
    })
}

/// A throughput for the report: samples/s, and tokens/s for the llama's
/// sequences (a few samples a second at 1 thread).
fn rate(workload: &str, samples_per_s: f64) -> String {
    if workload == "llama" {
        format!(
            "{samples_per_s:8.2} samples/s ({:6.0} tokens/s)",
            samples_per_s * LLAMA_SEQ as f64
        )
    } else {
        format!("{samples_per_s:8.0} samples/s")
    }
}

fn best(runs: &[Run]) -> Option<Run> {
    runs.iter()
        .copied()
        .max_by(|a, b| a.samples_per_s.total_cmp(&b.samples_per_s))
}

fn main() {
    if let Ok(w) = std::env::var(RANK_VAR) {
        rank_main(&w);
        return;
    }
    let malloc = common::malloc_setting();
    let rounds: usize = common::env_or("DDP_BENCH_ROUNDS", 2);
    let steps = Steps {
        gpt: common::env_or("DDP_BENCH_GPT_STEPS", 100),
        llama: common::env_or(LLAMA_STEPS_VAR, LLAMA_STEPS),
        llama_batch: common::env_or(LLAMA_BATCH_VAR, LLAMA_BATCH),
    };
    let workloads =
        std::env::var("DDP_BENCH_WORKLOADS").unwrap_or_else(|_| "gpt,mlp,cnn".to_string());
    let workloads: Vec<&str> = workloads.split(',').collect();
    println!("allocator: {malloc}");
    if workloads.contains(&"llama") {
        println!(
            "llama: hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1024, vocab {LLAMA_VOCAB} tied; batch {} x {LLAMA_SEQ} tokens per rank, AdamW, {LLAMA_WARMUP} warm-up + {} timed steps",
            steps.llama_batch, steps.llama
        );
    }
    let py = common::torch_python();
    if py.is_none() {
        println!(
            "no PyTorch interpreter (set {}): the PyTorch column is left out",
            common::TORCH_PYTHON_VAR
        );
    }
    // (workload, side, world) -> runs
    let mut runs: std::collections::BTreeMap<(String, &str, usize), Vec<Run>> = Default::default();
    for round in 0..rounds {
        for w in &workloads {
            let mut order: Vec<(&str, usize)> = vec![
                ("minibatch", 2),
                ("torch", 2),
                ("minibatch", 1),
                ("torch", 1),
            ];
            if round % 2 == 1 {
                order.reverse();
            }
            for (side, world) in order {
                let r = match side {
                    "minibatch" => ours(w, world),
                    _ => match &py {
                        Some(py) => torch(py, w, world, &steps),
                        None => continue,
                    },
                };
                let Some(r) = r else { continue };
                // PyTorch's twins report no all-reduce time.
                let reduce = if r.reduce_ms.is_finite() {
                    format!(
                        ", all-reduce {:.2} ms/step (+{:.2} copy)",
                        r.reduce_ms, r.copy_ms
                    )
                } else {
                    String::new()
                };
                println!(
                    "round {round} {w:>3} {side:>9} x{world}: {}, train {:6.2} s{reduce}, command wall {:.1} s CPU {:.1} s",
                    rate(w, r.samples_per_s), r.train_s, r.wall_s, r.cpu_s
                );
                runs.entry((w.to_string(), side, world))
                    .or_default()
                    .push(r);
            }
        }
    }
    println!("\nbest of {rounds} round(s), 1 thread per rank:");
    for w in &workloads {
        let get = |side: &str, world: usize| {
            runs.get(&(w.to_string(), side, world))
                .and_then(|r| best(r))
        };
        let (o2, o1, t2, t1) = (
            get("minibatch", 2),
            get("minibatch", 1),
            get("torch", 2),
            get("torch", 1),
        );
        for (name, r2, r1) in [("minibatch", o2, o1), ("torch DDP", t2, t1)] {
            if let (Some(r2), Some(r1)) = (r2, r1) {
                let rank_cpu = if r2.rank_cpu_s.is_finite() {
                    format!(", CPU {:.1} s in the ranks", r2.rank_cpu_s)
                } else {
                    String::new()
                };
                println!(
                    "{w:>3} {name:>9}: 2 ranks {} ({:.2} s{rank_cpu}, command wall {:.1} s CPU {:.1} s), 1 process {} ({:.2} s, command wall {:.1} s CPU {:.1} s); scaling efficiency {:.2}",
                    rate(w, r2.samples_per_s),
                    r2.train_s,
                    r2.wall_s,
                    r2.cpu_s,
                    rate(w, r1.samples_per_s),
                    r1.train_s,
                    r1.wall_s,
                    r1.cpu_s,
                    r2.samples_per_s / (2.0 * r1.samples_per_s)
                );
            }
        }
        if let Some(o2) = o2 {
            println!(
                "{w:>3} minibatch all-reduce at 2 ranks: {:.2} ms/step in the collectives, {:.2} ms/step packing",
                o2.reduce_ms, o2.copy_ms
            );
        }
        if let (Some(o2), Some(t2)) = (o2, t2) {
            print!(
                "{w:>3} ratio minibatch / torch DDP at 2 ranks: {:.2}x",
                o2.samples_per_s / t2.samples_per_s
            );
            if let (Some(o1), Some(t1)) = (o1, t1) {
                print!(
                    ", at 1 process: {:.2}x",
                    o1.samples_per_s / t1.samples_per_s
                );
            }
            println!();
        }
    }
}
