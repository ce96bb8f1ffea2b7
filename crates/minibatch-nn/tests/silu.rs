//! silu: the fused CPU op against candle's `Tensor::silu` (forward) and
//! PyTorch's formula `σ(x)(1 + x(1 − σ(x)))` in f64 (backward), the tensor
//! path, and f64 finite differences; `silu_mul` against `silu` then a
//! product, bit for bit.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{abs_sum, bits, both_paths, check_gradients_fd};
use minibatch_nn::ops::{silu, silu_mul};
use minibatch_testkit::{assert_close, Tol};

fn draw(n: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Wide enough to reach both saturated tails.
    let v: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * 30.0)
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

#[test]
fn matches_the_formula_on_both_paths() {
    let x64 = draw(100_003, 1);
    let r64 = draw(100_003, 2);
    let s = (x64.neg().unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .recip()
        .unwrap();
    let want_y = (&x64 * &s).unwrap();
    let want_dx =
        (&r64 * (&s * ((&x64 * (1.0 - &s).unwrap()).unwrap() + 1.0).unwrap()).unwrap()).unwrap();
    for (dtype, tol) in [(DType::F32, 2e-6), (DType::F64, 1e-14)] {
        both_paths(|forced| {
            let x = Var::from_tensor(&x64.to_dtype(dtype).unwrap()).unwrap();
            let y = silu(x.as_tensor()).unwrap();
            assert_eq!(y.dtype(), dtype);
            let g = (&y * r64.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let what = format!("{dtype:?} tensor path {forced}");
            assert_close(&y, &want_y, Tol::new(tol, tol), &format!("y {what}"));
            assert_close(
                g.get(x.as_tensor()).unwrap(),
                &want_dx,
                Tol::new(tol, tol),
                &format!("dx {what}"),
            );
        });
    }
}

#[test]
fn gradients_match_finite_differences() {
    let x = draw(64, 3)
        .affine(0.2, 0.0)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    let r = draw(64, 4).reshape((8, 8)).unwrap();
    both_paths(|_| {
        check_gradients_fd(
            std::slice::from_ref(&x),
            |v| (silu(&v[0])? * &r)?.sum_all(),
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
    });
}

#[test]
fn silu_mul_is_silu_then_product_bit_for_bit() {
    let g64 = draw(3 * 40_001, 5).reshape((3, 40_001)).unwrap();
    let u64_ = draw(3 * 40_001, 6).reshape((3, 40_001)).unwrap();
    let r64 = draw(3 * 40_001, 7).reshape((3, 40_001)).unwrap();
    for dtype in [DType::F32, DType::F64] {
        both_paths(|forced| {
            let run = |fused: bool| {
                let g = Var::from_tensor(&g64.to_dtype(dtype).unwrap()).unwrap();
                let u = Var::from_tensor(&u64_.to_dtype(dtype).unwrap()).unwrap();
                let y = if fused {
                    silu_mul(g.as_tensor(), u.as_tensor()).unwrap()
                } else {
                    (silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap()
                };
                assert_eq!(y.dims(), g64.dims());
                let grads = (&y * r64.to_dtype(dtype).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dg = grads.get(g.as_tensor()).unwrap().clone();
                let du = grads.get(u.as_tensor()).unwrap().clone();
                (y, dg, du)
            };
            let (y1, dg1, du1) = run(true);
            let (y2, dg2, du2) = run(false);
            let what = format!("{dtype:?} tensor path {forced}");
            assert!(bits(&y1) == bits(&y2), "y differs, {what}");
            assert!(bits(&dg1) == bits(&dg2), "d gate differs, {what}");
            assert!(bits(&du1) == bits(&du2), "d up differs, {what}");
            // And not trivially: the values are finite and the gradients live.
            assert_close(&y1, &y2, Tol::new(0.0, 0.0), &what);
            assert!(abs_sum(&dg1) > 0.0);
        });
    }
}

#[test]
fn silu_mul_gradients_match_finite_differences() {
    let g = draw(48, 8)
        .affine(0.2, 0.0)
        .unwrap()
        .reshape((6, 8))
        .unwrap();
    let u = draw(48, 9)
        .affine(0.1, 0.0)
        .unwrap()
        .reshape((6, 8))
        .unwrap();
    let r = draw(48, 10).reshape((6, 8)).unwrap();
    both_paths(|_| {
        check_gradients_fd(
            &[g.clone(), u.clone()],
            |v| (silu_mul(&v[0], &v[1])? * &r)?.sum_all(),
            1e-6,
            Tol::new(1e-8, 1e-6),
        );
    });
}

#[test]
fn silu_mul_rejects_mismatched_inputs() {
    let g = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    for (u, what) in [
        (
            Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
            "shape",
        ),
        (
            Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap(),
            "dtype",
        ),
    ] {
        let err = silu_mul(&g, &u).unwrap_err().to_string();
        assert!(
            err.contains("silu_mul") && err.contains("gate"),
            "{what}: {err}"
        );
    }
}
