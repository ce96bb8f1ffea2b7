//! Trainer resume: bit-identical mid-epoch and at epoch boundaries, with
//! dropout, accumulation, clipping and workers, past corrupt checkpoints.

mod train_support;
use train_support::*;

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::Device;
use minibatch_data::DataLoader;
use minibatch_optim::schedule::{PlateauMode, ThresholdMode};
use minibatch_optim::{Norm, ReduceLROnPlateau, Sgd, SgdConfig};
use minibatch_train::checkpoint::{load_weights, read_checkpoint, varmap_bytes};
use minibatch_train::{
    Clip, EarlyStopping, Mode, ProgressMode, ScheduleEvery, TrainError, Trainer,
};

#[test]
fn resume_mid_epoch_is_bit_identical() {
    // 7 batches per epoch; resume at step 10 = epoch 1, batch 3
    check_resume(
        Setup {
            step_schedule: false,
            accumulate: 1,
            clip: None,
            workers: 0,
            dropout: false,
        },
        10,
    );
}

/// `minibatch_nn::Dropout` draws its masks from (seed, step, layer), the
/// step being the trainer's global micro-batch index: a resumed run draws the
/// same masks, so it stays bit-identical (with accumulation, mid-step).
#[test]
fn resume_with_dropout_is_bit_identical() {
    check_resume(
        Setup {
            step_schedule: false,
            accumulate: 2,
            clip: None,
            workers: 0,
            dropout: true,
        },
        6,
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
            dropout: false,
        },
        5,
    );
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
        dropout: false,
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
