//! [`Linear::forward_lora`]: a frozen layer plus a low-rank (LoRA) update,
//! `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`, as one autograd node.
//!
//! Written out of candle ops, PEFT's `base(x) + lora_B(lora_A(x)) * s` is
//! four nodes (the base product, `A`'s product, the scaling, `B`'s product)
//! and an addition. candle's backward gives every edge a zero-filled
//! gradient buffer plus an addition, so the adapter costs, beside its own
//! small products, a sum of the two `(M, N)` outputs in the forward pass,
//! two zero fills and two additions of the `(M, N)` output gradient, and an
//! addition of the two `(M, K)` input gradients, in every adapted
//! projection. The fused node computes, with `g = dY` as `(M, N)`, `t = s ·
//! x Aᵀ` `(M, r)` and `u = s · g B` `(M, r)`:
//!
//! ```text
//! forward   Y  = X Wᵀ + b,  Y += t Bᵀ     (the rank-r product accumulated into the output)
//! backward  dB = gᵀ t                     (t recomputed: M·K·r multiply-adds)
//!           dA = uᵀ X
//!           dX = g W,  dX += u A          (only when X tracks gradients)
//! ```
//!
//! The products are the ones the unfused nodes run, in the same orders, and
//! the accumulations add each product once to what was there: values and
//! gradients are bit-identical to the composition (tested).
//!
//! The base `W`, `b` must be frozen (constants, not `Var`s, as PEFT's base
//! layers are): a custom op has at most three inputs with gradients, and they
//! are `x`, `A` and `B`. A trainable base, another device or dtype, or shapes
//! that do not fit take the composition of candle ops, so the call works
//! everywhere.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};

use crate::cpu::{contiguous, with_cpu};
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::gemm::{matmul_add, matmul_new, Mat};
use crate::linear::{forward_vec, mat};
use crate::{Linear, NnError};

impl Linear {
    /// `self(x) + scaling · (x Aᵀ) Bᵀ`: this layer with a LoRA update of
    /// `lora_a (r, in)` and `lora_b (out, r)` (PEFT's `lora_A.weight` and
    /// `lora_B.weight`), the same values as PEFT's `base(x) +
    /// lora_B(lora_A(x)) * scaling`.
    ///
    /// With the layer's own weight and bias frozen (not `Var`s) and `x` on
    /// the CPU in `f32`/`f64`, this is one fused node with a lean backward
    /// (module docs), bit-identical to the composition it replaces; otherwise
    /// it is that composition of candle ops. Adapter shapes that do not fit
    /// the layer are an error naming them.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor, Var};
    /// use minibatch_nn::Linear;
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let base = Linear::new(Tensor::randn(0f32, 1., (6, 4), &dev)?, None);
    /// let a = Var::randn(0f32, 1., (2, 4), &dev)?;
    /// let b = Var::zeros((6, 2), DType::F32, &dev)?;
    /// let x = Tensor::randn(0f32, 1., (3, 4), &dev)?;
    /// let y = base.forward_lora(&x, a.as_tensor(), b.as_tensor(), 2.0)?;
    /// // B starts at zero: the output is the base layer's.
    /// assert_eq!(y.to_vec2::<f32>()?, base.forward(&x)?.to_vec2::<f32>()?);
    /// let grads = y.sum_all()?.backward()?;
    /// assert!(grads.get(b.as_tensor()).is_some());
    /// assert!(grads.get(base.weight()).is_none());
    /// # Ok(()) }
    /// ```
    pub fn forward_lora(
        &self,
        x: &Tensor,
        lora_a: &Tensor,
        lora_b: &Tensor,
        scaling: f64,
    ) -> candle_core::Result<Tensor> {
        let (out_dim, in_dim) = self.weight().dims2()?;
        let (ra, ia) = lora_a.dims2()?;
        let (ob, rb) = lora_b.dims2()?;
        if ia != in_dim || ob != out_dim || ra != rb {
            return Err(NnError::ShapeMismatch(format!(
                "forward_lora: lora_A {:?} and lora_B {:?} do not fit a layer from {in_dim} to {out_dim} (want (r, {in_dim}) and ({out_dim}, r))",
                lora_a.dims(),
                lora_b.dims()
            ))
            .into());
        }
        let dt = x.dtype();
        let fused = self.fused_applies(x)
            && !self.weight().track_op()
            && self.bias().is_none_or(|b| !b.track_op())
            && [lora_a, lora_b]
                .iter()
                .all(|t| cpu_kernel(t) && t.dtype() == dt);
        if !fused {
            // PEFT's composition, node by node.
            let h = Linear::new(lora_a.clone(), None).forward(x)?;
            let h = (h * scaling)?;
            return self.forward(x)? + Linear::new(lora_b.clone(), None).forward(&h)?;
        }
        x.apply_op3(
            lora_a,
            lora_b,
            LoraLinearOp {
                weight: self.weight().clone(),
                bias: self.bias().cloned(),
                scaling,
            },
        )
    }
}

/// The fused node over `(x, A, B)`; the frozen base rides in the op.
struct LoraLinearOp {
    weight: Tensor,
    bias: Option<Tensor>,
    scaling: f64,
}

/// `s · x Aᵀ` as `(M, r)`: the product then candle's affine `v · s + 0`
/// (what `(x Aᵀ) * s` runs), so the bits are the composition's.
fn scaled_product<T: Float>(a: Mat<T>, b: Mat<T>, s: T) -> Vec<T> {
    let mut t = matmul_new(a, b);
    for v in t.iter_mut() {
        *v = *v * s + T::zero();
    }
    t
}

impl LoraLinearOp {
    fn fwd<T: Float>(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut out, shape) = with_cpu(&self.weight, |ws, lw| match &self.bias {
            Some(bias) => with_cpu(bias, |bs, lbs| {
                forward_vec::<T>(x, lx, ws, lw, Some((bs, lbs)))
            }),
            None => forward_vec::<T>(x, lx, ws, lw, None),
        })?;
        let xm = mat::<T>(x, lx)?;
        let (am, bm) = (mat::<T>(a, la)?, mat::<T>(b, lb)?);
        let r = am.rows;
        let t = scaled_product(xm, am.t(), T::from_f64(self.scaling));
        matmul_add(&mut out, Mat::row_major(&t, xm.rows, r), bm.t());
        Ok((T::to_cpu_storage_owned(out), shape))
    }

    fn bwd_t<T: Float>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_da, want_db) = (x.track_op(), a.track_op(), b.track_op());
        let grad = grad.contiguous()?;
        let s = T::from_f64(self.scaling);
        let (r, k) = a.dims2()?;
        let n = b.dim(0)?;
        let m = x.elem_count().checked_div(k).unwrap_or(0);
        let dev = x.device();
        with_cpu(&grad, |gs, lg| {
            let g = Mat::row_major(contiguous::<T>(gs, lg, "forward_lora gradient")?, m, n);
            with_cpu(x, |xs, lx| {
                let xm = mat::<T>(xs, lx)?;
                with_cpu(a, |as_, la| {
                    let am = mat::<T>(as_, la)?;
                    with_cpu(b, |bs, lb| {
                        let bm = mat::<T>(bs, lb)?;
                        let db = if want_db {
                            let t = scaled_product(xm, am.t(), s);
                            let db = matmul_new(g.t(), Mat::row_major(&t, m, r));
                            Some(Tensor::from_vec(db, (n, r), dev)?)
                        } else {
                            None
                        };
                        if !(want_da || want_dx) {
                            return Ok((None, None, db));
                        }
                        let u = scaled_product(g, bm, s);
                        let um = Mat::row_major(&u, m, r);
                        let da = if want_da {
                            Some(Tensor::from_vec(matmul_new(um.t(), xm), (r, k), dev)?)
                        } else {
                            None
                        };
                        let dx = if want_dx {
                            let mut dx = with_cpu(&self.weight, |ws, lw| {
                                Ok(matmul_new(g, mat::<T>(ws, lw)?))
                            })?;
                            matmul_add(&mut dx, um, am);
                            Some(Tensor::from_vec(dx, x.shape(), dev)?)
                        } else {
                            None
                        };
                        Ok((dx, da, db))
                    })
                })
            })
        })
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "minibatch-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match x {
            CpuStorage::F32(_) => self.fwd::<f32>(x, lx, a, la, b, lb),
            CpuStorage::F64(_) => self.fwd::<f64>(x, lx, a, la, b, lb),
            _ => candle_core::bail!("forward_lora: the fused op takes f32 or f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, a, b, grad),
            DType::F64 => self.bwd_t::<f64>(x, a, b, grad),
            dt => candle_core::bail!("forward_lora: the fused op takes f32 or f64, got {dt:?}"),
        }
    }
}
