//! MNIST with real mini-batch training: the front door of minibatch.
//!
//! ```text
//! cargo run --release --example mnist                    # MLP 784-256-10, SGD momentum 0.9
//! cargo run --release --example mnist -- --model cnn     # small CNN
//! cargo run --release --example mnist -- --optimizer adamw --lr 1e-3 --schedule cosine
//! cargo run --release --example mnist -- --checkpoint-dir runs/ckpt            # then ...
//! cargo run --release --example mnist -- --checkpoint-dir runs/ckpt --resume   # ... continue
//! ```
//!
//! Writes `history_epochs.csv`, `history_steps.csv`, `history.json` and
//! `history.svg` into `--out-dir` (default `runs/mnist`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Conv2dConfig, VarMap};
use clap::{Parser, ValueEnum};
use minibatch::data::{mnist, parse_device, DataLoader};
use minibatch::dist::ProcessGroupExt;
// `minibatch::nn::Conv2d`, `max_pool2d` and `relu`: im2col + gemm convolutions with a
// fast backward pass, max pooling with PyTorch's gradient (candle's is 1/4 of it), and
// a relu whose backward is one pass.
use minibatch::nn::ops::{max_pool2d, relu};
use minibatch::nn::{conv2d, Conv2d};
// `minibatch::nn::Linear`: candle_nn::Linear's maths with a leaner backward pass.
use minibatch::nn::{linear, seeded_var_builder, Linear};
use minibatch::optim::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, CosineAnnealingLR, ExponentialLR,
    LrScheduler, OneCycleLR, OneCycleOptions, Optimizer, ReduceLROnPlateau, RmsProp, RmsPropConfig,
    Sgd, SgdConfig, StepLR,
};
use minibatch::train::{Mode, ProgressMode, ScheduleEvery, Trainer};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    Mlp,
    Cnn,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Opt {
    Sgd,
    Adam,
    Adamw,
    Rmsprop,
    Adagrad,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Schedule {
    None,
    /// StepLR: x0.1 every third of the run
    Step,
    /// ExponentialLR gamma 0.8 per epoch
    Exponential,
    /// CosineAnnealingLR over the epochs
    Cosine,
    /// OneCycleLR per step, max_lr = --lr, momentum (or Adam's beta1) cycled
    /// 0.95 -> 0.85 -> 0.95 (not for adagrad, which has none)
    Onecycle,
    /// ReduceLROnPlateau on val_loss
    Plateau,
}

#[derive(Parser, Debug)]
#[command(about = "Train an MLP or a CNN on MNIST with minibatch")]
struct Args {
    /// mlp (784-H-10) or cnn (2 conv + 2 linear)
    #[arg(long, value_enum, default_value = "mlp")]
    model: Arch,
    /// hidden width of the MLP
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// epochs (default: 10 for the MLP, 4 for the CNN)
    #[arg(long)]
    epochs: Option<u64>,
    /// samples per batch (per rank with --distributed)
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// learning rate (default: 0.05 for SGD, 1e-3 for the adaptive optimizers)
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long)]
    nesterov: bool,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: Opt,
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Schedule,
    /// seeds the weights and the shuffling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// loader worker threads (0: load in the training thread)
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "data/mnist")]
    data_dir: PathBuf,
    /// write checkpoints here (every epoch, and every --checkpoint-every steps)
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// continue from the newest intact checkpoint in --checkpoint-dir
    #[arg(long)]
    resume: bool,
    /// stop after this many optimizer steps in total (e.g. to try --resume)
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value = "runs/mnist")]
    out_dir: PathBuf,
    /// data-parallel over MPI: `mpirun -np N target/release/examples/mnist --distributed`
    /// (build with `--features mpi`); rank 0 prints and writes
    #[arg(long)]
    distributed: bool,
    /// threads of each rank's candle pool (default: the cores / the ranks on this machine)
    #[arg(long)]
    threads: Option<usize>,
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&relu(&self.fc1.forward(x)?)?)
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
        let x = max_pool2d(&relu(&self.c1.forward(&x)?)?, 2)?; // 16x12x12
        let x = max_pool2d(&relu(&self.c2.forward(&x)?)?, 2)?; // 32x4x4
        let x = x.flatten_from(1)?;
        self.fc2.forward(&relu(&self.fc1.forward(&x)?)?)
    }
}

enum Net {
    Mlp(Mlp),
    Cnn(Cnn),
}

impl ModuleT for Net {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        match self {
            Net::Mlp(m) => m.forward(x),
            Net::Cnn(m) => m.forward(x),
        }
    }
}

fn build_optimizer(a: &Args, vm: &VarMap, lr: f64) -> Result<Box<dyn Optimizer>> {
    let wd = a.weight_decay;
    Ok(match a.optimizer {
        Opt::Sgd => Box::new(Sgd::from_varmap(
            vm,
            SgdConfig {
                lr,
                momentum: a.momentum,
                nesterov: a.nesterov,
                weight_decay: wd,
                ..Default::default()
            },
        )?),
        Opt::Adam => Box::new(Adam::from_varmap(
            vm,
            AdamConfig {
                lr,
                weight_decay: wd,
                ..Default::default()
            },
        )?),
        Opt::Adamw => Box::new(AdamW::from_varmap(
            vm,
            AdamWConfig {
                adam: AdamConfig {
                    lr,
                    weight_decay: if wd == 0.0 { 1e-2 } else { wd },
                    ..AdamWConfig::default().adam
                },
            },
        )?),
        Opt::Rmsprop => Box::new(RmsProp::from_varmap(
            vm,
            RmsPropConfig {
                lr,
                weight_decay: wd,
                ..Default::default()
            },
        )?),
        Opt::Adagrad => Box::new(Adagrad::from_varmap(
            vm,
            AdagradConfig {
                lr,
                weight_decay: wd,
                ..Default::default()
            },
        )?),
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    let wall = std::time::Instant::now();
    let group = minibatch::dist::launch(a.distributed)?;
    // before the first candle op: candle builds its pool once
    let threads = minibatch::dist::threads::configure_threads(group.local_size(), a.threads);
    let main_rank = group.rank() == 0;
    let device: Device = parse_device(&a.device)?;
    let epochs = a.epochs.unwrap_or(match a.model {
        Arch::Mlp => 10,
        Arch::Cnn => 4,
    });
    let lr = a.lr.unwrap_or(match a.optimizer {
        Opt::Sgd => 0.05,
        Opt::Adagrad => 1e-2,
        _ => 1e-3,
    });
    let opts = mnist::MnistOptions::default().normalized(true);
    let (train, test) = mnist::load_with(&a.data_dir, &opts, &device).with_context(|| {
        format!(
            "loading MNIST from {} (run from the repository root or pass --data-dir)",
            a.data_dir.display()
        )
    })?;
    let mut train_loader = DataLoader::builder(train)
        .batch_size(a.batch_size)
        .shuffle(a.seed)
        .num_workers(a.workers);
    if a.distributed {
        // this rank's share: steps_per_epoch below counts the rank's batches
        train_loader = train_loader.shard(group.rank(), group.world_size());
    }
    let train_loader = train_loader.build()?;
    let test_loader = DataLoader::builder(test).batch_size(1000).build()?;

    let vm = VarMap::new();
    // initial weights: a pure function of (seed, parameter name), candle-nn's
    // distributions (Kaiming normal weights, uniform ±1/√fan_in biases)
    let vb = seeded_var_builder(&vm, a.seed, DType::F32, &device);
    let net = match a.model {
        Arch::Mlp => Net::Mlp(Mlp {
            fc1: linear(784, a.hidden, vb.pp("fc1"))?,
            fc2: linear(a.hidden, 10, vb.pp("fc2"))?,
        }),
        Arch::Cnn => {
            let c = Conv2dConfig::default();
            Net::Cnn(Cnn {
                c1: conv2d(1, 16, 5, c, vb.pp("c1"))?,
                c2: conv2d(16, 32, 5, c, vb.pp("c2"))?,
                fc1: linear(512, 128, vb.pp("fc1"))?,
                fc2: linear(128, 10, vb.pp("fc2"))?,
            })
        }
    };
    let mut opt = build_optimizer(&a, &vm, lr)?;
    let steps_per_epoch = train_loader.len() as u64;
    let sched: Option<(Box<dyn LrScheduler>, ScheduleEvery)> = match a.schedule {
        Schedule::None => None,
        Schedule::Step => Some((
            Box::new(StepLR::new(opt.as_mut(), (epochs / 3).max(1), 0.1)?),
            ScheduleEvery::Epoch,
        )),
        Schedule::Exponential => Some((
            Box::new(ExponentialLR::new(opt.as_mut(), 0.8)?),
            ScheduleEvery::Epoch,
        )),
        Schedule::Cosine => Some((
            Box::new(CosineAnnealingLR::new(opt.as_mut(), epochs, 0.0)?),
            ScheduleEvery::Epoch,
        )),
        Schedule::Onecycle => {
            // Momentum cycling (PyTorch's default) needs a momentum or beta1:
            // Adagrad has neither, so it gets the lr cycle only.
            let cycle_momentum = opt.momentum(0).is_some();
            let options = OneCycleOptions {
                cycle_momentum,
                ..Default::default()
            };
            let total = epochs * steps_per_epoch;
            Some((
                Box::new(OneCycleLR::with_options(opt.as_mut(), lr, total, options)?),
                ScheduleEvery::Step,
            ))
        }
        Schedule::Plateau => Some((
            Box::new(ReduceLROnPlateau::new(opt.as_mut())?),
            ScheduleEvery::EpochOnMetric("val_loss".into()),
        )),
    };

    if a.distributed && main_rank {
        println!(
            "data-parallel: {} ranks ({}), {threads} threads each, global batch {}",
            group.world_size(),
            group.backend(),
            group.world_size() * a.batch_size
        );
    }
    if main_rank {
        println!(
        "MNIST {:?}: {} train / {} test samples, batch {}, {} steps/epoch, {} epochs, {} lr {lr}, schedule {:?}, device {:?}",
        a.model,
        train_loader.num_samples(),
        test_loader.num_samples(),
        a.batch_size,
        steps_per_epoch,
        epochs,
        opt.name(),
        a.schedule,
        device
    );
    }
    let mut b = Trainer::builder(net, vm, train_loader, opt)
        .val_loader(test_loader)
        .epochs(epochs)
        .progress(ProgressMode::Auto)
        .out_dir(&a.out_dir);
    if a.distributed {
        b = b.distributed(group.clone());
    }
    if let Some((s, every)) = sched {
        b = b.scheduler(s, every);
    }
    if let Some(n) = a.max_steps {
        b = b.max_steps(n);
    }
    if let Some(dir) = &a.checkpoint_dir {
        b = b
            .checkpoint_dir(dir)
            .save_best("val_accuracy", Mode::Max)
            .keep_last(2);
        if let Some(n) = a.checkpoint_every {
            b = b.checkpoint_every_steps(n);
        }
        if a.resume {
            // corrupt checkpoints are skipped, with a warning naming each
            b = b.resume_from_latest_valid(dir);
        }
    } else if a.resume {
        bail!("--resume needs --checkpoint-dir");
    }
    // a resume prints where it resumed and what came from the checkpoint
    let mut trainer = b.build()?;
    let history = group.or_abort(trainer.fit());
    if !main_rank {
        return Ok(());
    }
    if let Some(last) = history.epochs.last() {
        println!(
            "final test accuracy {:.2}% (test loss {:.4}) after {} epochs",
            100.0
                * last
                    .val_metrics
                    .get("accuracy")
                    .copied()
                    .unwrap_or(f64::NAN),
            last.val_loss.unwrap_or(f64::NAN),
            last.epoch + 1
        );
    }
    println!(
        "wrote {0}/history_epochs.csv, {0}/history_steps.csv, {0}/history.json and {0}/history.svg",
        a.out_dir.display()
    );
    if let Some(dir) = &a.checkpoint_dir {
        println!(
            "checkpoints in {} (latest and best pointers)",
            dir.display()
        );
    }
    println!(
        "wall {:.1} s, CPU {:.1} s (this process, all threads)",
        wall.elapsed().as_secs_f64(),
        minibatch::dist::threads::cpu_time().as_secs_f64()
    );
    Ok(())
}
