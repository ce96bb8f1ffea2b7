//! Trainer behaviour: NaN detection, early stopping, checkpoint validation,
//! gradient accumulation (resume: `train_resume.rs`).

mod train_support;
use train_support::*;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use candle_core::{DType, Device};
use candle_nn::{linear, VarBuilder, VarMap};
use minibatch_data::{available_devices, DataLoader};
use minibatch_optim::{Sgd, SgdConfig};
use minibatch_train::checkpoint::{read_checkpoint, varmap_bytes};
use minibatch_train::{Clip, Control, EarlyStopping, Mode, ProgressMode, TrainError, Trainer};

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
        drop: None,
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
