//! scaled_dot_product_attention_dropout: dropout on the attention weights
//! inside the fused CPU kernel. Its masks are `Dropout::forward`'s on the
//! `(b, h, tq, tk)` weights (checked against softmax, `Dropout::forward` and
//! a matmul composed by hand), the fused kernel matches the tensor-op path
//! (forward and backward, with masks, causal blocks, grouped-query heads and
//! more query rows than one block), f64 finite differences hold with the
//! mask held fixed, and evaluation or `p = 0` is the plain op and draws no
//! mask.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{both_paths, check_gradients_fd};
use minibatch_nn::ops::{
    scaled_dot_product_attention_dropout as sdpa_drop, scaled_dot_product_attention_masked,
};
use minibatch_nn::{set_rng_step, Dropout};
use minibatch_testkit::{assert_close, Tol};

/// Uniform draws in `[-1.5, 1.5)`, seeded.
fn rand(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    common::uniform(shape, dtype, seed, 1.5)
}

/// Output and gradients of `sum(o ⊙ r)` for `q`, `k`, `v`, the dropout keyed
/// by step 7.
#[allow(clippy::too_many_arguments)]
fn run(
    x: [&Tensor; 3],
    r: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    drop: &Dropout,
    train: bool,
) -> (Tensor, [Tensor; 3]) {
    let vars = x.map(|t| Var::from_tensor(t).unwrap());
    set_rng_step(7);
    let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
    let o = sdpa_drop(q, k, v, mask, causal, Some(0.4), drop, train).unwrap();
    let g = (&o * r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        o,
        vars.map(|v| g.get(v.as_tensor()).expect("no gradient").clone()),
    )
}

/// `(b, hk, t, d)` repeated to `(b, h, t, d)` (query head `i` reads `i / (h / hk)`).
fn repeat_heads(x: &Tensor, h: usize) -> Tensor {
    let (b, hk, t, d) = x.dims4().unwrap();
    x.unsqueeze(2)
        .unwrap()
        .broadcast_as((b, hk, h / hk, t, d))
        .unwrap()
        .reshape((b, h, t, d))
        .unwrap()
}

#[test]
fn the_mask_is_dropouts_mask_on_the_weights() {
    let (b, h, hk, tq, tk, d) = (2, 4, 2, 70, 66, 8);
    let q = rand(&[b, h, tq, d], DType::F64, 1);
    let k = rand(&[b, hk, tk, d], DType::F64, 2);
    let v = rand(&[b, hk, tk, d], DType::F64, 3);
    let drop = Dropout::new(0.3).with_seed(11);
    for causal in [false, true] {
        set_rng_step(5);
        let fused = sdpa_drop(&q, &k, &v, None, causal, None, &drop, true).unwrap();
        // By hand: softmax(q kᵀ / √d + causal), Dropout::forward, @ v.
        let (kr, vr) = (repeat_heads(&k, h), repeat_heads(&v, h));
        let mut s = (q.matmul(&kr.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        if causal {
            let m: Vec<f64> = (0..tq)
                .flat_map(|i| (0..tk).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
                .collect();
            let m = Tensor::from_vec(m, (tq, tk), &Device::Cpu).unwrap();
            s = s.broadcast_add(&m).unwrap();
        }
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        set_rng_step(5);
        let dropped = drop.forward(&p, true).unwrap();
        let kept = dropped.ne(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let rate = kept.mean_all().unwrap().to_scalar::<f64>().unwrap();
        let reference = dropped.matmul(&vr).unwrap();
        assert_close(
            &fused,
            &reference,
            Tol::new(1e-12, 1e-12),
            &format!("causal {causal}"),
        );
        // About 30 % of the weights dropped (fewer than 30 % of the entries
        // are non-zero under the causal mask: those are zero anyway).
        let expect = if causal { 0.7 * 0.5 } else { 0.7 };
        assert!((rate - expect).abs() < 0.05, "kept {rate}, causal {causal}");
    }
}

#[test]
fn fused_kernel_matches_tensor_path() {
    // 150 query rows: more than one block of the fused kernel, causal or not.
    for (n, &(b, h, hk, tq, tk, d, dv)) in [
        (2, 4, 2, 150, 140, 8, 5),
        (1, 3, 3, 9, 13, 4, 4),
        (2, 2, 1, 200, 200, 16, 16),
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * n as u64;
        let q = rand(&[b, h, tq, d], DType::F64, s);
        let k = rand(&[b, hk, tk, d], DType::F64, s + 1);
        let v = rand(&[b, hk, tk, dv], DType::F64, s + 2);
        let r = rand(&[b, h, tq, dv], DType::F64, s + 3);
        let mut pad = vec![0f64; b * tk];
        pad[tk - 3..tk].fill(f64::NEG_INFINITY);
        let pad = Tensor::from_vec(pad, (b, 1, 1, tk), &Device::Cpu).unwrap();
        let drop = Dropout::new(0.25);
        for mask in [None, Some(&pad)] {
            for causal in [false, true] {
                let mut outs = Vec::new();
                both_paths(|_| outs.push(run([&q, &k, &v], &r, mask, causal, &drop, true)));
                let ((o, g), (o2, g2)) = (&outs[0], &outs[1]);
                let what = format!("case {n} mask {} causal {causal}", mask.is_some());
                assert_close(o, o2, Tol::new(1e-12, 1e-11), &format!("o {what}"));
                for (i, (a, b)) in g.iter().zip(g2).enumerate() {
                    assert_close(a, b, Tol::new(1e-12, 1e-11), &format!("grad {i} {what}"));
                }
            }
        }
    }
}

#[test]
fn f32_fused_kernel_matches_tensor_path() {
    let (b, h, t, d) = (2, 6, 130, 32);
    let q = rand(&[b, h, t, d], DType::F32, 1);
    let k = rand(&[b, h, t, d], DType::F32, 2);
    let v = rand(&[b, h, t, d], DType::F32, 3);
    let r = rand(&[b, h, t, d], DType::F32, 4);
    let drop = Dropout::new(0.1);
    let mut outs = Vec::new();
    both_paths(|_| outs.push(run([&q, &k, &v], &r, None, false, &drop, true)));
    let ((o, g), (o2, g2)) = (&outs[0], &outs[1]);
    let tol = Tol::rel_to_max(1e-5);
    assert_close(o, o2, tol, "o");
    for (i, (a, b)) in g.iter().zip(g2).enumerate() {
        assert_close(a, b, tol, &format!("grad {i}"));
    }
}

#[test]
fn gradients_match_finite_differences() {
    let q = rand(&[1, 4, 5, 3], DType::F64, 7);
    let k = rand(&[1, 2, 6, 3], DType::F64, 8);
    let v = rand(&[1, 2, 6, 2], DType::F64, 9);
    let r = rand(&[1, 4, 5, 2], DType::F64, 10);
    let mask = rand(&[1, 1, 5, 6], DType::F64, 11);
    let drop = Dropout::new(0.4);
    for causal in [false, true] {
        both_paths(|_| {
            check_gradients_fd(
                &[q.clone(), k.clone(), v.clone()],
                |x| {
                    // The same step every evaluation: one fixed mask.
                    set_rng_step(3);
                    let o = sdpa_drop(&x[0], &x[1], &x[2], Some(&mask), causal, None, &drop, true)?;
                    (o * &r)?.sum_all()
                },
                1e-6,
                Tol::new(1e-8, 1e-6),
            )
        });
    }
}

#[test]
fn evaluation_and_zero_p_are_the_plain_op_and_draw_nothing() {
    let q = rand(&[2, 2, 6, 4], DType::F32, 1);
    let k = rand(&[2, 2, 6, 4], DType::F32, 2);
    let v = rand(&[2, 2, 6, 4], DType::F32, 3);
    let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
    let later = Dropout::new(0.5);
    set_rng_step(9);
    let expected = later.forward(&x, true).unwrap();
    for (p, train) in [(0.3, false), (0.0, true)] {
        both_paths(|_| {
            let plain = scaled_dot_product_attention_masked(&q, &k, &v, None, true, None).unwrap();
            set_rng_step(9);
            let o = sdpa_drop(&q, &k, &v, None, true, None, &Dropout::new(p), train).unwrap();
            assert_close(
                &o,
                &plain,
                Tol::new(0.0, 0.0),
                &format!("p {p} train {train}"),
            );
            // No call index was drawn: the next dropout is the step's first.
            let next = later.forward(&x, true).unwrap();
            assert_close(&next, &expected, Tol::new(0.0, 0.0), "the next mask");
        });
    }
}

#[test]
fn a_bad_probability_is_an_error() {
    let q = rand(&[1, 1, 2, 2], DType::F32, 1);
    for p in [1.0, -0.1, f32::NAN] {
        let e = sdpa_drop(&q, &q, &q, None, false, None, &Dropout::new(p), true).unwrap_err();
        assert!(e.to_string().contains("dropout probability"), "{e}");
    }
}
