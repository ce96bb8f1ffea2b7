//! A short real-MNIST run on a subset through the Trainer: accuracy must be
//! far above chance (10%).

mod common;

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use minibatch_data::{available_devices, mnist, DataLoader, Dataset, Subset};
use minibatch_optim::{Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};
use std::sync::Arc;

struct Mlp(Linear, Linear);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.relu()?)
    }
}

#[test]
fn mnist_subset_reaches_high_accuracy() {
    for dev in available_devices() {
        let (train, test) = mnist::load(common::mnist_dir(), &dev).unwrap();
        let train: Arc<dyn Dataset> = Arc::new(train);
        let test: Arc<dyn Dataset> = Arc::new(test);
        let train = Subset::new(train, (0..4000).collect()).unwrap();
        let test = Subset::new(test, (0..1000).collect()).unwrap();
        let loader = DataLoader::builder(train)
            .batch_size(64)
            .shuffle(1)
            .build()
            .unwrap();
        let val = DataLoader::builder(test).batch_size(500).build().unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let model = Mlp(
            linear(784, 64, vb.pp("fc1")).unwrap(),
            linear(64, 10, vb.pp("fc2")).unwrap(),
        );
        let opt = Sgd::from_varmap(
            &vm,
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        let mut t = Trainer::builder(model, vm, loader, opt)
            .val_loader(val)
            .epochs(3)
            .progress(ProgressMode::Silent)
            .build()
            .unwrap();
        let h = t.fit().unwrap();
        let acc = h.epochs.last().unwrap().val_metrics["accuracy"];
        assert!(acc > 0.85, "test accuracy {acc} on {dev:?}");
        assert!(h.epochs[2].train_loss < h.epochs[0].train_loss);
    }
}
