//! Helpers shared by the benches (`mod common;` in each): the PyTorch
//! interpreter, memory and CPU-time readings of `/proc/self`, fresh-process
//! runs, and environment knobs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The environment variable naming the PyTorch interpreter that runs the
/// benches' Python twins (default `~/.venv-torch/bin/python`).
pub const TORCH_PYTHON_VAR: &str = "MINIBATCH_TORCH_PYTHON";

/// The PyTorch interpreter: `$MINIBATCH_TORCH_PYTHON`, else
/// `~/.venv-torch/bin/python`; `None` when that file does not exist (the
/// benches then leave the PyTorch column out).
pub fn torch_python() -> Option<PathBuf> {
    let p = match std::env::var_os(TORCH_PYTHON_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(&std::env::var_os("HOME")?).join(".venv-torch/bin/python"),
    };
    p.exists().then_some(p)
}

/// `../shared/peers` beside the repository: the PyTorch twins and data
/// helpers shared with the peer projects (`torch_e2e.py`, `mnist_np.py`, ...).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers")
}

/// The MNIST files committed with the project (`data/mnist`).
pub fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
}

/// The value of `field` (`"VmRSS"`, `"VmHWM"`, ...) of `/proc/self/status`,
/// in KiB; 0 where it cannot be read (not Linux).
pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets this process's `VmHWM` to its current RSS (`echo 5 >
/// /proc/self/clear_refs`), so a later [`status_kib`]`("VmHWM")` is the peak
/// of what ran since.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process, all threads
/// (`/proc/self/stat`, clock ticks of 10 ms); NaN where it cannot be read.
pub fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name (which may contain
    // spaces); utime and stime are the 12th and 13th of them.
    let rest = s.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

/// `key` parsed from the environment, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs this bench binary again in a fresh process with `var=value` set
/// (the child's `main` sees `var` and runs one measurement, for instance of
/// its peak memory, which a process that already ran other variants would
/// spoil); `None` if it cannot be started.
pub fn fresh_process(var: &str, value: &str) -> Option<Output> {
    let exe = std::env::current_exe().ok()?;
    Command::new(exe).env(var, value).output().ok()
}

/// User + system CPU seconds of this process, all threads, from
/// `getrusage(RUSAGE_SELF)` (microsecond resolution, what Python's
/// `resource.getrusage` reads); NaN if the call fails.
pub fn rusage_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is a plain C struct of integers, for which all-zero
    // bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage` that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The allocator setting of a bench run, from `MINIBATCH_BENCH_MALLOC`:
/// `keep` (the default) calls [`minibatch_nn::malloc::keep_freed_memory`]
/// here and sets the same glibc parameters for every child process through
/// `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (the PyTorch twins and
/// the fresh processes that measure memory), so both sides run with the same
/// allocator; `default` leaves glibc's defaults to both. Call it first in
/// `main`, before any thread starts. Returns the setting's name, for the
/// bench's header.
pub fn malloc_setting() -> &'static str {
    if std::env::var("MINIBATCH_BENCH_MALLOC").is_ok_and(|v| v == "default") {
        return "glibc defaults (MINIBATCH_BENCH_MALLOC=default)";
    }
    // Edition 2021: set_var is safe to call; no other thread runs yet.
    std::env::set_var(
        "MALLOC_MMAP_THRESHOLD_",
        minibatch_nn::malloc::MMAP_THRESHOLD.to_string(),
    );
    std::env::set_var(
        "MALLOC_TRIM_THRESHOLD_",
        minibatch_nn::malloc::TRIM_THRESHOLD.to_string(),
    );
    if minibatch_nn::malloc::keep_freed_memory() {
        "keep_freed_memory (both sides; MINIBATCH_BENCH_MALLOC=default for glibc's defaults)"
    } else {
        "allocator defaults (keep_freed_memory needs glibc)"
    }
}

/// The vocabulary of [`llama_20m`].
pub const LLAMA_20M_VOCAB: usize = 8192;

/// The ~20M Llama of the models issue, shared by `models_step` and `ddp`:
/// hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1024, vocab
/// 8192, tied embeddings (23.1M parameters).
pub fn llama_20m() -> minibatch::models::llama::Config {
    let mut cfg = minibatch::models::llama::Config::small(LLAMA_20M_VOCAB, 512, 8, 8, 4);
    cfg.intermediate_size = 1024;
    cfg.tie_word_embeddings = true;
    cfg
}

/// The models benches' AdamW: lr 1e-4, betas 0.9/0.999, weight decay 0.01
/// (transformers' fine-tuning defaults but the lr; the twins use the same).
pub fn models_adamw() -> minibatch::optim::AdamWConfig {
    minibatch::optim::AdamWConfig {
        adam: minibatch::optim::AdamConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.01,
            ..minibatch::optim::AdamWConfig::default().adam
        },
    }
}
