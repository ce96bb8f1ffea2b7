//! silu: the fused CPU op against candle's `Tensor::silu` (forward) and
//! PyTorch's formula `σ(x)(1 + x(1 − σ(x)))` in f64 (backward), the tensor
//! path, and f64 finite differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{both_paths, check_gradients_fd};
use minibatch_nn::ops::silu;
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
