//! Gradient checkpointing on the ~20M-parameter Llama step: peak step memory
//! and step time with `Llama::with_gradient_checkpointing(true)` against the
//! same step without it.
//!
//! The model: hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1024,
//! vocabulary 2048, untied head (21.0M parameters, f32); one step is forward,
//! cross-entropy over batch 8 × sequence 256, backward and an AdamW update
//! over every parameter. Each mode runs in a fresh process (this bench
//! re-executes itself), which reports the median step time of the steps after
//! a warm-up step, the CPU time per step, and its step memory: `VmHWM` after
//! the steps minus `VmRSS` just before the first (activations, gradients and
//! the AdamW state, the same 168 MiB in both). The children run with
//! `MALLOC_MMAP_THRESHOLD_=65536`, so glibc returns every large freed buffer
//! to the system (its default threshold grows after the first frees and then
//! keeps them, which hides the peak). The parent prints both and the ratios
//! (the targets: memory ≤ 50 %, time ≤ 1.4x).
//!
//! `cargo bench --bench grad_checkpoint` (`GC_STEPS` timed steps, default 3).

mod common;

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use minibatch_models::llama::{Config, Llama};
use minibatch_nn::loss::cross_entropy;
use minibatch_nn::seeded_var_builder;
use minibatch_optim::{AdamW, AdamWConfig, Optimizer};

const CHILD: &str = "GRAD_CHECKPOINT_MODE";
const VOCAB: usize = 2048;
const BATCH: usize = 8;
const SEQ: usize = 256;

fn config() -> Config {
    let mut cfg = Config::small(VOCAB, 512, 8, 8, 4);
    cfg.intermediate_size = 1024;
    cfg.max_position_embeddings = SEQ;
    cfg
}

/// One mode in this process: prints `median_s cpu_s_per_step step_mib params`.
fn child(on: bool) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Llama::load(seeded_var_builder(&varmap, 0, DType::F32, &dev), &config())?
        .with_gradient_checkpointing(on);
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(varmap.all_vars(), AdamWConfig::default())?;
    let ids: Vec<u32> = (0..BATCH * (SEQ + 1))
        .map(|i| ((i * 2654435761) % VOCAB) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (BATCH, SEQ + 1), &dev)?;
    let (x, y) = (
        ids.narrow(1, 0, SEQ)?,
        ids.narrow(1, 1, SEQ)?.flatten_all()?,
    );
    let mut step = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let logits = model.forward_t(&x, true)?.reshape((BATCH * SEQ, VOCAB))?;
        let loss = cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let rss = common::status_kib("VmRSS");
    common::reset_peak();
    step()?; // warm-up (the optimizer state appears here), in the peak too
    let steps: usize = common::env_or("GC_STEPS", 3);
    let cpu0 = common::cpu_seconds();
    let mut times = (0..steps)
        .map(|_| step())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let cpu = (common::cpu_seconds() - cpu0) / steps as f64;
    let peak = common::status_kib("VmHWM");
    times.sort_by(f64::total_cmp);
    let step_mib = peak.saturating_sub(rss) as f64 / 1024.0;
    println!("{} {cpu} {step_mib} {params}", times[steps / 2]);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if let Ok(mode) = std::env::var(CHILD) {
        return child(mode == "on");
    }
    let mut rows = Vec::new();
    for mode in ["off", "on"] {
        let out = std::process::Command::new(std::env::current_exe()?)
            .env(CHILD, mode)
            .env("MALLOC_MMAP_THRESHOLD_", "65536")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mode {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = line
            .split_whitespace()
            .map(|s| s.parse().map_err(|e| anyhow::anyhow!("`{line}`: {e}")))
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(v.len() == 4, "mode {mode} printed `{line}`");
        println!(
            "checkpointing {mode:3}: {:.3} s/step (CPU {:.2} s/step), step memory {:.0} MiB ({:.1}M parameters)",
            v[0],
            v[1],
            v[2],
            v[3] / 1e6
        );
        rows.push(v);
    }
    println!(
        "with/without: time {:.2}x, step memory {:.0} %",
        rows[1][0] / rows[0][0],
        100.0 * rows[1][2] / rows[0][2]
    );
    Ok(())
}
