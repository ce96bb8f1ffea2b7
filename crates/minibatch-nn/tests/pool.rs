//! `minibatch_nn::ops::{max_pool2d, avg_pool2d}` (and their `_with_stride`
//! forms) against PyTorch (fixtures made by
//! `tests/fixtures/make_conv_pool.py`), against candle's forward pass, and
//! against f64 finite differences, on every device and on the tensor-op path.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_gradients_fd, devices, load_fixture};
use minibatch_nn::ops::{avg_pool2d, avg_pool2d_with_stride, max_pool2d, max_pool2d_with_stride};
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

const CASES: [&str; 4] = ["k2", "k2_odd", "k3_s2", "k2x3_s1x2"];

fn pool(op: &str, x: &Tensor, k: (usize, usize), s: (usize, usize)) -> candle_core::Result<Tensor> {
    match op {
        "max" => max_pool2d_with_stride(x, k, s),
        _ => avg_pool2d_with_stride(x, k, s),
    }
}

#[test]
fn outputs_and_gradients_match_pytorch() {
    for dev in devices() {
        for tp in [false, true] {
            set_tensor_path(tp);
            for (tag, rtol, atol) in [("f32", 1e-5, 1e-6), ("f64", 1e-12, 1e-14)] {
                let fx = load_fixture("conv_pool.safetensors", &dev);
                for op in ["max", "avg"] {
                    for case in CASES {
                        let key = |s: &str| format!("{tag}.{op}.{case}.{s}");
                        let get = |s: &str| fx.get(&key(s)).unwrap_or_else(|| panic!("{}", key(s)));
                        let what = format!("{op} {case} {tag} {dev:?} tensor_path={tp}");
                        let c = get("cfg").to_vec1::<i64>().unwrap();
                        let (k, s) = (
                            (c[0] as usize, c[1] as usize),
                            (c[2] as usize, c[3] as usize),
                        );
                        let x = Var::from_tensor(get("x")).unwrap();
                        let y = pool(op, x.as_tensor(), k, s).unwrap();
                        assert_close(&y, get("y"), Tol::new(atol, rtol), &format!("{what}: y"));
                        let g = (&y * get("r"))
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        let dx = g.get(x.as_tensor()).expect("dx");
                        assert_close(dx, get("dx"), Tol::new(atol, rtol), &format!("{what}: dx"));
                    }
                }
            }
            set_tensor_path(false);
        }
    }
}

/// candle's own `max_pool2d` backward gives each window's maximum a quarter
/// of its gradient for k = 2 (it multiplies by the fraction of the window at
/// the max instead of passing the gradient on); ours passes all of it, as
/// PyTorch does (`torch.nn.functional.max_pool2d` on this input gives 1.0).
/// If candle fixes its backward, the first assertion tells us.
#[test]
fn candle_max_pool_gradient_is_quartered_ours_is_pytorchs() {
    let dev = Device::Cpu;
    let vals: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32).collect();
    let x = Var::from_tensor(&Tensor::from_vec(vals, (1, 1, 4, 4), &dev).unwrap()).unwrap();
    let at_max = |dx: &Tensor| -> Vec<f32> {
        dx.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .filter(|v| *v != 0.0)
            .collect()
    };
    let y = x.as_tensor().max_pool2d(2).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        at_max(g.get(x.as_tensor()).unwrap()),
        [0.25; 4],
        "candle's gradient"
    );
    for tp in [false, true] {
        set_tensor_path(tp);
        let ours = max_pool2d(x.as_tensor(), 2).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let g = ours.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        assert_eq!(at_max(dx), [1.0; 4], "tensor_path={tp}");
        // ... at the window maxima: 13 (1,0)... positions where x is the max.
        let xs = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let dxs = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (wy, wx) in [(0, 0), (0, 2), (2, 0), (2, 2)] {
            let idx = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(i, j)| (wy + i) * 4 + wx + j);
            let best = idx
                .into_iter()
                .max_by(|a, b| xs[*a].total_cmp(&xs[*b]))
                .unwrap();
            assert_eq!(dxs[best], 1.0);
        }
        set_tensor_path(false);
    }
}

/// Forward values equal candle's pooling (bit for bit for max, within
/// rounding for avg: candle multiplies by 1/(kh·kw), PyTorch and we divide),
/// including inputs large enough to be split over threads.
#[test]
fn forward_matches_candle() {
    let dev = Device::Cpu;
    for &(shape, k, s) in &[
        ((64, 16, 24, 24), (2, 2), (2, 2)),
        ((3, 5, 9, 11), (3, 3), (2, 2)),
        ((2, 3, 7, 8), (2, 3), (1, 2)),
    ] {
        let x = common::randn(0f32, 1.0, shape, &dev).unwrap();
        let ours = max_pool2d_with_stride(&x, k, s).unwrap();
        let theirs = x.max_pool2d_with_stride(k, s).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "max {shape:?}"
        );
        let ours = avg_pool2d_with_stride(&x, k, s).unwrap();
        let theirs = x.avg_pool2d_with_stride(k, s).unwrap();
        assert_close(
            &ours,
            &theirs,
            Tol::new(1e-7, 1e-6),
            &format!("avg {shape:?}"),
        );
    }
}

/// The fused kernels and the tensor path agree on a batch that the fused
/// kernels split over threads (gradients included; distinct values, so the
/// argmax is unique).
#[test]
fn threaded_planes_match_the_tensor_path() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&common::randn(0f64, 1.0, (8, 6, 20, 18), &dev).unwrap()).unwrap();
    let r = common::randn(0f64, 1.0, (8, 6, 9, 8), &dev).unwrap();
    for op in ["max", "avg"] {
        let run = |tp: bool| {
            set_tensor_path(tp);
            let y = pool(op, x.as_tensor(), (3, 4), (2, 2)).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            set_tensor_path(false);
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(false), run(true));
        assert_close(&a.0, &b.0, Tol::new(1e-14, 1e-14), &format!("{op}: y"));
        assert_close(&a.1, &b.1, Tol::new(1e-14, 1e-14), &format!("{op}: dx"));
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    // Distinct values spaced well apart (no ties within eps), shuffled.
    let vals: Vec<f64> = (0..2 * 3 * 7 * 6)
        .map(|i| ((i * 37) % 252) as f64 * 0.01)
        .collect();
    let x = Tensor::from_vec(vals, (2, 3, 7, 6), &dev).unwrap();
    for tp in [false, true] {
        set_tensor_path(tp);
        for op in ["max", "avg"] {
            for (k, s) in [((2, 2), (2, 2)), ((3, 2), (1, 2))] {
                check_gradients_fd(
                    std::slice::from_ref(&x),
                    |t| pool(op, &t[0], k, s)?.sqr()?.sum_all(),
                    1e-6,
                    Tol::new(1e-8, 1e-6),
                );
            }
        }
        set_tensor_path(false);
    }
}

/// A NaN in a window is its maximum and receives the gradient (PyTorch's rule).
#[test]
fn nan_is_the_maximum() {
    let dev = Device::Cpu;
    let x = Var::new(&[[[[1f32, f32::NAN], [3., 2.]]]], &dev).unwrap();
    let y = max_pool2d(x.as_tensor(), 2).unwrap();
    assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    assert_eq!(dx.to_vec1::<f32>().unwrap(), [0., 1., 0., 0.]);
}

#[test]
fn bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let x4 = Tensor::zeros((1, 2, 3, 5), DType::F32, &dev).unwrap();
    let x3 = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap();
    for tp in [false, true] {
        set_tensor_path(tp);
        for op in ["max", "avg"] {
            for (what, x, k, s) in [
                ("kernel taller than the input", &x4, (4, 2), (1, 1)),
                ("kernel wider than the input", &x4, (2, 6), (1, 1)),
                ("kernel 0", &x4, (0, 2), (1, 1)),
                ("stride 0", &x4, (2, 2), (0, 1)),
                ("3-D input", &x3, (2, 2), (2, 2)),
            ] {
                let r = pool(op, x, k, s);
                assert!(r.is_err(), "{op}: {what} (tensor_path={tp}) was accepted");
            }
        }
        let e = max_pool2d(&x4, 4).unwrap_err().to_string();
        assert!(e.contains("larger than the input 3x5"), "{e}");
        set_tensor_path(false);
    }
    // The square forms take a plain usize, as Tensor::max_pool2d does.
    let x = Tensor::zeros((1, 1, 4, 4), DType::F64, &dev).unwrap();
    assert_eq!(max_pool2d(&x, 2).unwrap().dims(), &[1, 1, 2, 2]);
    assert_eq!(avg_pool2d(&x, 2).unwrap().dims(), &[1, 1, 2, 2]);
}
