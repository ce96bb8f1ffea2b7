//! The model, data and trainer set-up shared by `train_loop.rs` and
//! `train_resume.rs`.
#![allow(dead_code)]

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use minibatch_data::{DataLoader, Dataset, FnDataset, TensorDataset};
use minibatch_optim::{varmap_vars, LrScheduler, OneCycleLR, Sgd, SgdConfig, StepLR};
use minibatch_train::checkpoint::{load_weights, varmap_bytes};
use minibatch_train::{Clip, Control, ProgressMode, ScheduleEvery, Trainer};
use rand::{Rng, SeedableRng};

pub struct Mlp {
    pub l1: Linear,
    pub l2: Linear,
    /// dropout on the hidden layer (`Setup::dropout`)
    pub drop: Option<minibatch_nn::Dropout>,
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.l1.forward(x)?.relu()?;
        let h = match &self.drop {
            Some(d) => d.forward(&h, train)?,
            None => h,
        };
        self.l2.forward(&h)
    }
}

pub fn mlp(dev: &Device) -> (Mlp, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let m = Mlp {
        l1: linear(10, 16, vb.pp("l1")).unwrap(),
        l2: linear(16, 3, vb.pp("l2")).unwrap(),
        drop: None,
    };
    (m, vm)
}

/// The bytes of an [`mlp`]'s weights drawn from a seeded ChaCha8 stream
/// (uniform in ±0.3), for tests whose assertions depend on the trajectory
/// (candle's own initialisation is not seeded).
pub fn seeded_init(dev: &Device, seed: u64) -> Vec<u8> {
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
pub fn dataset(n: usize, seed: u64, dev: &Device) -> TensorDataset {
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
pub fn loader(dev: &Device, batch: usize, workers: usize) -> DataLoader {
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

pub struct Setup {
    /// OneCycleLR stepped per optimizer step instead of StepLR per epoch
    pub step_schedule: bool,
    pub accumulate: usize,
    pub clip: Option<Clip>,
    pub workers: usize,
    /// `minibatch_nn::Dropout(0.3)` on the hidden layer
    pub dropout: bool,
}

pub fn trainer(
    dev: &Device,
    init: &[u8],
    s: &Setup,
    record: Rc<RefCell<Vec<Vec<u8>>>>,
) -> minibatch_train::TrainerBuilder<Mlp> {
    let (mut model, vm) = mlp(dev);
    if s.dropout {
        model.drop = Some(minibatch_nn::Dropout::new(0.3));
    }
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

pub fn check_resume(s: Setup, k: u64) {
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
