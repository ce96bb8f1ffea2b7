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

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::dispatch::cpu_kernel;
use crate::error::NnError;
mod op;
mod unfold;
use op::ConvOp;
use unfold::Geom;

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
    if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
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
