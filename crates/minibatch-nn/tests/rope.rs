//! rope, rope_i and rope_thd: against PyTorch (the reference written in torch
//! ops by `fixtures/make_norm_softmax_rope.py`), bit for bit against
//! candle-nn's forward, against candle's autograd and f64 finite
//! differences, on every device and on both paths (fused CPU kernel, candle
//! tensor ops).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::rotary_emb::{rope, rope_i, rope_thd};
use minibatch_nn::set_tensor_path;
use minibatch_testkit::{assert_close, Tol};

const FIXTURE: &str = "norm_softmax_rope.safetensors";

type RopeFn = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

/// (fixture kind, ours, candle-nn's)
const KINDS: [(&str, RopeFn, RopeFn); 3] = [
    ("halves", rope, candle_nn::rotary_emb::rope),
    ("interleaved", rope_i, candle_nn::rotary_emb::rope_i),
    ("thd", rope_thd, candle_nn::rotary_emb::rope_thd),
];

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-6),
        _ => (1e-12, 1e-13),
    }
}

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn weighted_sum(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

#[test]
fn rope_matches_pytorch() {
    for dev in devices() {
        let fx = load_fixture(FIXTURE, &dev);
        for (tag, dtype) in [("f32", DType::F32), ("f64", DType::F64)] {
            let (rtol, atol) = tol(dtype);
            for (kind, ours, _) in KINDS {
                let cases: &[&str] = if kind == "halves" {
                    &["shared", "batched", "wide"]
                } else {
                    &["shared", "batched"]
                };
                for case in cases {
                    let key = |k: &str| fx[&format!("{tag}.rope.{kind}.{case}.{k}")].clone();
                    both_paths(|forced| {
                        let what = format!("{kind} {case} {tag} tensor path {forced} {dev:?}");
                        let x = Var::from_tensor(&key("x")).unwrap();
                        let c = Var::from_tensor(&key("cos")).unwrap();
                        let s = Var::from_tensor(&key("sin")).unwrap();
                        let y = ours(x.as_tensor(), c.as_tensor(), s.as_tensor()).unwrap();
                        assert_close(&y, &key("y"), Tol::new(atol, rtol), &format!("y {what}"));
                        let g = weighted_sum(&y, &key("r")).backward().unwrap();
                        for (v, k) in [(&x, "dx"), (&c, "dcos"), (&s, "dsin")] {
                            let d = g.get(v.as_tensor()).unwrap_or_else(|| panic!("no {k}"));
                            assert_close(d, &key(k), Tol::new(atol, rtol), &format!("{k} {what}"));
                        }
                    });
                }
            }
        }
    }
}

/// Forward bit-identical to candle-nn's fused op and to its `*_slow` tensor
/// formulas, on both paths, for shared tables (as long as `t` or longer),
/// per-batch tables, a single position (candle's `t == 1` branch) and a
/// shape large enough for the parallel path.
#[test]
fn forward_is_bit_identical_to_candle_nn() {
    for dtype in [DType::F32, DType::F64] {
        for (b, h, t, d, table_t, batched) in [
            (2, 3, 5, 8, 5, false),
            (2, 3, 5, 8, 9, false),
            (2, 3, 5, 8, 5, true),
            (3, 2, 1, 6, 4, false),
            (3, 2, 1, 6, 1, true),
            (16, 4, 64, 32, 64, false),
        ] {
            let x = randn(&[b, h, t, d], dtype, 1);
            let tshape: Vec<usize> = if batched {
                vec![b, table_t, d / 2]
            } else {
                vec![table_t, d / 2]
            };
            let (c, s) = (randn(&tshape, dtype, 2), randn(&tshape, dtype, 3));
            both_paths(|forced| {
                let what =
                    format!("{dtype:?} {b}x{h}x{t}x{d} table {tshape:?} tensor path {forced}");
                for (kind, ours, theirs) in KINDS {
                    let x = if kind == "thd" {
                        x.reshape((b, t, h, d)).unwrap()
                    } else {
                        x.clone()
                    };
                    let y = ours(&x, &c, &s).unwrap();
                    let z = theirs(&x, &c, &s).unwrap();
                    assert_close(&y, &z, Tol::exact(), &format!("{kind} {what}"));
                }
                if !batched {
                    let y = rope(&x, &c, &s).unwrap();
                    let z = candle_nn::rotary_emb::rope_slow(&x, &c, &s).unwrap();
                    assert_close(&y, &z, Tol::exact(), &format!("rope_slow {what}"));
                    let y = rope_i(&x, &c, &s).unwrap();
                    let z = candle_nn::rotary_emb::rope_i_slow(&x, &c, &s).unwrap();
                    assert_close(&y, &z, Tol::exact(), &format!("rope_i_slow {what}"));
                }
            });
        }
    }
}

/// A per-batch table longer than the sequence: each batch item uses the
/// first t rows of its own table (candle-nn's CPU kernel reads other rows).
#[test]
fn per_batch_tables_longer_than_the_sequence() {
    let (b, h, t, d, tt) = (3, 2, 4, 6, 7);
    let x = randn(&[b, h, t, d], DType::F64, 4);
    let (c, s) = (
        randn(&[b, tt, d / 2], DType::F64, 5),
        randn(&[b, tt, d / 2], DType::F64, 6),
    );
    both_paths(|forced| {
        for (kind, ours, _) in KINDS {
            let xk = if kind == "thd" {
                x.reshape((b, t, h, d)).unwrap()
            } else {
                x.clone()
            };
            let y = ours(&xk, &c, &s).unwrap();
            for i in 0..b {
                let xi = xk.narrow(0, i, 1).unwrap();
                let ci = c.get(i).unwrap();
                let si = s.get(i).unwrap();
                let yi = ours(&xi, &ci, &si).unwrap();
                let what = format!("{kind} item {i} tensor path {forced}");
                assert_close(&y.narrow(0, i, 1).unwrap(), &yi, Tol::exact(), &what);
            }
        }
    });
}

/// f64 gradients of x, cos and sin against central finite differences and
/// against candle's autograd of the tensor formula, for every layout and
/// both table kinds.
#[test]
fn gradients_match_finite_differences_and_autograd() {
    let (b, h, t, d) = (2, 2, 3, 6);
    for batched in [false, true] {
        let tshape: Vec<usize> = if batched {
            vec![b, t + 1, d / 2]
        } else {
            vec![t + 2, d / 2]
        };
        for (kind, ours, _) in KINDS {
            let xs = if kind == "thd" {
                [b, t, h, d]
            } else {
                [b, h, t, d]
            };
            let x = randn(&xs, DType::F64, 7);
            let (c, s) = (randn(&tshape, DType::F64, 8), randn(&tshape, DType::F64, 9));
            let r = randn(&xs, DType::F64, 10);
            both_paths(|_| {
                check_gradients_fd(
                    &[x.clone(), c.clone(), s.clone()],
                    |ts| Ok(weighted_sum(&ours(&ts[0], &ts[1], &ts[2])?, &r)),
                    1e-6,
                    Tol::new(1e-9, 1e-7),
                )
            });
            // Fused backward vs autograd of the tensor path.
            let grads = |forced: bool| {
                set_tensor_path(forced);
                let vars: Vec<Var> = [&x, &c, &s]
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let y = ours(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                )
                .unwrap();
                let g = weighted_sum(&y, &r).backward().unwrap();
                set_tensor_path(false);
                vars.iter()
                    .map(|v| g.get(v.as_tensor()).unwrap().clone())
                    .collect::<Vec<_>>()
            };
            for (i, (a, z)) in grads(false).iter().zip(grads(true)).enumerate() {
                assert_close(
                    a,
                    &z,
                    Tol::new(1e-14, 1e-13),
                    &format!("{kind} batched {batched} grad {i}"),
                );
            }
        }
    }
}

/// Constant tables (the usual case) get no gradient, and the input's
/// gradient is the output gradient rotated back; strided inputs (q from a
/// `(b, t, h, d)` projection transposed to `(b, h, t, d)`) work.
#[test]
fn constant_tables_and_strided_inputs() {
    let (b, h, t, d) = (2, 3, 6, 8);
    let proj = Var::from_tensor(&randn(&[b, t, h, d], DType::F32, 11)).unwrap();
    let q = proj.as_tensor().transpose(1, 2).unwrap();
    assert!(!q.is_contiguous());
    let (c, s) = (
        randn(&[t, d / 2], DType::F32, 12),
        randn(&[t, d / 2], DType::F32, 13),
    );
    let r = randn(&[b, h, t, d], DType::F32, 14);
    let y = rope(&q, &c, &s).unwrap();
    let y2 = rope(&q.contiguous().unwrap(), &c, &s).unwrap();
    assert_close(&y, &y2, Tol::exact(), "strided forward");
    let thd = rope_thd(proj.as_tensor(), &c, &s).unwrap();
    assert_close(
        &thd.transpose(1, 2).unwrap(),
        &y,
        Tol::exact(),
        "rope_thd = rope on the transpose",
    );
    let g = weighted_sum(&y, &r).backward().unwrap();
    assert!(g.get(&c).is_none() && g.get(&s).is_none());
    let dproj = g
        .get(proj.as_tensor())
        .expect("no gradient for the projection");
    set_tensor_path(true);
    let g2 = weighted_sum(&rope(&q, &c, &s).unwrap(), &r)
        .backward()
        .unwrap();
    set_tensor_path(false);
    assert_close(
        dproj,
        g2.get(proj.as_tensor()).unwrap(),
        Tol::new(1e-7, 1e-6),
        "strided gradient",
    );
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((2, 3, 4, 8), DType::F32, &Device::Cpu).unwrap();
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    for (_, ours, _) in KINDS {
        // d/2 columns, at least t rows (t = 4 for rope/rope_i, 3 for thd).
        assert!(ours(&x, &t(&[4, 3]), &t(&[4, 3])).is_err(), "wrong width");
        assert!(ours(&x, &t(&[2, 4]), &t(&[2, 4])).is_err(), "too few rows");
        assert!(
            ours(&x, &t(&[3, 4, 4]), &t(&[3, 4, 4])).is_err(),
            "wrong batch"
        );
        assert!(ours(&x, &t(&[4]), &t(&[4])).is_err(), "1-D table");
        // 3-D: never for rope / rope_i; for rope_thd only (b, t, h · d).
        assert!(
            ours(&t(&[3, 4, 12]), &t(&[4, 4]), &t(&[4, 4])).is_err(),
            "3-D x"
        );
        assert!(
            ours(&t(&[2, 3, 4, 7]), &t(&[4, 3]), &t(&[4, 3])).is_err(),
            "odd d"
        );
        let c64 = Tensor::zeros((4, 4), DType::F64, &Device::Cpu).unwrap();
        let e = ours(&x, &c64, &c64).unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
    }
    // Empty batch: fine.
    let e = rope(&t(&[0, 3, 4, 8]), &t(&[4, 4]), &t(&[4, 4])).unwrap();
    assert_eq!(e.dims(), &[0, 3, 4, 8]);
}

/// Why this crate exists: candle-nn's rope ops give nothing upstream a
/// gradient; ours do.
#[test]
fn candle_nn_rope_drops_the_gradient_ours_does_not() {
    let (b, h, t, d) = (1, 2, 3, 4);
    let w = Var::from_tensor(&randn(&[d, d], DType::F32, 15)).unwrap();
    let x = randn(&[b, h, t, d], DType::F32, 16);
    let (c, s) = (
        randn(&[t, d / 2], DType::F32, 17),
        randn(&[t, d / 2], DType::F32, 18),
    );
    let r = randn(&[b, h, t, d], DType::F32, 19);
    let q = x.broadcast_matmul(w.as_tensor()).unwrap();
    for (kind, ours, theirs) in KINDS {
        let q = if kind == "thd" {
            q.reshape((b, t, h, d)).unwrap()
        } else {
            q.clone()
        };
        let g = weighted_sum(&theirs(&q, &c, &s).unwrap(), &r.reshape(q.shape()).unwrap())
            .backward()
            .unwrap();
        assert!(
            g.get(w.as_tensor()).is_none(),
            "candle-nn's {kind} now has a backward"
        );
        let g = weighted_sum(&ours(&q, &c, &s).unwrap(), &r.reshape(q.shape()).unwrap())
            .backward()
            .unwrap();
        let dw = g
            .get(w.as_tensor())
            .unwrap_or_else(|| panic!("our {kind} drops the gradient"));
        assert!(
            dw.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}

/// `rope_thd` on `(b, t, h · d)` is the `(b, t, h, d)` rotation to the bit,
/// values and input gradients, on both paths (f32 and f64, per-batch
/// tables too); a last dimension that is not a multiple of the head size
/// is an error naming it.
#[test]
fn rope_thd_on_projection_layout() {
    let (b, t, h, d) = (2, 5, 3, 8);
    for dtype in [DType::F32, DType::F64] {
        for per_batch in [false, true] {
            let tshape: Vec<usize> = if per_batch {
                vec![b, t + 2, d / 2]
            } else {
                vec![t, d / 2]
            };
            let (c, s) = (randn(&tshape, dtype, 21), randn(&tshape, dtype, 22));
            let x0 = randn(&[b, t, h * d], dtype, 23);
            let r = randn(&[b, t, h * d], dtype, 24);
            both_paths(|forced| {
                let what = format!("{dtype:?} per-batch {per_batch} tensor path {forced}");
                let x3 = Var::from_tensor(&x0).unwrap();
                let y3 = rope_thd(x3.as_tensor(), &c, &s).unwrap();
                assert_eq!(y3.dims(), &[b, t, h * d], "{what}");
                let g3 = weighted_sum(&y3, &r).backward().unwrap();
                let x4 = Var::from_tensor(&x0.reshape((b, t, h, d)).unwrap()).unwrap();
                let y4 = rope_thd(x4.as_tensor(), &c, &s).unwrap();
                let g4 = weighted_sum(&y4, &r.reshape((b, t, h, d)).unwrap())
                    .backward()
                    .unwrap();
                let flat = |x: &Tensor| x.reshape((b, t, h * d)).unwrap();
                assert_close(&y3, &flat(&y4), Tol::exact(), &format!("values, {what}"));
                assert_close(
                    g3.get(x3.as_tensor()).unwrap(),
                    &flat(g4.get(x4.as_tensor()).unwrap()),
                    Tol::exact(),
                    &format!("gradients, {what}"),
                );
            });
        }
    }
    let (c, s) = (
        randn(&[t, d / 2], DType::F32, 25),
        randn(&[t, d / 2], DType::F32, 26),
    );
    let bad = randn(&[b, t, h * d + 4], DType::F32, 27);
    let err = rope_thd(&bad, &c, &s).unwrap_err().to_string();
    assert!(
        err.contains("rope_thd") && err.contains("multiple"),
        "{err}"
    );
}
