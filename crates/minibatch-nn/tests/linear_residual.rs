//! `Linear::forward_add`: the fused node against `residual + layer(x)` bit
//! for bit (values and the gradients of x, W and the residual), f32 and
//! f64, rank 2 and 3, a strided weight; the composition for a layer with a
//! bias; f64 finite differences.

mod common;

use candle_core::{DType, Module, Tensor, Var};
use common::{abs_sum, bits, both_paths, check_gradients_fd, uniform};
use minibatch_nn::Linear;
use minibatch_testkit::{assert_close, Tol};

#[test]
fn fused_node_is_the_sum_bit_for_bit() {
    let (k, n) = (72, 88);
    for dtype in [DType::F32, DType::F64] {
        for (x_shape, transposed, bias) in [
            (vec![3, 41, k], false, false),
            (vec![130, k], true, false),
            (vec![2, 9, k], false, true),
        ] {
            let w0 = if transposed {
                uniform(&[k, n], dtype, 1, 0.3)
            } else {
                uniform(&[n, k], dtype, 1, 0.3)
            };
            let b0 = uniform(&[n], dtype, 2, 0.3);
            let x0 = uniform(&x_shape, dtype, 3, 1.0);
            let mut out_shape = x_shape.clone();
            *out_shape.last_mut().unwrap() = n;
            let r0 = uniform(&out_shape, dtype, 4, 1.0);
            let rr = uniform(&out_shape, dtype, 5, 1.0);
            let run = |fused: bool| {
                let (x, w, r, b) = (
                    Var::from_tensor(&x0).unwrap(),
                    Var::from_tensor(&w0).unwrap(),
                    Var::from_tensor(&r0).unwrap(),
                    Var::from_tensor(&b0).unwrap(),
                );
                let wt = if transposed {
                    w.as_tensor().t().unwrap()
                } else {
                    w.as_tensor().clone()
                };
                let layer = Linear::new(wt, bias.then(|| b.as_tensor().clone()));
                let y = if fused {
                    layer.forward_add(x.as_tensor(), r.as_tensor()).unwrap()
                } else {
                    (r.as_tensor() + layer.forward(x.as_tensor()).unwrap()).unwrap()
                };
                assert_eq!(y.dims(), &out_shape[..]);
                let g = (&y * &rr).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                let db = bias.then(|| get(&b));
                (y, get(&x), get(&w), get(&r), db)
            };
            let f = run(true);
            let p = run(false);
            let what = format!("{dtype:?} x {x_shape:?} transposed {transposed} bias {bias}");
            for (name, a, b) in [
                ("y", &f.0, &p.0),
                ("dx", &f.1, &p.1),
                ("dW", &f.2, &p.2),
                ("dresidual", &f.3, &p.3),
            ] {
                assert_eq!(a.dims(), b.dims(), "{name} shape, {what}");
                assert!(bits(a) == bits(b), "{name} differs, {what}");
                assert_close(a, b, Tol::new(0.0, 0.0), &format!("{name}, {what}"));
                assert!(abs_sum(a) > 0.0, "{name} is all zeros, {what}");
            }
            if let (Some(a), Some(b)) = (&f.4, &p.4) {
                assert!(bits(a) == bits(b), "db differs, {what}");
            }
        }
    }
}

#[test]
fn a_data_batch_gets_no_gradient() {
    let dt = DType::F32;
    let w = Var::from_tensor(&uniform(&[5, 4], dt, 11, 0.5)).unwrap();
    let layer = Linear::new(w.as_tensor().clone(), None);
    let x = uniform(&[3, 4], dt, 12, 1.0);
    let r = Var::from_tensor(&uniform(&[3, 5], dt, 13, 1.0)).unwrap();
    let g = layer
        .forward_add(&x, r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_none());
    assert!(abs_sum(g.get(w.as_tensor()).unwrap()) > 0.0);
    assert!(abs_sum(g.get(r.as_tensor()).unwrap()) > 0.0);
}

#[test]
fn gradients_match_finite_differences() {
    let dt = DType::F64;
    let x = uniform(&[2, 3, 6], dt, 21, 1.0);
    let w = uniform(&[5, 6], dt, 22, 0.5);
    let r = uniform(&[2, 3, 5], dt, 23, 1.0);
    let rr = uniform(&[2, 3, 5], dt, 24, 1.0);
    both_paths(|_| {
        check_gradients_fd(
            &[x.clone(), w.clone(), r.clone()],
            |v| {
                let layer = Linear::new(v[1].clone(), None);
                (layer.forward_add(&v[0], &v[2])? * &rr)?.sum_all()
            },
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
    });
}

#[test]
fn a_residual_of_another_shape_is_an_error() {
    let dt = DType::F32;
    let layer = Linear::new(uniform(&[5, 4], dt, 31, 0.5), None);
    let x = uniform(&[3, 4], dt, 32, 1.0);
    let r = Tensor::zeros((3, 6), dt, &candle_core::Device::Cpu).unwrap();
    assert!(layer.forward_add(&x, &r).is_err());
}
