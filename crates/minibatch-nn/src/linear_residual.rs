//! [`Linear::forward_add`]: `residual + x Wᵀ`, a projection and the residual
//! sum after it as one autograd node.
//!
//! A transformer block ends in `x + proj(h)`. As two candle nodes, the sum
//! costs a pass over the output in the forward pass and, in the backward
//! pass, a zero-filled buffer and an addition for the projection's output
//! gradient (candle gives every graph edge one). The fused node adds the
//! residual into the product's buffer and hands the output gradient to the
//! residual unchanged (what the sum's backward does); the product and its
//! gradients are [`Linear`]'s. Values and gradients are bit-identical to
//! `residual + layer.forward(x)` (tested).

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Shape, Tensor};

use crate::cpu::contiguous;
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::linear::{dispatch_backward, forward_vec};
use crate::split::{parts, run_parts};
use crate::Linear;

impl Linear {
    /// `residual + self(x)`, with `residual` of the output's shape: on the
    /// CPU (`f32`/`f64`, a layer without bias) one fused node, bit-identical
    /// to the two ops (module docs); elsewhere those two candle ops.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use minibatch_nn::Linear;
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let layer = Linear::new(Tensor::randn(0f32, 1., (6, 4), &dev)?, None);
    /// let x = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
    /// let r = Tensor::randn(0f32, 1., (2, 3, 6), &dev)?;
    /// let fused = layer.forward_add(&x, &r)?.flatten_all()?.to_vec1::<f32>()?;
    /// let two = (&r + layer.forward(&x)?)?.flatten_all()?.to_vec1::<f32>()?;
    /// assert_eq!(fused, two);
    /// # Ok(()) }
    /// ```
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let fused = self.bias().is_none()
            && self.fused_applies(x)
            && cpu_kernel(residual)
            && residual.dtype() == x.dtype()
            && residual.is_contiguous()
            && residual.rank() == x.rank()
            && residual.dims()[..x.rank() - 1] == x.dims()[..x.rank() - 1]
            && residual.dims().last() == self.weight().dims().first();
        if !fused {
            return residual + self.forward(x)?;
        }
        x.apply_op3(self.weight(), residual, LinearAddOp)
    }
}

/// `(x, W, residual)` → `residual + x Wᵀ`.
struct LinearAddOp;

fn fwd<T: Float>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    r: &CpuStorage,
    lr: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (mut out, shape) = forward_vec::<T>(x, lx, w, lw, None)?;
    let r = contiguous::<T>(r, lr, "forward_add residual")?;
    if r.len() != out.len() {
        candle_core::bail!(
            "forward_add: residual {:?} for an output {:?}",
            lr.dims(),
            shape.dims()
        );
    }
    // `y + r` element by element (what candle's sum computes, commutative
    // bit for bit), in blocks over candle's pool.
    let per = out.len().div_ceil(parts(out.len(), out.len())).max(1);
    run_parts(
        out.chunks_mut(per).zip(r.chunks(per)).collect(),
        |_, (o, r)| {
            for (o, &r) in o.iter_mut().zip(r) {
                *o += r;
            }
        },
    );
    Ok((T::to_cpu_storage_owned(out), shape))
}

impl CustomOp3 for LinearAddOp {
    fn name(&self) -> &'static str {
        "minibatch-linear-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match x {
            CpuStorage::F32(_) => fwd::<f32>(x, lx, w, lw, r, lr),
            CpuStorage::F64(_) => fwd::<f64>(x, lx, w, lw, r, lr),
            _ => candle_core::bail!("forward_add: the fused op takes f32 or f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The product's gradients are the plain layer's.
        let (dx, dw, _) = dispatch_backward(x, w, None, grad)?;
        // The sum's backward: the residual gets the output gradient as it is.
        let dr = r.track_op().then(|| grad.clone());
        Ok((dx, dw, dr))
    }
}
