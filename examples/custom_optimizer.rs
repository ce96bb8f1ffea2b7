//! Writing a new optimizer: Lion (Chen et al. 2023, "Symbolic Discovery of
//! Optimization Algorithms") as one `UpdateRule`, trained on a small
//! least-squares problem and compared with AdamW.
//!
//! Everything drawn is seeded (the data from ChaCha8, the initial weights by
//! `seeded_var_builder`), so every run prints the same figures.
//!
//! `cargo run --release --example custom_optimizer`

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use minibatch::optim::{
    check_non_negative, check_unit, AdamConfig, AdamW, AdamWConfig, CosineAnnealingLR, Float,
    GenericOptimizer, LrScheduler, Optimizer, ParamStep, UpdateRule,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Lion: `u = sign(β₁ m + (1 − β₁) g)`, `θ ← θ(1 − lr·λ) − lr·u`,
/// `m ← β₂ m + (1 − β₂) g`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lion {
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

impl UpdateRule for Lion {
    const KIND: &'static str = "Lion";

    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }
    fn validate(&self) -> minibatch::optim::Result<()> {
        check_non_negative("lr", self.lr)?;
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg"]
    }
    fn update<F: Float>(&self, _step: ParamStep, p: &mut [F], g: &[F], state: &mut [&mut [F]]) {
        let (lr, b1, b2) = (
            F::from_f64(self.lr),
            F::from_f64(self.beta1),
            F::from_f64(self.beta2),
        );
        let decay = F::from_f64(1.0 - self.lr * self.weight_decay);
        let m = &mut *state[0];
        for j in 0..p.len() {
            let u = (b1 * m[j] + (F::ONE - b1) * g[j]).sign();
            p[j] = p[j] * decay - lr * u;
            m[j] = b2 * m[j] + (F::ONE - b2) * g[j];
        }
    }
}

const STEPS: usize = 300;

fn train(
    opt: &mut dyn Optimizer,
    model: &candle_nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> anyhow::Result<f32> {
    let mut sched = CosineAnnealingLR::new(opt, STEPS as u64, 0.0)?;
    for _ in 0..STEPS {
        let loss = model.forward(x)?.sub(y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        sched.step(opt)?;
    }
    Ok(model
        .forward(x)?
        .sub(y)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?)
}

/// `n` values drawn uniformly from `[-scale, scale)`.
fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    // y = x W* + b* with W* = [2, -3, 0.5], b* = 1, x uniform in [-2, 2).
    let x = Tensor::from_vec(uniform(&mut rng, 256 * 3, 2.0), (256, 3), &dev)?;
    let w_true = Tensor::new(&[[2f32], [-3.0], [0.5]], &dev)?;
    let y = x.matmul(&w_true)?.affine(1.0, 1.0)?;

    for which in ["Lion", "AdamW"] {
        // the same seeded starting point for both optimizers
        let varmap = VarMap::new();
        let vb = minibatch::nn::seeded_var_builder(&varmap, 42, DType::F32, &dev);
        let model = candle_nn::linear(3, 1, vb.pp("fc"))?;
        let mut opt: Box<dyn Optimizer> = match which {
            // Lion moves each weight by at most lr per step, so the lr summed
            // over the cosine schedule (0.1 · 300 / 2 = 15) must cover the
            // distance to W* with room to spare: at lr 0.05 a third of the
            // seeds fell short.
            "Lion" => Box::new(GenericOptimizer::from_varmap(
                &varmap,
                Lion {
                    lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.99,
                    weight_decay: 0.0,
                },
            )?),
            _ => Box::new(AdamW::from_varmap(
                &varmap,
                AdamWConfig {
                    adam: AdamConfig {
                        lr: 0.1,
                        weight_decay: 0.0,
                        ..AdamWConfig::default().adam
                    },
                },
            )?),
        };
        let loss = train(opt.as_mut(), &model, &x, &y)?;
        let w = model.weight().flatten_all()?.to_vec1::<f32>()?;
        let b = match model.bias() {
            Some(b) => b.to_vec1::<f32>()?[0],
            None => 0.0,
        };
        println!("{which:>5}: final mse {loss:.2e}, weights {w:.4?}, bias {b:.4}");
        // Saved state carries every hyperparameter of a new rule too.
        let state = opt.state_bytes()?;
        println!("       state: {} bytes", state.len());
        anyhow::ensure!(loss < 1e-2, "{which} did not fit the problem (mse {loss})");
    }
    Ok(())
}
