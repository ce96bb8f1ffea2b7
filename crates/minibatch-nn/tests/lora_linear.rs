//! `Linear::forward_lora`: the fused node against PEFT's composition of
//! candle ops (`base(x) + lora_B(lora_A(x)) * s`) bit for bit, values and
//! gradients, for f32 and f64, with and without bias, a transposed
//! (GPT-2 `Conv1D`) base weight and a batched input; f64 finite
//! differences; the composition it falls back to for a trainable base; and
//! the shape errors.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::{abs_sum, bits, both_paths, check_gradients_fd, uniform};
use minibatch_nn::Linear;
use minibatch_testkit::{assert_close, Tol};

/// PEFT's forward, node by node.
fn composition(base: &Linear, x: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Tensor {
    let h = (Linear::new(a.clone(), None).forward(x).unwrap() * s).unwrap();
    (base.forward(x).unwrap() + Linear::new(b.clone(), None).forward(&h).unwrap()).unwrap()
}

#[test]
fn fused_node_is_the_composition_bit_for_bit() {
    let (k, n, r) = (96, 80, 8);
    for dtype in [DType::F32, DType::F64] {
        for (bias, conv1d, x_shape) in [
            (true, false, vec![4, 37, k]),
            (false, false, vec![150, k]),
            (true, true, vec![3, 50, k]),
        ] {
            let w = if conv1d {
                // GPT-2's Conv1D keeps (in, out); the layer runs its transpose.
                uniform(&[k, n], dtype, 1, 0.3).t().unwrap()
            } else {
                uniform(&[n, k], dtype, 1, 0.3)
            };
            let b = bias.then(|| uniform(&[n], dtype, 2, 0.5));
            let base = Linear::new(w, b);
            let x0 = uniform(&x_shape, dtype, 3, 1.0);
            let a0 = uniform(&[r, k], dtype, 4, 0.2);
            let b0 = uniform(&[n, r], dtype, 5, 0.2);
            let mut out_shape = x_shape.clone();
            *out_shape.last_mut().unwrap() = n;
            let rr = uniform(&out_shape, dtype, 6, 1.0);
            let run = |fused: bool| {
                let (x, a, b) = (
                    Var::from_tensor(&x0).unwrap(),
                    Var::from_tensor(&a0).unwrap(),
                    Var::from_tensor(&b0).unwrap(),
                );
                let y = if fused {
                    base.forward_lora(x.as_tensor(), a.as_tensor(), b.as_tensor(), 2.5)
                        .unwrap()
                } else {
                    composition(&base, x.as_tensor(), a.as_tensor(), b.as_tensor(), 2.5)
                };
                assert_eq!(y.dims(), &out_shape[..]);
                let g = (&y * &rr).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(
                    g.get(base.weight()).is_none(),
                    "the frozen base got a gradient"
                );
                let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                (y, get(&x), get(&a), get(&b))
            };
            let fused = run(true);
            let plain = run(false);
            let what = format!("{dtype:?} bias {bias} conv1d {conv1d} x {x_shape:?}");
            for (name, f, p) in [
                ("y", &fused.0, &plain.0),
                ("dx", &fused.1, &plain.1),
                ("dA", &fused.2, &plain.2),
                ("dB", &fused.3, &plain.3),
            ] {
                assert_eq!(f.dims(), p.dims(), "{name} shape, {what}");
                assert!(bits(f) == bits(p), "{name} differs, {what}");
                // Finite and alive: equal bits of NaNs or zeros prove nothing.
                assert_close(f, p, Tol::new(0.0, 0.0), &format!("{name}, {what}"));
                assert!(abs_sum(f) > 0.0, "{name} is all zeros, {what}");
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dt = DType::F64;
    let base = Linear::new(
        uniform(&[5, 6], dt, 11, 0.5),
        Some(uniform(&[5], dt, 12, 0.5)),
    );
    let x = uniform(&[2, 3, 6], dt, 13, 1.0);
    let a = uniform(&[2, 6], dt, 14, 0.5);
    let b = uniform(&[5, 2], dt, 15, 0.5);
    let r = uniform(&[2, 3, 5], dt, 16, 1.0);
    both_paths(|_| {
        check_gradients_fd(
            &[x.clone(), a.clone(), b.clone()],
            |v| (base.forward_lora(&v[0], &v[1], &v[2], 0.75)? * &r)?.sum_all(),
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
    });
}

#[test]
fn a_trainable_base_takes_the_composition_and_gets_its_gradient() {
    let dt = DType::F32;
    let w = Var::from_tensor(&uniform(&[7, 4], dt, 21, 0.5)).unwrap();
    let base = Linear::new(w.as_tensor().clone(), None);
    let x = uniform(&[9, 4], dt, 22, 1.0);
    let a = Var::from_tensor(&uniform(&[3, 4], dt, 23, 0.5)).unwrap();
    let b = Var::from_tensor(&uniform(&[7, 3], dt, 24, 0.5)).unwrap();
    let y = base
        .forward_lora(&x, a.as_tensor(), b.as_tensor(), 1.5)
        .unwrap();
    let want = composition(&base, &x, a.as_tensor(), b.as_tensor(), 1.5);
    assert_close(&y, &want, Tol::new(0.0, 0.0), "trainable base");
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(abs_sum(g.get(w.as_tensor()).expect("base weight gradient")) > 0.0);
}

#[test]
fn adapters_that_do_not_fit_are_errors_naming_them() {
    let dev = Device::Cpu;
    let base = Linear::new(Tensor::zeros((6, 4), DType::F32, &dev).unwrap(), None);
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    for (a, b) in [((2, 5), (6, 2)), ((2, 4), (5, 2)), ((2, 4), (6, 3))] {
        let a = Tensor::zeros(a, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(b, DType::F32, &dev).unwrap();
        let err = base.forward_lora(&x, &a, &b, 1.0).unwrap_err().to_string();
        assert!(
            err.contains("forward_lora") && err.contains("lora_A") && err.contains("lora_B"),
            "{err}"
        );
    }
}
