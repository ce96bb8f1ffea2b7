//! scaled_dot_product_attention: against PyTorch (fixtures from
//! `fixtures/make_attention.py`), the fused CPU kernel against the tensor-op
//! path, f64 finite differences, and its errors. Inputs are attended to as
//! `x.transpose(1, 2)` of a `(b, t, h, d)` tensor, so the fused kernel reads
//! non-contiguous layouts.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::ops::scaled_dot_product_attention as sdpa;
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

const FIXTURE: &str = "attention.safetensors";

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (5e-5, 5e-5),
        _ => (1e-11, 1e-12),
    }
}

fn randn(shape: &[usize], dtype: DType, seed: u64, scale: f64) -> Tensor {
    common::uniform(shape, dtype, seed, scale)
}

/// `(b, t, h, d) -> (b, h, t, d)`, a strided view.
fn heads(x: &Tensor) -> Tensor {
    x.transpose(1, 2).unwrap()
}

/// The output and the gradients of `sum(o ⊙ r)` with respect to `q`, `k`,
/// `v` (each given as a `(b, t, h, d)` tensor).
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    r: &Tensor,
    causal: bool,
    scale: Option<f64>,
) -> (Tensor, [Tensor; 3]) {
    let vars = [q, k, v].map(|t| Var::from_tensor(t).unwrap());
    let [q, k, v] = vars.each_ref().map(|v| heads(v.as_tensor()));
    let o = sdpa(&q, &k, &v, causal, scale).unwrap();
    assert!(o.is_contiguous());
    let g = (&o * r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars.map(|v| g.get(v.as_tensor()).expect("no gradient").clone());
    (o, grads)
}

#[test]
fn matches_pytorch() {
    let cases: [(&str, &[&str]); 3] = [
        ("gpt", &["full", "causal"]),
        ("odd", &["full"]),
        ("odd_causal", &["causal"]),
    ];
    for dev in devices() {
        let fx = load_fixture(FIXTURE, &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            for (case, masks) in cases {
                let key = |k: &str| fx[&format!("{tag}.{case}.{k}")].clone();
                let scale = fx
                    .get(&format!("{tag}.{case}.scale"))
                    .map(|s| s.to_vec1::<f64>().unwrap()[0]);
                for &mask in masks {
                    both_paths(|forced| {
                        let what = format!("{case} {mask} {tag} tensor path {forced} {dev:?}");
                        let (o, [dq, dk, dv]) = run(
                            &key("q"),
                            &key("k"),
                            &key("v"),
                            &key("r"),
                            mask == "causal",
                            scale,
                        );
                        assert_eq!(o.dtype(), dtype);
                        let want = |k: &str| key(&format!("{mask}.{k}"));
                        assert_close(&o, &want("o"), Tol::new(atol, rtol), &format!("o {what}"));
                        assert_close(
                            &dq,
                            &want("dq"),
                            Tol::new(atol, rtol),
                            &format!("dq {what}"),
                        );
                        assert_close(
                            &dk,
                            &want("dk"),
                            Tol::new(atol, rtol),
                            &format!("dk {what}"),
                        );
                        assert_close(
                            &dv,
                            &want("dv"),
                            Tol::new(atol, rtol),
                            &format!("dv {what}"),
                        );
                    });
                }
            }
        }
    }
}

/// The fused kernel against candle's autograd of the composed ops, on
/// shapes large enough to split over threads, with more and fewer queries
/// than keys under the causal mask, contiguous, transposed and broadcast
/// (stride 0) inputs, and an explicit scale.
#[test]
fn fused_kernel_matches_tensor_path() {
    // (b, h, tq, tk, d, dv)
    let shapes = [
        (8, 4, 11, 11, 32, 32),
        (3, 2, 9, 5, 8, 3),
        (3, 2, 4, 13, 5, 7),
        (1, 1, 1, 1, 1, 1),
    ];
    for dtype in [DType::F32, DType::F64] {
        let (rtol, atol) = tol(dtype);
        for (n, &(b, h, tq, tk, d, dv)) in shapes.iter().enumerate() {
            let seed = 10 * n as u64;
            let q = randn(&[b, tq, h, d], dtype, seed, 2.0);
            let k = randn(&[b, tk, h, d], dtype, seed + 1, 2.0);
            let v = randn(&[b, tk, h, dv], dtype, seed + 2, 1.0);
            let r = randn(&[b, h, tq, dv], dtype, seed + 3, 1.0);
            for causal in [false, true] {
                for scale in [None, Some(0.3)] {
                    let mut outs = Vec::new();
                    both_paths(|_| outs.push(run(&q, &k, &v, &r, causal, scale)));
                    let what = format!("{dtype:?} {:?} causal {causal} scale {scale:?}", shapes[n]);
                    let ((o, g), (o2, g2)) = (&outs[0], &outs[1]);
                    assert_close(o, o2, Tol::new(atol, rtol), &format!("o {what}"));
                    for (i, (a, b)) in g.iter().zip(g2).enumerate() {
                        assert_close(a, b, Tol::new(atol, rtol), &format!("grad {i} {what}"));
                    }
                }
            }
        }
    }
    // Contiguous (b, h, t, d) inputs, and keys/values shared by every batch
    // entry through a stride-0 broadcast.
    let q = randn(&[2, 3, 6, 4], DType::F64, 100, 2.0);
    let k = randn(&[1, 3, 6, 4], DType::F64, 101, 2.0)
        .broadcast_as((2, 3, 6, 4))
        .unwrap();
    let v = randn(&[2, 3, 6, 5], DType::F64, 102, 1.0);
    let mut outs = Vec::new();
    both_paths(|_| outs.push(sdpa(&q, &k, &v, true, None).unwrap()));
    assert_close(
        &outs[0],
        &outs[1],
        Tol::new(1e-13, 1e-12),
        "contiguous / broadcast",
    );
}

#[test]
fn gradients_match_finite_differences() {
    let q = randn(&[1, 3, 2, 3], DType::F64, 7, 1.5);
    let k = randn(&[1, 4, 2, 3], DType::F64, 8, 1.5);
    let v = randn(&[1, 4, 2, 2], DType::F64, 9, 1.0);
    let r = randn(&[1, 2, 3, 2], DType::F64, 10, 1.0);
    for causal in [false, true] {
        for forced in [false, true] {
            set_tensor_path(forced);
            check_gradients_fd(
                &[q.clone(), k.clone(), v.clone()],
                |x| {
                    let o = sdpa(&heads(&x[0]), &heads(&x[1]), &heads(&x[2]), causal, None)?;
                    (o * &r)?.sum_all()
                },
                1e-6,
                Tol::new(1e-8, 1e-6),
            );
            set_tensor_path(false);
        }
    }
}

/// bf16 runs the tensor-op path, close to the f32 result.
#[test]
fn half_precision_runs_the_tensor_path() {
    let q = randn(&[2, 3, 5, 8], DType::F32, 20, 1.0);
    let k = randn(&[2, 3, 6, 8], DType::F32, 21, 1.0);
    let v = randn(&[2, 3, 6, 4], DType::F32, 22, 1.0);
    let want = sdpa(&q, &k, &v, true, None).unwrap();
    let [qh, kh, vh] =
        [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap()).unwrap());
    let got = sdpa(qh.as_tensor(), kh.as_tensor(), vh.as_tensor(), true, None).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    assert_close(&got, &want, Tol::new(3e-2, 3e-2), "bf16");
    let g = got.sum_all().unwrap().backward().unwrap();
    for x in [&qh, &kh, &vh] {
        assert!(g.get(x.as_tensor()).is_some());
    }
}

#[test]
fn bad_inputs_are_errors() {
    let t = |shape: &[usize], dtype: DType| randn(shape, dtype, 0, 1.0);
    let f32 = DType::F32;
    let q = t(&[2, 3, 5, 4], f32);
    let k = t(&[2, 3, 7, 4], f32);
    let v = t(&[2, 3, 7, 6], f32);
    assert!(sdpa(&q, &k, &v, false, None).is_ok());
    let bad: [(&str, Tensor, Tensor, Tensor); 7] = [
        ("head dim", q.clone(), t(&[2, 3, 7, 5], f32), v.clone()),
        ("keys", q.clone(), k.clone(), t(&[2, 3, 6, 6], f32)),
        ("batch", t(&[1, 3, 5, 4], f32), k.clone(), v.clone()),
        (
            "heads",
            q.clone(),
            t(&[2, 2, 7, 4], f32),
            t(&[2, 2, 7, 6], f32),
        ),
        ("rank", t(&[3, 5, 4], f32), k.clone(), v.clone()),
        ("dtype", q.clone(), t(&[2, 3, 7, 4], DType::F64), v.clone()),
        (
            "no keys",
            q.clone(),
            t(&[2, 3, 0, 4], f32),
            t(&[2, 3, 0, 6], f32),
        ),
    ];
    for (what, q, k, v) in bad {
        for forced in [false, true] {
            set_tensor_path(forced);
            let e = sdpa(&q, &k, &v, true, None).expect_err(what);
            assert!(
                e.to_string().contains("scaled_dot_product_attention"),
                "{what}: {e}"
            );
            set_tensor_path(false);
        }
    }
    for scale in [f64::NAN, f64::INFINITY] {
        assert!(sdpa(&q, &k, &v, false, Some(scale)).is_err());
    }
}
