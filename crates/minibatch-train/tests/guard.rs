//! The trainer refuses setups that would train quietly wrong: parameters
//! that get no gradient (candle-nn's fused ops), an optimizer over another
//! VarMap, checkpoint settings without a directory.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, LayerNorm, Linear, VarBuilder, VarMap};
use minibatch_data::{DataLoader, TensorDataset};
use minibatch_optim::{Sgd, SgdConfig};
use minibatch_train::{params_without_grad, Mode, ProgressMode, TrainError, Trainer};
use rand::{Rng, SeedableRng};

fn loader(dev: &Device) -> DataLoader {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..32 * 4)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let y: Vec<u32> = (0..32).map(|i| (i % 3) as u32).collect();
    let ds = TensorDataset::new(vec![
        Tensor::from_vec(x, (32, 4), dev).unwrap(),
        Tensor::from_vec(y, 32, dev).unwrap(),
    ])
    .unwrap();
    DataLoader::builder(ds).batch_size(8).build().unwrap()
}

/// A Linear followed by one of candle-nn's fused ops without a backward.
enum Fused {
    LayerNorm(LayerNorm),
    SoftmaxLastDim,
}

struct Net {
    fc: Linear,
    fused: Fused,
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc.forward(x)?;
        match &self.fused {
            Fused::LayerNorm(ln) => ln.forward(&h),
            // log of the fused softmax: a valid log-probability for the loss
            Fused::SoftmaxLastDim => candle_nn::ops::softmax_last_dim(&h)?.log(),
        }
    }
}

fn net(dev: &Device, layer_norm: bool) -> (Net, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let fc = linear(4, 3, vb.pp("fc")).unwrap();
    let fused = if layer_norm {
        Fused::LayerNorm(candle_nn::layer_norm(3, 1e-5, vb.pp("ln")).unwrap())
    } else {
        Fused::SoftmaxLastDim
    };
    (Net { fc, fused }, vm)
}

fn trainer(layer_norm: bool, allow: bool) -> minibatch_train::Result<Trainer<Net>> {
    let dev = Device::Cpu;
    let (model, vm) = net(&dev, layer_norm);
    // a boxed optimizer, as chosen at run time, goes to the same builder
    let opt: Box<dyn minibatch_optim::Optimizer> =
        Box::new(Sgd::from_varmap(&vm, SgdConfig::default()).unwrap());
    let mut b = Trainer::builder(model, vm, loader(&dev), opt)
        .epochs(2)
        .progress(ProgressMode::Silent);
    if allow {
        b = b.allow_unused_parameters();
    }
    b.build()
}

#[test]
fn candle_nn_fused_ops_stop_training_naming_the_starved_parameters() {
    // softmax_last_dim: the Linear below it gets nothing
    let mut t = trainer(false, false).unwrap();
    let before = minibatch_train::checkpoint::varmap_bytes(t.varmap()).unwrap();
    let err = t.fit().unwrap_err();
    match &err {
        TrainError::MissingGradients { params } => assert_eq!(params, &["fc.bias", "fc.weight"]),
        other => panic!("expected MissingGradients, got {other}"),
    }
    let msg = err.to_string();
    for want in [
        "softmax_last_dim",
        "LayerNorm",
        "minibatch::nn",
        "allow_unused_parameters",
    ] {
        assert!(msg.contains(want), "{want} missing from: {msg}");
    }
    // stopped before the first update
    assert_eq!(
        minibatch_train::checkpoint::varmap_bytes(t.varmap()).unwrap(),
        before
    );
    assert!(t.history().steps.is_empty());

    // candle_nn::layer_norm: neither the Linear nor the norm's own weights
    let err = trainer(true, false).unwrap().fit().unwrap_err();
    match &err {
        TrainError::MissingGradients { params } => {
            assert_eq!(params, &["fc.bias", "fc.weight", "ln.bias", "ln.weight"])
        }
        other => panic!("expected MissingGradients, got {other}"),
    }
}

#[test]
fn the_opt_out_lets_such_a_model_run() {
    for layer_norm in [false, true] {
        let mut t = trainer(layer_norm, true).unwrap();
        let h = t.fit().unwrap();
        assert_eq!(h.steps.len(), 8);
    }
}

#[test]
fn the_helper_lists_parameters_without_gradient() {
    let dev = Device::Cpu;
    let (model, vm) = net(&dev, false);
    let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let loss = model.forward(&x).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        params_without_grad(&vm, &grads).unwrap(),
        ["fc.bias", "fc.weight"]
    );
    let loss = model.fc.forward(&x).unwrap().sum_all().unwrap();
    assert!(params_without_grad(&vm, &loss.backward().unwrap())
        .unwrap()
        .is_empty());
}

#[test]
fn an_optimizer_over_another_varmap_is_refused() {
    let dev = Device::Cpu;
    let (model, vm) = net(&dev, false);
    let (_, other) = net(&dev, false);
    let opt = Sgd::from_varmap(&other, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev), opt)
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("[\"fc.bias\", \"fc.weight\"] are not in the trainer's VarMap"),
        "{err}"
    );
    // a subset of the VarMap is fine: the rest is frozen
    let (model, vm) = net(&dev, true);
    let fc: Vec<_> = minibatch_optim::varmap_vars(&vm)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("fc."))
        .map(|(_, v)| v)
        .collect();
    let opt = Sgd::new(fc, SgdConfig::default()).unwrap();
    assert!(Trainer::builder(model, vm, loader(&dev), opt)
        .build()
        .is_ok());
}

#[test]
fn checkpoint_settings_apply_in_any_order() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (model, vm) = net(&dev, false);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    // every setting before checkpoint_dir: none may be dropped
    let mut t = Trainer::builder(model, vm, loader(&dev), opt)
        .allow_unused_parameters()
        .keep_last(1)
        .save_best("train_loss", Mode::Min)
        .checkpoint_every_epoch(false)
        .checkpoint_every_steps(3)
        .checkpoint_dir(dir.path())
        .epochs(3)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    t.fit().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    // 12 steps, every 3 -> steps 3, 6, 9, 12; keep_last 1; no extra epoch-end
    // checkpoint (epochs end at 4, 8); the best epoch is kept too
    assert_eq!(names.iter().filter(|n| n.starts_with("step-")).count(), 1);
    assert!(names.contains(&"step-000000012".to_string()), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("best-step-")),
        "{names:?}"
    );

    // and without a directory they are an error, not ignored
    let (model, vm) = net(&dev, false);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev), opt)
        .keep_last(2)
        .save_best("val_loss", Mode::Min)
        .build()
        .err()
        .unwrap();
    assert!(
        matches!(&err, TrainError::Config(m) if m.contains("keep_last, save_best given without checkpoint_dir")),
        "{err}"
    );
}
