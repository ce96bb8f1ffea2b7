//! The attention core shared by the ports: the fused
//! [`scaled_dot_product_attention_masked`] of minibatch-nn, or, when
//! attention dropout is on in training, the same maths as tensor ops with
//! dropout on the weights (as transformers' eager attention).

use candle_core::{Result, Tensor};
use minibatch_nn::ops::{scaled_dot_product_attention_masked, softmax_last_dim};
use minibatch_nn::Dropout;

/// `softmax(scale · q kᵀ + masks) v` for `q (b, h, tq, d)`, `k`, `v`
/// `(b, hk, tk, d)` (`hk` divides `h`), `mask` a `u8` key-padding mask
/// `(b, 1, 1, tk)` (non-zero = a token). `dropout` applies to the
/// attention weights when `train`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    dropout: &Dropout,
    train: bool,
) -> Result<Tensor> {
    if !train || dropout.drop_p() == 0.0 {
        return scaled_dot_product_attention_masked(q, k, v, mask, causal, Some(scale));
    }
    let (b, h, tq, _) = q.dims4()?;
    let (_, hk, tk, _) = k.dims4()?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if hk == h {
            return x.contiguous();
        }
        let dx = x.dim(3)?;
        x.unsqueeze(2)?
            .broadcast_as((b, hk, h / hk, tk, dx))?
            .reshape((b, h, tk, dx))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    // The scale goes on q, 4x smaller than the scores at t = 4 d (one pass
    // over (b, h, tq, d) instead of (b, h, tq, tk), forward and backward),
    // and kᵀ stays a strided view: the matmul reads it transposed.
    let mut s = q.affine(scale, 0.0)?.matmul(&k.t()?)?;
    let mut add: Option<Tensor> = None;
    if causal {
        let m: Vec<f32> = (0..tq)
            .flat_map(|i| (0..tk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        add = Some(Tensor::from_vec(m, (1, 1, tq, tk), q.device())?.to_dtype(q.dtype())?);
    }
    if let Some(m) = mask {
        let zero = Tensor::zeros(m.shape(), q.dtype(), q.device())?;
        let ninf = Tensor::full(f32::NEG_INFINITY, m.shape(), q.device())?.to_dtype(q.dtype())?;
        let pad = m.where_cond(&zero, &ninf)?;
        add = Some(match add {
            Some(a) => a.broadcast_add(&pad)?,
            None => pad,
        });
    }
    if let Some(a) = add {
        s = s.broadcast_add(&a)?;
    }
    let p = softmax_last_dim(&s)?;
    let p = dropout.forward(&p, true)?;
    p.matmul(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The dropout path (taken for any p > 0 in training; with p = 1e-12 no
    /// weight is dropped) computes what the fused kernel does, with padding
    /// and causal masks and grouped-query heads, forward and backward.
    #[test]
    fn tensor_path_matches_fused_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, hk, t, d) = (2, 4, 2, 6, 8);
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?)?;
        let k = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hk, t, d), &dev)?)?;
        let v = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hk, t, d), &dev)?)?;
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev)?
            .reshape((b, 1, 1, t))?;
        let r = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        for causal in [false, true] {
            let run = |p: f32| -> Result<Vec<Tensor>> {
                let out = attend(&q, &k, &v, Some(&mask), causal, 0.3, &Dropout::new(p), true)?;
                let g = (out.clone() * &r)?.sum_all()?.backward()?;
                let mut all = vec![out];
                for x in [&q, &k, &v] {
                    all.push(g.get(x).expect("a gradient").clone());
                }
                Ok(all)
            };
            let (tensor_path, fused) = (run(1e-12)?, run(0.0)?);
            assert_eq!(tensor_path.len(), fused.len());
            for (i, (a, f)) in tensor_path.iter().zip(&fused).enumerate() {
                // 1e-5 of the largest value, or absolute below 1.
                let tol = minibatch_testkit::Tol::rel_to_max(1e-5).floor(1.0).strict();
                minibatch_testkit::assert_close(a, f, tol, &format!("causal {causal}: output {i}"));
            }
        }
        Ok(())
    }
}
