//! [`Dropout`]: a drop-in for `candle_nn::Dropout` whose masks are a pure
//! function of `(seed, step, call index)`, so a run resumed from a checkpoint
//! draws the same masks as the run it continues.
//!
//! # Where the randomness comes from
//!
//! Each training-mode forward pass of a dropout layer draws its mask from a
//! ChaCha8 stream (`rand_chacha`) whose 256-bit key is
//! `(seed, step, call index, mode)`:
//!
//! * `seed`: the layer's, [`DEFAULT_SEED`] unless set with
//!   [`Dropout::with_seed`];
//! * `step`: the value last given to [`set_rng_step`] on this thread (the
//!   Trainer calls it before every training forward pass with the global
//!   micro-batch index, which a checkpoint restores);
//! * `call index`: how many dropout forward passes this thread ran since that
//!   call, so the layers of one model get different masks (the first dropout
//!   call of a step is 0, the next 1, ...: the "layer" of the mask);
//! * `mode`: whether `set_rng_step` was ever called on this thread. A
//!   hand-written loop that never calls it still gets a fresh mask every
//!   forward pass: the call index then simply keeps counting.
//!
//! Element `i` (in row-major order of the input) is kept when the `i`-th
//! 32-bit word of the stream is `≥ p · 2³²`, so the keep rate is `1 - p` up to
//! `2⁻³²`. The mask depends on nothing else: not on the thread count, the
//! device, or the dtype.
//!
//! # Cost
//!
//! The mask is always generated on the host: one ChaCha8 word per element
//! (about a nanosecond each). On the CPU (`f32`/`f64`) one fused op draws the
//! words and writes `x · 1/(1-p)` or `x · 0` in the same pass, and keeps the
//! mask as a bitset (one bit per element) for the backward pass, which is one
//! more pass. On other devices the mask goes to the device as one byte per
//! element (one host-to-device copy of `n` bytes per forward pass; that copy is
//! what makes the masks identical on every device), and is applied with
//! candle tensor ops (whose backward is the same product).
//!
//! [`scaled_dot_product_attention_dropout`](crate::ops::scaled_dot_product_attention_dropout)
//! draws its masks from the same streams, inside the fused attention kernel:
//! the mask of a call is the one `forward` would draw for the
//! `(b, h, tq, tk)` attention weights.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::OnceLock;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, ModuleT, Shape, Tensor,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cpu::{contiguous, with_cpu};
use crate::dispatch::cpu_kernel;
use crate::float::Float;
use crate::NnError;

/// The seed of a [`Dropout`] built with [`Dropout::new`].
pub const DEFAULT_SEED: u64 = 0x6d69_6e69_6261_7463; // "minibatc"

thread_local! {
    /// (step, call index within the step, whether `set_rng_step` was called).
    static RNG_STEP: Cell<(u64, u64, bool)> = const { Cell::new((0, 0, false)) };
}

/// Sets the step that keys the masks of every [`Dropout`] forward pass that
/// follows on this thread, and restarts the call index at 0.
///
/// Training loops call it before each training forward pass with a value
/// unique per micro-batch (the `Trainer` does, with its global micro-batch
/// index); the masks of that forward pass are then a pure function of the
/// layer seeds, this step and the order of the dropout calls, so a resumed run
/// replays them exactly. The setting is per thread (like
/// [`set_tensor_path`](crate::set_tensor_path)): threads do not disturb each
/// other's masks.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use minibatch_nn::{set_rng_step, Dropout};
///
/// # fn main() -> candle_core::Result<()> {
/// let drop = Dropout::new(0.5);
/// let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu)?;
/// set_rng_step(41);
/// let a = drop.forward(&x, true)?;
/// set_rng_step(41);
/// let b = drop.forward(&x, true)?; // the same step: the same mask
/// assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
/// set_rng_step(42);
/// let c = drop.forward(&x, true)?; // another step: another mask
/// assert_ne!(a.to_vec2::<f32>()?, c.to_vec2::<f32>()?);
/// # Ok(()) }
/// ```
pub fn set_rng_step(step: u64) {
    RNG_STEP.with(|c| c.set((step, 0, true)));
}

/// The dropout key of this thread: `(step, call index, explicit)`.
pub(crate) type RngState = (u64, u64, bool);

/// This thread's dropout key, for [`crate::recompute`] to replay a forward pass.
pub(crate) fn rng_state() -> RngState {
    RNG_STEP.with(Cell::get)
}

/// Restores a key read by [`rng_state`].
pub(crate) fn set_rng_state(state: RngState) {
    RNG_STEP.with(|c| c.set(state));
}

/// The `(step, call index, explicit)` key of the next mask, advancing the call index.
fn next_key() -> (u64, u64, bool) {
    RNG_STEP.with(|c| {
        let (step, call, explicit) = c.get();
        c.set((step, call.wrapping_add(1), explicit));
        (step, call, explicit)
    })
}

/// Randomly zeroes elements with probability `p` during training and scales
/// the others by `1/(1-p)`; the identity in evaluation. A drop-in for
/// `candle_nn::Dropout` (same `new`, `forward(xs, train)` and [`ModuleT`]),
/// whose masks are reproducible: see the [module docs](self) and
/// [`set_rng_step`].
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use minibatch_nn::Dropout;
///
/// # fn main() -> candle_core::Result<()> {
/// let drop = Dropout::new(0.25).with_seed(7);
/// let x = Tensor::ones(10_000, DType::F32, &Device::Cpu)?;
/// let y = drop.forward_t(&x, true)?.to_vec1::<f32>()?;
/// // Kept elements are scaled by 1/(1-p); about 75 % are kept.
/// assert!(y.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
/// let kept = y.iter().filter(|&&v| v != 0.0).count();
/// assert!((7_300..7_700).contains(&kept));
/// // Evaluation: the identity.
/// assert_eq!(drop.forward_t(&x, false)?.to_vec1::<f32>()?, vec![1.0; 10_000]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Dropout {
    drop_p: f32,
    seed: u64,
}

impl Dropout {
    /// A dropout layer with drop probability `drop_p` (in `[0, 1)`; anything
    /// else is an error at the first training forward pass, as in candle-nn)
    /// and the seed [`DEFAULT_SEED`].
    pub fn new(drop_p: f32) -> Dropout {
        Self {
            drop_p,
            seed: DEFAULT_SEED,
        }
    }

    /// The same layer with another seed (so two models, or two otherwise
    /// identical layers, draw independent masks).
    pub fn with_seed(self, seed: u64) -> Dropout {
        Self { seed, ..self }
    }

    /// The drop probability.
    pub fn drop_p(&self) -> f32 {
        self.drop_p
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// `xs` with its elements dropped (zeroed) with probability `p` and the
    /// others scaled by `1/(1-p)` when `train`, `xs` itself otherwise. Each
    /// training call draws the mask of the next call index (see
    /// [`set_rng_step`]).
    pub fn forward(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let Some(mask) = self.next_mask(train, false)? else {
            return Ok(xs.clone());
        };
        if cpu_kernel(xs) && matches!(xs.dtype(), DType::F32 | DType::F64) {
            let op: Arc<Box<dyn CustomOp1 + Send + Sync>> = Arc::new(Box::new(DropoutOp {
                mask: mask.source,
                scale: mask.scale,
                kept: OnceLock::new(),
            }));
            return xs.contiguous()?.apply_op1_arc(op);
        }
        // Tensor path: the same mask, drawn on the host, as one byte per element.
        xs * mask.multiplier(xs.shape(), xs.dtype(), xs.device())?
    }

    /// `self.forward(xs, train) + residual`, the dropout-then-residual step of
    /// a transformer block (BERT's and GPT-2's `dropout(dense(h)) + x`), with
    /// the same mask, values and gradients as the two ops. On the CPU it is
    /// one fused op, so candle's autograd has one node fewer to
    /// differentiate (each node costs a zero-filled buffer and an addition
    /// the size of `xs` in its backward pass). `xs` and `residual` must have
    /// the same shape; in evaluation it is `xs + residual`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use minibatch_nn::{set_rng_step, Dropout};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Tensor::randn(0f32, 1.0, (4, 16), &Device::Cpu)?;
    /// let r = Tensor::randn(0f32, 1.0, (4, 16), &Device::Cpu)?;
    /// let drop = Dropout::new(0.25);
    /// set_rng_step(1);
    /// let fused = drop.forward_add(&x, &r, true)?;
    /// set_rng_step(1);
    /// let two = (drop.forward(&x, true)? + &r)?;
    /// assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, two.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_add(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        if xs.shape() != residual.shape() {
            return Err(NnError::ShapeMismatch(format!(
                "dropout forward_add: xs {:?} and residual {:?} differ",
                xs.shape(),
                residual.shape()
            ))
            .into());
        }
        // As `forward`: a training call draws its index even with p = 0.
        let Some(mask) = self.next_mask(train, false)? else {
            return xs + residual;
        };
        if cpu_kernel(xs)
            && matches!(xs.dtype(), DType::F32 | DType::F64)
            && residual.dtype() == xs.dtype()
            && residual.device().same_device(xs.device())
        {
            let op = DropoutOp {
                mask: mask.source,
                scale: mask.scale,
                kept: OnceLock::new(),
            };
            return xs.contiguous()?.apply_op2(&residual.contiguous()?, op);
        }
        xs * mask.multiplier(xs.shape(), xs.dtype(), xs.device())? + residual
    }

    /// The mask of the next training call, for [`Dropout::forward`] and for
    /// fused kernels that drop inside their own pass (attention): `None` in
    /// evaluation (and, with `skip_zero`, when `p = 0`), without drawing a
    /// key; otherwise the next call index is drawn, as `forward` draws it.
    pub(crate) fn next_mask(
        &self,
        train: bool,
        skip_zero: bool,
    ) -> candle_core::Result<Option<DropMask>> {
        let p = self.drop_p;
        if !train || (skip_zero && p == 0.0) {
            return Ok(None);
        }
        if !(0. ..1.).contains(&p) {
            return Err(NnError::InvalidArgument(format!(
                "dropout probability has to be in [0, 1), got {p}"
            ))
            .into());
        }
        let source = MaskSource {
            seed: self.seed,
            key: next_key(),
            threshold: (p as f64 * 4_294_967_296.0) as u64,
        };
        Ok(Some(DropMask {
            source,
            scale: 1.0 / (1.0 - p as f64),
        }))
    }
}

/// The mask of one training-mode dropout pass over a tensor: element `e`
/// (in row-major order) is kept when word `e` of its stream is at or above
/// the threshold, and kept elements are multiplied by `scale = 1/(1-p)`.
/// Any kernel that draws element `e` from [`DropMask::stream_at`]`(e)`
/// drops exactly what [`Dropout::forward`] would on that tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropMask {
    source: MaskSource,
    /// `1/(1-p)`.
    pub(crate) scale: f64,
}

impl DropMask {
    /// The keep decisions of elements `word, word + 1, ...`.
    pub(crate) fn stream_at(&self, word: u64) -> KeepStream {
        let mut rng = self.source.rng();
        rng.set_word_pos(word as u128);
        KeepStream {
            rng,
            threshold: self.source.threshold,
        }
    }

    /// The mask as a tensor of `shape` on `device`: `scale` where kept, `0`
    /// where dropped (drawn on the host, sent as one byte per element).
    pub(crate) fn multiplier(
        &self,
        shape: &Shape,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut bytes = Vec::with_capacity(n);
        self.source.for_each(n, |keep| bytes.push(u8::from(keep)));
        Tensor::from_vec(bytes, shape, device)?
            .to_dtype(dtype)?
            .affine(self.scale, 0.)
    }
}

/// The keep rule of every mask: an element is kept when its stream word is
/// at or above `threshold = p · 2³²`.
#[inline(always)]
fn keeps(w: u32, threshold: u64) -> bool {
    w as u64 >= threshold
}

/// Consecutive keep decisions of a [`DropMask`].
pub(crate) struct KeepStream {
    rng: ChaCha8Rng,
    threshold: u64,
}

impl KeepStream {
    /// Fills `words` with the next elements' stream words: element `j` is
    /// kept when [`keeps`](Self::keeps)`(words[j])`.
    /// `bytes` is scratch of at least `4 · words.len()` bytes: the stream is
    /// read in one `fill_bytes` (the same words as `next_u32` calls, which
    /// the stream gives as little-endian bytes).
    #[inline]
    pub(crate) fn fill(&mut self, words: &mut [u32], bytes: &mut [u8]) {
        let bytes = &mut bytes[..4 * words.len()];
        self.rng.fill_bytes(bytes);
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }

    /// Whether an element whose stream word is `w` is kept.
    #[inline(always)]
    pub(crate) fn keeps(&self, w: u32) -> bool {
        keeps(w, self.threshold)
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward(xs, train)
    }
}

/// Where a mask comes from: the ChaCha8 key and the keep threshold.
#[derive(Clone, Copy, Debug)]
struct MaskSource {
    seed: u64,
    key: (u64, u64, bool),
    threshold: u64,
}

impl MaskSource {
    fn rng(&self) -> ChaCha8Rng {
        let (step, call, explicit) = self.key;
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&self.seed.to_le_bytes());
        k[8..16].copy_from_slice(&step.to_le_bytes());
        k[16..24].copy_from_slice(&call.to_le_bytes());
        k[24] = u8::from(explicit);
        ChaCha8Rng::from_seed(k)
    }

    /// Calls `f(keep)` for elements `0..n` in order.
    fn for_each(&self, n: usize, mut f: impl FnMut(bool)) {
        let mut rng = self.rng();
        for _ in 0..n {
            f(keeps(rng.next_u32(), self.threshold));
        }
    }
}

/// The fused CPU dropout of one forward pass; keeps its mask for the backward.
struct DropoutOp {
    mask: MaskSource,
    scale: f64,
    kept: OnceLock<Vec<u64>>,
}

fn apply<T: Float>(xs: &[T], mask: &MaskSource, scale: f64) -> (Vec<T>, Vec<u64>) {
    let s = T::from_f64(scale);
    let mut out = Vec::with_capacity(xs.len());
    let mut bits = vec![0u64; xs.len().div_ceil(64)];
    let mut i = 0;
    mask.for_each(xs.len(), |keep| {
        let x = xs[i];
        // candle-nn's values: x times (1 · scale) or times (0 · scale).
        out.push(if keep { x * s } else { x * T::zero() });
        bits[i / 64] |= u64::from(keep) << (i % 64);
        i += 1;
    });
    (out, bits)
}

fn apply_bits<T: Float>(g: &[T], bits: &[u64], scale: f64) -> Vec<T> {
    let s = T::from_f64(scale);
    g.iter()
        .enumerate()
        .map(|(i, &g)| {
            if bits[i / 64] >> (i % 64) & 1 == 1 {
                g * s
            } else {
                g * T::zero()
            }
        })
        .collect()
}

impl DropoutOp {
    /// The gradient of the dropped input: `grad` through the kept bits.
    fn grad_in(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        let Some(bits) = self.kept.get() else {
            candle_core::bail!("dropout: backward before forward");
        };
        let grad = grad.contiguous()?;
        with_cpu(&grad, |s, l| match s {
            CpuStorage::F32(_) => Tensor::from_vec(
                apply_bits::<f32>(contiguous(s, l, "dropout")?, bits, self.scale),
                grad.shape(),
                &Device::Cpu,
            ),
            CpuStorage::F64(_) => Tensor::from_vec(
                apply_bits::<f64>(contiguous(s, l, "dropout")?, bits, self.scale),
                grad.shape(),
                &Device::Cpu,
            ),
            _ => candle_core::bail!("dropout: unexpected gradient dtype"),
        })
    }
}

/// `dropout(x) + r` in one pass ([`Dropout::forward_add`]).
impl CustomOp2 for DropoutOp {
    fn name(&self) -> &'static str {
        "minibatch-dropout-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn add<T: Float>(x: &[T], r: &[T], mask: &MaskSource, scale: f64) -> (Vec<T>, Vec<u64>) {
            let (mut out, bits) = apply::<T>(x, mask, scale);
            // Dropout's value, then the addition: the two ops' bits.
            out.iter_mut().zip(r).for_each(|(o, &r)| *o += r);
            (out, bits)
        }
        let what = "dropout forward_add";
        let (out, bits) = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (o, b) = add::<f32>(
                    contiguous(s1, l1, what)?,
                    contiguous(s2, l2, what)?,
                    &self.mask,
                    self.scale,
                );
                (CpuStorage::F32(o), b)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (o, b) = add::<f64>(
                    contiguous(s1, l1, what)?,
                    contiguous(s2, l2, what)?,
                    &self.mask,
                    self.scale,
                );
                (CpuStorage::F64(o), b)
            }
            _ => candle_core::bail!("{what}: the fused op takes two f32 or two f64 tensors"),
        };
        let _ = self.kept.set(bits);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad_in(grad)?), Some(grad.clone())))
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "minibatch-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mask = self.mask;
        let (out, bits) = match s {
            CpuStorage::F32(_) => {
                let (o, b) = apply::<f32>(contiguous(s, l, "dropout")?, &mask, self.scale);
                (CpuStorage::F32(o), b)
            }
            CpuStorage::F64(_) => {
                let (o, b) = apply::<f64>(contiguous(s, l, "dropout")?, &mask, self.scale);
                (CpuStorage::F64(o), b)
            }
            _ => candle_core::bail!("dropout: the fused op takes f32 or f64"),
        };
        let _ = self.kept.set(bits);
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad_in(grad)?))
    }
}
