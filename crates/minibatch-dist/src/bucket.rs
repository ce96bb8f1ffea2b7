//! [`GradBuckets`]: DDP's gradient averaging, one collective per ~25 MB bucket.

use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use half::bf16;

use crate::error::{DistError, Result};
use crate::group::{Buffer, ProcessGroup, ReduceOp};
use crate::tensor::{with_cpu_buffer, with_cpu_view, View};

/// PyTorch DDP's default bucket size (`bucket_cap_mb = 25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Averages gradients across the ranks of a group the way PyTorch's
/// `DistributedDataParallel` does: the parameters are laid out once, at
/// construction, in flat buffers of about [`DEFAULT_BUCKET_BYTES`]; each
/// step packs the gradients into them, runs **one all-reduce per bucket**,
/// divides by the world size and writes the averages back into the
/// gradient tensors in place. The buffers are allocated once: a step
/// allocates nothing (on the CPU; a gradient that is not contiguous, or a
/// parameter that got none on this rank, is the exception and gets a fresh
/// tensor).
///
/// f32 and bf16 gradients travel in f32 buckets, f64 ones in f64 buckets.
/// A parameter without a gradient on this rank contributes zeros, as in
/// DDP with `find_unused_parameters`; one without a gradient on every rank
/// receives zeros.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use minibatch_dist::{GradBuckets, Single};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// let mut buckets = GradBuckets::new(&[w.clone()], 1 << 20)?;
/// let mut grads = (w.as_tensor() * 2.0)?.sum_all()?.backward()?;
/// buckets.all_reduce_mean(&Single, &mut grads)?; // one rank: unchanged
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f32>()?, [2.0, 2.0, 2.0]);
/// assert_eq!(buckets.num_buckets(), 1);
/// # Ok(()) }
/// ```
pub struct GradBuckets {
    slots: Vec<Slot>,
    buckets: Vec<Bucket>,
    stats: ReduceStats,
}

struct Slot {
    var: Var,
    offset: usize,
    len: usize,
}

enum Flat {
    F32 { send: Vec<f32>, recv: Vec<f32> },
    F64 { send: Vec<f64>, recv: Vec<f64> },
}

struct Bucket {
    flat: Flat,
    /// `slots[first..end]` live in this bucket.
    first: usize,
    end: usize,
}

/// Where the time of the gradient reduction went, summed over the steps so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReduceStats {
    /// Reductions run (optimizer steps with more than one rank).
    pub steps: u64,
    /// Time inside the collectives (communication and waiting for the slowest rank).
    pub collective: Duration,
    /// Time packing the gradients into the buckets and writing the averages back.
    pub copy: Duration,
}

impl ReduceStats {
    /// Mean collective time per reduction.
    pub fn collective_per_step(&self) -> Duration {
        self.collective / (self.steps.max(1) as u32)
    }
}

fn wire(dtype: DType, index: usize) -> Result<DType> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(DType::F32),
        DType::F64 => Ok(DType::F64),
        dtype => Err(DistError::UnsupportedDType { index, dtype }),
    }
}

impl GradBuckets {
    /// Lays out `vars` (in order) in buckets of at most `bucket_bytes` each
    /// (a parameter larger than that gets a bucket of its own).
    pub fn new(vars: &[Var], bucket_bytes: usize) -> Result<Self> {
        if bucket_bytes == 0 {
            return Err(DistError::InvalidArgument(
                "the bucket size must be at least one byte".into(),
            ));
        }
        let mut slots = Vec::with_capacity(vars.len());
        let mut buckets: Vec<(DType, usize, usize)> = Vec::new(); // (wire dtype, elements, first slot)
        for (index, var) in vars.iter().enumerate() {
            let w = wire(var.dtype(), index)?;
            let len = var.elem_count();
            let bytes = w.size_in_bytes();
            let fits = buckets
                .last()
                .is_some_and(|&(d, n, _)| d == w && n > 0 && (n + len) * bytes <= bucket_bytes);
            if !fits {
                buckets.push((w, 0, index));
            }
            let b = buckets.len() - 1;
            let offset = buckets[b].1;
            buckets[b].1 += len;
            slots.push(Slot {
                var: var.clone(),
                offset,
                len,
            });
        }
        let n = buckets.len();
        let buckets = buckets
            .iter()
            .enumerate()
            .map(|(i, &(d, len, first))| Bucket {
                flat: match d {
                    DType::F64 => Flat::F64 {
                        send: vec![0.0; len],
                        recv: vec![0.0; len],
                    },
                    _ => Flat::F32 {
                        send: vec![0.0; len],
                        recv: vec![0.0; len],
                    },
                },
                first,
                end: if i + 1 < n {
                    buckets[i + 1].2
                } else {
                    vars.len()
                },
            })
            .collect();
        Ok(Self {
            slots,
            buckets,
            stats: ReduceStats::default(),
        })
    }

    /// [`new`](Self::new) with [`DEFAULT_BUCKET_BYTES`].
    pub fn with_default_size(vars: &[Var]) -> Result<Self> {
        Self::new(vars, DEFAULT_BUCKET_BYTES)
    }

    /// The number of buckets (= collectives per step).
    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// The elements of each bucket.
    pub fn bucket_lens(&self) -> Vec<usize> {
        self.buckets
            .iter()
            .map(|b| match &b.flat {
                Flat::F32 { send, .. } => send.len(),
                Flat::F64 { send, .. } => send.len(),
            })
            .collect()
    }

    /// The time spent so far, per part.
    pub fn stats(&self) -> ReduceStats {
        self.stats
    }

    /// Replaces every gradient in `grads` by its mean over the ranks of
    /// `group`: one collective per bucket. With one rank it returns at once.
    ///
    /// Every rank must call it at the same step with the same parameters.
    pub fn all_reduce_mean(
        &mut self,
        group: &dyn ProcessGroup,
        grads: &mut GradStore,
    ) -> Result<()> {
        let world = group.world_size();
        if world <= 1 {
            return Ok(());
        }
        let on_cpu = self.slots.iter().all(|s| s.var.device().is_cpu());
        if !on_cpu {
            return self.all_reduce_mean_device(group, grads);
        }
        for b in 0..self.buckets.len() {
            let t0 = Instant::now();
            self.pack(b, grads)?;
            let t1 = Instant::now();
            let bucket = &mut self.buckets[b];
            match &mut bucket.flat {
                Flat::F32 { send, recv } => group.sum_f32_into(send, recv)?,
                Flat::F64 { send, recv } => group.sum_f64_into(send, recv)?,
            }
            let t2 = Instant::now();
            self.unpack(b, grads, world)?;
            self.stats.collective += t2 - t1;
            self.stats.copy += (t1 - t0) + t2.elapsed();
        }
        self.stats.steps += 1;
        Ok(())
    }

    /// Copies the gradients of bucket `b` into its send buffer (zeros for a
    /// parameter without one).
    fn pack(&mut self, b: usize, grads: &GradStore) -> Result<()> {
        let bucket = &mut self.buckets[b];
        for slot in &self.slots[bucket.first..bucket.end] {
            let range = slot.offset..slot.offset + slot.len;
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                match &mut bucket.flat {
                    Flat::F32 { send, .. } => send[range].fill(0.0),
                    Flat::F64 { send, .. } => send[range].fill(0.0),
                }
                continue;
            };
            check_grad(g, slot)?;
            let copy = |g: &Tensor, flat: &mut Flat| {
                with_cpu_view(g, |v| match (v, flat) {
                    (View::F32(x), Flat::F32 { send, .. }) => {
                        send[range.clone()].copy_from_slice(x)
                    }
                    (View::BF16(x), Flat::F32 { send, .. }) => {
                        for (d, s) in send[range.clone()].iter_mut().zip(x) {
                            *d = s.to_f32();
                        }
                    }
                    (View::F64(x), Flat::F64 { send, .. }) => {
                        send[range.clone()].copy_from_slice(x)
                    }
                    _ => unreachable!("the bucket's dtype was chosen from the parameter's"),
                })
            };
            if g.is_contiguous() {
                copy(g, &mut bucket.flat)?;
            } else {
                copy(&g.contiguous()?, &mut bucket.flat)?;
            }
        }
        Ok(())
    }

    /// Writes the means of bucket `b` back into the gradients.
    fn unpack(&mut self, b: usize, grads: &mut GradStore, world: usize) -> Result<()> {
        let bucket = &mut self.buckets[b];
        let inv = world as f64;
        match &mut bucket.flat {
            Flat::F32 { recv, .. } => recv.iter_mut().for_each(|v| *v /= inv as f32),
            Flat::F64 { recv, .. } => recv.iter_mut().for_each(|v| *v /= inv),
        }
        for slot in &self.slots[bucket.first..bucket.end] {
            let range = slot.offset..slot.offset + slot.len;
            let g = grads
                .get(slot.var.as_tensor())
                .filter(|g| g.is_contiguous());
            if let Some(g) = g {
                with_cpu_buffer(g, &mut |dst| {
                    match (dst, &bucket.flat) {
                        (Buffer::F32(d), Flat::F32 { recv, .. }) => {
                            d.copy_from_slice(&recv[range.clone()])
                        }
                        (Buffer::BF16(d), Flat::F32 { recv, .. }) => {
                            for (d, s) in d.iter_mut().zip(&recv[range.clone()]) {
                                *d = bf16::from_f32(*s);
                            }
                        }
                        (Buffer::F64(d), Flat::F64 { recv, .. }) => {
                            d.copy_from_slice(&recv[range.clone()])
                        }
                        _ => unreachable!("the bucket's dtype was chosen from the parameter's"),
                    }
                    Ok(())
                })?;
                continue;
            }
            // no gradient here, or a strided one: a fresh tensor
            let var = slot.var.as_tensor();
            let fresh = match &bucket.flat {
                Flat::F32 { recv, .. } => {
                    Tensor::from_slice(&recv[range], var.shape(), var.device())?
                        .to_dtype(var.dtype())?
                }
                Flat::F64 { recv, .. } => {
                    Tensor::from_slice(&recv[range], var.shape(), var.device())?
                }
            };
            grads.insert(var, fresh);
        }
        Ok(())
    }

    /// The device path (CUDA with NCCL): each bucket is concatenated on the
    /// device, all-reduced in place, and split back into the gradients.
    fn all_reduce_mean_device(
        &mut self,
        group: &dyn ProcessGroup,
        grads: &mut GradStore,
    ) -> Result<()> {
        for bucket in &self.buckets {
            let t0 = Instant::now();
            let slots = &self.slots[bucket.first..bucket.end];
            let parts = slots
                .iter()
                .map(|s| match grads.get(s.var.as_tensor()) {
                    Some(g) => g.flatten_all(),
                    None => s.var.as_tensor().zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            drop(parts);
            let t1 = Instant::now();
            group.all_reduce_tensor(&flat, ReduceOp::Mean)?;
            let t2 = Instant::now();
            for s in slots {
                let var = s.var.as_tensor();
                let g = flat.narrow(0, s.offset, s.len)?.reshape(var.shape())?;
                grads.insert(var, g);
            }
            self.stats.collective += t2 - t1;
            self.stats.copy += (t1 - t0) + t2.elapsed();
        }
        self.stats.steps += 1;
        Ok(())
    }
}

fn check_grad(g: &Tensor, slot: &Slot) -> Result<()> {
    if g.elem_count() != slot.len || g.dtype() != slot.var.dtype() {
        return Err(DistError::InvalidArgument(format!(
            "the gradient of a parameter of shape {:?} ({:?}) has shape {:?} ({:?})",
            slot.var.dims(),
            slot.var.dtype(),
            g.dims(),
            g.dtype()
        )));
    }
    Ok(())
}

impl std::fmt::Debug for GradBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradBuckets")
            .field("params", &self.slots.len())
            .field("bucket_lens", &self.bucket_lens())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Overwrites every parameter with rank `root`'s values (DDP's broadcast at
/// construction): after it, every rank starts from the same weights,
/// whatever its own initialization drew.
pub fn broadcast_vars(group: &dyn ProcessGroup, vars: &[Var], root: usize) -> Result<()> {
    if group.world_size() <= 1 {
        return crate::group::check_root(root, 1);
    }
    for v in vars {
        group.broadcast_tensor(v.as_tensor(), root)?;
    }
    Ok(())
}

/// A 64-bit FNV-1a checksum of the tensors' bytes (dtype, shape and values),
/// to check that ranks hold the same weights (`group.check_same("weights", ..)`).
pub fn checksum(tensors: &[&Tensor]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in tensors {
        eat(t.dtype().as_str().as_bytes());
        for d in t.dims() {
            eat(&(*d as u64).to_le_bytes());
        }
        let t = t.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        with_cpu_view(&t, |v| match v {
            View::F32(x) => x.iter().for_each(|x| eat(&x.to_bits().to_le_bytes())),
            View::F64(x) => x.iter().for_each(|x| eat(&x.to_bits().to_le_bytes())),
            View::BF16(x) => x.iter().for_each(|x| eat(&x.to_bits().to_le_bytes())),
        })?;
    }
    Ok(h)
}
