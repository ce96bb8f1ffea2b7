//! Trainer behaviour: bit-identical resume, NaN detection, early stopping,
//! checkpoint validation, gradient accumulation.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use minibatch_data::{available_devices, DataLoader, Dataset, FnDataset, TensorDataset};
use minibatch_optim::schedule::{PlateauMode, ThresholdMode};
use minibatch_optim::{
    varmap_vars, LrScheduler, Norm, OneCycleLR, ReduceLROnPlateau, Sgd, SgdConfig, StepLR,
};
use minibatch_train::checkpoint::{load_weights, read_checkpoint, varmap_bytes};
use minibatch_train::{
    Clip, Control, EarlyStopping, Mode, ProgressMode, ScheduleEvery, TrainError, Trainer,
};
use rand::{Rng, SeedableRng};

struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.relu()?)
    }
}

fn mlp(dev: &Device) -> (Mlp, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let m = Mlp {
        l1: linear(10, 16, vb.pp("l1")).unwrap(),
        l2: linear(16, 3, vb.pp("l2")).unwrap(),
    };
    (m, vm)
}

/// The bytes of an [`mlp`]'s weights drawn from a seeded ChaCha8 stream
/// (uniform in ±0.3), for tests whose assertions depend on the trajectory
/// (candle's own initialisation is not seeded).
fn seeded_init(dev: &Device, seed: u64) -> Vec<u8> {
    let (_, vm) = mlp(dev);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (_, var) in varmap_vars(&vm).unwrap() {
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-0.3f32..0.3))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), dev).unwrap())
            .unwrap();
    }
    varmap_bytes(&vm).unwrap()
}

/// 200 points in 10-D, 3 classes given by a fixed linear rule (learnable).
fn dataset(n: usize, seed: u64, dev: &Device) -> TensorDataset {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let xs: Vec<f32> = (0..n * 10)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let ys: Vec<u32> = xs
        .chunks(10)
        .map(|r| {
            let a = r[0] + r[1] - r[2];
            if a > 0.4 {
                0
            } else if a < -0.4 {
                1
            } else {
                2
            }
        })
        .collect();
    let x = Tensor::from_vec(xs, (n, 10), dev).unwrap();
    let y = Tensor::from_vec(ys, n, dev).unwrap();
    TensorDataset::new(vec![x, y]).unwrap()
}

/// With `workers > 0` the samples come through an `FnDataset` (not an
/// in-memory dataset), so the loader really builds batches on its workers.
fn loader(dev: &Device, batch: usize, workers: usize) -> DataLoader {
    let ds = dataset(200, 7, dev);
    let b = if workers == 0 {
        DataLoader::builder(ds)
    } else {
        DataLoader::builder(FnDataset::new(ds.len(), move |i| ds.get(i)))
    };
    let l = b
        .batch_size(batch)
        .shuffle(42)
        .num_workers(workers)
        .build()
        .unwrap();
    assert_eq!(l.uses_workers(), workers > 0);
    l
}

struct Setup {
    /// OneCycleLR stepped per optimizer step instead of StepLR per epoch
    step_schedule: bool,
    accumulate: usize,
    clip: Option<Clip>,
    workers: usize,
}

fn trainer(
    dev: &Device,
    init: &[u8],
    s: &Setup,
    record: Rc<RefCell<Vec<Vec<u8>>>>,
) -> minibatch_train::TrainerBuilder<Mlp> {
    let (model, vm) = mlp(dev);
    load_weights(&vm, init, std::path::Path::new("init")).unwrap();
    let mut opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let (sched, every): (Box<dyn LrScheduler>, _) = if s.step_schedule {
        (
            Box::new(OneCycleLR::new(&mut opt, 0.2, 30).unwrap()),
            ScheduleEvery::Step,
        )
    } else {
        (
            Box::new(StepLR::new(&mut opt, 1, 0.7).unwrap()),
            ScheduleEvery::Epoch,
        )
    };
    let vm2 = vm.clone();
    let mut b = Trainer::builder(model, vm, loader(dev, 32, s.workers), opt)
        .scheduler(sched, every)
        .accumulate(s.accumulate)
        .epochs(3)
        .progress(ProgressMode::Silent)
        .on_step(move |_| {
            record.borrow_mut().push(varmap_bytes(&vm2).unwrap());
            Ok(Control::Continue)
        });
    if let Some(c) = s.clip {
        b = b.clip(c);
    }
    b
}

fn check_resume(s: Setup, k: u64) {
    let dev = Device::Cpu;
    let init = varmap_bytes(&mlp(&dev).1).unwrap();

    let straight = Rc::new(RefCell::new(Vec::new()));
    let mut a = trainer(&dev, &init, &s, straight.clone()).build().unwrap();
    a.fit().unwrap();
    let n = straight.borrow().len() as u64;
    assert!(n > k + 3, "need steps after the resume point ({n})");

    let dir = tempfile::tempdir().unwrap();
    let first = Rc::new(RefCell::new(Vec::new()));
    let mut b = trainer(&dev, &init, &s, first.clone())
        .checkpoint_dir(dir.path())
        .checkpoint_every_epoch(false)
        .max_steps(k)
        .build()
        .unwrap();
    b.fit().unwrap();
    assert_eq!(b.global_step(), k);
    drop(b);
    assert_eq!(first.borrow().len() as u64, k);

    // fresh random weights: the checkpoint must overwrite them all
    let second = Rc::new(RefCell::new(Vec::new()));
    let fresh = varmap_bytes(&mlp(&dev).1).unwrap();
    let mut c = trainer(&dev, &fresh, &s, second.clone())
        .resume_from(dir.path())
        .build()
        .unwrap();
    assert_eq!(c.global_step(), k);
    c.fit().unwrap();
    let second = second.borrow();
    assert_eq!(second.len() as u64, n - k);
    for (i, w) in second.iter().enumerate() {
        let step = k as usize + i;
        assert!(
            w == &straight.borrow()[step],
            "weights differ from the uninterrupted run after step {step}"
        );
    }
    assert_eq!(c.history().steps.len() as u64, n);
    assert_eq!(c.history().epochs.len(), 3);
    let a_losses: Vec<f64> = a.history().steps.iter().map(|s| s.loss).collect();
    let c_losses: Vec<f64> = c.history().steps.iter().map(|s| s.loss).collect();
    assert_eq!(a_losses, c_losses);
}

#[test]
fn resume_mid_epoch_is_bit_identical() {
    // 7 batches per epoch; resume at step 10 = epoch 1, batch 3
    check_resume(
        Setup {
            step_schedule: false,
            accumulate: 1,
            clip: None,
            workers: 0,
        },
        10,
    );
}

#[test]
fn resume_with_accumulation_clipping_and_workers_is_bit_identical() {
    // 7 batches, accumulate 2 -> 4 steps per epoch (last one a single micro-batch)
    check_resume(
        Setup {
            step_schedule: true,
            accumulate: 2,
            clip: Some(Clip::Norm {
                max_norm: 0.5,
                norm: Norm::L2,
            }),
            workers: 2,
        },
        5,
    );
}

#[test]
fn nan_loss_stops_with_step_and_keeps_last_good_checkpoint() {
    for dev in available_devices() {
        let (model, vm) = mlp(&dev);
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let calls = Rc::new(Cell::new(0u32));
        let c2 = calls.clone();
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Rc::new(RefCell::new(Vec::new()));
        let (s2, vm2) = (snapshots.clone(), vm.clone());
        let mut t = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
            .loss(move |o, y| {
                c2.set(c2.get() + 1);
                let l = candle_nn::loss::cross_entropy(o, y)?;
                if c2.get() > 5 {
                    l * f64::NAN
                } else {
                    Ok(l)
                }
            })
            .checkpoint_dir(dir.path())
            .checkpoint_every_steps(2)
            .epochs(2)
            .progress(ProgressMode::Silent)
            .on_step(move |_| {
                s2.borrow_mut().push(varmap_bytes(&vm2).unwrap());
                Ok(Control::Continue)
            })
            .build()
            .unwrap();
        let err = t.fit().unwrap_err();
        match &err {
            TrainError::NonFiniteLoss { step, .. } => assert_eq!(*step, 5),
            other => panic!("expected NonFiniteLoss, got {other}"),
        }
        assert!(err.to_string().contains("step 5"), "{err}");
        let ck = read_checkpoint(dir.path()).unwrap();
        assert_eq!(ck.state.run.step, 4);
        assert_eq!(
            ck.model,
            snapshots.borrow()[3],
            "checkpoint = weights after step 4"
        );
        // weights were not touched by the NaN step
        assert_eq!(varmap_bytes(t.varmap()).unwrap(), snapshots.borrow()[4]);
    }
}

#[test]
fn early_stopping_ends_training_and_history_shows_it() {
    for dev in available_devices() {
        let (model, vm) = mlp(&dev);
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.05,
                ..Default::default()
            },
        )
        .unwrap();
        let val = DataLoader::builder(dataset(64, 9, &dev))
            .batch_size(64)
            .build()
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
            .val_loader(val)
            // an improvement must beat the best by 10: never after the first epoch
            .callback(
                EarlyStopping::new("val_loss", Mode::Min)
                    .patience(1)
                    .min_delta(10.0),
            )
            .epochs(10)
            .out_dir(out.path())
            .progress(ProgressMode::Silent)
            .build()
            .unwrap();
        let h = t.fit().unwrap();
        assert_eq!(
            h.epochs.len(),
            3,
            "best at epoch 0, two bad epochs > patience 1"
        );
        let e = &h.epochs[2];
        assert!(e.val_loss.unwrap().is_finite());
        assert!((0.0..=1.0).contains(&e.val_metrics["accuracy"]));
        for f in [
            "history_epochs.csv",
            "history_steps.csv",
            "history.json",
            "history.svg",
        ] {
            assert!(out.path().join(f).is_file(), "{f} missing");
        }
        let csv = std::fs::read_to_string(out.path().join("history_epochs.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4);
    }
}

#[test]
fn training_learns_the_synthetic_rule() {
    for dev in available_devices() {
        let (model, vm) = mlp(&dev);
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        let mut t = Trainer::builder(model, vm, loader(&dev, 16, 0), opt)
            .epochs(40)
            .progress(ProgressMode::Silent)
            .build()
            .unwrap();
        let h = t.fit().unwrap();
        let last = h.epochs.last().unwrap();
        assert!(last.train_loss < h.epochs[0].train_loss * 0.5);
        assert!(last.train_metrics["accuracy"] > 0.85, "{last:?}");
        assert_eq!(h.steps.len(), 40 * 13);
    }
}

#[test]
fn mismatched_or_corrupt_checkpoints_are_clear_errors() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (model, vm) = mlp(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let mut t = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
        .checkpoint_dir(dir.path())
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    t.fit().unwrap();

    // different batch size
    let (model, vm) = mlp(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev, 50, 0), opt)
        .resume_from(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("batches") && err.contains("per epoch"),
        "{err}"
    );

    // different model shape
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let model = Mlp {
        l1: linear(10, 8, vb.pp("l1")).unwrap(),
        l2: linear(8, 3, vb.pp("l2")).unwrap(),
    };
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
        .resume_from(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model mismatch"), "{err}");

    // truncated weights file
    let ck = read_checkpoint(dir.path()).unwrap().path;
    let f = ck.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let (model, vm) = mlp(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
        .resume_from(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn invalid_settings_are_typed_errors() {
    let dev = Device::Cpu;
    let (model, vm) = mlp(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
        .accumulate(0)
        .build()
        .err()
        .unwrap();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    let (model, vm) = mlp(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
        .clip(Clip::Value(-1.0))
        .build()
        .err()
        .unwrap();
    assert!(err.to_string().contains("clip value"), "{err}");
}

/// Resume at an epoch boundary with a validation loader, ReduceLROnPlateau on
/// `val_loss` and EarlyStopping: weights, learning rates and the stopping
/// epoch match the uninterrupted run.
#[test]
fn resume_at_epoch_boundary_restores_plateau_schedule_and_early_stopping() {
    let dev = Device::Cpu;
    // Seeded: whether the plateau cut comes before early stopping depends on
    // the trajectory, which must not vary from run to run.
    let init = seeded_init(&dev, 7);
    let build = |ckpt: Option<&std::path::Path>, resume: bool, epochs: u64| {
        let (model, vm) = mlp(&dev);
        load_weights(&vm, &init, std::path::Path::new("init")).unwrap();
        let mut opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.5,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        // patience 0: every epoch without a 1% relative improvement halves the lr
        let plateau = ReduceLROnPlateau::with_options(
            &mut opt,
            PlateauMode::Min,
            0.5,
            0,
            1e-2,
            ThresholdMode::Rel,
            0,
            0.0,
            1e-8,
        )
        .unwrap();
        let val = DataLoader::builder(dataset(64, 9, &dev))
            .batch_size(32)
            .build()
            .unwrap();
        let mut b = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
            .val_loader(val)
            .scheduler(plateau, ScheduleEvery::EpochOnMetric("val_loss".into()))
            .callback(
                EarlyStopping::new("val_accuracy", Mode::Max)
                    .patience(2)
                    .min_delta(0.02),
            )
            .epochs(epochs)
            .progress(ProgressMode::Silent);
        if let Some(dir) = ckpt {
            b = b.checkpoint_dir(dir);
            if resume {
                b = b.resume_from(dir);
            }
        }
        b.build().unwrap()
    };
    let mut a = build(None, false, 30);
    a.fit().unwrap();
    let stopped_after = a.history().epochs.len();
    assert!(stopped_after < 30, "early stopping should end this run");

    let dir = tempfile::tempdir().unwrap();
    let mut b = build(Some(dir.path()), false, 2);
    b.fit().unwrap();
    assert_eq!(b.position(), (2, 0));
    drop(b);
    let mut c = build(Some(dir.path()), true, 30);
    c.fit().unwrap();
    assert_eq!(c.history().epochs.len(), stopped_after);
    assert_eq!(
        varmap_bytes(c.varmap()).unwrap(),
        varmap_bytes(a.varmap()).unwrap()
    );
    let lrs = |t: &Trainer<Mlp>| t.history().steps.iter().map(|s| s.lr).collect::<Vec<_>>();
    assert_eq!(lrs(&c), lrs(&a));
    let first = lrs(&a)[0];
    assert!(
        lrs(&a).iter().any(|&l| l < first),
        "the plateau schedule should have cut the lr"
    );
    assert_eq!(
        c.history().epochs,
        a.history()
            .epochs
            .iter()
            .map(|e| {
                // timings differ between runs; everything else must not
                let mut e = e.clone();
                let r = &c.history().epochs[e.epoch as usize];
                e.epoch_time_s = r.epoch_time_s;
                e.samples_per_s = r.samples_per_s;
                e.data_wait_share = r.data_wait_share;
                e
            })
            .collect::<Vec<_>>()
    );
}

/// A corrupt newest checkpoint (a flipped byte in its weights) and a broken
/// one before it (a field missing from its trainer.json): resuming from the
/// newest valid one skips both, names them, and the run continues to the
/// same weights as an uninterrupted one.
#[test]
fn resume_falls_back_past_corrupt_checkpoints_to_identical_weights() {
    let dev = Device::Cpu;
    let s = Setup {
        step_schedule: false,
        accumulate: 1,
        clip: None,
        workers: 0,
    };
    let init = varmap_bytes(&mlp(&dev).1).unwrap();
    let straight = Rc::new(RefCell::new(Vec::new()));
    let mut a = trainer(&dev, &init, &s, straight.clone()).build().unwrap();
    a.fit().unwrap();
    let n = straight.borrow().len();

    let dir = tempfile::tempdir().unwrap();
    let mut b = trainer(&dev, &init, &s, Rc::default())
        .checkpoint_dir(dir.path())
        .checkpoint_every_epoch(false)
        .checkpoint_every_steps(4)
        .max_steps(12)
        .build()
        .unwrap();
    b.fit().unwrap();
    drop(b);
    let ck = |step: u64| dir.path().join(format!("step-{step:09}"));
    let model = ck(12).join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&model, &bytes).unwrap();
    let state = ck(8).join("trainer.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    json["run"]
        .as_object_mut()
        .unwrap()
        .remove("micro_batches")
        .unwrap();
    std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();

    // the plain resume follows `latest` and stops at the corrupt file
    let err = trainer(&dev, &init, &s, Rc::default())
        .resume_from(dir.path())
        .build()
        .err()
        .unwrap();
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");

    let second = Rc::new(RefCell::new(Vec::new()));
    let fresh = varmap_bytes(&mlp(&dev).1).unwrap();
    let mut c = trainer(&dev, &fresh, &s, second.clone())
        .resume_from_latest_valid(dir.path())
        .checkpoint_dir(dir.path())
        .checkpoint_every_epoch(false)
        .checkpoint_every_steps(4)
        .build()
        .unwrap();
    let skipped = c.skipped_checkpoints();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].path, ck(12));
    assert!(
        skipped[0].reason.contains("corrupt"),
        "{}",
        skipped[0].reason
    );
    assert_eq!(skipped[1].path, ck(8));
    assert!(
        skipped[1].reason.contains("micro_batches"),
        "{}",
        skipped[1].reason
    );
    assert_eq!(c.global_step(), 4);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest")).unwrap(),
        "step-000000004\n"
    );
    c.fit().unwrap();
    let second = second.borrow();
    assert_eq!(second.len(), n - 4);
    for (i, w) in second.iter().enumerate() {
        assert!(
            w == &straight.borrow()[4 + i],
            "weights differ from the uninterrupted run after step {}",
            4 + i
        );
    }
    assert_eq!(
        c.history().steps,
        a.history().steps,
        "the same losses and lrs"
    );
    // the corrupt step-12 was written again on the way (step-8 too, then
    // pruned by keep_last 3: 12, 16, 20 remain)
    assert_eq!(read_checkpoint(&ck(12)).unwrap().state.run.step, 12);
    assert!(!ck(8).exists());
}

/// Two EarlyStopping callbacks: their states are saved under their own keys
/// and each comes back to its own callback.
#[test]
fn two_early_stoppings_keep_their_own_state_across_a_resume() {
    let dev = Device::Cpu;
    let init = seeded_init(&dev, 3);
    let build = |with_second: bool| {
        let (model, vm) = mlp(&dev);
        load_weights(&vm, &init, std::path::Path::new("init")).unwrap();
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let val = DataLoader::builder(dataset(64, 9, &dev))
            .batch_size(32)
            .build()
            .unwrap();
        let mut b = Trainer::builder(model, vm, loader(&dev, 32, 0), opt)
            .val_loader(val)
            .callback(EarlyStopping::new("val_loss", Mode::Min).patience(10))
            .epochs(2)
            .progress(ProgressMode::Silent);
        if with_second {
            b = b.callback(EarlyStopping::new("train_accuracy", Mode::Max).patience(10));
        }
        b
    };
    let dir = tempfile::tempdir().unwrap();
    let mut t = build(true).checkpoint_dir(dir.path()).build().unwrap();
    t.fit().unwrap();
    let saved = read_checkpoint(dir.path()).unwrap().state.callbacks;
    let best = |k: &str| saved[k]["best"].as_f64().unwrap();
    let h = t.history();
    let val_best = h
        .epochs
        .iter()
        .map(|e| e.val_loss.unwrap())
        .fold(f64::INFINITY, f64::min);
    let acc_best = h
        .epochs
        .iter()
        .map(|e| e.train_metrics["accuracy"])
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(best("early_stopping#0"), val_best);
    assert_eq!(best("early_stopping#1"), acc_best);
    assert_ne!(val_best, acc_best);

    let mut r = build(true).resume_from(dir.path()).build().unwrap();
    let again = tempfile::tempdir().unwrap();
    r.save_checkpoint_to(again.path()).unwrap();
    assert_eq!(
        read_checkpoint(again.path()).unwrap().state.callbacks,
        saved
    );

    // a saved state without its callback is an error naming it
    let err = build(false)
        .resume_from(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("early_stopping#1"), "{err}");
}
