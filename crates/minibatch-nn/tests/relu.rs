//! `minibatch_nn::ops::relu` against candle's `Tensor::relu` and PyTorch's
//! rule for its gradient (`torch.relu(x).backward(g)` gives `g · [x > 0]`:
//! nothing at 0, and a NaN input gives NaN forward and 0 backward), on every
//! device and on the tensor-op path.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_gradients_fd, devices};
use minibatch_nn::ops::relu;
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

#[test]
fn values_and_gradients() {
    for dev in devices() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &Tensor::new(&[-2f64, -0.5, 0.0, 0.25, 3.0], &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::new(&[1f64, 2.0, 3.0, 4.0, 5.0], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = relu(x.as_tensor()).unwrap();
            let want = Tensor::new(&[0f64, 0.0, 0.0, 0.25, 3.0], &dev).unwrap();
            assert_close(&y, &want, Tol::exact(), "relu(x)");
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            // PyTorch: no gradient at exactly 0 (candle's own relu passes it).
            let want = Tensor::new(&[0f64, 0.0, 0.0, 4.0, 5.0], &dev).unwrap();
            assert_close(dx, &want, Tol::exact(), &format!("{dtype:?} {dev:?}: dx"));
        }
    }
}

#[test]
fn nan_stays_nan_and_passes_no_gradient() {
    let x = Var::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap();
    let y = relu(x.as_tensor()).unwrap();
    let v = y.to_vec1::<f32>().unwrap();
    assert!(v[0].is_nan());
    assert_eq!(v[1], 1.0);
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(dx, [0.0, 1.0]);
}

/// The fused kernel (split over threads for this size) and the tensor path
/// (candle's relu) agree away from 0; strided inputs work.
#[test]
fn matches_candle_relu_and_the_tensor_path() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&common::randn(0f32, 1.0, (64, 16, 24, 24), &dev).unwrap()).unwrap();
    let r = common::randn(0f32, 1.0, (64, 16, 24, 24), &dev).unwrap();
    let run = |tp: bool| {
        set_tensor_path(tp);
        // A transposed view: the op must handle strided inputs.
        let xt = x.as_tensor().transpose(2, 3).unwrap();
        let y = relu(&xt).unwrap();
        let g = (&y * &r.transpose(2, 3).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        set_tensor_path(false);
        (y, g.get(x.as_tensor()).unwrap().clone())
    };
    let (a, b) = (run(false), run(true));
    assert_close(&a.0, &b.0, Tol::exact(), "y");
    assert_close(&a.1, &b.1, Tol::exact(), "dx");
    let theirs = x.as_tensor().transpose(2, 3).unwrap().relu().unwrap();
    assert_close(&a.0, &theirs, Tol::exact(), "candle's relu");
}

#[test]
fn gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    // Away from 0, where relu is differentiable.
    let vals: Vec<f64> = (0..24).map(|i| (i as f64 - 11.5) * 0.1).collect();
    let x = Tensor::from_vec(vals, (4, 6), &dev).unwrap();
    for tp in [false, true] {
        set_tensor_path(tp);
        check_gradients_fd(
            std::slice::from_ref(&x),
            |t| relu(&t[0])?.sqr()?.sum_all(),
            1e-6,
            Tol::new(1e-9, 1e-7),
        );
        set_tensor_path(false);
    }
}
