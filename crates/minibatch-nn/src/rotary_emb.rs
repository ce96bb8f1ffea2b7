//! Rotary position embeddings with real backward passes: drop-ins for
//! `candle_nn::rotary_emb::{rope, rope_i, rope_thd}`, whose CPU ops have no
//! backward pass (nothing below them gets a gradient).
//!
//! Each position `t` rotates pairs `(x₁, x₂)` of a head's `d` features by
//! the angle whose cosine and sine are `cos[t, i]` and `sin[t, i]`
//! (`i < d/2`):
//!
//! `y₁ = x₁ cos − x₂ sin`, `y₂ = x₁ sin + x₂ cos`.
//!
//! [`rope`] and [`rope_thd`] pair feature `i` with `i + d/2` (the two halves,
//! GPT-NeoX/Llama style); [`rope_i`] pairs `2i` with `2i + 1` (interleaved,
//! GPT-J style). `cos` and `sin` are `(T, d/2)` tables with `T ≥ t` (the
//! first `t` rows are used), or `(b, T, d/2)` for one table per batch item.
//!
//! The backward pass rotates the output gradient by the opposite angle,
//! `dx₁ = dy₁ cos + dy₂ sin`, `dx₂ = dy₂ cos − dy₁ sin`; when `cos` or `sin`
//! track gradients (learned tables) they get theirs too,
//! `dcos = Σ dy₁ x₁ + dy₂ x₂` and `dsin = Σ dy₂ x₁ − dy₁ x₂` summed over
//! heads (and batch items for a shared table). On the CPU (`f32`, `f64`)
//! each is one fused pass over memory, parallel over rows when large, with
//! outputs bit-identical to candle-nn's; elsewhere (and after
//! [`set_tensor_path(true)`](crate::set_tensor_path)) the same formula runs
//! as candle tensor ops.
//!
//! One difference: with a per-batch `(b, T, d/2)` table and `T > t`,
//! candle-nn's CPU kernel steps through the table as if `T = t` (it reads
//! the wrong rows); here each batch item uses the first `t` rows of its own
//! table.

use std::ops::Range;

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use crate::dispatch::cpu_kernel;
use crate::error::NnError;
use crate::float::Float;
use crate::ops::rows::{row_blocks, slice, tensor, with_slices};
use crate::ops::simd::simd_dispatch;

/// Rotary embedding of `xs` `(b, h, t, d)`, rotating the two halves of each
/// head (`i` with `i + d/2`), as `candle_nn::rotary_emb::rope`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // One head, one position, d = 4: rotate (x0, x2) and (x1, x3) by 90°.
/// let x = Var::new(&[[[[1f32, 2., 3., 4.]]]], &dev)?;
/// let cos = Tensor::new(&[[0f32, 0.]], &dev)?;
/// let sin = Tensor::new(&[[1f32, 1.]], &dev)?;
/// let y = minibatch_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [-3., -4., 1., 2.]);
/// // The gradient is the output gradient rotated back.
/// let g = y.get_on_dim(3, 0)?.sum_all()?.backward()?;
/// let dx = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(dx, [0., 0., -1., 0.]);
/// # Ok(()) }
/// ```
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(xs, cos, sin, Kind::Halves)
}

/// Rotary embedding of `xs` `(b, h, t, d)`, rotating interleaved pairs
/// (`2i` with `2i + 1`), as `candle_nn::rotary_emb::rope_i`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &dev)?;
/// let cos = Tensor::new(&[[0f32, 1.]], &dev)?;
/// let sin = Tensor::new(&[[1f32, 0.]], &dev)?;
/// let y = minibatch_nn::rotary_emb::rope_i(&x, &cos, &sin)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [-2., 1., 3., 4.]);
/// # Ok(()) }
/// ```
pub fn rope_i(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(xs, cos, sin, Kind::Interleaved)
}

/// Rotary embedding of `xs` laid out `(b, t, h, d)`, rotating the two halves
/// of each head, as `candle_nn::rotary_emb::rope_thd`.
///
/// `xs` may also be `(b, t, h · d)`, the layout a projection gives, with the
/// head size `d` read from the tables (`cos`, `sin` of `d / 2` columns): the
/// same numbers as on its `(b, t, h, d)` view, without the reshape nodes
/// (each a zero-filled buffer and an addition in candle's backward pass).
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1., (2, 5, 3, 8), &dev)?;
/// let cos = Tensor::rand(-1f32, 1., (5, 4), &dev)?;
/// let sin = Tensor::rand(-1f32, 1., (5, 4), &dev)?;
/// let thd = minibatch_nn::rotary_emb::rope_thd(&x, &cos, &sin)?;
/// let bhtd = minibatch_nn::rotary_emb::rope(&x.transpose(1, 2)?, &cos, &sin)?;
/// let diff = (thd - bhtd.transpose(1, 2)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(diff, 0.0);
/// # Ok(()) }
/// ```
pub fn rope_thd(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(xs, cos, sin, Kind::Thd)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `(b, h, t, d)`, `i` with `i + d/2`.
    Halves,
    /// `(b, h, t, d)`, `2i` with `2i + 1`.
    Interleaved,
    /// `(b, t, h, d)`, `i` with `i + d/2`.
    Thd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Halves => "rope",
            Kind::Interleaved => "rope_i",
            Kind::Thd => "rope_thd",
        }
    }
}

/// The shapes of one call: `b, h, t, d` and the `cos`/`sin` tables' row count
/// and whether each is per batch item.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    kind: Kind,
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    /// Elements between two batch items' tables (0 for a shared table).
    cos_batch: usize,
    sin_batch: usize,
}

impl Geometry {
    fn new(kind: Kind, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let name = kind.name();
        let (b, h, t, d) = match kind {
            Kind::Halves | Kind::Interleaved => xs.dims4()?,
            Kind::Thd if xs.rank() == 3 => {
                // (b, t, h · d), as a projection gives it: d from the tables.
                let (b, t, hd) = xs.dims3()?;
                let d = 2 * cos.dims().last().copied().unwrap_or(0);
                if d == 0 || hd % d != 0 {
                    return Err(NnError::ShapeMismatch(format!(
                        "{name}: xs {:?} of rank 3 needs a last dimension that is a multiple of the head size 2 · cos.dim(-1) = {d}",
                        xs.shape()
                    ))
                    .into());
                }
                (b, hd / d, t, d)
            }
            Kind::Thd => {
                let (b, t, h, d) = xs.dims4()?;
                (b, h, t, d)
            }
        };
        let table = |c: &Tensor, which: &str| -> Result<usize> {
            let (rows, half, batch) = match *c.dims() {
                [rows, half] => (rows, half, 0),
                [cb, rows, half] if cb == b => (rows, half, rows * half),
                _ => {
                    return Err(NnError::ShapeMismatch(format!(
                        "{name}: {which} must be (t, d/2) or (b, t, d/2) with b = {b}, got {:?}",
                        c.shape()
                    ))
                    .into())
                }
            };
            if 2 * half != d || rows < t {
                return Err(NnError::ShapeMismatch(format!(
                    "{name}: {which} {:?} does not fit xs {:?} (it needs d/2 = {} columns and at least t = {t} rows; d must be even)",
                    c.shape(),
                    xs.shape(),
                    d as f64 / 2.0
                ))
                .into());
            }
            Ok(batch)
        };
        let cos_batch = table(cos, "cos")?;
        let sin_batch = table(sin, "sin")?;
        if cos.dtype() != xs.dtype() || sin.dtype() != xs.dtype() {
            return Err(NnError::InvalidArgument(format!(
                "{name}: xs, cos and sin must have one dtype, got {:?}, {:?}, {:?}",
                xs.dtype(),
                cos.dtype(),
                sin.dtype()
            ))
            .into());
        }
        Ok(Self {
            kind,
            b,
            h,
            t,
            d,
            cos_batch,
            sin_batch,
        })
    }

    fn rows(&self) -> usize {
        self.b * self.h * self.t
    }

    /// Batch item and position of each row of `range`, in order.
    fn positions(&self, range: Range<usize>) -> impl Iterator<Item = (usize, usize)> + '_ {
        range.map(move |r| match self.kind {
            Kind::Halves | Kind::Interleaved => (r / (self.h * self.t), r % self.t),
            Kind::Thd => (r / (self.h * self.t), (r / self.h) % self.t),
        })
    }
}

fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor, kind: Kind) -> Result<Tensor> {
    let g = Geometry::new(kind, xs, cos, sin)?;
    if cpu_kernel(xs) && matches!(xs.dtype(), DType::F32 | DType::F64) {
        return xs
            .contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { g });
    }
    tensor_ops(xs, cos, sin, &g)
}

/// The same maths as candle tensor ops (candle-nn's `rope_slow` and
/// `rope_i_slow`, extended to per-batch tables), differentiated by candle.
fn tensor_ops(xs: &Tensor, cos: &Tensor, sin: &Tensor, g: &Geometry) -> Result<Tensor> {
    let (b, h, t, d) = (g.b, g.h, g.t, g.d);
    if xs.rank() == 3 {
        // (b, t, h · d): the same rotation on the (b, t, h, d) view.
        return tensor_ops(&xs.reshape((b, t, h, d))?, cos, sin, g)?.reshape(xs.shape());
    }
    let half = d / 2;
    let table = |c: &Tensor| -> Result<Tensor> {
        let (c, cb) = match c.rank() {
            2 => (c.narrow(0, 0, t)?, 1),
            _ => (c.narrow(1, 0, t)?, b),
        };
        match g.kind {
            Kind::Halves => c.reshape((cb, 1, t, half)),
            Kind::Thd => c.reshape((cb, t, 1, half)),
            Kind::Interleaved => c.reshape((cb, 1, t, half, 1)),
        }
    };
    let (c, s) = (table(cos)?, table(sin)?);
    if g.kind == Kind::Interleaved {
        let x = xs.reshape((b, h, t, half, 2))?;
        let x0 = x.narrow(D::Minus1, 0, 1)?;
        let x1 = x.narrow(D::Minus1, 1, 1)?;
        let y0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let y1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
        return Tensor::cat(&[y0, y1], D::Minus1)?.flatten_from(D::Minus2);
    }
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let y2 = (x1.broadcast_mul(&s)? + x2.broadcast_mul(&c)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

/// The fused CPU op over `(xs, cos, sin)`.
struct Rope {
    g: Geometry,
}

impl Rope {
    /// Rotates every row of `x` into `y` (by `−θ` when `inverse`).
    fn rotate<T: Float>(&self, x: &[T], cos: &[T], sin: &[T], inverse: bool) -> Vec<T> {
        let g = self.g;
        let d = g.d;
        let mut y = vec![T::ZERO; x.len()];
        row_blocks(g.rows(), d, [(&mut y, d)], 0, |rows, [y], _| {
            let x = &x[rows.start * d..rows.end * d];
            let rows_xy = x.chunks_exact(d).zip(y.chunks_exact_mut(d));
            for ((x, y), (bi, ti)) in rows_xy.zip(g.positions(rows)) {
                let c = &cos[bi * g.cos_batch + ti * d / 2..][..d / 2];
                let s = &sin[bi * g.sin_batch + ti * d / 2..][..d / 2];
                rotate_row::<T>(x, y, c, s, g.kind == Kind::Interleaved, inverse);
            }
        });
        y
    }

    /// `(dcos, dsin)` summed over the rows that share each table entry.
    fn table_grads<T: Float>(&self, x: &[T], dy: &[T], m_cos: usize, m_sin: usize) -> Vec<T> {
        let g = self.g;
        let (d, half) = (g.d, g.d / 2);
        row_blocks(g.rows(), d, [], m_cos + m_sin, |rows, [], partial| {
            let (dc, ds) = partial.split_at_mut(m_cos);
            let span = rows.start * d..rows.end * d;
            let rows_xg = x[span.clone()]
                .chunks_exact(d)
                .zip(dy[span].chunks_exact(d));
            for ((x, dy), (bi, ti)) in rows_xg.zip(g.positions(rows)) {
                let dc = &mut dc[bi * g.cos_batch + ti * half..][..half];
                let ds = &mut ds[bi * g.sin_batch + ti * half..][..half];
                table_grad_row::<T>(x, dy, dc, ds, g.kind == Kind::Interleaved);
            }
        })
    }

    fn cpu<T: Float>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let name = self.g.kind.name();
        let x = slice::<T>(s[0].0, s[0].1, name)?;
        let cos = slice::<T>(s[1].0, s[1].1, name)?;
        let sin = slice::<T>(s[2].0, s[2].1, name)?;
        let y = self.rotate(x, cos, sin, false);
        Ok((T::to_cpu_storage_owned(y), s[0].1.shape().clone()))
    }

    fn grads<T: Float>(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.g.kind.name();
        let x_tracked = x.track_op();
        let need_tables = cos.track_op() || sin.track_op();
        let (m_cos, m_sin) = (cos.elem_count(), sin.elem_count());
        let (dx, sums) = with_slices::<T, _>(&[x, grad, cos, sin], name, |s| {
            let (x, dy, c, sn) = (s[0], s[1], s[2], s[3]);
            let dx = x_tracked.then(|| self.rotate(dy, c, sn, true));
            let sums = need_tables.then(|| self.table_grads(x, dy, m_cos, m_sin));
            Ok((dx, sums))
        })?;
        let dx = dx.map(|v| tensor(v, x.shape().clone())).transpose()?;
        let (dcos, dsin) = match sums {
            Some(mut dc) => {
                let ds = dc.split_off(m_cos);
                let dcos = cos.track_op().then(|| tensor(dc, cos.shape().clone()));
                let dsin = sin.track_op().then(|| tensor(ds, sin.shape().clone()));
                (dcos.transpose()?, dsin.transpose()?)
            }
            None => (None, None),
        };
        Ok((dx, dcos, dsin))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        match self.g.kind {
            Kind::Halves => "minibatch-rope",
            Kind::Interleaved => "minibatch-rope-i",
            Kind::Thd => "minibatch-rope-thd",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        match s1 {
            CpuStorage::F32(_) => self.cpu::<f32>(s),
            CpuStorage::F64(_) => self.cpu::<f64>(s),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.grads::<f32>(x, cos, sin, grad),
            DType::F64 => self.grads::<f64>(x, cos, sin, grad),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }
}

simd_dispatch!(
    fn rotate_row(x: &[T], y: &mut [T], c: &[T], s: &[T], interleaved: bool, inverse: bool)
        => rotate_row_body
);
simd_dispatch!(
    fn table_grad_row(x: &[T], dy: &[T], dc: &mut [T], ds: &mut [T], interleaved: bool)
        => table_grad_row_body
);

/// One row: `y₁ = x₁ c − x₂ s`, `y₂ = x₁ s + x₂ c` (candle-nn's expressions,
/// so the results are bit-identical), or the inverse rotation.
#[inline(always)]
fn rotate_row_body<T: Float>(
    x: &[T],
    y: &mut [T],
    c: &[T],
    s: &[T],
    interleaved: bool,
    inverse: bool,
) {
    let half = c.len();
    if interleaved {
        let pairs = x.chunks_exact(2).zip(y.chunks_exact_mut(2));
        for ((x, y), (c, s)) in pairs.zip(c.iter().zip(s)) {
            let (x1, x2) = (x[0], x[1]);
            if inverse {
                y[0] = x1 * *c + x2 * *s;
                y[1] = x2 * *c - x1 * *s;
            } else {
                y[0] = x1 * *c - x2 * *s;
                y[1] = x1 * *s + x2 * *c;
            }
        }
        return;
    }
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    if inverse {
        for i in 0..half {
            y1[i] = x1[i] * c[i] + x2[i] * s[i];
            y2[i] = x2[i] * c[i] - x1[i] * s[i];
        }
    } else {
        for i in 0..half {
            y1[i] = x1[i] * c[i] - x2[i] * s[i];
            y2[i] = x1[i] * s[i] + x2[i] * c[i];
        }
    }
}

/// One row's contribution to `dcos` and `dsin`.
#[inline(always)]
fn table_grad_row_body<T: Float>(x: &[T], dy: &[T], dc: &mut [T], ds: &mut [T], interleaved: bool) {
    let half = dc.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x1, x2, g1, g2) = (x[a], x[b], dy[a], dy[b]);
        dc[i] += g1 * x1 + g2 * x2;
        ds[i] += g2 * x1 - g1 * x2;
    }
}
