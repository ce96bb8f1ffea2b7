//! The general training step: batches of any number of tensors, masked
//! losses, metrics fed by the step, and losses read back at logging points.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use minibatch_data::{Batch, DataLoader, TensorDataset};
use minibatch_optim::{varmap_vars, Sgd, SgdConfig};
use minibatch_train::checkpoint::{read_checkpoint, varmap_bytes};
use minibatch_train::{
    Accuracy, Control, Metric, Model, ProgressMode, StepOutput, TrainError, Trainer,
};
use rand::{Rng, SeedableRng};

/// 64 samples of (x: 3 floats, y: 1 float, mask: 1 float). y = x·(1, -2, 0.5)
/// where mask = 1; elsewhere y is garbage (±100) that the masked loss must
/// ignore.
fn masked_data(dev: &Device) -> (Vec<f32>, Vec<f32>, Vec<f32>, TensorDataset) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let n = 64;
    let x: Vec<f32> = (0..n * 3).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mask: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
    let y: Vec<f32> = (0..n)
        .map(|i| {
            if mask[i] == 0.0 {
                if i % 2 == 0 {
                    100.0
                } else {
                    -100.0
                }
            } else {
                x[3 * i] - 2.0 * x[3 * i + 1] + 0.5 * x[3 * i + 2]
            }
        })
        .collect();
    let ds = TensorDataset::new(vec![
        Tensor::from_vec(x.clone(), (n, 3), dev).unwrap(),
        Tensor::from_vec(y.clone(), (n, 1), dev).unwrap(),
        Tensor::from_vec(mask.clone(), (n, 1), dev).unwrap(),
    ])
    .unwrap();
    (x, y, mask, ds)
}

/// The masked mean squared error: Σ mask·(out - y)² / Σ mask.
fn masked_mse<M: Model>(model: &M, batch: &Batch, train: bool) -> candle_core::Result<StepOutput> {
    let [x, y, mask] = batch.tensors() else {
        candle_core::bail!("want (x, y, mask), got {} tensors", batch.tensors().len())
    };
    let err = (model.forward(x, train)? - y)?.sqr()?;
    let loss = (err * mask)?.sum_all()?.div(&mask.sum_all()?)?;
    Ok(StepOutput::new(loss))
}

fn linear_model(dev: &Device) -> (Linear, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let l = linear(3, 1, vb.pp("fc")).unwrap();
    // fixed initial weights, so the first loss can be computed by hand
    for (name, var) in varmap_vars(&vm).unwrap() {
        let t = if name == "fc.weight" {
            Tensor::new(&[[0.25f32, -0.5, 0.75]], dev).unwrap()
        } else {
            Tensor::new(&[0.125f32], dev).unwrap()
        };
        var.set(&t).unwrap();
    }
    (l, vm)
}

#[test]
fn a_masked_loss_trains_and_its_loss_is_the_hand_computed_one() {
    let dev = Device::Cpu;
    let (x, y, mask, ds) = masked_data(&dev);
    let loader = DataLoader::builder(ds).batch_size(16).build().unwrap();
    let (model, vm) = linear_model(&dev);
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut t = Trainer::builder(model, vm, loader, opt)
        .step(|m: &Linear, b: &Batch, train: bool| masked_mse(m, b, train))
        .epochs(60)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let h = t.fit().unwrap();

    // first step: samples 0..16 with the initial weights, by hand in f64
    let (w, b) = ([0.25f64, -0.5, 0.75], 0.125f64);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for i in 0..16 {
        let out = b + (0..3).map(|j| w[j] * f64::from(x[3 * i + j])).sum::<f64>();
        num += f64::from(mask[i]) * (out - f64::from(y[i])).powi(2);
        den += f64::from(mask[i]);
    }
    let first = h.steps[0].loss;
    assert!(
        (first - num / den).abs() < 1e-6 * (num / den),
        "first step loss {first}, by hand {}",
        num / den
    );
    // the garbage targets (±100) would dominate an unmasked loss
    assert!(first < 10.0, "{first}");
    let last = h.epochs.last().unwrap().train_loss;
    assert!(
        last < 1e-4,
        "the masked rule is linear and learnable: {last}"
    );
    assert_eq!(h.steps.len(), 60 * 4);
}

/// A classifier over (x, y, weight) batches whose step feeds the metrics.
#[test]
fn a_step_feeds_the_metrics_and_evaluation_uses_the_same_step() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1f32, 1.], [2., 1.5], [-1., -1.], [-2., -0.5]], &dev).unwrap();
    let y = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
    let w = Tensor::new(&[1f32, 1., 1., 0.], &dev).unwrap();
    let loader = DataLoader::builder(TensorDataset::new(vec![x, y, w]).unwrap())
        .batch_size(2)
        .shuffle(1)
        .build()
        .unwrap();
    let vm = VarMap::new();
    let model = linear(2, 2, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let calls = Rc::new(RefCell::new(Vec::new()));
    let c2 = calls.clone();
    let mut t = Trainer::builder(model, vm, loader.clone(), opt)
        .step(move |m: &Linear, b: &Batch, train: bool| {
            c2.borrow_mut().push(train);
            let [x, y, w] = b.tensors() else {
                candle_core::bail!("want 3 tensors")
            };
            let logits = Module::forward(m, x)?;
            // sample-weighted cross-entropy
            let logp = candle_nn::ops::log_softmax(&logits, 1)?;
            let picked = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?;
            let loss = ((picked * w)?.sum_all()? / -(w.sum_all()?.to_scalar::<f32>()? as f64))?;
            Ok(StepOutput::new(loss).with_metrics(logits.detach(), y.clone()))
        })
        .metric(Accuracy::default())
        .val_loader(loader.clone())
        .epochs(20)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let h = t.fit().unwrap();
    let last = h.epochs.last().unwrap();
    assert_eq!(last.train_metrics["accuracy"], 1.0);
    assert_eq!(last.val_metrics["accuracy"], 1.0);
    assert!(last.val_loss.unwrap() < h.epochs[0].val_loss.unwrap());
    // 2 train batches and 2 validation batches per epoch
    assert_eq!(calls.borrow().len(), 20 * 4);
    assert_eq!(calls.borrow().iter().filter(|&&t| t).count(), 40);
    let ev = t.evaluate(&loader).unwrap();
    assert_eq!(ev.samples, 4);
    assert_eq!(ev.metrics["accuracy"], 1.0);
}

#[test]
fn misconfigured_steps_are_errors() {
    let dev = Device::Cpu;
    let (_, _, _, ds) = masked_data(&dev);
    let loader = DataLoader::builder(ds).batch_size(16).build().unwrap();
    let build = |with_loss: bool, with_metric: bool| {
        let (model, vm) = linear_model(&dev);
        let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
        let mut b = Trainer::builder(model, vm, loader.clone(), opt)
            .step(|m: &Linear, b: &Batch, train: bool| masked_mse(m, b, train))
            .progress(ProgressMode::Silent);
        if with_loss {
            b = b.loss(minibatch_train::mse);
        }
        if with_metric {
            b = b.metric(minibatch_train::MeanAbsoluteError::default());
        }
        b.build()
    };
    let err = build(true, false).err().unwrap();
    assert!(err.to_string().contains("both loss and step"), "{err}");
    // a metric but a step that returns nothing for it
    let err = build(false, true).unwrap().fit().unwrap_err();
    assert!(
        matches!(&err, TrainError::Config(m) if m.contains("\"mae\"") && m.contains("with_metrics")),
        "{err}"
    );
    // the default (inputs, targets) step on 3-tensor batches
    let (model, vm) = linear_model(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let err = Trainer::builder(model, vm, loader.clone(), opt)
        .loss(minibatch_train::mse)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap()
        .fit()
        .unwrap_err();
    assert!(err.to_string().contains("batches of 2 tensors"), "{err}");
}

type Snapshots = Rc<RefCell<Vec<(u64, f64, Vec<u8>)>>>;
type Logged = Result<Vec<(u64, f64)>, TrainError>;

/// Trains the masked model for 3 epochs with `log_every` and returns the
/// history's (step, loss) pairs, what the step callback saw (step, loss,
/// weights when called) and the final weights.
fn run_logged(
    log_every: Option<u64>,
    nan_at: Option<usize>,
    ckpt: Option<&std::path::Path>,
) -> (Logged, Snapshots, Vec<u8>) {
    let dev = Device::Cpu;
    let (_, _, _, ds) = masked_data(&dev);
    let loader = DataLoader::builder(ds)
        .batch_size(8)
        .shuffle(5)
        .build()
        .unwrap();
    let (model, vm) = linear_model(&dev);
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let seen: Snapshots = Rc::new(RefCell::new(Vec::new()));
    let (s2, vm2) = (seen.clone(), vm.clone());
    let calls = Rc::new(RefCell::new(0usize));
    let mut b = Trainer::builder(model, vm.clone(), loader, opt)
        .step(move |m: &Linear, b: &Batch, train: bool| {
            let out = masked_mse(m, b, train)?;
            *calls.borrow_mut() += 1;
            if nan_at == Some(*calls.borrow()) {
                return Ok(StepOutput::new((out.loss * f64::NAN)?));
            }
            Ok(out)
        })
        .accumulate(3)
        .on_step(move |r| {
            s2.borrow_mut()
                .push((r.step, r.loss, varmap_bytes(&vm2).unwrap()));
            Ok(Control::Continue)
        })
        .epochs(3)
        .progress(ProgressMode::Silent);
    if let Some(n) = log_every {
        b = b.log_every_steps(n);
    }
    if let Some(dir) = ckpt {
        b = b.checkpoint_dir(dir).checkpoint_every_steps(2);
    }
    let mut t = b.build().unwrap();
    let h = t
        .fit()
        .map(|h| h.steps.iter().map(|s| (s.step, s.loss)).collect());
    (h, seen, varmap_bytes(&vm).unwrap())
}

#[test]
fn losses_read_at_logging_points_give_the_same_history() {
    let (eager, eager_seen, eager_w) = run_logged(None, None, None);
    let (late, late_seen, late_w) = run_logged(Some(5), None, None);
    let (eager, late) = (eager.unwrap(), late.unwrap());
    // 8 batches per epoch, accumulate 3: 3 steps per epoch
    assert_eq!(eager.len(), 9);
    assert_eq!(
        eager, late,
        "every step's exact loss, read once per 5 steps"
    );
    assert_eq!(eager_w, late_w);
    let steps = |s: &Snapshots| {
        s.borrow()
            .iter()
            .map(|(s, l, _)| (*s, *l))
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&eager_seen), eager);
    assert_eq!(steps(&late_seen), eager);
    // step callbacks run at the logging points: with 5, those of steps 0-2
    // at the end of epoch 0 (after step 2), those of steps 3 and 4 after
    // step 4 (the 5th), that of step 5 at the end of epoch 1
    let w_after = |s: &Snapshots, i: usize| s.borrow()[i].2.clone();
    assert_eq!(w_after(&late_seen, 0), w_after(&eager_seen, 2));
    assert_eq!(w_after(&late_seen, 3), w_after(&eager_seen, 4));
    assert_eq!(w_after(&late_seen, 5), w_after(&eager_seen, 5));
    assert_ne!(w_after(&late_seen, 0), w_after(&eager_seen, 0));
}

#[test]
fn a_non_finite_loss_read_late_stops_at_the_next_logging_point() {
    // micro-batch 10 (step 3, epoch 1, batch 1) returns NaN
    let dir = tempfile::tempdir().unwrap();
    let (eager, eager_seen, eager_w) = run_logged(None, Some(10), None);
    let err = eager.unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::NonFiniteLoss {
                step: 3,
                epoch: 1,
                batch: 1,
                ..
            }
        ),
        "{err}"
    );
    // read every step: stopped before step 3's update
    assert_eq!(eager_seen.borrow().len(), 3);
    assert_eq!(eager_w, eager_seen.borrow()[2].2);

    let (late, late_seen, late_w) = run_logged(Some(5), Some(10), Some(dir.path()));
    let err = late.unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::NonFiniteLoss {
                step: 3,
                epoch: 1,
                batch: 1,
                ..
            }
        ),
        "{err}"
    );
    // read at the checkpoint due after step 3 (every 2 steps; the 4th):
    // step 3's update was applied, but that checkpoint was not written; the
    // last one is the end of epoch 0 (3 steps), a logging point too
    let losses = |s: &Snapshots| s.borrow().iter().map(|s| s.1).collect::<Vec<_>>();
    assert_eq!(losses(&late_seen), losses(&eager_seen));
    assert_ne!(late_w, eager_w);
    let ck = read_checkpoint(dir.path()).unwrap();
    assert_eq!(ck.state.run.step, 3);
    assert_eq!(
        ck.model,
        eager_seen.borrow()[2].2,
        "checkpoint = weights after 3 steps"
    );
    let saved: Vec<f64> = ck.state.run.history.steps.iter().map(|s| s.loss).collect();
    assert_eq!(saved, losses(&eager_seen));
}

/// The device path of `Accuracy` (outputs of rank 3 run it on the CPU too)
/// keeps its count on the device and agrees with the host path.
#[test]
fn accuracy_tensor_path_matches_the_host_path() {
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let logits: Vec<f32> = (0..2 * 5 * 4)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let labels: Vec<u32> = (0..10).map(|_| rng.random_range(0u32..4)).collect();
    let l3 = Tensor::from_vec(logits, (2, 5, 4), &dev).unwrap();
    let y2 = Tensor::from_vec(labels, (2, 5), &dev).unwrap();
    let (mut host, mut device) = (Accuracy::default(), Accuracy::default());
    for _ in 0..3 {
        host.update(&l3.reshape((10, 4)).unwrap(), &y2.flatten_all().unwrap())
            .unwrap();
        device.update(&l3, &y2).unwrap();
    }
    assert_eq!(host.value(), device.value());
    assert_eq!(host.state(), device.state());
    let mut back = Accuracy::default();
    back.load_state(&device.state()).unwrap();
    assert_eq!(back.value(), host.value());
    assert!(back.load_state(&serde_json::json!({"correct": 1})).is_err());
    let bad = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    assert!(device.update(&bad.unsqueeze(0).unwrap(), &y2).is_err());
}

#[test]
fn max_steps_reached_at_the_end_of_an_epoch_stops_there() {
    let dev = Device::Cpu;
    let (_, _, _, ds) = masked_data(&dev);
    let loader = DataLoader::builder(ds).batch_size(16).build().unwrap();
    let (model, vm) = linear_model(&dev);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let mut t = Trainer::builder(model, vm, loader, opt)
        .step(|m: &Linear, b: &Batch, train: bool| masked_mse(m, b, train))
        .max_steps(8)
        .epochs(5)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let h = t.fit().unwrap();
    assert_eq!((h.steps.len(), h.epochs.len()), (8, 2));
    assert_eq!(t.position(), (2, 0));
}
