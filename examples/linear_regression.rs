//! The classic mini-batch gradient-descent demo, through minibatch's
//! DataLoader, optimizer and Trainer.
//!
//! X = [[1,2],[1,3],[1,4]] (the first column is the bias), y = [2,5,9],
//! theta = 0, lr 0.01, batch size 2, shuffled every epoch, MSE loss.
//! Prints theta after 100 epochs beside the least-squares solution, then how
//! far more epochs and momentum get; then `MiniBatchRegressor` on a
//! synthetic problem; finally the lesson on real data: the diabetes table
//! (`data/diabetes`, 442 patients, 10 features, the lesson's 353/89 split)
//! read with `csv::load`, `MiniBatchRegressor` fitted on the train rows, and
//! its test R² beside the closed-form least-squares fit (scikit-learn's
//! `LinearRegression` gets 0.4399 there, the lesson's regressor 0.451-0.455).
//!
//! `cargo run --release --example linear_regression`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use minibatch::data::csv::{self, CsvOptions};
use minibatch::data::{DataLoader, TensorDataset};
use minibatch::optim::{Sgd, SgdConfig};
use minibatch::train::regressor::{self, r2_score};
use minibatch::train::{mse, MiniBatchRegressor, ProgressMode, Trainer};
use rand::{Rng, SeedableRng};

/// Trains theta from zeros; returns (theta, final epoch loss).
fn train(x: &Tensor, y: &Tensor, epochs: u64, momentum: f64) -> Result<(Vec<f64>, f64)> {
    let dev = x.device();
    let theta = Var::zeros((2, 1), DType::F64, dev)?;
    let vm = VarMap::new();
    vm.data()
        .lock()
        .unwrap()
        .insert("theta".into(), theta.clone());
    let loader = DataLoader::builder(TensorDataset::new(vec![x.clone(), y.clone()])?)
        .batch_size(2)
        .shuffle(0)
        .build()?;
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.01,
            momentum,
            ..Default::default()
        },
    )?;
    let t = theta.as_tensor().clone();
    let model = move |x: &Tensor| x.matmul(&t);
    // note: candle's mse is the mean over the batch, like PyTorch's MSELoss
    let mut trainer = Trainer::builder(model, vm, loader, opt)
        .loss(mse)
        .epochs(epochs)
        .progress(ProgressMode::Silent)
        .build()?;
    let h = trainer.fit()?;
    let loss = h.epochs.last().map(|e| e.train_loss).unwrap_or(f64::NAN);
    Ok((theta.as_tensor().flatten_all()?.to_vec1::<f64>()?, loss))
}

/// Closed-form least squares for two columns: (X^T X)^-1 X^T y.
fn least_squares(x: &[[f64; 2]], y: &[f64]) -> [f64; 2] {
    let (mut a, mut b, mut d, mut u, mut v) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (r, &t) in x.iter().zip(y) {
        a += r[0] * r[0];
        b += r[0] * r[1];
        d += r[1] * r[1];
        u += r[0] * t;
        v += r[1] * t;
    }
    let det = a * d - b * b;
    [(d * u - b * v) / det, (a * v - b * u) / det]
}

/// The diabetes part: csv::load, MiniBatchRegressor, closed form, test R².
fn diabetes() -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/diabetes/diabetes.csv");
    let opts = CsvOptions::default().target("target").drop(&["split"]);
    let load = |split: &str| -> Result<(Tensor, Tensor)> {
        let ds = csv::load(path, &opts.clone().rows_where("split", split))?;
        let t = ds.into_tensors();
        Ok((t[0].clone(), t[1].clone()))
    };
    let (xtr, ytr) = load("train")?;
    let (xte, yte) = load("test")?;
    println!(
        "\nDiabetes (data/diabetes/diabetes.csv via csv::load): {} train rows, {} test rows, {} features",
        xtr.dims()[0],
        xte.dims()[0],
        xtr.dims()[1]
    );
    let (lr, momentum, batch, epochs) = (0.01, 0.9, 35, 300);
    let mut reg = MiniBatchRegressor::new()
        .lr(lr)
        .momentum(momentum)
        .batch_size(batch)
        .epochs(epochs)
        .seed(0);
    reg.fit(&xtr, &ytr)?;
    let r2 = reg.score(&xte, &yte)?;
    let (coef, intercept) = regressor::least_squares(&xtr, &ytr)?;
    let pred: Vec<f64> = xte
        .to_vec2::<f32>()?
        .iter()
        .map(|r| r.iter().zip(&coef).map(|(&v, c)| v as f64 * c).sum::<f64>() + intercept)
        .collect();
    let target: Vec<f64> = yte.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
    let ls_r2 = r2_score(&target, &pred)?;
    let fmt = |c: &[f64]| {
        c.iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  {:<66} {:>8}", "model", "test R²");
    println!(
        "  {:<66} {:>8.4}",
        format!(
            "MiniBatchRegressor (lr {lr}, momentum {momentum}, batch {batch}, {epochs} epochs)"
        ),
        r2
    );
    println!("  {:<66} {:>8.4}", "closed-form least squares", ls_r2);
    println!(
        "  {:<66} {:>8}",
        "reference: scikit-learn LinearRegression", "0.4399"
    );
    println!(
        "  {:<66} {:>8}",
        "reference: the lesson's MiniBatchRegressor", "0.451-0.455"
    );
    println!(
        "  MiniBatchRegressor: intercept {:.3}, coef [{}]",
        reg.intercept_,
        fmt(&reg.coef_)
    );
    println!(
        "  least squares:      intercept {intercept:.3}, coef [{}]",
        fmt(&coef)
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let rows = [[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]];
    let ys = [2.0, 5.0, 9.0];
    let x = Tensor::new(&rows, &dev)?;
    let y = Tensor::new(&ys, &dev)?.reshape((3, 1))?;
    let ls = least_squares(&rows, &ys);
    let mse_of = |t: &[f64]| -> f64 {
        rows.iter()
            .zip(&ys)
            .map(|(r, y)| (r[0] * t[0] + r[1] * t[1] - y).powi(2))
            .sum::<f64>()
            / 3.0
    };
    println!(
        "least squares: theta = [{:.4}, {:.4}], MSE {:.4}",
        ls[0],
        ls[1],
        mse_of(&ls)
    );
    println!(
        "{:>8} {:>9} | {:>9} {:>9} | {:>9} {:>12}",
        "epochs", "momentum", "theta0", "theta1", "MSE", "dist to LS"
    );
    for (epochs, momentum) in [
        (100, 0.0),
        (1000, 0.0),
        (10000, 0.0),
        (100, 0.9),
        (1000, 0.9),
    ] {
        let (t, _) = train(&x, &y, epochs, momentum)?;
        let dist = ((t[0] - ls[0]).powi(2) + (t[1] - ls[1]).powi(2)).sqrt();
        println!(
            "{epochs:>8} {momentum:>9} | {:>9.4} {:>9.4} | {:>9.4} {:>12.4}",
            t[0],
            t[1],
            mse_of(&t),
            dist
        );
    }

    // MiniBatchRegressor on a synthetic problem: y = 4 x0 - 3 x1 + 2 + noise
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = 1000;
    let xs: Vec<f32> = (0..n * 2).map(|_| rng.random_range(-2.0..2.0)).collect();
    let ys: Vec<f32> = xs
        .chunks(2)
        .map(|r| 4.0 * r[0] - 3.0 * r[1] + 2.0 + rng.random_range(-0.1..0.1))
        .collect();
    let xt = Tensor::from_vec(xs, (n, 2), &dev)?;
    let yt = Tensor::from_vec(ys, n, &dev)?;
    let mut reg = MiniBatchRegressor::new().lr(0.05).epochs(20).batch_size(32);
    reg.fit(&xt, &yt)?;
    println!(
        "\nMiniBatchRegressor (lr 0.05, 20 epochs, batch 32) on y = 4 x0 - 3 x1 + 2 + U(-0.1, 0.1):\n  coef_ = [{:.4}, {:.4}], intercept_ = {:.4}, final epoch MSE {:.5}",
        reg.coef_[0],
        reg.coef_[1],
        reg.intercept_,
        reg.loss_curve_.last().copied().unwrap_or(f64::NAN)
    );
    let p = reg.predict(&Tensor::new(&[[1f32, 1.0]], &dev)?)?;
    println!("  predict([1, 1]) = {:.4} (true 3)", p.to_vec1::<f32>()?[0]);

    diabetes()
}
