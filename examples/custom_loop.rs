//! Your own training loop from minibatch's pieces: a seeded DataLoader, an
//! optimizer, gradient clipping and a per-step OneCycle schedule, the
//! trainer's gradient guard (`params_without_grad`) at the first step, and
//! `minibatch::train::evaluate` for the test set. No Trainer involved.
//!
//! `cargo run --release --example custom_loop`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use minibatch::data::{mnist, DataLoader, Dataset, Subset};
use minibatch::nn::{linear, seeded_var_builder};
use minibatch::optim::{clip_grad_norm, LrScheduler, Norm, OneCycleLR, Optimizer, Sgd, SgdConfig};
use minibatch::train::{cross_entropy, evaluate, params_without_grad, Accuracy, Metric};
use std::sync::Arc;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (train, test) = mnist::load("data/mnist", &dev)?;
    let train: Arc<dyn Dataset> = Arc::new(train);
    let train = Subset::new(train, (0..20_000).collect())?; // keep it short
    let loader = DataLoader::builder(train)
        .batch_size(64)
        .shuffle(7)
        .build()?;
    let test_loader = DataLoader::builder(test).batch_size(1000).build()?;

    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 7, DType::F32, &dev); // seeded initial weights
    let (fc1, fc2) = (
        linear(784, 128, vb.pp("fc1"))?,
        linear(128, 10, vb.pp("fc2"))?,
    );
    let model = move |x: &Tensor| fc2.forward(&fc1.forward(x)?.relu()?);

    let epochs = 2u64;
    let mut opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let mut sched = OneCycleLR::new(&mut opt, 0.1, epochs * loader.len() as u64)?;
    let vars = opt.vars();

    let mut first_step = true;
    for epoch in 0..epochs {
        let (mut sum, mut n, mut max_norm) = (0.0f64, 0usize, 0.0f64);
        for batch in loader.epoch(epoch) {
            let (x, y) = batch?.into_pair()?;
            let loss = cross_entropy(&model(&x)?, &y)?;
            let mut grads = loss.backward()?;
            if first_step {
                // What the Trainer checks at its first step: every parameter got a
                // gradient (candle-nn's fused norms, softmax_last_dim and rope drop
                // them silently).
                let missing = params_without_grad(&vm, &grads)?;
                anyhow::ensure!(missing.is_empty(), "no gradient reaches {missing:?}");
                first_step = false;
            }
            let norm = clip_grad_norm(&mut grads, &vars, 1.0, Norm::L2)?; // norm before clipping
            opt.step(&grads)?;
            sched.step(&mut opt)?;
            sum += f64::from(loss.to_scalar::<f32>()?) * x.dim(0)? as f64;
            n += x.dim(0)?;
            max_norm = max_norm.max(norm);
        }
        let mut metrics: Vec<Box<dyn Metric>> = vec![Box::new(Accuracy::default())];
        let ev = evaluate(&model, &test_loader, &cross_entropy, &mut metrics)?;
        println!(
            "epoch {epoch}: train loss {:.4} (largest grad norm {max_norm:.2}), test loss {:.4}, test accuracy {:.2}%, lr now {:.2e}",
            sum / n as f64,
            ev.loss,
            100.0 * ev.metrics["accuracy"],
            opt.learning_rate()
        );
    }
    Ok(())
}
