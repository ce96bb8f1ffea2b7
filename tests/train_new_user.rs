//! What a new user meets in the first hour (issue 18), written as a user
//! would, with `minibatch::` paths only: seeded runs that repeat, an
//! optimizer built too early, frozen parameters, a regression without
//! `.loss(mse)`, a resume that takes the checkpoint's learning rate, and
//! checkpoint directories that are byte-identical across identical runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minibatch::prelude::*;

mod train_support;

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}
impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

fn mlp(varmap: &VarMap, seed: u64, device: &Device) -> Mlp {
    let vb = seeded_var_builder(varmap, seed, DType::F32, device);
    Mlp {
        fc1: linear(10, 16, vb.pp("fc1")).unwrap(),
        fc2: linear(16, 3, vb.pp("fc2")).unwrap(),
    }
}

fn loaders(device: &Device) -> (DataLoader, DataLoader) {
    let train = train_support::dataset(200, 7, device);
    let val = train_support::dataset(64, 8, device);
    (
        DataLoader::builder(train)
            .batch_size(32)
            .shuffle(42)
            .build()
            .unwrap(),
        DataLoader::builder(val).batch_size(64).build().unwrap(),
    )
}

fn sgd(varmap: &VarMap, lr: f64) -> Sgd {
    Sgd::from_varmap(
        varmap,
        SgdConfig {
            lr,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A README-style program: seeded weights, the optimizer after the model, a
/// shuffled loader, a schedule, a validation loader. Returns every step's
/// loss and the final weights.
fn readme_style_run(seed: u64) -> (Vec<f64>, Vec<u8>) {
    let device = Device::Cpu;
    let (train, val) = loaders(&device);
    let varmap = VarMap::new();
    let model = mlp(&varmap, seed, &device);
    let mut opt = sgd(&varmap, 0.1);
    let sched = CosineAnnealingLR::new(&mut opt, 3, 0.0).unwrap();
    let mut trainer = Trainer::builder(model, varmap, train, opt)
        .val_loader(val)
        .scheduler(sched, ScheduleEvery::Epoch)
        .epochs(3)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let history = trainer.fit().unwrap();
    let losses = history.steps.iter().map(|s| s.loss).collect();
    let weights = minibatch::train::checkpoint::varmap_bytes(trainer.varmap()).unwrap();
    (losses, weights)
}

#[test]
fn two_fresh_runs_of_a_seeded_program_give_identical_losses() {
    let (a, wa) = readme_style_run(42);
    let (b, wb) = readme_style_run(42);
    assert_eq!(a.len(), 21, "7 steps an epoch, 3 epochs");
    assert!(a.iter().all(|l| l.is_finite()), "{a:?}");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&a),
        bits(&b),
        "the same seed must give the same losses"
    );
    assert_eq!(wa, wb);
    // the seed matters: another one starts (and so runs) elsewhere
    let (c, _) = readme_style_run(43);
    assert_ne!(a[0].to_bits(), c[0].to_bits());
    assert!(a.last() < a.first(), "it trains: {a:?}");
}

#[test]
fn an_optimizer_built_before_the_model_is_a_build_error() {
    let device = Device::Cpu;
    let (train, _) = loaders(&device);
    let varmap = VarMap::new();
    let opt = sgd(&varmap, 0.1); // too early: the VarMap is still empty
    let model = mlp(&varmap, 0, &device);
    let err = Trainer::builder(model, varmap, train, opt)
        .progress(ProgressMode::Silent)
        .build()
        .err()
        .expect("an optimizer without parameters must not build")
        .to_string();
    assert!(err.contains("holds no parameter"), "{err}");
    assert!(err.contains("before the model"), "{err}");
    assert!(err.contains("4 parameter(s)"), "{err}");
}

#[test]
fn parameters_the_optimizer_lacks_are_named_as_frozen() {
    let device = Device::Cpu;
    let (train, _) = loaders(&device);
    let varmap = VarMap::new();
    let model = mlp(&varmap, 0, &device);
    let fc1: Vec<Var> = minibatch::optim::varmap_vars(&varmap)
        .unwrap()
        .into_iter()
        .filter(|(name, _)| name.starts_with("fc1."))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(fc1.len(), 2);
    let opt = Sgd::new(fc1, SgdConfig::default()).unwrap();
    let frozen_before = minibatch::train::checkpoint::varmap_bytes(&varmap).unwrap();
    let mut trainer = Trainer::builder(model, varmap, train, opt)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    assert_eq!(trainer.frozen_parameters(), ["fc2.bias", "fc2.weight"]);
    trainer.fit().unwrap();
    // fc2 did not move, fc1 did
    let after = minibatch::optim::varmap_vars(trainer.varmap()).unwrap();
    let before: BTreeMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&frozen_before, &device)
            .unwrap()
            .into_iter()
            .collect();
    for (name, var) in after {
        let same = var
            .as_tensor()
            .eq(&before[&name])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
            .iter()
            .all(|&e| e == 1);
        assert_eq!(same, name.starts_with("fc2."), "{name}");
    }

    // all parameters in the optimizer: nothing frozen
    let varmap = VarMap::new();
    let model = mlp(&varmap, 0, &device);
    let opt = sgd(&varmap, 0.1);
    let t = Trainer::builder(model, varmap, loaders(&device).0, opt)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    assert!(t.frozen_parameters().is_empty());
}

#[test]
fn regression_targets_with_the_default_loss_say_to_call_loss_mse() {
    let device = Device::Cpu;
    let x = Tensor::ones((8, 3), DType::F32, &device).unwrap();
    let y = Tensor::zeros(8, DType::F32, &device).unwrap();
    let make = || {
        let loader = DataLoader::builder(TensorDataset::new(vec![x.clone(), y.clone()]).unwrap())
            .batch_size(4)
            .build()
            .unwrap();
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 0, DType::F32, &device);
        let fc = linear(3, 1, vb).unwrap();
        let opt = sgd(&varmap, 0.01);
        Trainer::builder(fc, varmap, loader, opt).progress(ProgressMode::Silent)
    };
    let err = make().build().unwrap().fit().err().unwrap().to_string();
    assert!(err.contains("default loss is cross-entropy"), "{err}");
    assert!(err.contains(".loss(mse)"), "{err}");
    // with the loss it trains: (batch, 1) outputs against (batch,) targets
    let mut t = make().loss(mse).build().unwrap();
    t.fit().unwrap();
    assert!(t.history().epochs[0].train_loss.is_finite());
}

#[test]
fn mse_compares_element_by_element_and_never_broadcasts() {
    let device = Device::Cpu;
    let out = Tensor::new(&[[1f32], [2.], [3.], [5.]], &device).unwrap();
    let y = Tensor::new(&[1f32, 2., 3., 4.], &device).unwrap();
    // one meaning for every name of it
    for f in [mse, minibatch::nn::loss::mse, minibatch::train::mse] {
        assert_eq!(f(&out, &y).unwrap().to_scalar::<f32>().unwrap(), 0.25);
        assert_eq!(f(&y, &out).unwrap().to_scalar::<f32>().unwrap(), 0.25);
        let y64 = y.to_dtype(DType::F64).unwrap();
        assert_eq!(f(&out, &y64).unwrap().to_scalar::<f32>().unwrap(), 0.25);
        let wide = out.repeat((1, 2)).unwrap(); // (4, 2) against (4,)
        let err = f(&wide, &y).unwrap_err().to_string();
        assert!(err.contains("[4, 2]") && err.contains("[4]"), "{err}");
    }
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn checkpointed(
    ckpt: &Path,
    out: &Path,
    lr: f64,
    max_steps: Option<u64>,
    resume: bool,
) -> Trainer<Mlp> {
    let device = Device::Cpu;
    let (train, val) = loaders(&device);
    let varmap = VarMap::new();
    let model = mlp(&varmap, 5, &device);
    let mut opt = sgd(&varmap, lr);
    let sched = StepLR::new(&mut opt, 1, 0.5).unwrap();
    let mut b = Trainer::builder(model, varmap, train, opt)
        .val_loader(val)
        .scheduler(sched, ScheduleEvery::Epoch)
        .callback(EarlyStopping::new("val_loss", Mode::Min).patience(5))
        .checkpoint_dir(ckpt)
        .checkpoint_every_steps(5)
        .keep_last(2)
        .save_best("val_accuracy", Mode::Max)
        .out_dir(out)
        .epochs(4)
        .progress(ProgressMode::Silent);
    if let Some(n) = max_steps {
        b = b.max_steps(n);
    }
    if resume {
        b = b.resume_from(ckpt);
    }
    b.build().unwrap()
}

#[test]
fn identical_runs_write_byte_identical_checkpoint_directories() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b] {
        let mut t = checkpointed(
            &d.path().join("ckpt"),
            &d.path().join("out"),
            0.1,
            None,
            false,
        );
        t.fit().unwrap();
        assert_eq!(t.history().epochs.len(), 4);
    }
    let (ta, tb) = (tree(&a.path().join("ckpt")), tree(&b.path().join("ckpt")));
    let names: Vec<String> = ta.keys().map(|p| p.display().to_string()).collect();
    assert!(names.contains(&"latest".to_string()), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("best-step-")),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.ends_with("trainer.json")).count(),
        3,
        "two step-* and one best-step-*: {names:?}"
    );
    for (path, bytes) in &ta {
        let other = tb
            .get(path)
            .unwrap_or_else(|| panic!("{} only in one run", path.display()));
        assert!(
            bytes == other,
            "{} differs between identical runs",
            path.display()
        );
        if path.ends_with("trainer.json") {
            let text = String::from_utf8(bytes.clone()).unwrap();
            for timing in ["epoch_time_s", "samples_per_s", "data_wait_share", "wait_s"] {
                assert!(!text.contains(timing), "{timing} in {}", path.display());
            }
        }
    }
    assert_eq!(ta.len(), tb.len());
    // the timings are in the history files, outside the checkpoint directory
    let csv = std::fs::read_to_string(a.path().join("out/history_epochs.csv")).unwrap();
    let row = csv.lines().nth(1).unwrap();
    assert!(!row.ends_with(",,,"), "timings missing: {row}");
}

#[test]
fn a_resume_says_which_settings_came_from_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let (ckpt, out) = (d.path().join("ckpt"), d.path().join("out"));
    let mut first = checkpointed(&ckpt, &out, 0.1, Some(10), false);
    first.fit().unwrap();
    assert_eq!(first.position(), (1, 3), "stopped mid-epoch 1");
    assert!(first.resume_note().is_none());
    let lr_saved = first.optimizer().learning_rate();
    drop(first);

    let mut resumed = checkpointed(&ckpt, &out, 0.5, None, true);
    let note = resumed.resume_note().expect("a resume note").to_string();
    assert_eq!(resumed.optimizer().learning_rate(), lr_saved);
    assert!(note.contains("epoch 1, batch 3 of 7, step 10"), "{note}");
    assert!(
        note.contains(&format!(
            "lr {lr_saved}, in place of the 0.5 it was built with"
        )),
        "{note}"
    );
    assert!(
        note.contains("schedule state") && note.contains("history (1 epoch(s)"),
        "{note}"
    );
    // epoch 0 ran before the resume: its timings come from out/history.json
    let e0 = &resumed.history().epochs[0];
    assert!(e0.epoch_time_s.is_some_and(|t| t > 0.0), "{e0:?}");
    resumed.fit().unwrap();
    assert_eq!(resumed.history().epochs.len(), 4);

    // without the history file the earlier timings are unknown, not made up
    std::fs::remove_dir_all(&out).unwrap();
    let resumed = checkpointed(&ckpt, &out, 0.1, None, true);
    assert!(resumed
        .resume_note()
        .unwrap()
        .contains("epoch 4, batch 0 of 7"));
    assert_eq!(resumed.history().epochs.len(), 4);
    assert!(resumed
        .history()
        .epochs
        .iter()
        .all(|e| e.epoch_time_s.is_none()));
}
