//! [`Embedding`]: a drop-in for `candle_nn::Embedding` (a lookup table of
//! `n` vectors of size `d`), with a fused CPU forward and backward.
//!
//! ```text
//! forward   y[i, :] = table[ids[i], :]
//! backward  dtable[r, :] = Σ_{i : ids[i] = r} dy[i, :]      (a scatter-add of dy's rows)
//! ```
//!
//! On the CPU (`f32`/`f64`) the forward copies the selected rows straight into
//! the output (no zero-fill) and the backward adds each row of the output
//! gradient into a `(n, d)` gradient in one pass over it, in the order of the
//! ids (deterministic); no one-hot matrix and no product. On other devices, and
//! with [`set_tensor_path(true)`](crate::set_tensor_path), it is candle's
//! `index_select`, whose backward is candle's `index_add` (the same
//! scatter-add). Ids out of range are an error on every device.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::cpu::{contiguous, with_cpu, ClassIds};
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::ids::check_ids;
use crate::NnError;

/// A table of `n` embeddings of size `d` looked up by integer ids: a drop-in
/// for `candle_nn::Embedding`.
///
/// `forward(ids)` takes ids of any shape `S` (`u32`, `i64` or `u8`, each in
/// `0..n`) and returns shape `S + (d,)`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let emb = minibatch_nn::embedding(100, 16, vb.pp("tok"))?;
/// let ids = Tensor::new(&[[3u32, 7, 3], [0, 99, 1]], &Device::Cpu)?;
/// let y = emb.forward(&ids)?;
/// assert_eq!(y.dims(), &[2, 3, 16]);
/// // Row 3 was looked up twice: its gradient is the sum of both output rows'.
/// let g = y.sum_all()?.backward()?;
/// let row3 = g.get(emb.embeddings()).unwrap().get(3)?.to_vec1::<f32>()?;
/// assert_eq!(row3, vec![2.0; 16]);
/// // An id out of range is an error.
/// assert!(emb.forward(&Tensor::new(&[100u32], &Device::Cpu)?).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Embedding {
    embeddings: Tensor,
    hidden_size: usize,
}

/// An [`Embedding`] of `in_size` vectors of size `out_size`, created in (or
/// read from) `vb` as `weight` `(in_size, out_size)`, initialised as
/// `candle_nn::embedding` does: standard normal `N(0, 1)`.
pub fn embedding(
    in_size: usize,
    out_size: usize,
    vb: VarBuilder,
) -> candle_core::Result<Embedding> {
    let embeddings = vb.get_with_hints(
        (in_size, out_size),
        "weight",
        Init::Randn {
            mean: 0.,
            stdev: 1.,
        },
    )?;
    Ok(Embedding::new(embeddings, out_size))
}

impl Embedding {
    /// A layer over an existing table of shape `(n, hidden_size)`.
    pub fn new(embeddings: Tensor, hidden_size: usize) -> Self {
        Self {
            embeddings,
            hidden_size,
        }
    }

    /// The table, shape `(n, hidden_size)`.
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }

    /// The size of each embedding.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (n, d) = match *self.embeddings.dims() {
            [n, d] if d == self.hidden_size => (n, d),
            ref dims => {
                return Err(NnError::ShapeMismatch(format!(
                    "embedding: the table must have shape (n, {}), got {dims:?}",
                    self.hidden_size
                ))
                .into())
            }
        };
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(d);
        let flat = ids.flatten_all()?;
        let t = &self.embeddings;
        if cpu_kernel(t) && flat.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) {
            let y = t
                .contiguous()?
                .apply_op2_arc(&flat.contiguous()?, embedding_op())?;
            return y.reshape(out_dims);
        }
        check_ids("embedding", &flat, n)?;
        t.index_select(&flat, 0)?.reshape(out_dims)
    }
}

/// The one shared op (stateless).
fn embedding_op() -> Arc<Box<dyn CustomOp2 + Send + Sync>> {
    static OP: OnceLock<Arc<Box<dyn CustomOp2 + Send + Sync>>> = OnceLock::new();
    OP.get_or_init(|| Arc::new(Box::new(EmbeddingOp))).clone()
}

struct EmbeddingOp;

fn gather_rows<T: Float>(table: &[T], ids: &ClassIds, d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(ids.len() * d);
    for i in 0..ids.len() {
        let r = ids.get(i) as usize;
        out.extend_from_slice(&table[r * d..(r + 1) * d]);
    }
    out
}

fn scatter_rows<T: Float>(grad: &[T], ids: &ClassIds, n: usize, d: usize) -> Vec<T> {
    let mut out = vec![T::zero(); n * d];
    for (i, g) in grad.chunks_exact(d).enumerate() {
        let r = ids.get(i) as usize;
        for (o, &v) in out[r * d..(r + 1) * d].iter_mut().zip(g) {
            *o += v;
        }
    }
    out
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "minibatch-embedding"
    }

    fn cpu_fwd(
        &self,
        t: &CpuStorage,
        lt: &Layout,
        ids: &CpuStorage,
        li: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = lt.shape().dims2()?;
        let ids = ClassIds::new(ids, li, "embedding")?;
        ids.check(n, "embedding")?;
        let out = match t {
            CpuStorage::F32(_) => {
                CpuStorage::F32(gather_rows(contiguous(t, lt, "embedding")?, &ids, d))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(gather_rows(contiguous(t, lt, "embedding")?, &ids, d))
            }
            _ => candle_core::bail!("embedding: the fused op takes f32 or f64"),
        };
        Ok((out, Shape::from((ids.len(), d))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = table.dims2()?;
        let grad = grad.contiguous()?;
        let dt = with_cpu(&grad, |gs, lg| {
            with_cpu(ids, |is, li| {
                let ids = ClassIds::new(is, li, "embedding")?;
                match gs {
                    CpuStorage::F32(_) => Tensor::from_vec(
                        scatter_rows::<f32>(contiguous(gs, lg, "embedding")?, &ids, n, d),
                        (n, d),
                        &Device::Cpu,
                    ),
                    CpuStorage::F64(_) => Tensor::from_vec(
                        scatter_rows::<f64>(contiguous(gs, lg, "embedding")?, &ids, n, d),
                        (n, d),
                        &Device::Cpu,
                    ),
                    _ => candle_core::bail!("embedding: unexpected gradient dtype"),
                }
            })
        })?;
        Ok((Some(dt), None))
    }
}
