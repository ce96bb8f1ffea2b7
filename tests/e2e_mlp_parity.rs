//! End-to-end parity with PyTorch: replays the `end_to_end` runs of the
//! reference directory (index.json) through our DataLoader (fixed order),
//! optimizer and Trainer, and compares per-step losses and final weights.
//!
//! Nothing about the run is hard-coded: batch size, steps and SGD
//! hyperparameters come from index.json, the hidden width from the tensors.

mod common;

use std::collections::HashMap;

use candle_core::Module;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use minibatch_data::{available_devices, DataLoader, FixedOrderSampler, TensorDataset};
use minibatch_nn::Linear;
use minibatch_optim::{Sgd, SgdConfig};
use minibatch_train::{ProgressMode, Trainer};

fn sgd_config(h: &serde_json::Value) -> SgdConfig {
    let f = |k: &str, d: f64| h.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let b = |k: &str| h.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    SgdConfig {
        lr: f("lr", 1e-3),
        momentum: f("momentum", 0.0),
        dampening: f("dampening", 0.0),
        weight_decay: f("weight_decay", 0.0),
        nesterov: b("nesterov"),
        maximize: b("maximize"),
    }
}

fn replay(case: &serde_json::Value, dev: &Device, lean: bool) {
    let file = common::reference_dir().join(case["file"].as_str().unwrap());
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&file, dev).unwrap();
    assert_eq!(
        case["optimizer"].as_str(),
        Some("SGD"),
        "only SGD runs are replayed"
    );
    let batch = case["batch_size"].as_u64().unwrap() as usize;
    let steps = case["steps"].as_u64().unwrap();
    let cfg = sgd_config(&case["hyperparameters"]);
    // on CUDA, matmul reductions run in another order (and may use TF32-free
    // but differently blocked kernels): 32 steps of momentum SGD drift ~1e-4.
    let tol = if dev.is_cpu() { 1e-4 } else { 1e-3 };

    let varmap = VarMap::new();
    let mut vars = HashMap::new();
    for name in ["w1", "b1", "w2", "b2"] {
        let v = Var::from_tensor(&t[name].to_dtype(DType::F32).unwrap()).unwrap();
        varmap
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), v.clone());
        vars.insert(name, v);
    }
    let hidden = vars["w1"].dims()[0];
    assert_eq!(vars["w2"].dims()[1], hidden);
    let (w1, b1, w2, b2) = (
        vars["w1"].as_tensor().clone(),
        vars["b1"].as_tensor().clone(),
        vars["w2"].as_tensor().clone(),
        vars["b2"].as_tensor().clone(),
    );
    let (fc1, fc2) = (
        Linear::new(w1.clone(), Some(b1.clone())),
        Linear::new(w2.clone(), Some(b2.clone())),
    );
    let model = move |x: &Tensor| -> candle_core::Result<Tensor> {
        if lean {
            fc2.forward(&fc1.forward(x)?.relu()?)
        } else {
            x.matmul(&w1.t()?)?
                .broadcast_add(&b1)?
                .relu()?
                .matmul(&w2.t()?)?
                .broadcast_add(&b2)
        }
    };

    let order: Vec<usize> = t["order"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let ds = TensorDataset::new(vec![t["x"].clone(), t["y"].clone()]).unwrap();
    let loader = DataLoader::builder(ds)
        .batch_size(batch)
        .sampler(FixedOrderSampler::new(order))
        .build()
        .unwrap();
    let per_epoch = loader.len() as u64;
    let opt = Sgd::from_varmap(&varmap, cfg).unwrap();
    let mut trainer = Trainer::builder(model, varmap, loader, opt)
        .epochs(steps.div_ceil(per_epoch))
        .max_steps(steps)
        .progress(ProgressMode::Silent)
        .build()
        .unwrap();
    let history = trainer.fit().unwrap();

    let want: Vec<f64> = t["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(history.steps.len() as u64, steps);
    assert_eq!(want.len() as u64, steps);
    for (s, (got, want)) in history.steps.iter().zip(&want).enumerate() {
        assert!(
            (got.loss - want).abs() < tol,
            "{} (lean Linear: {lean}): step {s} loss {} vs torch {want} on {dev:?}",
            file.display(),
            got.loss
        );
    }
    for name in ["w1", "b1", "w2", "b2"] {
        minibatch_testkit::assert_close(
            vars[name].as_tensor(),
            &t[&format!("{name}.final")],
            minibatch_testkit::Tol::abs(tol).strict(),
            &format!("{name}.final on {dev:?} (lean Linear: {lean})"),
        );
    }
}

#[test]
fn mlp_sgd_matches_pytorch_step_by_step() {
    let index = common::reference_index();
    let cases = index["end_to_end"].as_array().expect("end_to_end entries");
    assert!(!cases.is_empty());
    for dev in available_devices() {
        for case in cases {
            for lean in [false, true] {
                replay(case, &dev, lean);
            }
        }
    }
}
