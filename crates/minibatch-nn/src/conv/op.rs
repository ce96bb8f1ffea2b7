//! The fused CPU convolution behind [`super::Conv2d`]: a candle custom op
//! over `(x, W)` or `(x, W, b)` whose forward pass is im2col + gemm per image
//! (the batch split over threads) and whose backward pass is gemm + col2im,
//! with per-thread `dW`/`db` partials summed in a fixed order.

use candle_core::{CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::unfold::{col2im_add, im2col, Geom};
use crate::cpu::contiguous;
use crate::float::Float;
use crate::gemm::{matmul_seq, Mat};
use crate::ops::simd::sum_8_pairwise;
use crate::split::{assume_init, fill_uninit, parts, run_parts, uninit};

/// The fused CPU convolution (see the module docs), as a custom op over
/// `(x, W)` or `(x, W, b)`.
pub(super) struct ConvOp {
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) dil: usize,
    pub(super) groups: usize,
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

    fn bwd_typed<T: Float>(
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

/// [`contiguous`] of a `(storage, layout)` pair (for `Option::map`).
fn host<'a, T: candle_core::WithDType>(
    (s, l): (&'a candle_core::CpuStorage, &Layout),
) -> candle_core::Result<&'a [T]> {
    contiguous(s, l, "conv2d")
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

fn conv_fwd<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, d: &Dims) -> Vec<T> {
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
    run_parts(out.chunks_mut(per * out_img).collect(), |part, chunk| {
        run((part, chunk))
    });
    // SAFETY: every image's output rows were filled, then accumulated into.
    unsafe { assume_init(out) }
}

type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

fn conv_bwd<T: Float>(x: &[T], w: &[T], grad: &[T], d: &Dims, need: Need) -> Grads<T> {
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
                        *acc += sum_8_pairwise(row);
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
    let partial = run_parts(slots, |part, slot| run((part, slot)));
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
