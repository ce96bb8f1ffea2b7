//! `Dropout`: masks keyed by (seed, step, call index), keep rate, gradients,
//! evaluation mode, both paths and every device giving the same masks.

mod common;
use common::to_f64_vec;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use common::{check_gradients_fd, devices};
use minibatch_nn::{set_rng_step, set_tensor_path, Dropout};
use minibatch_testkit::{assert_close, Tol};

/// The kept positions of a dropout of ones.
fn mask_of(d: &Dropout, n: usize, dev: &Device, dtype: DType) -> Vec<bool> {
    let x = Tensor::ones(n, dtype, dev).unwrap();
    to_f64_vec(&d.forward(&x, true).unwrap())
        .iter()
        .map(|&v| v != 0.0)
        .collect()
}

#[test]
fn same_key_same_mask_other_key_other_mask() {
    let d = Dropout::new(0.5);
    let n = 256;
    let dev = Device::Cpu;
    set_rng_step(3);
    let a0 = mask_of(&d, n, &dev, DType::F32);
    let a1 = mask_of(&d, n, &dev, DType::F32); // second call of step 3
    set_rng_step(3);
    assert_eq!(
        mask_of(&d, n, &dev, DType::F32),
        a0,
        "same (seed, step, call)"
    );
    assert_eq!(mask_of(&d, n, &dev, DType::F32), a1, "same second call");
    assert_ne!(
        a0, a1,
        "two calls of a step (two layers) draw different masks"
    );
    set_rng_step(4);
    assert_ne!(mask_of(&d, n, &dev, DType::F32), a0, "another step");
    set_rng_step(3);
    assert_ne!(
        mask_of(&d.clone().with_seed(99), n, &dev, DType::F32),
        a0,
        "another seed"
    );
    // The mask does not depend on the dtype, nor on the path.
    for forced in [false, true] {
        set_tensor_path(forced);
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            set_rng_step(3);
            assert_eq!(
                mask_of(&d, n, &dev, dtype),
                a0,
                "{dtype:?} tensor path {forced}"
            );
        }
    }
    set_tensor_path(false);
}

/// A resumed run (starting at step 2) replays the masks of the full run.
#[test]
fn resume_replays_masks() {
    let drops = [Dropout::new(0.3), Dropout::new(0.1)];
    let x = Tensor::ones((8, 16), DType::F32, &Device::Cpu).unwrap();
    let run = |steps: std::ops::Range<u64>| -> Vec<Vec<f64>> {
        let mut out = vec![];
        for s in steps {
            set_rng_step(s);
            for d in &drops {
                out.push(to_f64_vec(&d.forward(&x, true).unwrap()));
            }
        }
        out
    };
    let full = run(0..5);
    let resumed = run(2..5);
    assert_eq!(&full[4..], &resumed[..]);
}

/// Masks are per thread and independent of which thread draws them.
#[test]
fn thread_local_and_thread_independent() {
    let d = Dropout::new(0.5).with_seed(1);
    set_rng_step(10);
    let here = mask_of(&d, 300, &Device::Cpu, DType::F32);
    let d2 = d.clone();
    let there = std::thread::spawn(move || {
        set_rng_step(10);
        mask_of(&d2, 300, &Device::Cpu, DType::F32)
    })
    .join()
    .unwrap();
    assert_eq!(here, there);
    // The other thread's set_rng_step did not reset this thread's call index.
    let next = mask_of(&d, 300, &Device::Cpu, DType::F32);
    assert_ne!(next, here);
}

/// Without set_rng_step every forward pass draws a fresh mask.
#[test]
fn fresh_masks_without_set_rng_step() {
    std::thread::spawn(|| {
        let d = Dropout::new(0.5);
        let masks: Vec<_> = (0..5)
            .map(|_| mask_of(&d, 128, &Device::Cpu, DType::F32))
            .collect();
        for i in 0..masks.len() {
            for j in 0..i {
                assert_ne!(masks[i], masks[j], "forward passes {j} and {i}");
            }
        }
    })
    .join()
    .unwrap();
}

#[test]
fn keep_rate_is_one_minus_p() {
    let n = 200_000;
    for p in [0.1f32, 0.5, 0.9] {
        set_rng_step(1);
        let kept = mask_of(&Dropout::new(p), n, &Device::Cpu, DType::F32)
            .iter()
            .filter(|&&k| k)
            .count() as f64;
        let q = 1.0 - p as f64;
        let sd = (q * (1.0 - q) / n as f64).sqrt();
        let rate = kept / n as f64;
        assert!(
            (rate - q).abs() < 5.0 * sd,
            "p {p}: kept {rate}, want {q} ± {sd}"
        );
    }
    set_rng_step(1);
    assert!(mask_of(&Dropout::new(0.0), 1000, &Device::Cpu, DType::F32)
        .iter()
        .all(|&k| k));
}

/// Values are x / (1-p) or 0; the gradient is mask / (1-p); both paths and
/// every device agree to the bit.
#[test]
fn values_and_gradients() {
    let p = 0.4f32;
    let scale = 1.0 / (1.0 - p as f64);
    let d = Dropout::new(p).with_seed(5);
    let mut reference: Option<(Vec<f64>, Vec<f64>)> = None;
    for dev in devices() {
        for forced in [false, true] {
            set_tensor_path(forced);
            for dtype in [DType::F32, DType::F64] {
                let what = format!("{dtype:?} tensor path {forced} {dev:?}");
                let x = Var::from_tensor(
                    &Tensor::arange(1f64, 61., &dev)
                        .unwrap()
                        .reshape((3, 4, 5))
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                set_rng_step(77);
                let y = d.forward(x.as_tensor(), true).unwrap();
                assert_eq!(y.dims(), &[3, 4, 5]);
                let yv = to_f64_vec(&y);
                let xv = to_f64_vec(x.as_tensor());
                let s = if dtype == DType::F32 {
                    scale as f32 as f64
                } else {
                    scale
                };
                for (a, b) in yv.iter().zip(&xv) {
                    assert!(
                        *a == 0.0 || (*a - b * s).abs() <= 1e-6 * a.abs(),
                        "{what}: {a} from {b}"
                    );
                }
                let g = (&y * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
                let gv = to_f64_vec(g.get(x.as_tensor()).unwrap());
                for (gi, yi) in gv.iter().zip(&yv) {
                    let want = if *yi != 0.0 { 2.0 * s } else { 0.0 };
                    assert!(
                        (gi - want).abs() <= 1e-6 * want,
                        "{what}: grad {gi} want {want}"
                    );
                }
                if dtype == DType::F64 {
                    match &reference {
                        None => reference = Some((yv, gv)),
                        Some((ry, rg)) => {
                            assert_eq!(&yv, ry, "{what}: values differ from the CPU fused path");
                            assert_eq!(&gv, rg, "{what}: gradients differ");
                        }
                    }
                }
            }
        }
    }
    set_tensor_path(false);
}

/// f64 finite differences through a fixed mask (the step is set before each
/// evaluation).
#[test]
fn gradients_match_finite_differences() {
    let x = common::randn(0f64, 1.0, (4, 5), &Device::Cpu).unwrap();
    let d = Dropout::new(0.3);
    for forced in [false, true] {
        set_tensor_path(forced);
        check_gradients_fd(
            std::slice::from_ref(&x),
            |a| {
                set_rng_step(12);
                d.forward(&a[0].tanh()?, true)?.sqr()?.sum_all()
            },
            1e-5,
            Tol::new(1e-8, 1e-6),
        );
    }
    set_tensor_path(false);
}

#[test]
fn evaluation_is_identity_and_bad_p_is_an_error() {
    let x = common::randn(0f32, 1.0, (3, 3), &Device::Cpu).unwrap();
    let d = Dropout::new(0.5);
    assert_close(&d.forward_t(&x, false).unwrap(), &x, Tol::exact(), "eval");
    for p in [1.0f32, -0.1, f32::NAN] {
        let e = Dropout::new(p).forward(&x, true).unwrap_err().to_string();
        assert!(e.contains("[0, 1)"), "{e}");
        // Evaluation never looks at p, as in candle-nn.
        assert!(Dropout::new(p).forward(&x, false).is_ok());
    }
}

/// `forward_add` is `forward` then `+ residual`: the same bits, the same
/// gradients (to both inputs), the same next masks afterwards, on the fused
/// op and the tensor path; evaluation is the plain sum; shapes must agree.
#[test]
fn forward_add_is_forward_then_add() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        for p in [0.0f32, 0.3] {
            common::both_paths(|tp| {
                let x = common::uniform(&[3, 50, 7], dtype, 1, 2.0);
                let r = common::uniform(&[3, 50, 7], dtype, 2, 2.0);
                let w = common::uniform(&[3, 50, 7], dtype, 3, 1.0);
                let d = Dropout::new(p).with_seed(5);
                let run = |fused: bool| {
                    let (xv, rv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&r).unwrap());
                    set_rng_step(9);
                    let y = if fused {
                        d.forward_add(xv.as_tensor(), rv.as_tensor(), true).unwrap()
                    } else {
                        (d.forward(xv.as_tensor(), true).unwrap() + rv.as_tensor()).unwrap()
                    };
                    // The call after it draws the same mask either way.
                    let next = d.forward(&x, true).unwrap();
                    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    let grad = |v: &Var| g.get(v.as_tensor()).expect("no gradient").clone();
                    [y, next, grad(&xv), grad(&rv)]
                };
                let (a, b) = (run(true), run(false));
                for (what, (a, b)) in ["y", "next mask", "dx", "dr"].iter().zip(a.iter().zip(&b)) {
                    assert_close(
                        a,
                        b,
                        Tol::exact(),
                        &format!("{what}, {dtype:?}, p {p}, tensor path {tp}"),
                    );
                }
                let eval = d.forward_add(&x, &r, false).unwrap();
                assert_close(&eval, &(&x + &r).unwrap(), Tol::exact(), "eval");
            });
        }
    }
    let d = Dropout::new(0.1);
    let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let r = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
    let err = d.forward_add(&x, &r, true).unwrap_err().to_string();
    assert!(err.contains("differ"), "{err}");
    assert!(Dropout::new(1.5).forward_add(&x, &x, true).is_err());
}
