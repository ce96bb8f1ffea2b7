//! Writing a new optimizer: Lion (Chen et al. 2023, "Symbolic Discovery of
//! Optimization Algorithms") as one `UpdateRule`, trained on a small
//! least-squares problem and compared with AdamW.
//!
//! `cargo run --release --example custom_optimizer`

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use minibatch_optim::{
    AdamW, AdamWConfig, CosineAnnealingLR, Float, GenericOptimizer, LrScheduler, Optimizer,
    UpdateRule,
};

/// Lion: `u = sign(β₁ m + (1 − β₁) g)`, `θ ← θ(1 − lr·λ) − lr·u`,
/// `m ← β₂ m + (1 − β₂) g`.
#[derive(Debug, Clone)]
struct Lion {
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

impl UpdateRule for Lion {
    const KIND: &'static str = "Lion";

    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> minibatch_optim::Result<()> {
        let ok =
            self.lr >= 0.0 && (0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2);
        if ok {
            Ok(())
        } else {
            Err(minibatch_optim::OptimError::InvalidSetup(format!(
                "bad Lion hyperparameters {self:?}"
            )))
        }
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg"]
    }
    fn update<F: Float>(&self, _step: u64, p: &mut [F], g: &[F], state: &mut [&mut [F]]) {
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

fn train(
    opt: &mut dyn Optimizer,
    model: &candle_nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> anyhow::Result<f32> {
    let mut sched = CosineAnnealingLR::new(opt, 300, 0.0)?;
    for _ in 0..300 {
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

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // y = x W* + b* with W* = [2, -3, 0.5], b* = 1.
    let x = Tensor::randn(0f32, 1.0, (256, 3), &dev)?;
    let w_true = Tensor::new(&[[2f32], [-3.0], [0.5]], &dev)?;
    let y = x.matmul(&w_true)?.affine(1.0, 1.0)?;

    for which in ["Lion", "AdamW"] {
        let varmap = VarMap::new();
        let model = candle_nn::linear(
            3,
            1,
            VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("fc"),
        )?;
        let mut opt: Box<dyn Optimizer> = match which {
            "Lion" => Box::new(GenericOptimizer::from_varmap(
                &varmap,
                Lion {
                    lr: 0.05,
                    beta1: 0.9,
                    beta2: 0.99,
                    weight_decay: 0.0,
                },
            )?),
            _ => Box::new(AdamW::from_varmap(
                &varmap,
                AdamWConfig {
                    lr: 0.1,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )?),
        };
        let loss = train(opt.as_mut(), &model, &x, &y)?;
        println!(
            "{which:>5}: final mse {loss:.2e}, weights {:?}",
            model.weight().flatten_all()?.to_vec1::<f32>()?
        );
        // State saving works for new rules too (hyperparameters: lr only by default).
        let state = opt.state_bytes()?;
        println!("       state: {} bytes", state.len());
        anyhow::ensure!(loss < 1e-2, "{which} did not fit the problem (mse {loss})");
    }
    Ok(())
}
