//! [`Linear`]: a drop-in for `candle_nn::Linear` whose backward pass does less.
//!
//! candle's autograd differentiates `x.matmul(&w.t()?)?.broadcast_add(&b)?`
//! node by node. For a layer fed by a data batch that costs:
//!
//! * a gradient for the input batch `grad · W` that nobody reads (candle's
//!   matmul backward computes both operands' gradients unconditionally): as
//!   many multiply-adds as the forward pass;
//! * the weight gradient computed as `xᵀ · grad`, then transposed back through
//!   the `w.t()` node, with a zeros + add accumulation at each of the two nodes;
//! * the bias gradient through the broadcast node's reductions.
//!
//! Here the layer is one candle [`CustomOp3`] over `(x, W, b)`. Its forward is
//! the same gemm call and the same bias addition as candle's (so its output is
//! bit-identical to `candle_nn::Linear`); its backward returns
//! `dW = gradᵀ · x` (directly in `W`'s layout), `db = Σ_rows grad`, and
//! `dx = grad · W` **only when `x` tracks gradients** (a hidden layer's input,
//! or a `Var`), never for a plain data batch.
//!
//! The custom op runs for 2-D `f32`/`f64` inputs on the CPU; any other case
//! (CUDA, half precision, batched 3-D inputs, no bias) takes the ordinary
//! candle ops path, so the layer works everywhere.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// A fully connected layer `y = x Wᵀ + b` with a lean backward pass.
///
/// Same weights, names and initialisation as `candle_nn::linear`
/// (`weight` of shape `(out, in)`, `bias` of shape `(out,)`), so checkpoints
/// and `VarMap`s are interchangeable.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_train::linear;
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let layer = linear(784, 128, vb.pp("fc1"))?;
/// let x = Tensor::zeros((64, 784), DType::F32, &Device::Cpu)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), &[64, 128]);
/// // The input batch gets no gradient: it is not a variable.
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(&x).is_none());
/// assert!(grads.get(layer.weight()).is_some());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A [`Linear`] layer of `in_dim -> out_dim` with a bias, initialised like
/// `candle_nn::linear` (uniform in `±1/sqrt(in_dim)`), its weights created in
/// (or read from) `vb` as `weight` and `bias`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let bound = 1. / (in_dim as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Linear {
    /// A layer over existing weights: `weight` of shape `(out, in)`, `bias` of
    /// shape `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, shape `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shape `(out,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn fused_applies(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.rank() == 2
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && x.dtype() == self.weight.dtype()
            && self.weight.rank() == 2
            && self
                .bias
                .as_ref()
                .is_some_and(|b| b.dtype() == x.dtype() && b.rank() == 1 && b.is_contiguous())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(bias) if self.fused_applies(x) => x.apply_op3_arc(&self.weight, bias, linear_op()),
            // Everything else: exactly candle_nn::Linear's ops.
            _ => candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x),
        }
    }
}

/// `y = x Wᵀ + b` on CPU storage, with the lean backward described in the module docs.
struct LinearOp;

/// The one shared [`LinearOp`]: each forward pass only bumps its count
/// (candle keeps the op in the graph for the backward pass).
fn linear_op() -> Arc<Box<dyn CustomOp3 + Send + Sync>> {
    static OP: OnceLock<Arc<Box<dyn CustomOp3 + Send + Sync>>> = OnceLock::new();
    OP.get_or_init(|| Arc::new(Box::new(LinearOp))).clone()
}

fn add_bias<T: Copy + std::ops::AddAssign>(mut out: Vec<T>, bias: &[T], n: usize) -> Vec<T> {
    for row in out.chunks_exact_mut(n) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += *b;
        }
    }
    out
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "minibatch-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, kw) = lw.shape().dims2()?;
        let nb = lb.shape().dims1()?;
        if k != kw || nb != n {
            candle_core::bail!(
                "linear: input (_, {k}), weight ({n}, {kw}) and bias ({nb},) do not fit together"
            );
        }
        // The same call candle's `x.matmul(&w.t()?)` makes: rhs is Wᵀ as a strided view.
        let out = x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
        let start = lb.start_offset();
        let out = match (out, b) {
            (CpuStorage::F32(o), CpuStorage::F32(b)) => {
                CpuStorage::F32(add_bias(o, &b[start..start + n], n))
            }
            (CpuStorage::F64(o), CpuStorage::F64(b)) => {
                CpuStorage::F64(add_bias(o, &b[start..start + n], n))
            }
            (o, b) => candle_core::bail!(
                "linear: unsupported dtypes {:?} / {:?}",
                o.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(grad.matmul(w)?)
        } else {
            None
        };
        let dw = grad.t()?.matmul(x)?;
        let db = grad.sum(0)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Forward is bit-identical to candle_nn::Linear; gradients agree with it,
    /// through a two-layer net (so the hidden layer's input gradient is used).
    #[test]
    fn matches_candle_nn_linear() -> candle_core::Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (33, 20), &dev)?.to_dtype(dtype)?;
            let w1 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (16, 20), &dev)?.to_dtype(dtype)?)?;
            let b1 = Var::from_tensor(&Tensor::randn(0f32, 0.3, 16, &dev)?.to_dtype(dtype)?)?;
            let w2 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, 16), &dev)?.to_dtype(dtype)?)?;
            let b2 = Var::from_tensor(&Tensor::randn(0f32, 0.3, 5, &dev)?.to_dtype(dtype)?)?;
            let ours = |x: &Tensor| -> candle_core::Result<Tensor> {
                let h = Linear::new(w1.as_tensor().clone(), Some(b1.as_tensor().clone()))
                    .forward(x)?
                    .relu()?;
                Linear::new(w2.as_tensor().clone(), Some(b2.as_tensor().clone())).forward(&h)
            };
            let theirs = |x: &Tensor| -> candle_core::Result<Tensor> {
                let h =
                    candle_nn::Linear::new(w1.as_tensor().clone(), Some(b1.as_tensor().clone()))
                        .forward(x)?
                        .relu()?;
                candle_nn::Linear::new(w2.as_tensor().clone(), Some(b2.as_tensor().clone()))
                    .forward(&h)
            };
            let (ya, yb) = (ours(&x)?, theirs(&x)?);
            assert_eq!(max_abs_diff(&ya, &yb), 0.0, "{dtype:?}: forward differs");
            let ga = ya.sqr()?.sum_all()?.backward()?;
            let gb = yb.sqr()?.sum_all()?.backward()?;
            // Relative to the gradient's size: the sums run in another order.
            let rtol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for v in [&w1, &b1, &w2, &b2] {
                let (a, b) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(a.dims(), b.dims());
                let d = max_abs_diff(a, b);
                let scale = max_abs_diff(b, &b.zeros_like()?).max(1.0);
                assert!(
                    d <= rtol * scale,
                    "{dtype:?}: gradient differs by {d} (scale {scale})"
                );
            }
            assert!(ga.get(&x).is_none(), "the data batch must get no gradient");
        }
        Ok(())
    }

    /// An input that is a variable does get its gradient.
    #[test]
    fn input_gradient_when_tracked() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f64, 2.0, 3.0]], &dev)?;
        let w = Tensor::new(&[[1f64, 0.0, -1.0], [0.5, 0.5, 0.5]], &dev)?;
        let b = Tensor::new(&[0.1f64, -0.1], &dev)?;
        let layer = Linear::new(w, Some(b));
        let y = layer.forward(x.as_tensor())?;
        assert_eq!(y.to_vec2::<f64>()?, vec![vec![-1.9, 2.9]]);
        let g = y.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).unwrap().to_vec2::<f64>()?;
        assert_eq!(dx, vec![vec![1.5, 0.5, -0.5]]);
        Ok(())
    }

    /// Cases outside the fused op (3-D input, no bias) use candle's ops.
    #[test]
    fn falls_back_outside_the_fused_case() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev)?;
        let ours = Linear::new(w.clone(), None).forward(&x)?;
        let theirs = candle_nn::Linear::new(w, None).forward(&x)?;
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        Ok(())
    }
}
