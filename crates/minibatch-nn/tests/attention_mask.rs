//! scaled_dot_product_attention_masked: attention masks (additive float
//! and boolean) and grouped-query attention against PyTorch's
//! `F.scaled_dot_product_attention(attn_mask=..., enable_gqa=...)`
//! (fixtures from `fixtures/make_attention_mask.py`), the fused CPU kernel
//! against the tensor-op path, f64 finite differences, and errors.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{both_paths, check_gradients_fd, load_fixture};
use minibatch_nn::ops::scaled_dot_product_attention_masked as sdpa;
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

/// Uniform draws in `[-1.5, 1.5)`, seeded.
fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    common::uniform(shape, dtype, seed, 1.5)
}

/// The output and the gradients of `sum(o ⊙ r)` for `q`, `k`, `v`.
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    r: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> (Tensor, [Tensor; 3]) {
    let vars = [q, k, v].map(|t| Var::from_tensor(t).unwrap());
    let o = sdpa(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        mask,
        causal,
        None,
    )
    .unwrap();
    let g = (&o * r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        o,
        vars.map(|v| g.get(v.as_tensor()).expect("no gradient").clone()),
    )
}

#[test]
fn matches_pytorch() {
    let fx = load_fixture("attention_mask.safetensors", &Device::Cpu);
    for (tag, dtype, tol) in [("f32", DType::F32, 5e-5), ("f64", DType::F64, 1e-11)] {
        for case in ["pad", "gqa", "gqa_pad_causal", "dense"] {
            let key = |k: &str| fx[&format!("{tag}.{case}.{k}")].clone();
            let causal = fx.contains_key(&format!("{tag}.{case}.is_causal"));
            let mask = key("mask");
            // The float mask as given, and (for padding masks) as booleans.
            let mut masks = vec![("float", mask.clone())];
            if case.contains("pad") {
                masks.push(("bool", mask.ne(f64::NEG_INFINITY).unwrap()));
            }
            for (kind, m) in masks {
                both_paths(|forced| {
                    let what = format!("{case} {kind} {tag} tensor path {forced}");
                    let (o, [dq, dk, dv]) =
                        run(&key("q"), &key("k"), &key("v"), &key("r"), Some(&m), causal);
                    assert_eq!(o.dtype(), dtype);
                    assert_close(&o, &key("o"), Tol::new(tol, tol), &format!("o {what}"));
                    assert_close(&dq, &key("dq"), Tol::new(tol, tol), &format!("dq {what}"));
                    assert_close(&dk, &key("dk"), Tol::new(tol, tol), &format!("dk {what}"));
                    assert_close(&dv, &key("dv"), Tol::new(tol, tol), &format!("dv {what}"));
                });
            }
        }
    }
}

/// The fused kernel against the tensor path on shapes split over threads,
/// with GQA, broadcast and strided masks, and rows that see no key.
#[test]
fn fused_kernel_matches_tensor_path() {
    // (b, h, hk, tq, tk, d)
    for (n, &(b, h, hk, tq, tk, d)) in [
        (4, 8, 2, 16, 16, 16),
        (2, 3, 1, 5, 9, 4),
        (3, 4, 4, 7, 7, 8),
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * n as u64;
        let q = randn(&[b, tq, h, d], DType::F64, s)
            .transpose(1, 2)
            .unwrap();
        let k = randn(&[b, tk, hk, d], DType::F64, s + 1)
            .transpose(1, 2)
            .unwrap();
        let v = randn(&[b, hk, tk, d + 1], DType::F64, s + 2);
        let r = randn(&[b, h, tq, d + 1], DType::F64, s + 3);
        // Padding (the last row of the batch sees no key), a dense per-head
        // mask read through a transposed (strided) layout.
        let mut pad = vec![0f64; b * tk];
        pad[tk - 2..tk].fill(f64::NEG_INFINITY);
        pad[(b - 1) * tk..b * tk].fill(f64::NEG_INFINITY);
        let pad = Tensor::from_vec(pad, (b, 1, 1, tk), &Device::Cpu).unwrap();
        let dense = randn(&[b, h, tk, tq], DType::F64, s + 4)
            .transpose(2, 3)
            .unwrap();
        for (kind, mask) in [("pad", &pad), ("dense", &dense)] {
            for causal in [false, true] {
                let mut outs = Vec::new();
                both_paths(|_| outs.push(run(&q, &k, &v, &r, Some(mask), causal)));
                let ((o, g), (o2, g2)) = (&outs[0], &outs[1]);
                let what = format!("case {n} {kind} causal {causal}");
                assert_close(o, o2, Tol::new(1e-12, 1e-11), &format!("o {what}"));
                for (i, (a, b)) in g.iter().zip(g2).enumerate() {
                    assert_close(a, b, Tol::new(1e-12, 1e-11), &format!("grad {i} {what}"));
                }
                if kind == "pad" {
                    // The fully masked row: zero output, zero gradients.
                    let last = o.get(b - 1).unwrap().abs().unwrap().max_all().unwrap();
                    assert_eq!(last.to_scalar::<f64>().unwrap(), 0.0, "{what}");
                }
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let q = randn(&[1, 4, 3, 3], DType::F64, 7);
    let k = randn(&[1, 2, 5, 3], DType::F64, 8);
    let v = randn(&[1, 2, 5, 2], DType::F64, 9);
    let r = randn(&[1, 4, 3, 2], DType::F64, 10);
    let mask = randn(&[1, 1, 3, 5], DType::F64, 11);
    for causal in [false, true] {
        for forced in [false, true] {
            set_tensor_path(forced);
            check_gradients_fd(
                &[q.clone(), k.clone(), v.clone()],
                |x| (sdpa(&x[0], &x[1], &x[2], Some(&mask), causal, None)? * &r)?.sum_all(),
                1e-6,
                Tol::new(1e-8, 1e-6),
            );
            set_tensor_path(false);
        }
    }
}

#[test]
fn bad_masks_and_heads_are_errors() {
    let q = randn(&[2, 4, 3, 4], DType::F32, 0);
    let k = randn(&[2, 2, 5, 4], DType::F32, 1);
    let v = randn(&[2, 2, 5, 4], DType::F32, 2);
    assert!(sdpa(&q, &k, &v, None, false, None).is_ok());
    let bad_shape = randn(&[2, 1, 1, 4], DType::F32, 3);
    let e = sdpa(&q, &k, &v, Some(&bad_shape), false, None).unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let ints = Tensor::zeros((2, 1, 1, 5), DType::I64, &Device::Cpu).unwrap();
    let e = sdpa(&q, &k, &v, Some(&ints), false, None).unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let k3 = randn(&[2, 3, 5, 4], DType::F32, 4);
    let e = sdpa(&q, &k3, &k3, None, false, None).unwrap_err();
    assert!(e.to_string().contains("heads"), "{e}");
}
