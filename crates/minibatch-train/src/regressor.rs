//! [`MiniBatchRegressor`]: linear regression fitted by mini-batch gradient
//! descent, in the style of scikit-learn's `SGDRegressor`.

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use minibatch_data::{DataLoader, TensorDataset};
use minibatch_optim::{Sgd, SgdConfig};

use crate::error::{Result, TrainError};
use crate::loss::mse;
use crate::progress::ProgressMode;
use crate::trainer::Trainer;

/// Linear regression `y = x . coef_ + intercept_` trained with mean squared
/// error by mini-batch SGD through [`Trainer`] (seeded shuffling each epoch).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_train::MiniBatchRegressor;
/// let dev = Device::Cpu;
/// // y = 2 x + 1
/// let x = Tensor::new(&[[0f32], [1.], [2.], [3.]], &dev)?;
/// let y = Tensor::new(&[1f32, 3., 5., 7.], &dev)?;
/// let mut reg = MiniBatchRegressor::new().lr(0.05).epochs(500).batch_size(2);
/// reg.fit(&x, &y)?;
/// assert!((reg.coef_[0] - 2.0).abs() < 1e-2 && (reg.intercept_ - 1.0).abs() < 1e-2);
/// let p = reg.predict(&Tensor::new(&[[10f32]], &dev)?)?;
/// assert!((p.to_vec1::<f32>()?[0] - 21.0).abs() < 0.1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct MiniBatchRegressor {
    lr: f64,
    epochs: u64,
    batch_size: usize,
    momentum: f64,
    seed: u64,
    fit_intercept: bool,
    /// Fitted coefficients, one per feature (empty before `fit`).
    pub coef_: Vec<f64>,
    /// Fitted intercept (0 before `fit`, or without an intercept).
    pub intercept_: f64,
    /// Mean training loss (MSE) of every epoch of the last `fit`.
    pub loss_curve_: Vec<f64>,
}

impl Default for MiniBatchRegressor {
    fn default() -> Self {
        Self::new()
    }
}

impl MiniBatchRegressor {
    /// lr 0.01, 100 epochs, batch size 32, no momentum, seed 0, with intercept.
    pub fn new() -> Self {
        Self {
            lr: 0.01,
            epochs: 100,
            batch_size: 32,
            momentum: 0.0,
            seed: 0,
            fit_intercept: true,
            coef_: Vec::new(),
            intercept_: 0.0,
            loss_curve_: Vec::new(),
        }
    }
    /// Learning rate.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    /// Number of passes over the data.
    pub fn epochs(mut self, epochs: u64) -> Self {
        self.epochs = epochs;
        self
    }
    /// Samples per update.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// SGD momentum (0 = plain mini-batch gradient descent).
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }
    /// Seed of the per-epoch shuffling.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Whether to fit an intercept (default true).
    pub fn fit_intercept(mut self, on: bool) -> Self {
        self.fit_intercept = on;
        self
    }

    /// Fits on `x` `(n, d)` and `y` `(n,)` (or `(n, 1)`), starting from zeros.
    pub fn fit(&mut self, x: &Tensor, y: &Tensor) -> Result<&mut Self> {
        let (n, d) = x.dims2().map_err(|_| {
            TrainError::Config(format!("x must be (samples, features), got {:?}", x.dims()))
        })?;
        if y.elem_count() != n {
            return Err(TrainError::Config(format!(
                "x has {n} samples but y has {} values",
                y.elem_count()
            )));
        }
        if self.epochs == 0 || self.lr.is_nan() || self.lr <= 0.0 {
            return Err(TrainError::Config(format!(
                "epochs must be >= 1 and lr > 0 (got {} and {})",
                self.epochs, self.lr
            )));
        }
        let dtype = match x.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let dev = x.device();
        let x = x.to_dtype(dtype)?;
        let y = y.to_dtype(dtype)?.reshape(n)?;
        let w = Var::zeros((d, 1), dtype, dev)?;
        let b = Var::zeros(1, dtype, dev)?;
        let vm = VarMap::new();
        {
            let mut data = vm
                .data()
                .lock()
                .map_err(|_| TrainError::Config("VarMap lock poisoned".into()))?;
            data.insert("weight".into(), w.clone());
            if self.fit_intercept {
                data.insert("bias".into(), b.clone());
            }
        }
        let loader = DataLoader::builder(TensorDataset::new(vec![x, y])?)
            .batch_size(self.batch_size)
            .shuffle(self.seed)
            .build()?;
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: self.lr,
                momentum: self.momentum,
                ..Default::default()
            },
        )?;
        let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
        let model = move |x: &Tensor| x.matmul(&wt)?.broadcast_add(&bt);
        let mut trainer = Trainer::builder(model, vm, loader, opt)
            .loss(mse)
            .epochs(self.epochs)
            .progress(ProgressMode::Silent)
            .build()?;
        let history = trainer.fit()?;
        self.loss_curve_ = history.epochs.iter().map(|e| e.train_loss).collect();
        self.coef_ = w
            .as_tensor()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        self.intercept_ = b.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        Ok(self)
    }

    /// Predictions `(n,)` for `x` `(n, d)`, in `x`'s float dtype.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let (_, d) = x.dims2().map_err(|_| {
            TrainError::Config(format!("x must be (samples, features), got {:?}", x.dims()))
        })?;
        if self.coef_.is_empty() {
            return Err(TrainError::Config("predict called before fit".into()));
        }
        if d != self.coef_.len() {
            return Err(TrainError::Config(format!(
                "x has {d} features, the model was fitted on {}",
                self.coef_.len()
            )));
        }
        let dtype = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let w = Tensor::new(self.coef_.as_slice(), x.device())?
            .to_dtype(dtype)?
            .reshape((d, 1))?;
        let out = (x.to_dtype(dtype)?.matmul(&w)? + self.intercept_)?;
        Ok(out.flatten_all()?)
    }
}

impl MiniBatchRegressor {
    /// The coefficient of determination of the predictions for `x` against
    /// `y` (scikit-learn's `score`, `r2_score`):
    ///
    /// R² = 1 − Σᵢ (yᵢ − ŷᵢ)² / Σᵢ (yᵢ − ȳ)²
    ///
    /// computed in f64. 1 is a perfect fit, 0 is no better than predicting the
    /// mean, and it is negative for worse. A constant `y` gives 1 for a
    /// perfect fit and 0 otherwise (scikit-learn's `force_finite`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use minibatch_train::MiniBatchRegressor;
    /// let dev = Device::Cpu;
    /// let x = Tensor::new(&[[0f32], [1.], [2.], [3.]], &dev)?;
    /// let y = Tensor::new(&[1f32, 3., 5., 7.], &dev)?;
    /// let mut reg = MiniBatchRegressor::new().lr(0.05).epochs(500).batch_size(2);
    /// reg.fit(&x, &y)?;
    /// assert!(reg.score(&x, &y)? > 0.999);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn score(&self, x: &Tensor, y: &Tensor) -> Result<f64> {
        let pred = self.predict(x)?;
        if y.elem_count() != pred.elem_count() {
            return Err(TrainError::Config(format!(
                "x has {} samples but y has {} values",
                pred.elem_count(),
                y.elem_count()
            )));
        }
        let p = pred.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let t = y.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        r2_score(&t, &p)
    }
}

/// The coefficient of determination R² = 1 − Σ(t − p)² / Σ(t − t̄)² of
/// predictions `pred` for targets `target`: scikit-learn's
/// `r2_score(y_true, y_pred)`, same argument order. 1 is a perfect fit, 0 the
/// mean's; it is negative for fits worse than the mean. Constant targets
/// give 1 for a perfect prediction and 0 otherwise (scikit-learn's
/// `force_finite`). [`MiniBatchRegressor::score`] computes it from tensors.
///
/// Errors ([`TrainError::Config`]): lengths that differ, no element, or a
/// NaN or infinite value.
///
/// ```
/// use minibatch_train::regressor::r2_score;
/// assert_eq!(r2_score(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0])?, 1.0);
/// assert_eq!(r2_score(&[1.0, 2.0, 3.0], &[2.0, 2.0, 2.0])?, 0.0);
/// assert!(r2_score(&[1.0, 2.0, 3.0], &[1.0, 2.0]).is_err());
/// # Ok::<(), minibatch_train::TrainError>(())
/// ```
pub fn r2_score(target: &[f64], pred: &[f64]) -> Result<f64> {
    if target.len() != pred.len() {
        return Err(TrainError::Config(format!(
            "r2_score: {} targets but {} predictions",
            target.len(),
            pred.len()
        )));
    }
    if target.is_empty() {
        return Err(TrainError::Config("r2_score: no element".into()));
    }
    if let Some(v) = target.iter().chain(pred).find(|v| !v.is_finite()) {
        return Err(TrainError::Config(format!("r2_score: a value is {v}")));
    }
    let n = target.len() as f64;
    let mean = target.iter().sum::<f64>() / n;
    let ss_res: f64 = target.iter().zip(pred).map(|(t, p)| (t - p).powi(2)).sum();
    let ss_tot: f64 = target.iter().map(|t| (t - mean).powi(2)).sum();
    if ss_tot == 0.0 {
        return Ok(if ss_res == 0.0 { 1.0 } else { 0.0 });
    }
    Ok(1.0 - ss_res / ss_tot)
}

/// Ordinary least squares with an intercept, in closed form: the baseline a
/// [`MiniBatchRegressor`] is measured against (scikit-learn's
/// `LinearRegression`). Solves the normal equations `[X 1]ᵀ[X 1] w = [X 1]ᵀ y`
/// in f64 by Gaussian elimination with partial pivoting and returns
/// `(coef, intercept)`.
///
/// `x` is `(n, f)` and `y` `(n,)` (any float dtype, any device). An empty
/// `x`, lengths that differ or collinear columns (a singular system) are
/// [`TrainError::Config`] errors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use minibatch_train::regressor::least_squares;
/// // y = 2 x0 - x1 + 3
/// let x = Tensor::new(&[[0f32, 1.], [1., 0.], [2., 2.], [3., 1.]], &Device::Cpu)?;
/// let y = Tensor::new(&[2f32, 5., 5., 8.], &Device::Cpu)?;
/// let (coef, intercept) = least_squares(&x, &y)?;
/// assert!((coef[0] - 2.0).abs() < 1e-9 && (coef[1] + 1.0).abs() < 1e-9);
/// assert!((intercept - 3.0).abs() < 1e-9);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn least_squares(x: &Tensor, y: &Tensor) -> Result<(Vec<f64>, f64)> {
    let x = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let y = y.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if x.is_empty() || x.len() != y.len() {
        return Err(TrainError::Config(format!(
            "least_squares: {} rows of x and {} targets (need the same, at least one)",
            x.len(),
            y.len()
        )));
    }
    let d = x[0].len() + 1;
    // The augmented system [A | b], A = [X 1]ᵀ[X 1], b = [X 1]ᵀ y.
    let mut a = vec![vec![0f64; d + 1]; d];
    for (row, &t) in x.iter().zip(&y) {
        let r: Vec<f64> = row.iter().copied().chain([1.0]).collect();
        for (ai, &ri) in a.iter_mut().zip(&r) {
            for (aij, &rj) in ai.iter_mut().zip(&r) {
                *aij += ri * rj;
            }
            ai[d] += ri * t;
        }
    }
    for c in 0..d {
        let p = (c..d)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        a.swap(c, p);
        let pivot = a[c].clone();
        if pivot[c].abs() < 1e-12 * (1.0 + pivot.iter().map(|v| v.abs()).fold(0.0, f64::max)) {
            return Err(TrainError::Config(
                "least_squares: the columns of x are collinear (singular normal equations)".into(),
            ));
        }
        for (i, ai) in a.iter_mut().enumerate() {
            if i != c {
                let f = ai[c] / pivot[c];
                for (aij, &pj) in ai.iter_mut().zip(&pivot).skip(c) {
                    *aij -= f * pj;
                }
            }
        }
    }
    let w: Vec<f64> = a.iter().enumerate().map(|(i, ai)| ai[d] / ai[i]).collect();
    Ok((w[..d - 1].to_vec(), w[d - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    #[test]
    fn recovers_a_synthetic_linear_rule() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 500;
        let xs: Vec<f32> = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ys: Vec<f32> = xs
            .chunks(3)
            .map(|r| 3.0 * r[0] - 2.0 * r[1] + 0.5 * r[2] + 1.5 + rng.random_range(-0.01..0.01))
            .collect();
        let x = Tensor::from_vec(xs, (n, 3), &dev).unwrap();
        let y = Tensor::from_vec(ys, n, &dev).unwrap();
        let mut reg = MiniBatchRegressor::new()
            .lr(0.1)
            .epochs(30)
            .batch_size(16)
            .momentum(0.5);
        reg.fit(&x, &y).unwrap();
        for (got, want) in reg.coef_.iter().zip([3.0, -2.0, 0.5]) {
            assert!((got - want).abs() < 0.02, "{:?}", reg.coef_);
        }
        assert!((reg.intercept_ - 1.5).abs() < 0.02, "{}", reg.intercept_);
        assert!(reg.loss_curve_.last().unwrap() < &1e-3);
        let p = reg.predict(&x).unwrap();
        assert_eq!(p.dims(), &[n]);
        assert!(reg
            .predict(&Tensor::zeros((2, 4), DType::F32, &dev).unwrap())
            .is_err());
        let err = MiniBatchRegressor::new()
            .fit(&x, &Tensor::zeros(3, DType::F32, &dev).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("500 samples"), "{err}");
    }
}
