//! `recompute::checkpoint`: a stack of checkpointed blocks gives the
//! gradients of the same stack without checkpointing, bit for bit (dropout
//! included), every Var the block reads (found, not listed) gets its
//! gradient; a block that reads other Vars when recomputed is an error;
//! evaluation without tracked tensors is the plain forward pass.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use minibatch_nn::ops::gelu_erf;
use minibatch_nn::recompute::checkpoint;
use minibatch_nn::{set_rng_step, set_tensor_path, Dropout, LayerNorm, Linear};
use minibatch_testkit::{assert_close, Tol};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D: usize = 16;

fn randn(rng: &mut ChaCha8Rng, dims: &[usize], scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * scale as f32)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// A pre-norm residual block: `x + W2 · drop(gelu(W1 · ln(x) + b1))`.
#[derive(Clone)]
struct Block {
    ln: LayerNorm,
    up: Linear,
    down: Linear,
    drop: Dropout,
    vars: Vec<Var>,
}

impl Block {
    fn new(rng: &mut ChaCha8Rng) -> Block {
        let v = |t: Tensor| Var::from_tensor(&t).unwrap();
        let g = v((randn(rng, &[D], 0.1) + 1.0).unwrap());
        let b = v(randn(rng, &[D], 0.1));
        let w1 = v(randn(rng, &[2 * D, D], 0.3));
        let b1 = v(randn(rng, &[2 * D], 0.1));
        let w2 = v(randn(rng, &[D, 2 * D], 0.3));
        Block {
            ln: LayerNorm::new(g.as_tensor().clone(), b.as_tensor().clone(), 1e-5),
            up: Linear::new(w1.as_tensor().clone(), Some(b1.as_tensor().clone())),
            down: Linear::new(w2.as_tensor().clone(), None),
            drop: Dropout::new(0.25),
            vars: vec![g, b, w1, b1, w2],
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = gelu_erf(&self.up.forward(&self.ln.forward(x)?)?)?;
        x + self.down.forward(&self.drop.forward(&h, true)?)?
    }
}

/// The loss `Σ out ⊙ r` of three blocks over `x`, each checkpointed or not,
/// and the gradients of every parameter and of `x`.
fn run(blocks: &[Block], x: &Var, r: &Tensor, recompute: bool) -> (Tensor, Vec<Tensor>) {
    set_rng_step(7);
    let mut h = x.as_tensor().clone();
    for b in blocks {
        h = if recompute {
            let block = b.clone();
            checkpoint(move |t: &Tensor| block.forward(t), &h).unwrap()
        } else {
            b.forward(&h).unwrap()
        };
    }
    let loss = (h * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut all: Vec<Tensor> = blocks
        .iter()
        .flat_map(|b| b.vars.iter())
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("a parameter without gradient")
                .clone()
        })
        .collect();
    all.push(grads.get(x.as_tensor()).expect("no input gradient").clone());
    (loss, all)
}

#[test]
fn checkpointed_gradients_equal_plain_ones_bit_for_bit() {
    for tensor_path in [false, true] {
        set_tensor_path(tensor_path);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let blocks: Vec<Block> = (0..3).map(|_| Block::new(&mut rng)).collect();
        let x = Var::from_tensor(&randn(&mut rng, &[4, 5, D], 1.0)).unwrap();
        let r = randn(&mut rng, &[4, 5, D], 1.0);
        let (loss_plain, plain) = run(&blocks, &x, &r, false);
        let (loss_ckpt, ckpt) = run(&blocks, &x, &r, true);
        assert_close(&loss_ckpt, &loss_plain, Tol::bits(), "loss");
        assert_eq!(plain.len(), ckpt.len());
        for (i, (c, p)) in ckpt.iter().zip(&plain).enumerate() {
            assert_close(
                c,
                p,
                Tol::bits(),
                &format!("gradient {i} (path {tensor_path})"),
            );
        }
        // The dropout key after the step is the same as without checkpointing:
        // the next mask drawn is the same.
        let probe = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
        set_rng_step(7);
        let _ = run(&blocks, &x, &r, true);
        let after_ckpt = blocks[0].drop.forward(&probe, true).unwrap();
        set_rng_step(7);
        let _ = run(&blocks, &x, &r, false);
        let after_plain = blocks[0].drop.forward(&probe, true).unwrap();
        assert_close(&after_ckpt, &after_plain, Tol::bits(), "next mask");
    }
    set_tensor_path(false);
}

#[test]
fn a_block_shared_by_two_positions_sums_its_gradients_as_without() {
    // Tied weights: the same block at positions 0 and 1.
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let b0 = Block::new(&mut rng);
    let blocks = vec![b0.clone(), b0, Block::new(&mut rng)];
    let x = Var::from_tensor(&randn(&mut rng, &[3, D], 1.0)).unwrap();
    let r = randn(&mut rng, &[3, D], 1.0);
    let (_, plain) = run(&blocks, &x, &r, false);
    let (_, ckpt) = run(&blocks, &x, &r, true);
    for (i, (c, p)) in ckpt.iter().zip(&plain).enumerate() {
        assert_close(c, p, Tol::bits(), &format!("gradient {i}"));
    }
}

#[test]
fn vars_reached_through_views_get_their_gradient() {
    // A Conv1D-style weight used through its transpose, and a Var reached
    // only through a reshape: both found by the graph walk.
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let w = Var::from_tensor(&randn(&mut rng, &[D, D], 0.3)).unwrap();
    let s = Var::from_tensor(&randn(&mut rng, &[D], 0.3)).unwrap();
    let x = Var::from_tensor(&randn(&mut rng, &[2, D], 1.0)).unwrap();
    let (wt, st) = (w.as_tensor().clone(), s.as_tensor().clone());
    let f = move |h: &Tensor| {
        let l = Linear::new(wt.t()?, None);
        l.forward(h)?.broadcast_mul(&st.reshape((1, D))?)?.tanh()
    };
    let plain = f(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = checkpoint(f, x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (t, what) in [
        (w.as_tensor(), "w"),
        (s.as_tensor(), "s"),
        (x.as_tensor(), "x"),
    ] {
        let got = g.get(t).unwrap_or_else(|| panic!("{what}: no gradient"));
        assert_close(got, plain.get(t).unwrap(), Tol::bits(), what);
    }
}

#[test]
fn a_block_that_reads_other_vars_when_recomputed_is_an_error() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a = Var::from_tensor(&randn(&mut rng, &[D], 1.0)).unwrap();
    let b = Var::from_tensor(&randn(&mut rng, &[D], 1.0)).unwrap();
    let x = Var::from_tensor(&randn(&mut rng, &[D], 1.0)).unwrap();
    let calls = AtomicUsize::new(0);
    let (ta, tb) = (a.as_tensor().clone(), b.as_tensor().clone());
    let f = move |h: &Tensor| {
        let w = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            &ta
        } else {
            &tb
        };
        h * w
    };
    let y = checkpoint(f, x.as_tensor()).unwrap();
    let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("other Vars"), "{err}");
}

#[test]
fn without_tracked_tensors_it_is_the_plain_forward() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = randn(&mut rng, &[D, D], 0.3);
    let x = randn(&mut rng, &[3, D], 1.0);
    let l = Linear::new(w.clone(), None);
    let plain = l.forward(&x).unwrap();
    let y = checkpoint(move |t: &Tensor| l.forward(t), &x).unwrap();
    assert_close(&y, &plain, Tol::bits(), "eval output");
    assert!(!y.track_op());
}

#[test]
fn only_the_input_tracked_gets_its_gradient() {
    // Frozen weights (constants), a trainable input: the LoRA-less frozen body.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let w = randn(&mut rng, &[D, D], 0.3);
    let x = Var::from_tensor(&randn(&mut rng, &[3, D], 1.0)).unwrap();
    let l = Linear::new(w.clone(), None);
    let f = move |t: &Tensor| l.forward(t)?.tanh();
    let plain = f(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let ckpt = checkpoint(f, x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        ckpt.get(x.as_tensor()).unwrap(),
        plain.get(x.as_tensor()).unwrap(),
        Tol::bits(),
        "input gradient",
    );
}
