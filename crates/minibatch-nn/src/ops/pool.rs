//! 2-D max and average pooling with correct, fast backward passes.
//!
//! Same signatures and output sizes as candle's `Tensor::max_pool2d`,
//! `max_pool2d_with_stride`, `avg_pool2d` and `avg_pool2d_with_stride`
//! (no padding; `oh = (H - kh) / sh + 1`, `ow` alike). For window `w(o)` of
//! output `o`:
//!
//! ```text
//! max:  y[o] = max_{i ∈ w(o)} x[i]        dx[i] += grad[o]   for i = the first argmax of w(o)
//! avg:  y[o] = Σ_{i ∈ w(o)} x[i] / (kh·kw)  dx[i] += grad[o] / (kh·kw)   for every i ∈ w(o)
//! ```
//!
//! as PyTorch's `MaxPool2d` / `AvgPool2d` (in the CPU kernel a NaN in a
//! window is its max, as in PyTorch). candle's own `max_pool2d` backward is wrong: it multiplies
//! the gradient by the fraction of the window's elements that equal the max,
//! so a 2x2 window with one max passes on 1/4 of the gradient, where this
//! passes all of it; and neither of candle's pooling backwards supports a
//! stride other than the kernel size.
//!
//! On the CPU (`f32`/`f64`) each op is a custom op: max pooling records the
//! argmax of every window in its forward pass and its backward scatters the
//! gradient there; planes are split over candle's threads. Elsewhere (and
//! with [`crate::set_tensor_path`]) the windows are gathered with
//! `index_select`, then `argmax` + `gather` (max) or `mean` (average) run as
//! candle tensor ops, whose autograd is correct.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, ToUsize2};

use crate::cpu::contiguous;
use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::float::Float;
use crate::split::{assume_init, fill_uninit, parts, run_parts, uninit};

/// Pooling window geometry over one plane.
#[derive(Clone, Copy, Debug)]
struct Win {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    oh: usize,
    ow: usize,
}

impl Win {
    fn new(
        op: &str,
        x: &Tensor,
        k: (usize, usize),
        s: (usize, usize),
    ) -> crate::Result<(usize, Self)> {
        let (n, c, h, w) = x.dims4().map_err(|_| {
            NnError::ShapeMismatch(format!(
                "{op}: the input must be (batch, channels, height, width), got {:?}",
                x.dims()
            ))
        })?;
        if k.0 == 0 || k.1 == 0 || s.0 == 0 || s.1 == 0 {
            return Err(NnError::InvalidArgument(format!(
                "{op}: kernel {k:?} and stride {s:?} must be at least 1"
            )));
        }
        if h < k.0 || w < k.1 {
            return Err(NnError::ShapeMismatch(format!(
                "{op}: the kernel {k:?} is larger than the input {h}x{w}"
            )));
        }
        if h.checked_mul(w).is_none_or(|hw| hw > u32::MAX as usize) {
            return Err(NnError::InvalidArgument(format!(
                "{op}: planes of {h}x{w} are too large"
            )));
        }
        Ok((
            n * c,
            Self {
                h,
                w,
                kh: k.0,
                kw: k.1,
                sh: s.0,
                sw: s.1,
                oh: (h - k.0) / s.0 + 1,
                ow: (w - k.1) / s.1 + 1,
            },
        ))
    }
    fn plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    /// Planes per part and the number of parts for `planes` planes.
    fn split(&self, planes: usize) -> usize {
        let work = planes * self.out_plane() * self.kh * self.kw;
        planes.div_ceil(parts(planes, work)).max(1)
    }
    /// The flat in-plane index of every window element, window by window:
    /// `(oh·ow·kh·kw,)` for the tensor path.
    fn window_indices(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.out_plane() * self.kh * self.kw);
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                for i in 0..self.kh {
                    for j in 0..self.kw {
                        v.push(((oy * self.sh + i) * self.w + ox * self.sw + j) as u32);
                    }
                }
            }
        }
        v
    }
    /// `(N, C, oh·ow, kh·kw)`: every window of `x` as a row (tensor ops).
    fn windows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let idx = Tensor::from_vec(
            self.window_indices(),
            self.out_plane() * self.kh * self.kw,
            x.device(),
        )?;
        x.reshape((n, c, self.plane()))?
            .index_select(&idx, 2)?
            .reshape((n, c, self.out_plane(), self.kh * self.kw))
    }
}

/// 2-D max pooling with a `k x k` (or `(kh, kw)`) window and stride `k`,
/// like candle's `Tensor::max_pool2d`, with PyTorch's backward pass (the
/// whole gradient to the first maximum of each window). See the module docs.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::max_pool2d;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[[[[1f32, 2., 5., 0.], [3., 4., 1., 1.]]]], &Device::Cpu)?; // (1, 1, 2, 4)
/// let y = max_pool2d(x.as_tensor(), 2)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [4., 5.]);
/// let g = y.sum_all()?.backward()?;
/// let dx = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(dx, [0., 0., 1., 0., 0., 1., 0., 0.]); // candle's own gives 0.25
/// # Ok(()) }
/// ```
pub fn max_pool2d<T: ToUsize2>(x: &Tensor, sz: T) -> candle_core::Result<Tensor> {
    let sz = sz.to_usize2();
    max_pool2d_with_stride(x, sz, sz)
}

/// [`max_pool2d`] with a stride that may differ from the kernel size
/// (overlapping windows pass each their gradient to their own argmax), like
/// candle's `Tensor::max_pool2d_with_stride`.
pub fn max_pool2d_with_stride<T: ToUsize2>(
    x: &Tensor,
    kernel_size: T,
    stride: T,
) -> candle_core::Result<Tensor> {
    let (k, s) = (kernel_size.to_usize2(), stride.to_usize2());
    let (_, win) = Win::new("max_pool2d", x, k, s)?;
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = MaxPoolOp {
            win,
            argmax: OnceLock::new(),
        };
        return x.contiguous()?.apply_op1(op);
    }
    let (n, c, _, _) = x.dims4()?;
    let windows = win.windows(x)?;
    let am = windows.argmax_keepdim(3)?;
    windows.gather(&am, 3)?.reshape((n, c, win.oh, win.ow))
}

/// 2-D average pooling with a `k x k` (or `(kh, kw)`) window and stride
/// `k`, like candle's `Tensor::avg_pool2d`; its backward spreads each
/// gradient evenly over its window. See the module docs.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_nn::ops::avg_pool2d;
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[[[[1f32, 2., 5., 0.], [3., 4., 1., 2.]]]], &Device::Cpu)?;
/// let y = avg_pool2d(x.as_tensor(), 2)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [2.5, 2.]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?, [0.25; 8]);
/// # Ok(()) }
/// ```
pub fn avg_pool2d<T: ToUsize2>(x: &Tensor, sz: T) -> candle_core::Result<Tensor> {
    let sz = sz.to_usize2();
    avg_pool2d_with_stride(x, sz, sz)
}

/// [`avg_pool2d`] with a stride that may differ from the kernel size, like
/// candle's `Tensor::avg_pool2d_with_stride` (whose backward candle does not
/// support).
pub fn avg_pool2d_with_stride<T: ToUsize2>(
    x: &Tensor,
    kernel_size: T,
    stride: T,
) -> candle_core::Result<Tensor> {
    let (k, s) = (kernel_size.to_usize2(), stride.to_usize2());
    let (_, win) = Win::new("avg_pool2d", x, k, s)?;
    if cpu_kernel(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(AvgPoolOp { win });
    }
    let (n, c, _, _) = x.dims4()?;
    win.windows(x)?.mean(3)?.reshape((n, c, win.oh, win.ow))
}

/// Runs `f(first_plane, out_chunk)` over the planes of a `(planes·len)`
/// output, split over threads in parts of `per` planes.
fn over_planes<T: Send>(
    out: &mut [MaybeUninit<T>],
    len: usize,
    per: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) {
    if len == 0 {
        return;
    }
    run_parts(out.chunks_mut(per * len).collect(), |i, chunk| {
        f(i * per, chunk)
    });
}

/// Max pooling on the CPU; keeps every window's argmax (in-plane index)
/// for its backward pass.
struct MaxPoolOp {
    win: Win,
    argmax: OnceLock<Vec<u32>>,
}

/// A part's output values and argmaxes.
type Pair<'a, T> = (&'a mut [MaybeUninit<T>], &'a mut [MaybeUninit<u32>]);

fn max_fwd<T: Float>(x: &[T], win: &Win) -> (Vec<T>, Vec<u32>) {
    let (hw, op) = (win.plane(), win.out_plane());
    let planes = x.len() / hw;
    let mut out = uninit::<T>(planes * op);
    let mut am = uninit::<u32>(planes * op);
    let per = win.split(planes);
    // Values and argmaxes are written side by side, so both split alike.
    let pairs: Vec<Pair<T>> = out
        .chunks_mut(per * op)
        .zip(am.chunks_mut(per * op))
        .collect();
    let run = |(part, (o, a)): (usize, &mut Pair<T>)| {
        for (k, (o, a)) in o.chunks_mut(op).zip(a.chunks_mut(op)).enumerate() {
            let p = &x[(part * per + k) * hw..(part * per + k + 1) * hw];
            if (win.kh, win.kw, win.sh, win.sw) == (2, 2, 2, 2) {
                max_plane_2x2(p, win, o, a);
            } else {
                max_plane(p, win, o, a);
            }
        }
    };
    run_parts(pairs, |part, mut pair| run((part, &mut pair)));
    // SAFETY: every output position of every plane was written above.
    unsafe { (assume_init(out), assume_init(am)) }
}

/// PyTorch's running-max rule: `v` takes over from `m` if it is larger or NaN
/// (so the first maximum wins, and the last NaN).
#[inline(always)]
fn takes_over<T: Float>(v: T, m: T) -> bool {
    v > m || v.is_nan()
}

/// Max pooling of one plane, any window and stride.
fn max_plane<T: Float>(p: &[T], win: &Win, o: &mut [MaybeUninit<T>], a: &mut [MaybeUninit<u32>]) {
    for oy in 0..win.oh {
        for ox in 0..win.ow {
            let (y0, x0) = (oy * win.sh, ox * win.sw);
            let mut best = y0 * win.w + x0;
            let mut m = p[best];
            for i in 0..win.kh {
                let row = (y0 + i) * win.w + x0;
                for (j, &v) in p[row..row + win.kw].iter().enumerate() {
                    if takes_over(v, m) {
                        m = v;
                        best = row + j;
                    }
                }
            }
            o[oy * win.ow + ox].write(m);
            a[oy * win.ow + ox].write(best as u32);
        }
    }
}

/// Max pooling of one plane with 2x2 windows and stride 2 (the common
/// case), branch-free: each row pair is reduced across, then the two rows
/// against each other, which picks the same element as the running max over
/// the window in row-major order.
fn max_plane_2x2<T: Float>(
    p: &[T],
    win: &Win,
    o: &mut [MaybeUninit<T>],
    a: &mut [MaybeUninit<u32>],
) {
    let w = win.w;
    for oy in 0..win.oh {
        let r0 = &p[2 * oy * w..2 * oy * w + 2 * win.ow];
        let r1 = &p[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * win.ow];
        let o = &mut o[oy * win.ow..(oy + 1) * win.ow];
        let a = &mut a[oy * win.ow..(oy + 1) * win.ow];
        let base = (2 * oy * w) as u32;
        for (ox, ((o, a), (q0, q1))) in o
            .iter_mut()
            .zip(a.iter_mut())
            .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
            .enumerate()
        {
            let t0 = takes_over(q0[1], q0[0]);
            let (m0, i0) = if t0 { (q0[1], 1) } else { (q0[0], 0) };
            let t1 = takes_over(q1[1], q1[0]);
            let (m1, i1) = if t1 { (q1[1], 1) } else { (q1[0], 0) };
            let (m, i) = if takes_over(m1, m0) {
                (m1, w as u32 + i1)
            } else {
                (m0, i0)
            };
            o.write(m);
            a.write(base + 2 * ox as u32 + i);
        }
    }
}

fn max_bwd<T: Float>(grad: &[T], am: &[u32], win: &Win) -> Vec<T> {
    let (hw, op) = (win.plane(), win.out_plane());
    let planes = grad.len() / op.max(1);
    let mut dx = uninit::<T>(planes * hw);
    let per = win.split(planes);
    over_planes(&mut dx, hw, per, |first, chunk| {
        for (k, d) in chunk.chunks_mut(hw).enumerate() {
            let d = fill_uninit(d, T::ZERO);
            let pl = first + k;
            let (g, a) = (&grad[pl * op..(pl + 1) * op], &am[pl * op..(pl + 1) * op]);
            for (&gv, &i) in g.iter().zip(a) {
                d[i as usize] += gv;
            }
        }
    });
    // SAFETY: every plane was zero-filled, then accumulated into.
    unsafe { assume_init(dx) }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "minibatch-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        if (h, w) != (self.win.h, self.win.w) {
            candle_core::bail!("max_pool2d: input {:?} changed", l.dims());
        }
        let (out, am) = match s {
            CpuStorage::F32(_) => {
                let (o, a) = max_fwd(contiguous::<f32>(s, l, "pool2d")?, &self.win);
                (CpuStorage::F32(o), a)
            }
            CpuStorage::F64(_) => {
                let (o, a) = max_fwd(contiguous::<f64>(s, l, "pool2d")?, &self.win);
                (CpuStorage::F64(o), a)
            }
            _ => candle_core::bail!("max_pool2d: the fused kernel runs on f32 or f64 only"),
        };
        let _ = self.argmax.set(am);
        Ok((out, Shape::from((n, c, self.win.oh, self.win.ow))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(am) = self.argmax.get() else {
            candle_core::bail!("max_pool2d: backward before forward");
        };
        let grad = grad.contiguous()?;
        let (s, l) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("max_pool2d: the fused backward got a gradient off the CPU");
        };
        let dx = match s {
            CpuStorage::F32(_) => Tensor::from_vec(
                max_bwd(contiguous::<f32>(s, l, "pool2d")?, am, &self.win),
                arg.shape(),
                arg.device(),
            )?,
            CpuStorage::F64(_) => Tensor::from_vec(
                max_bwd(contiguous::<f64>(s, l, "pool2d")?, am, &self.win),
                arg.shape(),
                arg.device(),
            )?,
            _ => candle_core::bail!("max_pool2d: the fused kernel runs on f32 or f64 only"),
        };
        Ok(Some(dx))
    }
}

/// Average pooling on the CPU.
struct AvgPoolOp {
    win: Win,
}

fn avg_fwd<T: Float>(x: &[T], win: &Win) -> Vec<T> {
    let (hw, op) = (win.plane(), win.out_plane());
    let planes = x.len() / hw;
    let count = T::from_usize(win.kh * win.kw);
    let mut out = uninit::<T>(planes * op);
    over_planes(&mut out, op, win.split(planes), |first, chunk| {
        for (k, o) in chunk.chunks_mut(op).enumerate() {
            let p = &x[(first + k) * hw..(first + k + 1) * hw];
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let mut s = T::ZERO;
                    for i in 0..win.kh {
                        let row = (oy * win.sh + i) * win.w + ox * win.sw;
                        for &v in &p[row..row + win.kw] {
                            s += v;
                        }
                    }
                    o[oy * win.ow + ox].write(s / count);
                }
            }
        }
    });
    // SAFETY: every output position of every plane was written above.
    unsafe { assume_init(out) }
}

fn avg_bwd<T: Float>(grad: &[T], win: &Win) -> Vec<T> {
    let (hw, op) = (win.plane(), win.out_plane());
    let planes = grad.len() / op.max(1);
    let count = T::from_usize(win.kh * win.kw);
    let mut dx = uninit::<T>(planes * hw);
    over_planes(&mut dx, hw, win.split(planes), |first, chunk| {
        for (k, d) in chunk.chunks_mut(hw).enumerate() {
            let d = fill_uninit(d, T::ZERO);
            let g = &grad[(first + k) * op..(first + k + 1) * op];
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let v = g[oy * win.ow + ox] / count;
                    for i in 0..win.kh {
                        let row = (oy * win.sh + i) * win.w + ox * win.sw;
                        for e in &mut d[row..row + win.kw] {
                            *e += v;
                        }
                    }
                }
            }
        }
    });
    // SAFETY: every plane was zero-filled, then accumulated into.
    unsafe { assume_init(dx) }
}

impl CustomOp1 for AvgPoolOp {
    fn name(&self) -> &'static str {
        "minibatch-avg-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        if (h, w) != (self.win.h, self.win.w) {
            candle_core::bail!("avg_pool2d: input {:?} changed", l.dims());
        }
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(avg_fwd(contiguous::<f32>(s, l, "pool2d")?, &self.win))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(avg_fwd(contiguous::<f64>(s, l, "pool2d")?, &self.win))
            }
            _ => candle_core::bail!("avg_pool2d: the fused kernel runs on f32 or f64 only"),
        };
        Ok((out, Shape::from((n, c, self.win.oh, self.win.ow))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (s, l) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("avg_pool2d: the fused backward got a gradient off the CPU");
        };
        let dx = match s {
            CpuStorage::F32(_) => Tensor::from_vec(
                avg_bwd(contiguous::<f32>(s, l, "pool2d")?, &self.win),
                arg.shape(),
                arg.device(),
            )?,
            CpuStorage::F64(_) => Tensor::from_vec(
                avg_bwd(contiguous::<f64>(s, l, "pool2d")?, &self.win),
                arg.shape(),
                arg.device(),
            )?,
            _ => candle_core::bail!("avg_pool2d: the fused kernel runs on f32 or f64 only"),
        };
        Ok(Some(dx))
    }
}
