//! The end-to-end reference of `index.json` ("end_to_end"): a small MLP
//! trained on MNIST rows with our SGD must reproduce PyTorch's losses and
//! final weights.
//!
//! Generated with PyTorch 2.x:
//!
//! ```python
//! model: relu(x @ w1.T + b1) @ w2.T + b2; loss = F.cross_entropy(logits, y)  # mean
//! opt = torch.optim.SGD([w1, b1, w2, b2], lr=0.05, momentum=0.9)
//! for s in range(32):
//!     idx = order[16 * s : 16 * s + 16]
//!     loss = F.cross_entropy(model(x[idx]), y[idx]); losses.append(loss.item())
//!     opt.zero_grad(); loss.backward(); opt.step()
//! ```
mod common;

use candle_core::{DType, Device, Tensor, Var};
use minibatch_optim::{Optimizer, Sgd, SgdConfig};

#[test]
fn mlp_sgd_matches_pytorch() {
    let dir = common::reference_dir();
    let index = common::reference_index();
    let Some(cases) = index["end_to_end"].as_array() else {
        return; // no end-to-end case in this reference directory
    };
    for case in cases {
        let file = case["file"].as_str().unwrap();
        assert_eq!(
            case["optimizer"].as_str(),
            Some("SGD"),
            "{file}: only SGD is replayed here"
        );
        let hp = case["hyperparameters"].as_object().unwrap();
        for k in hp.keys() {
            assert!(
                ["lr", "momentum"].contains(&k.as_str()),
                "{file}: unsupported hyperparameter `{k}`"
            );
        }
        let batch = case["batch_size"].as_u64().unwrap() as usize;
        let steps = case["steps"].as_u64().unwrap() as usize;
        let data = candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap();
        for device in minibatch_data::available_devices() {
            let t = |k: &str| data[k].to_device(&device).unwrap();
            let (x, y) = (t("x"), t("y").to_dtype(DType::U32).unwrap());
            let order: Vec<i64> = data["order"].to_vec1().unwrap();
            let names = ["w1", "b1", "w2", "b2"];
            let vars: Vec<(String, Var)> = names
                .iter()
                .map(|n| (n.to_string(), Var::from_tensor(&t(n)).unwrap()))
                .collect();
            let cfg = SgdConfig {
                lr: hp["lr"].as_f64().unwrap(),
                momentum: hp.get("momentum").and_then(|m| m.as_f64()).unwrap_or(0.0),
                ..Default::default()
            };
            let mut opt = Sgd::named(vars.clone(), cfg).unwrap();
            let want_loss: Vec<f32> = data["loss"].to_vec1().unwrap();
            let w = |i: usize| vars[i].1.as_tensor();
            for s in 0..steps {
                let idx: Vec<u32> = order[batch * s..batch * (s + 1)]
                    .iter()
                    .map(|&i| i as u32)
                    .collect();
                let idx = Tensor::new(idx.as_slice(), &device).unwrap();
                let (xb, yb) = (
                    x.index_select(&idx, 0).unwrap(),
                    y.index_select(&idx, 0).unwrap(),
                );
                let h = xb
                    .matmul(&w(0).t().unwrap())
                    .unwrap()
                    .broadcast_add(w(1))
                    .unwrap()
                    .relu()
                    .unwrap();
                let logits = h
                    .matmul(&w(2).t().unwrap())
                    .unwrap()
                    .broadcast_add(w(3))
                    .unwrap();
                let loss = candle_nn::loss::cross_entropy(&logits, &yb).unwrap();
                let l = loss.to_scalar::<f32>().unwrap();
                assert!(
                    (l - want_loss[s]).abs() <= 1e-4 * want_loss[s].abs().max(1.0),
                    "{file} on {device:?}: loss at step {s}: {l} vs PyTorch {}",
                    want_loss[s]
                );
                opt.backward_step(&loss).unwrap();
            }
            for (i, n) in names.iter().enumerate() {
                let got: Vec<f32> = w(i).flatten_all().unwrap().to_vec1().unwrap();
                let want: Vec<f32> = data[&format!("{n}.final")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs() + 1e-5,
                        "{file}: {n}[{j}]: {g} vs PyTorch {e}"
                    );
                }
            }
        }
    }
}
