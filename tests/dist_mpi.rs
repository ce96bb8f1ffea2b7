//! Data-parallel training over MPI, with 2 ranks launched by `mpirun` (feature `mpi`).
//!
//! Each test here starts `mpirun -np 2` on this test binary, running one of
//! the `rank_*` programs below (ignored in a plain `cargo test`: they are
//! what the ranks run), under a bounded wait: a hang fails the test, it never
//! hangs CI.
//!
//! - 2 ranks × batch 32 end where 1 process × batch 64 ends: relative weight
//!   difference ≤ 1e-5 after 100 momentum-SGD steps on an MNIST MLP.
//! - ranks seeded differently hold the same weights after the broadcast.
//! - the collectives (f32, f64, bf16 slices and tensors; broadcast,
//!   all-gather, barrier) give the sums they should.
//! - a rank killed by SIGKILL, or one that fails with an error, ends the
//!   whole job with an error naming the rank within 30 s.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor, Var};
use half::bf16;
use minibatch::data::rng::{derive_rng, unit_f64};
use minibatch::data::{mnist, DataLoader, Subset};
use minibatch::dist::{
    broadcast_vars, checksum, GradBuckets, Mpi, ProcessGroup, ProcessGroupExt, ReduceOp, Single,
};
use minibatch::nn::Linear;
use minibatch::optim::{Optimizer, Sgd, SgdConfig};

/// Where a parent test tells its ranks to write.
const OUT_ENV: &str = "MINIBATCH_DIST_TEST_OUT";

struct Run {
    code: Option<i32>,
    output: String,
    elapsed: Duration,
}

/// Runs `mpirun -np 2` on this test binary's `program`, killing it after `limit`.
fn mpirun(program: &str, out: &Path, limit: Duration) -> Run {
    let exe = std::env::current_exe().expect("the test binary's path");
    let log = out.join(format!("{program}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let started = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(&exe)
        .args([
            program,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("MINIBATCH_THREADS_PER_RANK", "1")
        .env(OUT_ENV, out)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("mpirun must be installed (apt-get install openmpi-bin libopenmpi-dev)");
    let code = loop {
        if let Some(status) = child.try_wait().expect("waiting for mpirun") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun {program} did not end within {limit:?}; its output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code,
        output: std::fs::read_to_string(&log).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

fn out_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(OUT_ENV).expect("run by a parent test through mpirun"))
}

/// A 784-128-10 MLP whose weights are drawn from `seed` (uniform, PyTorch's
/// Linear bound 1/sqrt(fan_in)).
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    vars: Vec<Var>,
}

impl Mlp {
    fn new(seed: u64) -> Mlp {
        let mut stream = 0;
        let mut draw = |dims: &[usize], fan_in: usize| {
            let mut rng = derive_rng(seed, 0, stream);
            stream += 1;
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| ((unit_f64(&mut rng) * 2.0 - 1.0) * bound) as f32)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
        };
        let vars = vec![
            draw(&[128, 784], 784),
            draw(&[128], 784),
            draw(&[10, 128], 128),
            draw(&[10], 128),
        ];
        let t = |i: usize| vars[i].as_tensor().clone();
        Mlp {
            fc1: Linear::new(t(0), Some(t(1))),
            fc2: Linear::new(t(2), Some(t(3))),
            vars,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(x).unwrap().relu().unwrap())
            .unwrap()
    }
}

/// 100 steps of momentum SGD on the first 100·(world·batch) MNIST images,
/// per-rank batch `batch`, gradients averaged over `group` in 100 KB buckets;
/// the model is seeded by `seed` and then broadcast from rank 0.
fn train_mlp(group: &dyn ProcessGroup, batch: usize, seed: u64) -> Vec<Tensor> {
    let world = group.world_size();
    let (train, _) = mnist::load(common::mnist_dir(), &Device::Cpu).unwrap();
    let n = 100 * world * batch;
    let train = Subset::new(train, (0..n).collect()).unwrap();
    let loader = DataLoader::builder(train)
        .batch_size(batch)
        .shuffle(3)
        .shard(group.rank(), world)
        .build()
        .unwrap();
    assert_eq!(loader.len(), 100);
    let model = Mlp::new(seed);
    broadcast_vars(group, &model.vars, 0).unwrap();
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = Sgd::new(model.vars.clone(), cfg).unwrap();
    let mut buckets = GradBuckets::new(&model.vars, 100 * 1024).unwrap();
    assert!(buckets.num_buckets() >= 2, "{buckets:?}");
    for b in loader.epoch(0) {
        let (x, y) = b.unwrap().into_pair().unwrap();
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x), &y).unwrap();
        let mut grads = loss.backward().unwrap();
        buckets.all_reduce_mean(group, &mut grads).unwrap();
        opt.step(&grads).unwrap();
    }
    model
        .vars
        .iter()
        .map(|v| v.as_tensor().copy().unwrap())
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    let v: Vec<f64> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "non-finite weights");
    v
}

/// The relative weight difference of the 2-rank tests: `|got - want|₂ ≤
/// 1e-5 · |want|₂` (testkit's norm-wise comparison: lengths, NaN and inf
/// fail); returns the difference.
fn assert_rel_l2(got: &[f64], want: &[f64], what: &str) -> f64 {
    minibatch_testkit::assert_rel_l2_slice(got, want, 1e-5, what)
}

#[test]
#[ignore = "a rank program: run by two_ranks_at_32_equal_one_process_at_64 through mpirun"]
fn rank_mlp_steps() {
    let group = Mpi::init().unwrap();
    assert_eq!(group.world_size(), 2);
    // each rank seeds its model differently: the broadcast must make them equal
    let weights = train_mlp(group.as_ref(), 32, 1 + group.rank() as u64);
    let refs: Vec<&Tensor> = weights.iter().collect();
    group.or_abort(group.check_same("weights checksum after training", checksum(&refs).unwrap()));
    if group.rank() == 0 {
        let named = weights
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i}"), t.clone()))
            .collect::<std::collections::HashMap<_, _>>();
        candle_core::safetensors::save(&named, out_dir().join("weights.safetensors")).unwrap();
    }
}

#[test]
fn two_ranks_at_32_equal_one_process_at_64() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_mlp_steps", dir.path(), Duration::from_secs(240));
    assert_eq!(run.code, Some(0), "mpirun failed:\n{}", run.output);
    let got = candle_core::safetensors::load(dir.path().join("weights.safetensors"), &Device::Cpu)
        .unwrap();
    let want = train_mlp(&Single, 64, 1);
    let init = Mlp::new(1);
    for (i, w) in want.iter().enumerate() {
        let w = values(w);
        let diff = assert_rel_l2(&values(&got[&format!("p{i}")]), &w, &format!("p{i}"));
        // and the weights did move: the comparison is not of two initializations
        let start = values(init.vars[i].as_tensor());
        assert_eq!(start.len(), w.len(), "p{i}: lengths differ");
        let moved = start
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(moved > 1e3 * diff.max(1e-12), "p{i}: moved {moved:e} only");
    }
}

#[test]
#[ignore = "a rank program: run by collectives_and_broadcast_over_two_ranks through mpirun"]
fn rank_collectives() {
    let group = Mpi::init().unwrap();
    let (rank, world) = (group.rank(), group.world_size());
    let r = rank as f64;
    // ranks seeded differently differ, then agree after the broadcast
    let model = Mlp::new(10 + rank as u64);
    let sums = |m: &Mlp| {
        let refs: Vec<&Tensor> = m.vars.iter().map(|v| v.as_tensor()).collect();
        checksum(&refs).unwrap()
    };
    let before = group.all_gather_u64(sums(&model)).unwrap();
    assert_ne!(
        before[0], before[1],
        "differently seeded ranks drew the same weights"
    );
    broadcast_vars(group.as_ref(), &model.vars, 0).unwrap();
    let after = group.all_gather_u64(sums(&model)).unwrap();
    assert_eq!(
        after,
        vec![before[0]; world],
        "after the broadcast from rank 0"
    );
    // slices: every element is rank + i; the sum over 2 ranks is 1 + 2i
    let mut a: Vec<f32> = (0..1000).map(|i| r as f32 + i as f32).collect();
    group.all_reduce_sum(&mut a).unwrap();
    assert!(a
        .iter()
        .enumerate()
        .all(|(i, v)| *v == 1.0 + 2.0 * i as f32));
    let mut b: Vec<f64> = (0..10).map(|i| r + i as f64).collect();
    group.all_reduce_mean(&mut b).unwrap();
    assert!(
        b.iter().enumerate().all(|(i, v)| *v == 0.5 + i as f64),
        "{b:?}"
    );
    let mut c: Vec<bf16> = (0..10).map(|i| bf16::from_f64(r + i as f64)).collect();
    group.all_reduce_sum(&mut c).unwrap();
    assert!(
        c.iter()
            .enumerate()
            .all(|(i, v)| v.to_f64() == 1.0 + 2.0 * i as f64),
        "{c:?}"
    );
    // tensors in place, f32 and bf16
    let t = Tensor::new(&[r as f32, 10.0], &Device::Cpu).unwrap();
    group.all_reduce_tensor(&t, ReduceOp::Mean).unwrap();
    assert_eq!(t.to_vec1::<f32>().unwrap(), [0.5, 10.0]);
    let t = Tensor::new(&[r as f32 + 1.0], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    group.all_reduce_tensor(&t, ReduceOp::Sum).unwrap();
    assert_eq!(
        t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        [3.0]
    );
    // broadcast from rank 1, all-gather, agreement checks
    let mut v = [r as u64 * 7; 3];
    group.broadcast(&mut v, 1).unwrap();
    assert_eq!(v, [7; 3]);
    assert_eq!(group.all_gather_f64(r * 0.25).unwrap(), vec![0.0, 0.25]);
    let err = group.check_same("length", 5 + rank as u64).unwrap_err();
    assert!(
        err.to_string()
            .contains("rank 1 has length = 6 where rank 0 has 5"),
        "{err}"
    );
    assert!(group.broadcast(&mut v, 2).is_err());
    // a non-contiguous tensor is an error on the rank, before any communication
    let tt = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(group.all_reduce_tensor(&tt, ReduceOp::Sum).is_err());
    group.barrier().unwrap();
    std::fs::write(out_dir().join(format!("ok{rank}")), "ok").unwrap();
}

#[test]
fn collectives_and_broadcast_over_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_collectives", dir.path(), Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "mpirun failed:\n{}", run.output);
    for r in 0..2 {
        assert!(
            dir.path().join(format!("ok{r}")).exists(),
            "rank {r} did not finish:\n{}",
            run.output
        );
    }
}

#[test]
#[ignore = "a rank program: run by a_killed_rank_ends_the_job_within_30_s through mpirun"]
fn rank_killed() {
    let group = Mpi::init().unwrap();
    let mut x = vec![1f32; 1 << 16];
    for step in 0.. {
        if group.rank() == 1 && step == 3 {
            // SAFETY: sends SIGKILL to this very process; nothing to uphold.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        group.all_reduce_mean(&mut x).unwrap();
        if step > 100_000 {
            break; // never reached while the test works: rank 1 is gone
        }
    }
}

/// The job failed, and within 30 s of its start.
fn assert_ended_within_30_s(run: &Run) {
    assert_ne!(run.code, Some(0), "the job succeeded:\n{}", run.output);
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took {:?}",
        run.elapsed
    );
}

#[test]
fn a_killed_rank_ends_the_job_within_30_s() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_killed", dir.path(), Duration::from_secs(60));
    assert_ended_within_30_s(&run);
    assert!(
        run.output.contains("rank 1"),
        "no rank named:\n{}",
        run.output
    );
}

#[test]
#[ignore = "a rank program: run by a_failing_rank_aborts_the_job_naming_it through mpirun"]
fn rank_fails() {
    let group = Mpi::init().unwrap();
    if group.rank() == 1 {
        // bad input on rank 1 only: a non-contiguous tensor
        let t = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        group.or_abort(group.all_reduce_tensor(&t, ReduceOp::Sum));
    }
    // rank 0 waits for a rank that will never come; MPI_Abort ends it
    group.barrier().unwrap();
    group.barrier().unwrap();
}

#[test]
fn a_failing_rank_aborts_the_job_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_fails", dir.path(), Duration::from_secs(60));
    assert_ended_within_30_s(&run);
    assert!(
        run.output.contains("rank 1 of 2 failed") && run.output.contains("not contiguous"),
        "the error does not name the rank and the problem:\n{}",
        run.output
    );
}

/// The Trainer on 2 ranks (`.distributed`) against 1 process at twice the
/// batch: same weights (1e-5), same validation figures over the whole set.
struct TrainerMlp(Linear, Linear);

impl Module for TrainerMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.relu()?)
    }
}

fn fit_mlp(
    group: Option<std::sync::Arc<dyn ProcessGroup>>,
    batch: usize,
    seed: u64,
) -> (Vec<Tensor>, f64, f64) {
    use minibatch::train::{ProgressMode, Trainer};
    let (train, test) = mnist::load(common::mnist_dir(), &Device::Cpu).unwrap();
    let train = Subset::new(train, (0..3200).collect()).unwrap();
    let test = Subset::new(test, (0..999).collect()).unwrap(); // odd: uneven shards
    let loader = DataLoader::builder(train)
        .batch_size(batch)
        .shuffle(5)
        .build()
        .unwrap();
    let val = DataLoader::builder(test).batch_size(250).build().unwrap();
    let vm = candle_nn::VarMap::new();
    let vb = minibatch::nn::seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let model = TrainerMlp(
        minibatch::nn::linear(784, 64, vb.pp("fc1")).unwrap(),
        minibatch::nn::linear(64, 10, vb.pp("fc2")).unwrap(),
    );
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let opt = Sgd::from_varmap(&vm, cfg).unwrap();
    let mut b = Trainer::builder(model, vm.clone(), loader, opt)
        .val_loader(val)
        .epochs(1)
        .accumulate(2)
        .clip(minibatch::train::Clip::Norm {
            max_norm: 1.0,
            norm: minibatch::optim::Norm::L2,
        })
        .progress(ProgressMode::Silent);
    if let Some(g) = group {
        b = b.distributed(g);
    }
    let mut t = b.build().unwrap();
    let h = t.fit().unwrap();
    let last = h.epochs.last().unwrap();
    let (loss, acc) = (last.val_loss.unwrap(), last.val_metrics["accuracy"]);
    let mut names: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let data = vm.data().lock().unwrap();
    let w = names
        .iter()
        .map(|n| data[n].as_tensor().copy().unwrap())
        .collect();
    (w, loss, acc)
}

#[test]
#[ignore = "a rank program: run by the_trainer_on_two_ranks_is_one_process through mpirun"]
fn rank_trainer() {
    let group = Mpi::init().unwrap();
    let rank = group.rank();
    let (w, loss, acc) = fit_mlp(Some(group.clone()), 32, 20 + rank as u64);
    let refs: Vec<&Tensor> = w.iter().collect();
    group.or_abort(group.check_same("weights checksum after fit", checksum(&refs).unwrap()));
    group.or_abort(group.check_same("val loss bits", loss.to_bits()));
    if rank == 0 {
        let named = w
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i}"), t.clone()))
            .collect::<std::collections::HashMap<_, _>>();
        candle_core::safetensors::save(&named, out_dir().join("trainer.safetensors")).unwrap();
        std::fs::write(out_dir().join("val.txt"), format!("{loss} {acc}")).unwrap();
    }
}

#[test]
fn the_trainer_on_two_ranks_is_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_trainer", dir.path(), Duration::from_secs(240));
    assert_eq!(run.code, Some(0), "mpirun failed:\n{}", run.output);
    let got = candle_core::safetensors::load(dir.path().join("trainer.safetensors"), &Device::Cpu)
        .unwrap();
    let (want, loss, acc) = fit_mlp(None, 64, 20);
    for (i, w) in want.iter().enumerate() {
        assert_rel_l2(
            &values(&got[&format!("p{i}")]),
            &values(w),
            &format!("p{i}"),
        );
    }
    let text = std::fs::read_to_string(dir.path().join("val.txt")).unwrap();
    let v: Vec<f64> = text.split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(
        (v[0] - loss).abs() <= 1e-5 * loss.abs(),
        "val loss {} vs {loss}",
        v[0]
    );
    assert!(
        (v[1] - acc).abs() <= 1.5e-3,
        "val accuracy {} vs {acc}",
        v[1]
    );
}

/// The MLP of [`fit_mlp`] for 2 epochs (50 steps: batch 32 per rank,
/// accumulate 2), on 2 ranks, checkpointing every 10 steps into `dir`;
/// stopped after `max_steps`, or resumed from the newest checkpoint under
/// `resume`. Returns the weights and the history without timings.
fn fit_resumable(
    group: std::sync::Arc<dyn ProcessGroup>,
    dir: &Path,
    max_steps: Option<u64>,
    resume: Option<PathBuf>,
) -> minibatch::train::Result<(Vec<Tensor>, minibatch::train::History)> {
    use minibatch::train::{ProgressMode, Trainer};
    let (train, test) = mnist::load(common::mnist_dir(), &Device::Cpu).unwrap();
    let train = Subset::new(train, (0..3200).collect()).unwrap();
    let test = Subset::new(test, (0..999).collect()).unwrap();
    let loader = DataLoader::builder(train)
        .batch_size(32)
        .shuffle(5)
        .build()
        .unwrap();
    let val = DataLoader::builder(test).batch_size(250).build().unwrap();
    let vm = candle_nn::VarMap::new();
    // each rank seeded differently: rank 0's weights are broadcast
    let vb =
        minibatch::nn::seeded_var_builder(&vm, 30 + group.rank() as u64, DType::F32, &Device::Cpu);
    let model = TrainerMlp(
        minibatch::nn::linear(784, 64, vb.pp("fc1")).unwrap(),
        minibatch::nn::linear(64, 10, vb.pp("fc2")).unwrap(),
    );
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let opt = Sgd::from_varmap(&vm, cfg).unwrap();
    let mut b = Trainer::builder(model, vm.clone(), loader, opt)
        .val_loader(val)
        .epochs(2)
        .accumulate(2)
        .checkpoint_dir(dir)
        .checkpoint_every_steps(10)
        .keep_last(10)
        .progress(ProgressMode::Silent)
        .distributed(group);
    if let Some(n) = max_steps {
        b = b.max_steps(n);
    }
    if let Some(root) = resume {
        b = b.resume_from_latest_valid(root);
    }
    let mut t = b.build()?;
    let h = t.fit()?;
    let mut names: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let data = vm.data().lock().unwrap();
    let w = names
        .iter()
        .map(|n| data[n].as_tensor().copy().unwrap())
        .collect();
    Ok((w, h.without_timings()))
}

#[test]
#[ignore = "a rank program: run by a_two_rank_resume_is_bit_identical through mpirun"]
fn rank_trainer_resume() {
    let group = Mpi::init().unwrap();
    let rank = group.rank();
    let out = out_dir();
    let sum = |w: &[Tensor]| checksum(&w.iter().collect::<Vec<_>>()).unwrap();
    // uninterrupted
    let (want, want_h) = group.or_abort(fit_resumable(group.clone(), &out.join("a"), None, None));
    // stopped at step 35 (mid-epoch 1: the newest checkpoint is step 30),
    // then resumed; rank 1 is given a directory that does not exist: rank 0
    // reads the checkpoint and broadcasts it
    group.or_abort(fit_resumable(group.clone(), &out.join("b"), Some(35), None));
    let root = if rank == 0 {
        out.join("b")
    } else {
        out.join("no-such-dir")
    };
    let (got, got_h) = group.or_abort(fit_resumable(
        group.clone(),
        &out.join("b"),
        None,
        Some(root),
    ));
    group.or_abort(group.check_same("weights checksum after the resumed fit", sum(&got)));
    if rank == 0 {
        assert_eq!(got_h, want_h, "the resumed history differs");
        assert_eq!(want_h.epochs.len(), 2);
        assert_eq!(want_h.epochs[1].steps, 50);
        std::fs::write(
            out.join("sums.txt"),
            format!("{} {}", sum(&want), sum(&got)),
        )
        .unwrap();
    }
    group.barrier().unwrap();
}

#[test]
fn a_two_rank_resume_is_bit_identical_and_one_process_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = mpirun("rank_trainer_resume", dir.path(), Duration::from_secs(400));
    assert_eq!(run.code, Some(0), "mpirun failed:\n{}", run.output);
    // the resumed run's weights are the uninterrupted run's, to the bit
    let sums = std::fs::read_to_string(dir.path().join("sums.txt")).unwrap();
    let (a, b) = sums.split_once(' ').unwrap();
    assert_eq!(a, b, "weights checksums: uninterrupted {a}, resumed {b}");
    // and the checkpoints it wrote after the resume are the same bytes
    for step in ["step-000000040", "step-000000050"] {
        for file in ["model.safetensors", "optimizer.bin", "trainer.json"] {
            let read =
                |run: &str| std::fs::read(dir.path().join(run).join(step).join(file)).unwrap();
            assert!(
                read("a") == read("b"),
                "{step}/{file} differs between the runs"
            );
        }
    }
    let state = std::fs::read_to_string(dir.path().join("a/step-000000030/trainer.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["world"]["world_size"], 2);
    assert_eq!(v["world"]["batch_per_rank"], 32);
    assert_eq!(v["world"]["global_batch"], 64);
    assert_eq!(v["world"]["ranks"].as_array().map(Vec::len), Some(2));
    // one process refuses a 2-rank checkpoint, at the per-rank batch and at
    // the global batch, naming both world sizes
    for batch in [32, 64] {
        let err = resume_in_one_process(&dir.path().join("a"), batch);
        assert!(
            err.contains("written by 2 rank(s) at batch 32 per rank (global batch 64)")
                && err.contains(&format!("this run has 1 rank(s) at batch {batch} per rank")),
            "{err}"
        );
    }
}

/// The error of resuming the 2-rank checkpoints under `root` in one process
/// at batch `batch`.
fn resume_in_one_process(root: &Path, batch: usize) -> String {
    use minibatch::train::{ProgressMode, Trainer};
    let (train, _) = mnist::load(common::mnist_dir(), &Device::Cpu).unwrap();
    let train = Subset::new(train, (0..3200).collect()).unwrap();
    let loader = DataLoader::builder(train)
        .batch_size(batch)
        .shuffle(5)
        .build()
        .unwrap();
    let vm = candle_nn::VarMap::new();
    let vb = minibatch::nn::seeded_var_builder(&vm, 30, DType::F32, &Device::Cpu);
    let model = TrainerMlp(
        minibatch::nn::linear(784, 64, vb.pp("fc1")).unwrap(),
        minibatch::nn::linear(64, 10, vb.pp("fc2")).unwrap(),
    );
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    match Trainer::builder(model, vm, loader, opt)
        .accumulate(2)
        .progress(ProgressMode::Silent)
        .resume_from_latest_valid(root)
        .build()
    {
        Ok(_) => panic!("a 2-rank checkpoint resumed in one process at batch {batch}"),
        Err(e) => e.to_string(),
    }
}
