//! Full-batch GD vs pure SGD vs mini-batch (32, 128) vs mini-batch with
//! momentum: the same softmax-regression model on the same 4096 MNIST rows,
//! the same budget (10 epochs = 40,960 sample-gradients each).
//!
//! Every column is measured in this run: updates and wall time until the
//! smoothed training loss first drops below the target, the noise of the
//! per-step loss (standard deviation over the last 20% of steps), time per
//! epoch, and the peak bytes of one batch (inputs + targets + logits) seen by
//! the model. The smoothed loss is an exponential moving average over about
//! 512 samples (alpha = batch / 512, at most 1). Writes the curves to
//! `runs/gd_vs_sgd/loss.svg`.
//!
//! `cargo run --release --example gd_vs_sgd`

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use minibatch::data::{mnist, DataLoader, Dataset, Subset};
use minibatch::nn::linear;
use minibatch::optim::{Sgd, SgdConfig};
use minibatch::train::plot::{plot_lines, Series};
use minibatch::train::{Control, ProgressMode, Trainer};

const N: usize = 4096;
const EPOCHS: u64 = 10;
const TARGET: f64 = 0.45;

struct Run {
    name: &'static str,
    batch: usize,
    lr: f64,
    momentum: f64,
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (train, _) = mnist::load("data/mnist", &dev)?;
    let train: Arc<dyn Dataset> = Arc::new(train);
    let runs = [
        Run {
            name: "full-batch GD",
            batch: N,
            lr: 0.5,
            momentum: 0.0,
        },
        Run {
            name: "pure SGD (batch 1)",
            batch: 1,
            lr: 0.01,
            momentum: 0.0,
        },
        Run {
            name: "mini-batch 32",
            batch: 32,
            lr: 0.1,
            momentum: 0.0,
        },
        Run {
            name: "mini-batch 128",
            batch: 128,
            lr: 0.2,
            momentum: 0.0,
        },
        Run {
            name: "mini-batch 32 + momentum 0.9",
            batch: 32,
            lr: 0.01,
            momentum: 0.9,
        },
    ];
    println!(
        "softmax regression on {N} MNIST rows, {EPOCHS} epochs each, target smoothed loss {TARGET}\n"
    );
    println!(
        "{:<30} {:>7} {:>6} {:>8} {:>12} {:>14} {:>11} {:>10} {:>12}",
        "run",
        "batch",
        "lr",
        "updates",
        "to target",
        "time to target",
        "loss noise",
        "s/epoch",
        "batch bytes"
    );
    let mut series = Vec::new();
    for r in &runs {
        let ds = Subset::new(train.clone(), (0..N).collect())?;
        let loader = DataLoader::builder(ds)
            .batch_size(r.batch)
            .shuffle(3)
            .build()?;
        let vm = VarMap::new();
        let vb = minibatch::nn::seeded_var_builder(&vm, 0, DType::F32, &dev);
        // the same initial weights (zeros) for every run, as in the lesson
        let fc = linear(784, 10, vb.pp("fc"))?;
        for (_, v) in minibatch::optim::varmap_vars(&vm)? {
            v.set(&v.zeros_like()?)?;
        }
        let peak = Rc::new(Cell::new(0usize));
        let p2 = peak.clone();
        let model = move |x: &Tensor| -> candle_core::Result<Tensor> {
            let out = fc.forward(x)?;
            // x (f32) + targets (u32) + logits (f32)
            let bytes = x.elem_count() * 4 + x.dim(0)? * 4 + out.elem_count() * 4;
            p2.set(p2.get().max(bytes));
            Ok(out)
        };
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: r.lr,
                momentum: r.momentum,
                ..Default::default()
            },
        )?;
        let log: Rc<RefCell<Vec<(u64, f64, f64)>>> = Rc::new(RefCell::new(Vec::new()));
        let l2 = log.clone();
        let start = Rc::new(Cell::new(Instant::now()));
        let s2 = start.clone();
        let mut trainer = Trainer::builder(model, vm, loader, opt)
            .epochs(EPOCHS)
            .no_default_metrics()
            .progress(ProgressMode::Silent)
            .on_step(move |s| {
                l2.borrow_mut()
                    .push((s.step, s.loss, s2.get().elapsed().as_secs_f64()));
                Ok(Control::Continue)
            })
            .build()?;
        start.set(Instant::now());
        trainer.fit()?;
        let wall = start.get().elapsed().as_secs_f64();
        let log = log.borrow();
        let alpha = (r.batch as f64 / 512.0).min(1.0);
        let mut ema = None::<f64>;
        let mut reached = None;
        let mut curve = Vec::with_capacity(log.len());
        for &(step, loss, t) in log.iter() {
            let e = match ema {
                None => loss,
                Some(e) => e + alpha * (loss - e),
            };
            ema = Some(e);
            if reached.is_none() && e < TARGET {
                reached = Some((step + 1, t));
            }
            curve.push(((step + 1) as f64 * r.batch as f64 / N as f64, e));
        }
        let tail = &log[log.len() - (log.len() / 5).max(2)..];
        let mean = tail.iter().map(|x| x.1).sum::<f64>() / tail.len() as f64;
        let std =
            (tail.iter().map(|x| (x.1 - mean).powi(2)).sum::<f64>() / tail.len() as f64).sqrt();
        let (upd, tt) = match reached {
            Some((u, t)) => (format!("{u}"), format!("{t:.3} s")),
            None => ("not reached".into(), "-".into()),
        };
        println!(
            "{:<30} {:>7} {:>6} {:>8} {:>12} {:>14} {:>11.4} {:>10.3} {:>12}",
            r.name,
            r.batch,
            r.lr,
            log.len(),
            upd,
            tt,
            std,
            wall / EPOCHS as f64,
            peak.get()
        );
        series.push(Series::new(r.name, curve));
    }
    let dir = std::path::Path::new("runs/gd_vs_sgd");
    std::fs::create_dir_all(dir)?;
    let path = dir.join("loss.svg");
    plot_lines(
        &path,
        "smoothed training loss",
        "epochs (samples / N)",
        "loss",
        &series,
        true,
    )?;
    println!("\nloss curves: {}", path.display());
    Ok(())
}
