//! Replays the gradient-clipping cases of the reference directory's
//! `index.json` on every available device.
//!
//! Generated with PyTorch 2.x:
//!
//! ```python
//! params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 3, 2)]
//! for p, g in zip(params, grads): p.grad = g.clone()           # saved as {tag}.grad.{i}
//! total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)  # norm cases
//! torch.nn.utils.clip_grad_value_(params, clip_value)                  # value case
//! # saved: {tag}.clipped.{i} = p.grad, {tag}.total_norm = total
//! ```
mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use minibatch_optim::{clip_grad_norm, clip_grad_norm_with, clip_grad_value, Norm, OptimError};
use minibatch_testkit::{assert_close, Tol};
use serde_json::Value;

fn norm_of(v: &Value) -> Norm {
    match v {
        Value::String(s) if s == "inf" || s == "Infinity" => Norm::Inf,
        Value::Number(n) => match n.as_f64().unwrap() {
            2.0 => Norm::L2,
            p => Norm::P(p),
        },
        other => panic!("unsupported norm_type {other}"),
    }
}

#[test]
fn clipping_matches_pytorch() {
    let dir = common::reference_dir();
    let index = common::reference_index();
    let cases = index["clipping"]
        .as_array()
        .expect("index.json: `clipping` list");
    assert!(!cases.is_empty());
    let data =
        candle_core::safetensors::load(dir.join("clipping.safetensors"), &Device::Cpu).unwrap();
    for device in minibatch_data::available_devices() {
        for case in cases {
            let tag = case["tag"].as_str().expect("tag");
            let known = ["tag", "norm_type", "max_norm", "clip_value"];
            for key in case.as_object().unwrap().keys() {
                assert!(
                    known.contains(&key.as_str()),
                    "{tag}: unsupported clipping setting `{key}`"
                );
            }
            let n = (0..)
                .take_while(|i| data.contains_key(&format!("{tag}.grad.{i}")))
                .count();
            assert!(n > 0, "{tag}: no gradients");
            let vars: Vec<Var> = (0..n)
                .map(|i| {
                    let g = &data[&format!("{tag}.grad.{i}")];
                    Var::zeros(g.shape(), g.dtype(), &device).unwrap()
                })
                .collect();
            let mut grads = GradStore::default();
            for (i, v) in vars.iter().enumerate() {
                grads.insert(
                    v.as_tensor(),
                    data[&format!("{tag}.grad.{i}")].to_device(&device).unwrap(),
                );
            }
            if let Some(clip) = case.get("clip_value") {
                clip_grad_value(&mut grads, &vars, clip.as_f64().unwrap()).unwrap();
            } else {
                let max_norm = case["max_norm"].as_f64().expect("max_norm");
                let norm = norm_of(&case["norm_type"]);
                let total = clip_grad_norm(&mut grads, &vars, max_norm, norm).unwrap();
                let want: f64 = data[&format!("{tag}.total_norm")]
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0];
                assert!(
                    Tol::rel(1e-6).accepts(total, want),
                    "{tag}: total norm {total} vs {want}"
                );
            }
            for (i, v) in vars.iter().enumerate() {
                // f32 precision: 2e-6 relative, 1e-7 absolute.
                assert_close(
                    grads.get(v.as_tensor()).unwrap(),
                    &data[&format!("{tag}.clipped.{i}")],
                    Tol::new(1e-7, 2e-6),
                    &format!("{tag} on {device:?}: clipped grad {i}"),
                );
            }
        }
    }
}

#[test]
fn non_finite_norm_is_an_error_unless_allowed() {
    let v = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::new(&[1f32, f32::NAN, 2.0], &Device::Cpu).unwrap();
    let mut grads = GradStore::default();
    grads.insert(v.as_tensor(), bad.clone());
    let e = clip_grad_norm(&mut grads, std::slice::from_ref(&v), 1.0, Norm::L2).unwrap_err();
    assert!(matches!(e, OptimError::NonFiniteNorm(_)), "{e}");
    let total =
        clip_grad_norm_with(&mut grads, std::slice::from_ref(&v), 1.0, Norm::L2, false).unwrap();
    assert!(total.is_nan());
    assert!(clip_grad_norm(&mut grads, std::slice::from_ref(&v), -1.0, Norm::L2).is_err());
    assert!(clip_grad_norm(&mut grads, std::slice::from_ref(&v), 1.0, Norm::P(-1.0)).is_err());
    assert!(clip_grad_value(&mut grads, &[v], f64::NAN).is_err());
}

#[test]
fn p_norm_and_small_gradients_are_left_alone() {
    let v = Var::zeros(2, DType::F64, &Device::Cpu).unwrap();
    let mut grads = GradStore::default();
    grads.insert(
        v.as_tensor(),
        Tensor::new(&[0.3f64, -0.4], &Device::Cpu).unwrap(),
    );
    // ||g||_1 = 0.7 < 1: nothing changes.
    let total = clip_grad_norm(&mut grads, std::slice::from_ref(&v), 1.0, Norm::P(1.0)).unwrap();
    assert!((total - 0.7).abs() < 1e-12);
    assert_eq!(
        grads.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
        vec![0.3, -0.4]
    );
    // max_norm 0.35 halves it (up to the 1e-6 guard).
    clip_grad_norm(&mut grads, std::slice::from_ref(&v), 0.35, Norm::P(1.0)).unwrap();
    let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
    assert!(
        (g[0] - 0.15).abs() < 1e-6 && (g[1] + 0.2).abs() < 1e-6,
        "{g:?}"
    );
}
