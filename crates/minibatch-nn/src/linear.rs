//! [`Linear`]: a drop-in for `candle_nn::Linear` whose backward pass does
//! only the work it must.
//!
//! candle's autograd differentiates `x.matmul(&w.t()?)?.broadcast_add(&b)?`
//! node by node. For a layer fed by a data batch that costs:
//!
//! * a gradient for the input batch `grad · W` that nobody reads (candle's
//!   matmul backward computes both operands' gradients unconditionally): as
//!   many multiply-adds as the forward pass;
//! * the weight gradient computed as `xᵀ · grad`, then transposed back through
//!   the `w.t()` node, with a zeros + add accumulation at each of the two nodes;
//! * the bias gradient through the broadcast node's reductions; for 3-D inputs
//!   two more reshape nodes.
//!
//! Here the layer is one candle custom op over `(x, W[, b])`, taking a
//! `(..., K)` input and giving `(..., N)` with no reshape node on either side.
//! With `M` the
//! number of rows of `x` (all leading dimensions flattened), `K` its last
//! dimension and `N` the output size:
//!
//! ```text
//! forward   Y  = X Wᵀ + b                 (M×K · K×N: the gemm candle runs, then the bias added row by row)
//! backward  dW = dYᵀ X                    (N×M · M×K, straight into W's (N, K) layout)
//!           db = Σ_rows dY
//!           dX = dY W                     (M×N · N×K, only when X tracks gradients)
//! ```
//!
//! The input gradient is computed only when `x` tracks gradients (a hidden
//! layer's input, or a `Var`), never for a plain data batch. The products run
//! through the `gemm` crate (candle's own CPU matmul kernels) straight into the
//! result buffers, on one thread for small products and on candle's thread
//! count for large ones.
//!
//! The fused op runs for `f32`/`f64` inputs of rank 2 (any strides) or of
//! higher rank and contiguous on the CPU; other devices and dtypes, strided
//! inputs of rank > 2 (which candle-nn multiplies batch by batch), and [`set_tensor_path(true)`](crate::set_tensor_path),
//! take candle-nn's own ops, so the layer works everywhere.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::cpu::{contiguous, with_cpu};
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::gemm::{matmul_new, Mat};
use crate::NnError;

/// A fully connected layer `y = x Wᵀ + b` with a lean backward pass: a
/// drop-in for `candle_nn::Linear`.
///
/// Same weights, names and initialisation as `candle_nn::linear`
/// (`weight` of shape `(out, in)`, `bias` of shape `(out,)`), so checkpoints
/// and `VarMap`s are interchangeable; the input may have any rank ≥ 1 (its
/// last dimension is `in`), as with candle-nn. The forward result is
/// bit-identical to `candle_nn::Linear`'s (same gemm, same bias addition).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_nn::linear;
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
/// // Batched inputs (batch, seq, in) work the same way.
/// let x = Tensor::zeros((2, 5, 784), DType::F32, &Device::Cpu)?;
/// assert_eq!(layer.forward(&x)?.dims(), &[2, 5, 128]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A [`Linear`] layer `in_dim -> out_dim` with a bias, created in (or read
/// from) `vb` as `weight` `(out_dim, in_dim)` and `bias` `(out_dim,)`,
/// initialised as `candle_nn::linear` does: the weight from candle-nn's
/// `DEFAULT_KAIMING_NORMAL` (normal, standard deviation `sqrt(2 / in_dim)`),
/// the bias uniform in `±1/sqrt(in_dim)`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// A [`Linear`] layer without bias (`weight` only), as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}

/// [`linear`] or [`linear_no_bias`] depending on `bias`, as `candle_nn::linear_b`.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bias = if bias {
        let bound = 1. / (in_dim as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
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

    /// Whether the fused CPU op takes `x`: on the CPU, `f32`/`f64` throughout,
    /// rank 2, or higher and contiguous, and shapes that fit (anything else goes to candle-nn's ops,
    /// which also report shape errors in candle-nn's words).
    pub(crate) fn fused_applies(&self, x: &Tensor) -> bool {
        let dt = x.dtype();
        let w = &self.weight;
        cpu_kernel(x)
            && w.device().is_cpu()
            && matches!(dt, DType::F32 | DType::F64)
            // candle-nn multiplies a strided input of rank > 2 batch by
            // batch; leave that (rare) case to it, keeping its bits.
            && (x.rank() == 2 || (x.rank() > 2 && x.is_contiguous()))
            && w.dtype() == dt
            && w.rank() == 2
            && w.dim(1).ok() == x.dims().last().copied()
            && self.bias.as_ref().is_none_or(|b| {
                b.dtype() == dt && b.device().is_cpu() && b.dims() == [w.dims()[0]]
            })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.fused_applies(x) {
            // Everything else: exactly candle_nn::Linear's ops.
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        // The op takes (..., K) as it is: a rank-2 input through its
        // strides, a contiguous one of higher rank as (M, K) rows, and gives
        // (..., N) (no reshape nodes around it for autograd to differentiate).
        match &self.bias {
            Some(b) => x.apply_op3_arc(&self.weight, b, linear_op()),
            None => x.apply_op2_arc(&self.weight, linear_no_bias_op()),
        }
    }
}

fn linear_op() -> Arc<Box<dyn CustomOp3 + Send + Sync>> {
    static OP: OnceLock<Arc<Box<dyn CustomOp3 + Send + Sync>>> = OnceLock::new();
    OP.get_or_init(|| Arc::new(Box::new(LinearOp))).clone()
}

/// The one shared op without bias.
fn linear_no_bias_op() -> Arc<Box<dyn CustomOp2 + Send + Sync>> {
    static OP: OnceLock<Arc<Box<dyn CustomOp2 + Send + Sync>>> = OnceLock::new();
    OP.get_or_init(|| Arc::new(Box::new(LinearOp))).clone()
}

/// `y = x Wᵀ (+ b)` on CPU storage, with the lean backward described in the module docs.
struct LinearOp;

/// A strided 2-D view of a tensor's storage.
/// A rank-2 layout through its strides, or a contiguous one of higher rank
/// as the `(M, K)` matrix of its rows.
pub(crate) fn mat<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Mat<'a, T>> {
    let all = T::cpu_storage_as_slice(s)?;
    let dims = l.dims();
    let st = l.stride();
    if dims.len() == 2 {
        return Ok(Mat {
            data: &all[l.start_offset()..],
            rows: dims[0],
            cols: dims[1],
            rs: st[0],
            cs: st[1],
        });
    }
    if dims.len() < 2 || !l.is_contiguous() {
        candle_core::bail!("linear: expected a matrix or a contiguous tensor, got {dims:?}");
    }
    let cols = dims[dims.len() - 1];
    Ok(Mat {
        data: &all[l.start_offset()..],
        rows: l.shape().elem_count().checked_div(cols).unwrap_or(0),
        cols,
        rs: cols,
        cs: 1,
    })
}

/// `dims` with the last one replaced by `n`.
fn with_last(dims: &[usize], n: usize) -> Shape {
    let mut out = dims.to_vec();
    if let Some(l) = out.last_mut() {
        *l = n;
    }
    Shape::from(out)
}

/// Forward kernel: `x (M, K)`, `w (N, K)`, optional bias `(N,)`.
fn forward<T: Float>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (out, shape) = forward_vec::<T>(x, lx, w, lw, b)?;
    Ok((T::to_cpu_storage_owned(out), shape))
}

/// [`forward`]'s result as a row-major `(M, N)` buffer and the output shape.
pub(crate) fn forward_vec<T: Float>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(Vec<T>, Shape)> {
    let x = mat::<T>(x, lx)?;
    let w = mat::<T>(w, lw)?;
    let n = w.rows;
    if x.cols != w.cols {
        return Err(NnError::ShapeMismatch(format!(
            "linear: input (_, {}) and weight ({n}, {}) do not fit together",
            x.cols, w.cols
        ))
        .into());
    }
    let mut out = matmul_new(x, w.t());
    if let Some((b, lb)) = b {
        let b = contiguous::<T>(b, lb, "linear bias")?;
        // After the product, as candle-nn's broadcast_add (bit-identical).
        for row in out.chunks_exact_mut(n) {
            for (o, &bj) in row.iter_mut().zip(b) {
                *o += bj;
            }
        }
    }
    Ok((out, with_last(lx.dims(), n)))
}

/// The gradients of `(x, w, b)` from `grad (..., N)` (as `(M, N)`); `dx`
/// (of `x`'s shape) only when `want_dx`.
fn backward<T: Float>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    want_dx: bool,
    want_dw: bool,
    want_db: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let k = x.dim(candle_core::D::Minus1)?;
    let m = x.elem_count().checked_div(k).unwrap_or(0);
    let n = w.dim(0)?;
    with_cpu(&grad, |gs, lg| {
        let g = contiguous::<T>(gs, lg, "linear gradient")?;
        let gm = Mat::row_major(g, m, n);
        // A frozen weight (a constant, not tracked) needs no gradient: the
        // LoRA base and frozen layers skip this product.
        let dw = if want_dw {
            let dw = with_cpu(x, |xs, lx| Ok(matmul_new(gm.t(), mat::<T>(xs, lx)?)))?;
            Some(Tensor::from_vec(dw, (n, k), &Device::Cpu)?)
        } else {
            None
        };
        let dx = if want_dx {
            let dx = with_cpu(w, |ws, lw| Ok(matmul_new(gm, mat::<T>(ws, lw)?)))?;
            Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?)
        } else {
            None
        };
        let db = if want_db {
            let mut db = vec![T::zero(); n];
            for row in g.chunks_exact(n) {
                for (d, &v) in db.iter_mut().zip(row) {
                    *d += v;
                }
            }
            Some(Tensor::from_vec(db, n, &Device::Cpu)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    })
}

/// The gradients of the tracked inputs only (`b`: the bias, if any).
pub(crate) fn dispatch_backward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (want_dx, want_dw) = (x.track_op(), w.track_op());
    let want_db = b.is_some_and(Tensor::track_op);
    match x.dtype() {
        DType::F32 => backward::<f32>(x, w, grad, want_dx, want_dw, want_db),
        DType::F64 => backward::<f64>(x, w, grad, want_dx, want_dw, want_db),
        dt => candle_core::bail!("linear: the fused op takes f32 or f64, got {dt:?}"),
    }
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
        match x {
            CpuStorage::F32(_) => forward::<f32>(x, lx, w, lw, Some((b, lb))),
            CpuStorage::F64(_) => forward::<f64>(x, lx, w, lw, Some((b, lb))),
            _ => candle_core::bail!("linear: the fused op takes f32 or f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch_backward(x, w, Some(b), grad)
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "minibatch-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match x {
            CpuStorage::F32(_) => forward::<f32>(x, lx, w, lw, None),
            CpuStorage::F64(_) => forward::<f64>(x, lx, w, lw, None),
            _ => candle_core::bail!("linear: the fused op takes f32 or f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = dispatch_backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}
