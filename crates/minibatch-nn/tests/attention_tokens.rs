//! multi_head_attention: attention on token-major tensors (`(b, t, h, d)`
//! or `(b, t, h·d)`) gives what scaled_dot_product_attention_dropout gives
//! on the same tensors transposed to `(b, h, t, d)`: the output, the
//! gradients of q, k and v, and the dropout mask, on the fused kernel and
//! the tensor-op path, in f64 and f32, with padding masks, causal blocks,
//! grouped-query heads and mixed ranks; bad shapes are errors.

mod common;

use candle_core::{DType, Tensor, Var};
use common::both_paths;
use minibatch_nn::ops::{multi_head_attention, scaled_dot_product_attention_dropout as sdpa};
use minibatch_nn::{set_rng_step, Dropout};
use minibatch_testkit::{assert_close, Tol};

/// The sizes of one case; `ranks` of q, k, v (3: heads packed in the last dim).
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    h: usize,
    hk: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    ranks: [usize; 3],
    causal: bool,
    masked: bool,
    p: f32,
}

/// A token-major tensor `(b, t, h, d)` and its `(b, h, t, d)` twin, drawn once.
fn pair(
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    rank: usize,
    dtype: DType,
    seed: u64,
) -> (Tensor, Tensor) {
    let x = common::uniform(&[b, t, h, d], dtype, seed, 1.5);
    let tokens = if rank == 3 {
        x.reshape((b, t, h * d)).unwrap()
    } else {
        x.clone()
    };
    (tokens, x.transpose(1, 2).unwrap().contiguous().unwrap())
}

/// Output (token-major) and the gradients of `sum(o ⊙ r)` of both ops,
/// the heads-first results moved back to the token-major layout.
fn run(c: Case, dtype: DType) -> ([Tensor; 4], [Tensor; 4]) {
    let (qt, qh) = pair(c.b, c.tq, c.h, c.d, c.ranks[0], dtype, 1);
    let (kt, kh) = pair(c.b, c.tk, c.hk, c.d, c.ranks[1], dtype, 2);
    let (vt, vh) = pair(c.b, c.tk, c.hk, c.dv, c.ranks[2], dtype, 3);
    let mask = c.masked.then(|| {
        // Batch 0 sees every key, batch 1 all but the last 3.
        let m: Vec<u8> = (0..c.b)
            .flat_map(|bi| (0..c.tk).map(move |j| u8::from(bi != 1 || j + 3 < c.tk)))
            .collect();
        Tensor::from_vec(m, (c.b, 1, 1, c.tk), &candle_core::Device::Cpu).unwrap()
    });
    let out_dims: Vec<usize> = if c.ranks[0] == 3 {
        vec![c.b, c.tq, c.h * c.dv]
    } else {
        vec![c.b, c.tq, c.h, c.dv]
    };
    let r = common::uniform(&out_dims, dtype, 4, 1.0);
    let drop = Dropout::new(c.p);
    let scale = Some(0.3);

    let vars = [&qt, &kt, &vt].map(|t| Var::from_tensor(t).unwrap());
    set_rng_step(11);
    let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
    let o =
        multi_head_attention(q, k, v, c.h, mask.as_ref(), c.causal, scale, &drop, true).unwrap();
    assert_eq!(o.dims(), out_dims.as_slice(), "{c:?}: output shape");
    let g = (&o * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |i: usize| g.get(vars[i].as_tensor()).expect("no gradient").clone();
    let tokens = [o, grad(0), grad(1), grad(2)];

    let hvars = [&qh, &kh, &vh].map(|t| Var::from_tensor(t).unwrap());
    set_rng_step(11);
    let [q, k, v] = hvars.each_ref().map(|v| v.as_tensor());
    let o = sdpa(q, k, v, mask.as_ref(), c.causal, scale, &drop, true).unwrap();
    let back = |x: &Tensor, like: &Tensor| {
        x.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(like.shape())
            .unwrap()
    };
    let r_heads = back(&r.reshape((c.b, c.tq, c.h, c.dv)).unwrap(), &o);
    let g = (&o * &r_heads)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |i: usize| g.get(hvars[i].as_tensor()).expect("no gradient").clone();
    let heads = [
        back(&o, &tokens[0]),
        back(&grad(0), &tokens[1]),
        back(&grad(1), &tokens[2]),
        back(&grad(2), &tokens[3]),
    ];
    (tokens, heads)
}

fn cases() -> Vec<Case> {
    let base = Case {
        b: 2,
        h: 4,
        hk: 4,
        tq: 9,
        tk: 9,
        d: 8,
        dv: 8,
        ranks: [3, 3, 3],
        causal: false,
        masked: false,
        p: 0.0,
    };
    vec![
        base,
        Case {
            ranks: [4, 4, 4],
            causal: true,
            ..base
        },
        Case {
            hk: 2,
            ranks: [4, 4, 3],
            masked: true,
            p: 0.25,
            ..base
        },
        Case {
            hk: 1,
            tk: 13,
            dv: 5,
            ranks: [3, 4, 3],
            p: 0.5,
            ..base
        },
        // More query rows than one block of the kernel, causal, GQA, dropout.
        Case {
            b: 1,
            h: 2,
            hk: 1,
            tq: 150,
            tk: 150,
            d: 4,
            dv: 4,
            causal: true,
            masked: true,
            p: 0.1,
            ..base
        },
    ]
}

#[test]
fn token_major_equals_heads_first_forward_backward_and_mask() {
    for c in cases() {
        both_paths(|tensor_path| {
            for (dtype, tol) in [
                (DType::F64, Tol::new(1e-12, 1e-12)),
                (DType::F32, Tol::new(1e-5, 1e-5)),
            ] {
                let (tokens, heads) = run(c, dtype);
                for (what, (a, e)) in ["output", "dq", "dk", "dv"]
                    .iter()
                    .zip(tokens.iter().zip(&heads))
                {
                    assert_eq!(a.dims(), e.dims(), "{c:?}: {what} shape");
                    assert_close(
                        a,
                        e,
                        tol,
                        &format!("{what} of {c:?}, {dtype:?}, tensor path {tensor_path}"),
                    );
                }
            }
        });
    }
}

#[test]
fn dropout_zeroes_what_the_heads_first_op_zeroes() {
    // With p = 0.5 a weight's drop flips the output; equal outputs mean
    // equal masks (checked above), and different steps give different ones.
    let c = Case {
        b: 2,
        h: 2,
        hk: 2,
        tq: 6,
        tk: 6,
        d: 4,
        dv: 4,
        ranks: [3, 3, 3],
        causal: false,
        masked: false,
        p: 0.5,
    };
    let (a, _) = run(c, DType::F64);
    let x = common::uniform(&[2, 6, 8], DType::F64, 1, 1.5);
    set_rng_step(12);
    let o = multi_head_attention(
        &x,
        &x,
        &x,
        2,
        None,
        false,
        Some(0.3),
        &Dropout::new(0.5),
        true,
    )
    .unwrap();
    let diff = (o - &a[0])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff > 1e-3, "another step drew the same mask");
}

#[test]
fn bad_shapes_are_errors_naming_the_problem() {
    let x = common::uniform(&[2, 5, 12], DType::F32, 1, 1.0);
    let drop = Dropout::new(0.0);
    let err = |q: &Tensor, k: &Tensor, v: &Tensor, heads: usize| {
        multi_head_attention(q, k, v, heads, None, false, None, &drop, false)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&x, &x, &x, 5).contains("does not split into 5 heads"));
    assert!(err(&x, &x, &x, 0).contains("does not split into 0 heads"));
    let k = common::uniform(&[2, 5, 10], DType::F32, 2, 1.0);
    assert!(err(&x, &k, &k, 4).contains("heads of size 3"));
    let x4 = x.reshape((2, 5, 4, 3)).unwrap();
    assert!(err(&x4, &x4, &x4, 2).contains("heads = 2"));
    let x2 = x.flatten_all().unwrap();
    assert!(err(&x2, &x, &x, 4).contains("(batch, tokens, heads, dim)"));
    // 4 query heads over 3 key heads.
    let k = common::uniform(&[2, 5, 9], DType::F32, 2, 1.0);
    assert!(err(&x, &k, &k, 4).contains("divide the query heads"));
    // Different batch.
    let k = common::uniform(&[3, 5, 12], DType::F32, 2, 1.0);
    assert!(err(&x, &k, &k, 4).contains("batch and heads differ"));
    let o = multi_head_attention(&x, &x, &x, 4, None, false, None, &drop, false).unwrap();
    assert_eq!(o.dims(), [2, 5, 12]);
    let finite = o
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
}
