//! [`Conv2d`]: a drop-in for `candle_nn::Conv2d` with a fast, lean backward
//! pass on the CPU.
//!
//! For an input `x` of shape `(N, C, H, W)`, a weight `W` of shape
//! `(O, C/g, kh, kw)` and `g` groups, image `n` and group `q` give
//!
//! ```text
//! y[n, q]  = W_q · cols(x[n, q]) + b_q             W_q: (O/g, C/g·kh·kw), cols: (C/g·kh·kw, oh·ow)
//! dW_q     = Σ_n grad[n, q] · cols(x[n, q])ᵀ
//! db       = Σ_n Σ_pixels grad[n]
//! dx[n, q] = col2im(W_qᵀ · grad[n, q])
//! ```
//!
//! with `oh = (H + 2p - d·(kh - 1) - 1) / s + 1` (and `ow` alike) for
//! stride `s`, padding `p` and dilation `d` (see `im2col` for the columns).
//!
//! On the CPU (`f32`/`f64`) the layer is one candle custom op. Its forward
//! pass works image by image, the batch split over candle's threads: the
//! image's columns go into a per-thread scratch buffer (it stays in cache),
//! the output rows start as the bias and the gemm adds `W · cols` straight
//! into them. Its backward pass makes the columns again instead of keeping
//! them from the forward pass (they are `kh·kw` times the size of the input),
//! accumulates `dW` and `db` per thread, and computes `dx` only when `x`
//! tracks gradients: a data batch gets none. candle's own backward runs
//! through a direct-loop `conv_transpose2d` instead.
//!
//! On other devices (and with [`crate::set_tensor_path`]) the layer runs
//! candle's `conv2d` and bias addition, exactly `candle_nn::Conv2d`'s ops,
//! except for the geometries where candle's backward returns an input
//! gradient of the wrong shape (stride > 1 with a different remainder along
//! the height and the width); those run the im2col formulation as tensor ops
//! (`index_select` + matmul), whose autograd is right everywhere.

use candle_core::{CustomOp2, CustomOp3, DType, Layout, Module, Shape, Storage, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::gemm::{matmul_seq, Mat};
use crate::im2col::{assume_init, col2im_add, fill_uninit, im2col, parts, uninit, ConvFloat, Geom};

/// A 2-D convolution `y = conv(x, W) + b` over `(N, C, H, W)` inputs.
///
/// Same weights, names and initialisation as `candle_nn::conv2d`: `weight`
/// of shape `(out, in/groups, k, k)` (Kaiming normal), `bias` of shape
/// `(out,)` (uniform in `±1/sqrt(in)`), and the same `candle_nn::Conv2dConfig`
/// (`padding`, `stride`, `dilation`, `groups`; `cudnn_fwd_algo` is ignored),
/// so checkpoints and `VarMap`s are interchangeable. The maths is in the
/// module docs.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// use minibatch_nn::conv2d;
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let cfg = Conv2dConfig { padding: 1, ..Default::default() };
/// let conv = conv2d(3, 8, 3, cfg, vb.pp("c1"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 10, 12), &Device::Cpu)?;
/// let y = conv.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 8, 10, 12]);
/// // The data batch gets no gradient; the weights do.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(&x).is_none());
/// assert_eq!(grads.get(conv.weight()).unwrap().dims(), &[8, 3, 3, 3]);
///
/// // Channel counts that do not fit are an error, not a panic.
/// let bad = Tensor::zeros((2, 4, 10, 12), DType::F32, &Device::Cpu)?;
/// assert!(conv.forward(&bad).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

fn check_channels(in_channels: usize, out_channels: usize, groups: usize) -> crate::Result<()> {
    if groups == 0 {
        return Err(NnError::InvalidArgument(
            "conv2d: groups must be at least 1".into(),
        ));
    }
    if in_channels % groups != 0 || out_channels % groups != 0 {
        return Err(NnError::InvalidArgument(format!(
            "conv2d: groups {groups} must divide both the input channels {in_channels} and the output channels {out_channels}"
        )));
    }
    Ok(())
}

fn weight(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: &Conv2dConfig,
    vb: &VarBuilder,
) -> candle_core::Result<Tensor> {
    check_channels(in_channels, out_channels, cfg.groups)?;
    vb.get_with_hints(
        (
            out_channels,
            in_channels / cfg.groups,
            kernel_size,
            kernel_size,
        ),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

/// A [`Conv2d`] of `in_channels -> out_channels` with a square
/// `kernel_size` kernel and a bias, initialised like `candle_nn::conv2d`,
/// its weights created in (or read from) `vb` as `weight` and `bias`.
/// Unlike candle-nn, `groups` of 0 or one that does not divide both channel
/// counts is an error here instead of a panic or a wrong shape.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let ws = weight(in_channels, out_channels, kernel_size, &cfg, &vb)?;
    let bound = 1. / (in_channels as f64).sqrt();
    let init_bs = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let bs = vb.get_with_hints(out_channels, "bias", init_bs)?;
    Ok(Conv2d::new(ws, Some(bs), cfg))
}

/// [`conv2d`] without a bias.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let ws = weight(in_channels, out_channels, kernel_size, &cfg, &vb)?;
    Ok(Conv2d::new(ws, None, cfg))
}

impl Conv2d {
    /// A layer over existing weights: `weight` of shape
    /// `(out, in/groups, kh, kw)` (the kernel may be non-square), `bias` of
    /// shape `(out,)`. Shapes are checked when the layer runs.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    /// The configuration (padding, stride, dilation, groups).
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }

    /// The weight, shape `(out, in/groups, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shape `(out,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Folds a batch norm that follows this layer into its weight and bias,
    /// as `candle_nn::Conv2d::absorb_bn`: `W' = W·γ/σ`, `b' = β + γ/σ·(b - μ)`
    /// with `σ = sqrt(running_var + eps)`.
    pub fn absorb_bn(&self, bn: &candle_nn::BatchNorm) -> candle_core::Result<Self> {
        let Some((w_bn, b_bn)) = bn.weight_and_bias() else {
            return Err(NnError::InvalidArgument(
                "absorb_bn: the batch norm has no weight and bias".into(),
            )
            .into());
        };
        let std_ = w_bn.div(&((bn.running_var() + bn.eps())?.sqrt()?))?;
        let weight =
            self.weight
                .broadcast_mul(&std_.reshape((self.weight.dims4()?.0, 1, 1, 1))?)?;
        let bias = match &self.bias {
            None => b_bn.sub(&std_.mul(bn.running_mean())?)?,
            Some(bias) => b_bn.add(&std_.mul(&bias.sub(bn.running_mean())?)?)?,
        };
        Ok(Self::new(weight, Some(bias), self.config))
    }

    /// The geometry of one image of `x`, after checking every shape and
    /// argument; returns `(batch, geometry, out_channels)`.
    fn dims(&self, x: &Tensor) -> crate::Result<(usize, Geom, usize)> {
        let cfg = &self.config;
        let (n, c, h, w) = x.dims4().map_err(|_| {
            NnError::ShapeMismatch(format!(
                "conv2d: the input must be (batch, channels, height, width), got {:?}",
                x.dims()
            ))
        })?;
        let (o, ci, kh, kw) = self.weight.dims4().map_err(|_| {
            NnError::ShapeMismatch(format!(
                "conv2d: the weight must be (out, in/groups, kh, kw), got {:?}",
                self.weight.dims()
            ))
        })?;
        check_channels(c, o, cfg.groups)?;
        if ci * cfg.groups != c {
            return Err(NnError::ShapeMismatch(format!(
                "conv2d: the input has {c} channels but the weight {:?} with groups {} expects {}",
                self.weight.dims(),
                cfg.groups,
                ci * cfg.groups
            )));
        }
        if cfg.stride == 0 || cfg.dilation == 0 {
            return Err(NnError::InvalidArgument(format!(
                "conv2d: stride ({}) and dilation ({}) must be at least 1",
                cfg.stride, cfg.dilation
            )));
        }
        if kh == 0 || kw == 0 {
            return Err(NnError::InvalidArgument(format!(
                "conv2d: empty kernel {kh}x{kw}"
            )));
        }
        let (eh, ew) = (cfg.dilation * (kh - 1) + 1, cfg.dilation * (kw - 1) + 1);
        let (ph, pw) = (h + 2 * cfg.padding, w + 2 * cfg.padding);
        if eh > ph || ew > pw {
            return Err(NnError::ShapeMismatch(format!(
                "conv2d: the kernel {kh}x{kw} (dilation {}, so {eh}x{ew}) is larger than the padded input {ph}x{pw}",
                cfg.dilation
            )));
        }
        if let Some(b) = &self.bias {
            if b.dims() != [o] {
                return Err(NnError::ShapeMismatch(format!(
                    "conv2d: the bias must be ({o},), got {:?}",
                    b.dims()
                )));
            }
        }
        for (t, what) in [(Some(&self.weight), "weight"), (self.bias.as_ref(), "bias")] {
            if let Some(t) = t {
                if t.dtype() != x.dtype() {
                    return Err(NnError::InvalidArgument(format!(
                        "conv2d: the input is {:?} but the {what} is {:?}",
                        x.dtype(),
                        t.dtype()
                    )));
                }
            }
        }
        let g = Geom {
            c,
            h,
            w,
            kh,
            kw,
            stride: cfg.stride,
            pad: cfg.padding,
            dil: cfg.dilation,
            oh: (ph - eh) / cfg.stride + 1,
            ow: (pw - ew) / cfg.stride + 1,
        };
        Ok((n, g, o))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, g, _) = self.dims(x)?;
        let fused = cpu_kernel(x)
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.weight.device().is_cpu();
        if fused {
            let op = ConvOp {
                stride: self.config.stride,
                pad: self.config.padding,
                dil: self.config.dilation,
                groups: self.config.groups,
            };
            let x = x.contiguous()?;
            let w = self.weight.contiguous()?;
            return match &self.bias {
                Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
                None => x.apply_op2(&w, op),
            };
        }
        let cfg = &self.config;
        let y = if candle_backward_fits(&g) {
            // candle_nn::Conv2d's own ops.
            x.conv2d(
                &self.weight,
                cfg.padding,
                cfg.stride,
                cfg.dilation,
                cfg.groups,
            )?
        } else {
            conv_as_tensor_ops(x, &self.weight, &g, cfg.groups)?
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        }
    }
}

/// Whether candle's own `conv2d` backward gets this geometry right. It
/// computes the input gradient with a `conv_transpose2d` whose output padding
/// it takes from the height alone, so it returns a gradient of the wrong
/// width when `(H + 2p - d·(kh-1) - 1) mod s` and the same for the width
/// differ (a 8x7 input with a 3x3 kernel, stride 2 and padding 1, say).
fn candle_backward_fits(g: &Geom) -> bool {
    let rem = |size: usize, k: usize| (size + 2 * g.pad - g.dil * (k - 1) - 1) % g.stride;
    rem(g.h, g.kh) == rem(g.w, g.kw)
}

/// The convolution as candle tensor ops whose autograd is right on every
/// device: zero padding, the columns gathered with one `index_select`
/// (`(N, C·kh·kw, oh·ow)`), and a batched matmul per group.
fn conv_as_tensor_ops(
    x: &Tensor,
    w: &Tensor,
    g: &Geom,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let o = w.dim(0)?;
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let xp = if g.pad > 0 {
        x.pad_with_zeros(2, g.pad, g.pad)?
            .pad_with_zeros(3, g.pad, g.pad)?
    } else {
        x.clone()
    };
    let p = g.out_pixels();
    let kk = g.kh * g.kw;
    let mut idx = Vec::with_capacity(kk * p);
    for i in 0..g.kh {
        for j in 0..g.kw {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    idx.push(((oy * g.stride + i * g.dil) * wp + ox * g.stride + j * g.dil) as u32);
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, kk * p, x.device())?;
    let kg = g.c / groups * kk;
    let cols = xp
        .reshape((n, g.c, hp * wp))?
        .index_select(&idx, 2)?
        .reshape((n, groups, kg, p))?;
    let wg = w.reshape((1, groups, o / groups, kg))?;
    wg.broadcast_matmul(&cols)?.reshape((n, o, g.oh, g.ow))
}

/// The fused CPU convolution (see the module docs), as a custom op over
/// `(x, W)` or `(x, W, b)`.
struct ConvOp {
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
}

/// Sizes of one call: batch, image geometry, output channels, groups.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    g: Geom,
    o: usize,
    groups: usize,
}

impl Dims {
    /// Rows of one group's columns: `C/g·kh·kw`.
    fn kg(&self) -> usize {
        self.g.col_rows() / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    fn image(&self) -> usize {
        self.g.c * self.g.h * self.g.w
    }
    /// Images per thread and the number of parts.
    fn split(&self) -> (usize, usize) {
        let work = self.n * self.o * self.kg() * self.g.out_pixels();
        let per = self.n.div_ceil(parts(self.n, work)).max(1);
        (per, self.n.div_ceil(per))
    }
}

impl ConvOp {
    fn dims(&self, lx: &Layout, lw: &Layout) -> candle_core::Result<Dims> {
        let (n, c, h, w) = lx.shape().dims4()?;
        let (o, ci, kh, kw) = lw.shape().dims4()?;
        let (eh, ew) = (self.dil * (kh - 1) + 1, self.dil * (kw - 1) + 1);
        if ci * self.groups != c
            || o % self.groups != 0
            || eh > h + 2 * self.pad
            || ew > w + 2 * self.pad
        {
            candle_core::bail!(
                "conv2d: input {:?} and weight {:?} do not fit",
                lx.dims(),
                lw.dims()
            );
        }
        let g = Geom {
            c,
            h,
            w,
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
            dil: self.dil,
            oh: (h + 2 * self.pad - eh) / self.stride + 1,
            ow: (w + 2 * self.pad - ew) / self.stride + 1,
        };
        Ok(Dims {
            n,
            g,
            o,
            groups: self.groups,
        })
    }

    fn fwd(
        &self,
        x: (&candle_core::CpuStorage, &Layout),
        w: (&candle_core::CpuStorage, &Layout),
        b: Option<(&candle_core::CpuStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        use candle_core::CpuStorage as S;
        let d = self.dims(x.1, w.1)?;
        let shape = Shape::from((d.n, d.o, d.g.oh, d.g.ow));
        let out = match (x.0, w.0) {
            (S::F32(_), S::F32(_)) => {
                S::F32(conv_fwd(host(x)?, host(w)?, b.map(host).transpose()?, &d))
            }
            (S::F64(_), S::F64(_)) => {
                S::F64(conv_fwd(host(x)?, host(w)?, b.map(host).transpose()?, &d))
            }
            _ => candle_core::bail!("conv2d: the fused kernel runs on f32 or f64 only"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Need {
            dx: x.track_op(),
            dw: w.track_op(),
            db: with_bias,
        };
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, w, &grad, need),
            DType::F64 => self.bwd_typed::<f64>(x, w, &grad, need),
            dt => candle_core::bail!("conv2d: the fused kernel runs on f32 or f64, not {dt:?}"),
        }
    }

    fn bwd_typed<T: ConvFloat>(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        need: Need,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cpu(cx), Storage::Cpu(cw), Storage::Cpu(cg)) = (&*sx, &*sw, &*sg) else {
            candle_core::bail!("conv2d: the fused backward got a tensor off the CPU");
        };
        let d = self.dims(lx, lw)?;
        if lg.dims() != [d.n, d.o, d.g.oh, d.g.ow] {
            candle_core::bail!("conv2d: gradient of shape {:?}", lg.dims());
        }
        let (dx, dw, db) = conv_bwd::<T>(
            host::<T>((cx, lx))?,
            host::<T>((cw, lw))?,
            host::<T>((cg, lg))?,
            &d,
            need,
        );
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, lx.shape(), dev))
            .transpose()?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, lw.shape(), dev))
            .transpose()?;
        let db = db.map(|v| Tensor::from_vec(v, d.o, dev)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// The elements of a contiguous CPU storage from its layout's offset.
fn host<'a, T: candle_core::WithDType>(
    (s, l): (&'a candle_core::CpuStorage, &Layout),
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("conv2d: the fused kernel needs contiguous tensors"),
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "minibatch-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &Layout,
        w: &candle_core::CpuStorage,
        lw: &Layout,
        b: &candle_core::CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), Some((b, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        ConvOp::bwd(self, x, w, b.track_op(), grad)
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "minibatch-conv2d-no-bias"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &Layout,
        w: &candle_core::CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = ConvOp::bwd(self, x, w, false, grad)?;
        Ok((dx, dw))
    }
}

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
struct Need {
    dx: bool,
    dw: bool,
    db: bool,
}

/// `W_q` of group `q`: rows `q·O/g..`, `(O/g, C/g·kh·kw)` row-major.
fn w_group<'a, T>(w: &'a [T], d: &Dims, q: usize) -> Mat<'a, T> {
    let (og, kg) = (d.og(), d.kg());
    Mat::row_major(&w[q * og * kg..(q + 1) * og * kg], og, kg)
}

/// Rows `q·rows..(q+1)·rows` of a row-major matrix with `p` columns.
fn rows<T>(m: &[T], q: usize, rows: usize, p: usize) -> Mat<'_, T> {
    Mat::row_major(&m[q * rows * p..(q + 1) * rows * p], rows, p)
}

fn conv_fwd<T: ConvFloat>(x: &[T], w: &[T], bias: Option<&[T]>, d: &Dims) -> Vec<T> {
    let (g, p, img) = (d.g, d.g.out_pixels(), d.image());
    let out_img = d.o * p;
    let mut out = uninit::<T>(d.n * out_img);
    let (per, _) = d.split();
    let pointwise = g.is_pointwise();
    let scratch = if pointwise { 0 } else { g.col_rows() * p };
    let run = |(part, chunk): (usize, &mut [std::mem::MaybeUninit<T>])| {
        T::with_scratch(scratch, |buf| {
            for (k, out_n) in chunk.chunks_mut(out_img).enumerate() {
                let n = part * per + k;
                let x_n = &x[n * img..(n + 1) * img];
                let cols: &[T] = if pointwise {
                    x_n
                } else {
                    im2col(x_n, &g, buf);
                    buf
                };
                // The rows start as the bias; the gemm adds W·cols onto them.
                let out_n = match bias {
                    Some(b) => {
                        for (o, row) in out_n.chunks_mut(p).enumerate() {
                            fill_uninit(row, b[o]);
                        }
                        // SAFETY: every row was just written.
                        unsafe { &mut *(out_n as *mut [_] as *mut [T]) }
                    }
                    None => fill_uninit(out_n, T::ZERO),
                };
                for q in 0..d.groups {
                    matmul_seq(
                        &mut out_n[q * d.og() * p..],
                        p,
                        w_group(w, d, q),
                        rows(cols, q, d.kg(), p),
                        true,
                    );
                }
            }
        })
    };
    if per >= d.n {
        run((0, &mut out));
    } else {
        out.par_chunks_mut(per * out_img).enumerate().for_each(run);
    }
    // SAFETY: every image's output rows were filled, then accumulated into.
    unsafe { assume_init(out) }
}

type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

fn conv_bwd<T: ConvFloat>(x: &[T], w: &[T], grad: &[T], d: &Dims, need: Need) -> Grads<T> {
    let (g, p, img) = (d.g, d.g.out_pixels(), d.image());
    let (o, kg, og) = (d.o, d.kg(), d.og());
    let (per, nparts) = d.split();
    let pointwise = g.is_pointwise();
    let kk = g.col_rows() * p;
    let cols_len = if need.dw && !pointwise { kk } else { 0 };
    let dcols_len = if need.dx && !pointwise { kk } else { 0 };
    let mut dx = need.dx.then(|| uninit::<T>(d.n * img));
    let slots: Vec<Option<&mut [std::mem::MaybeUninit<T>]>> = match &mut dx {
        Some(v) => v.chunks_mut(per * img).map(Some).collect(),
        None => (0..nparts).map(|_| None).collect(),
    };
    let run = |(part, slot): (usize, Option<&mut [std::mem::MaybeUninit<T>]>)| {
        let mut dw = if need.dw {
            vec![T::ZERO; o * kg]
        } else {
            Vec::new()
        };
        let mut db = if need.db {
            vec![T::ZERO; o]
        } else {
            Vec::new()
        };
        let mut slot = slot;
        T::with_scratch(cols_len + dcols_len, |buf| {
            let (cols_buf, dcols_buf) = buf.split_at_mut(cols_len);
            let n0 = part * per;
            let n1 = (n0 + per).min(d.n);
            for n in n0..n1 {
                let x_n = &x[n * img..(n + 1) * img];
                let g_n = &grad[n * o * p..(n + 1) * o * p];
                if need.dw {
                    let cols: &[T] = if pointwise {
                        x_n
                    } else {
                        im2col(x_n, &g, cols_buf);
                        cols_buf
                    };
                    // dW_q += grad_q · cols_qᵀ
                    for q in 0..d.groups {
                        matmul_seq(
                            &mut dw[q * og * kg..],
                            kg,
                            rows(g_n, q, og, p),
                            rows(cols, q, kg, p).t(),
                            true,
                        );
                    }
                }
                if need.db {
                    for (acc, row) in db.iter_mut().zip(g_n.chunks_exact(p)) {
                        let mut s = T::ZERO;
                        for v in row {
                            s += *v;
                        }
                        *acc += s;
                    }
                }
                if let Some(chunk) = slot.as_deref_mut() {
                    let k = n - n0;
                    let dx_n = fill_uninit(&mut chunk[k * img..(k + 1) * img], T::ZERO);
                    if pointwise {
                        for q in 0..d.groups {
                            matmul_seq(
                                &mut dx_n[q * kg * p..],
                                p,
                                w_group(w, d, q).t(),
                                rows(g_n, q, og, p),
                                true,
                            );
                        }
                    } else {
                        // dcols_q = W_qᵀ · grad_q, then back onto the pixels.
                        for q in 0..d.groups {
                            matmul_seq(
                                &mut dcols_buf[q * kg * p..],
                                p,
                                w_group(w, d, q).t(),
                                rows(g_n, q, og, p),
                                false,
                            );
                        }
                        col2im_add(dcols_buf, &g, dx_n);
                    }
                }
            }
        });
        (dw, db)
    };
    let partial: Vec<(Vec<T>, Vec<T>)> = if nparts == 1 {
        slots.into_iter().enumerate().map(run).collect()
    } else {
        slots.into_par_iter().enumerate().map(run).collect()
    };
    // Sum the per-thread parts in a fixed order: the same result every run.
    let mut it = partial.into_iter();
    let (mut dw, mut db) = it.next().unwrap_or_default();
    for (pw, pb) in it {
        for (a, b) in dw.iter_mut().zip(&pw) {
            *a += *b;
        }
        for (a, b) in db.iter_mut().zip(&pb) {
            *a += *b;
        }
    }
    // SAFETY: every image of dx was zero-filled, then accumulated into.
    let dx = dx.map(|v| unsafe { assume_init(v) });
    (dx, need.dw.then_some(dw), need.db.then_some(db))
}
