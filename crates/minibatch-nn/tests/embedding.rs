//! `Embedding` against PyTorch (fixtures from `fixtures/make_core.py`),
//! against `candle_nn::Embedding`, against f64 finite differences, on every
//! device and on both paths.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{both_paths, check_gradients_fd, devices, load_fixture};
use minibatch_nn::{embedding, Embedding};
use minibatch_testkit::{assert_close, Tol};

#[test]
fn matches_pytorch() {
    for dev in devices() {
        let fx = load_fixture("core.safetensors", &dev);
        for tag in ["f32", "f64"] {
            let key = |k: &str| fx[&format!("{tag}.emb.{k}")].clone();
            for id_dtype in [DType::I64, DType::U32, DType::U8] {
                both_paths(|forced| {
                    let what = format!("{tag} ids {id_dtype:?} tensor path {forced} {dev:?}");
                    let table = Var::from_tensor(&key("table")).unwrap();
                    let emb = Embedding::new(table.as_tensor().clone(), 3);
                    let ids = key("ids").to_dtype(id_dtype).unwrap();
                    let y = emb.forward(&ids).unwrap();
                    // A lookup is a copy: exact.
                    assert_close(&y, &key("y"), Tol::exact(), &format!("y {what}"));
                    let g = (y * key("r"))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let dt = g.get(table.as_tensor()).unwrap();
                    assert_close(
                        dt,
                        &key("dtable"),
                        Tol::new(1e-6, 1e-6),
                        &format!("dtable {what}"),
                    );
                });
            }
        }
    }
}

/// Forward bit-identical to candle_nn::Embedding; gradient equal to candle's
/// (index_add) up to summation order, for several id shapes.
#[test]
fn equals_candle_nn() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let table = Var::from_tensor(
            &common::randn(0f32, 1.0, (11, 6), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let ours = Embedding::new(table.as_tensor().clone(), 6);
        let theirs = candle_nn::Embedding::new(table.as_tensor().clone(), 6);
        let ids_cases = [
            Tensor::new(4u32, &dev).unwrap(),
            Tensor::new(&[0u32, 10, 10, 3], &dev).unwrap(),
            Tensor::new(&[[1u32, 2, 1], [9, 9, 9]], &dev).unwrap(),
            Tensor::new(&[[5i64, 0], [0, 5]], &dev)
                .unwrap()
                .t()
                .unwrap(),
            Tensor::zeros(0, DType::U32, &dev).unwrap(),
        ];
        for ids in &ids_cases {
            let yb = theirs.forward(ids).unwrap();
            let r = common::randn(0f32, 1.0, yb.shape(), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
            both_paths(|forced| {
                let what = format!("ids {:?} {dtype:?} tensor path {forced}", ids.dims());
                let ya = ours.forward(ids).unwrap();
                assert_close(&ya, &yb, Tol::exact(), &what);
                let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                match (ga.get(table.as_tensor()), gb.get(table.as_tensor())) {
                    (Some(a), Some(b)) => assert_close(a, b, Tol::new(1e-6, 1e-12), &what),
                    (a, b) => {
                        // An empty lookup: a zero gradient or none, as candle's.
                        for g in [a, b].into_iter().flatten() {
                            assert_eq!(common::abs_sum(g), 0.0);
                        }
                    }
                }
            });
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let table = common::randn(0f64, 1.0, (5, 3), &dev).unwrap();
    let ids = Tensor::new(&[[4u32, 1, 4], [0, 4, 2]], &dev).unwrap();
    let r = common::randn(0f64, 1.0, (2, 3, 3), &dev).unwrap();
    both_paths(|_| {
        check_gradients_fd(
            std::slice::from_ref(&table),
            |a| {
                let y = Embedding::new(a[0].clone(), 3).forward(&ids)?;
                (y.tanh()? * &r)?.sum_all()
            },
            1e-5,
            Tol::new(1e-8, 1e-6),
        );
    });
}

#[test]
fn varbuilder_name_and_init() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let emb = embedding(1000, 64, vb.pp("tok")).unwrap();
    assert_eq!(emb.hidden_size(), 64);
    let names: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
    assert_eq!(names, ["tok.weight"]);
    let w = emb
        .embeddings()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let sd = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.02 && (sd - 1.0).abs() < 0.02,
        "mean {mean}, sd {sd}"
    );
    // candle-nn reads the same variable back.
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let c = candle_nn::embedding(1000, 64, vb.pp("tok")).unwrap();
    let ids = Tensor::new(&[7u32, 999], &Device::Cpu).unwrap();
    assert_close(
        &emb.forward(&ids).unwrap(),
        &c.forward(&ids).unwrap(),
        Tol::exact(),
        "same table",
    );
}

#[test]
fn bad_inputs_are_errors() {
    for dev in devices() {
        let emb = Embedding::new(Tensor::zeros((4, 2), DType::F32, &dev).unwrap(), 2);
        both_paths(|forced| {
            let err = |ids: Tensor, needle: &str| {
                let e = emb.forward(&ids).expect_err(needle).to_string();
                assert!(e.contains(needle), "tensor path {forced}: {e}");
            };
            err(Tensor::new(&[0u32, 4], &dev).unwrap(), "out of range");
            err(Tensor::new(&[-1i64], &dev).unwrap(), "out of range");
            err(Tensor::new(&[1f32], &dev).unwrap(), "u32");
            let wrong = Embedding::new(Tensor::zeros((4, 3), DType::F32, &dev).unwrap(), 2);
            let e = wrong
                .forward(&Tensor::new(&[0u32], &dev).unwrap())
                .unwrap_err();
            assert!(e.to_string().contains("shape"), "{e}");
        });
    }
}
