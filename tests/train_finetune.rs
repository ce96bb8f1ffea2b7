//! Fine-tuning with the Trainer: a `select`ed subset of the parameters
//! trains (the rest stay bit-identical, the gradient guard looks only at the
//! trained ones), and an EMA of the weights kept by `AveragedWeights` is
//! saved in checkpoints and resumes to the bit.

mod train_support;
use train_support::*;

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::Module;
use minibatch_optim::{select, AveragedModel, Averaging, Sgd, SgdConfig};
use minibatch_train::checkpoint::{load_weights, varmap_bytes};
use minibatch_train::{AveragedWeights, ProgressMode, TrainError, Trainer};

/// `l1` sits behind a `detach`: it never gets a gradient (a frozen backbone).
struct FrozenBody(Mlp);

impl ModuleT for FrozenBody {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let h = self.0.l1.forward(x)?.relu()?.detach();
        self.0.l2.forward(&h)
    }
}

fn sgd_config() -> SgdConfig {
    SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    }
}

#[test]
fn a_selected_subset_trains_and_the_rest_stays_frozen() {
    let dev = Device::Cpu;
    let (model, vm) = mlp(&dev);
    load_weights(&vm, &seeded_init(&dev, 3), std::path::Path::new("init")).unwrap();
    let before = minibatch_optim::varmap_vars(&vm).unwrap();
    let snapshot: Vec<Vec<f32>> = before
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();

    // the whole VarMap: the guard stops on l1, which gets no gradient
    let opt = Sgd::from_varmap(&vm, sgd_config()).unwrap();
    let shared = Mlp {
        l1: model.l1.clone(),
        l2: model.l2.clone(),
        drop: None,
    };
    let mut all = Trainer::builder(FrozenBody(shared), vm.clone(), loader(&dev, 32, 0), opt)
        .epochs(1)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let e = all.fit().unwrap_err();
    assert!(matches!(e, TrainError::MissingGradients { .. }), "{e}");
    assert!(e.to_string().contains("l1.weight"), "{e}");

    // the head only: trains, and l1 is left bit for bit as it was
    load_weights(&vm, &seeded_init(&dev, 3), std::path::Path::new("init")).unwrap();
    let opt = Sgd::named(select(&vm, &["l2"]).unwrap(), sgd_config()).unwrap();
    let mut head = Trainer::builder(FrozenBody(model), vm.clone(), loader(&dev, 32, 0), opt)
        .epochs(2)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    head.fit().unwrap();
    let losses: Vec<f64> = head.history().epochs.iter().map(|e| e.train_loss).collect();
    assert!(losses[1] < losses[0], "the head learns: {losses:?}");
    for ((name, v), old) in before.iter().zip(&snapshot) {
        let now: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if name.starts_with("l1.") {
            assert_eq!(&now, old, "{name} is frozen");
        } else {
            assert_ne!(&now, old, "{name} trains");
        }
    }
    let trained: Vec<&String> = head.optimizer().param_groups()[0].names().iter().collect();
    assert_eq!(trained, ["l2.bias", "l2.weight"]);
}

fn new_ema(vm: &candle_nn::VarMap) -> AveragedWeights {
    let avg =
        AveragedModel::new(select(vm, &["l2"]).unwrap(), Averaging::Ema { decay: 0.9 }).unwrap();
    AveragedWeights::new(avg).start_at_step(2)
}

fn average_bits(ema: &AveragedWeights) -> Vec<Vec<u32>> {
    ema.model()
        .averages()
        .map(|(_, t)| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn averaged_weights_resume_to_the_bit_and_evaluate() {
    let dev = Device::Cpu;
    let init = seeded_init(&dev, 5);

    // uninterrupted: 3 epochs of 7 steps, averaging from step 2
    // (the average is built over the trainer's own Vars)
    let (model, vm) = mlp(&dev);
    load_weights(&vm, &init, std::path::Path::new("init")).unwrap();
    let ema_a = new_ema(&vm);
    let opt = Sgd::named(select(&vm, &["l2"]).unwrap(), sgd_config()).unwrap();
    let mut a = Trainer::builder(FrozenBody(model), vm.clone(), loader(&dev, 32, 0), opt)
        .epochs(3)
        .progress(ProgressMode::Silent)
        .callback(ema_a.clone())
        .build()
        .unwrap();
    a.fit().unwrap();
    let steps = a.global_step();
    assert_eq!(ema_a.model().n_averaged(), steps - 2);
    let want = average_bits(&ema_a);

    // evaluation with the averaged weights differs, and the trained ones come back
    let val = loader(&dev, 50, 0);
    let own = varmap_bytes(&vm).unwrap();
    let plain = a.evaluate(&val).unwrap();
    let averaged = ema_a.with_averaged(|| a.evaluate(&val)).unwrap().unwrap();
    assert_ne!(plain.loss, averaged.loss);
    assert_eq!(varmap_bytes(&vm).unwrap(), own);

    // interrupted at step 9 (mid-epoch), then resumed with fresh weights
    for stop in [9u64, 16] {
        let dir = tempfile::tempdir().unwrap();
        let (model, vm) = mlp(&dev);
        load_weights(&vm, &init, std::path::Path::new("init")).unwrap();
        let ema = new_ema(&vm);
        let opt = Sgd::named(select(&vm, &["l2"]).unwrap(), sgd_config()).unwrap();
        let mut b = Trainer::builder(FrozenBody(model), vm.clone(), loader(&dev, 32, 0), opt)
            .epochs(3)
            .progress(ProgressMode::Silent)
            .callback(ema.clone())
            .checkpoint_dir(dir.path())
            .checkpoint_every_epoch(false)
            .max_steps(stop)
            .build()
            .unwrap();
        b.fit().unwrap();
        drop(b);

        let (model, vm) = mlp(&dev);
        let ema = new_ema(&vm);
        let opt = Sgd::named(select(&vm, &["l2"]).unwrap(), sgd_config()).unwrap();
        let mut c = Trainer::builder(FrozenBody(model), vm.clone(), loader(&dev, 32, 0), opt)
            .epochs(3)
            .progress(ProgressMode::Silent)
            .callback(ema.clone())
            .resume_from(dir.path())
            .build()
            .unwrap();
        assert_eq!(
            ema.model().n_averaged(),
            stop - 2,
            "restored from the checkpoint"
        );
        c.fit().unwrap();
        assert_eq!(ema.model().n_averaged(), steps - 2);
        assert_eq!(average_bits(&ema), want, "resumed at step {stop}");

        // a callback set up differently refuses the saved average
        let (model, vm) = mlp(&dev);
        let other = AveragedWeights::new(
            AveragedModel::new(select(&vm, &["l2"]).unwrap(), Averaging::Ema { decay: 0.5 })
                .unwrap(),
        )
        .start_at_step(2);
        let opt = Sgd::named(select(&vm, &["l2"]).unwrap(), sgd_config()).unwrap();
        let r = Trainer::builder(FrozenBody(model), vm, loader(&dev, 32, 0), opt)
            .epochs(3)
            .progress(ProgressMode::Silent)
            .callback(other)
            .resume_from(dir.path())
            .build();
        assert!(
            r.is_err(),
            "an EMA of another decay must not resume this one"
        );
    }
}
