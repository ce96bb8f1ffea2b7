//! The fused in-place CPU update: a candle `InplaceOp2` that runs an
//! [`UpdateRule`] over the parameter's storage, chunked over candle's CPU thread pool.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout};
use half::{bf16, f16};

use crate::rule::MAX_STATE_BUFFERS;
use crate::{Float, ParamStep, UpdateRule};

/// Tensors with at most this many elements are updated on the calling thread.
pub(crate) const PARALLEL_THRESHOLD: usize = 1 << 16;
/// The smallest chunk handed to a pool task.
const MIN_CHUNK: usize = 1 << 15;
/// Elements converted at a time for bf16/f16 parameters (stack scratch).
const HALF_BLOCK: usize = 1024;

/// Host state buffers of one parameter.
#[derive(Debug, Clone)]
pub(crate) enum HostBuffers {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

/// The op lent the state buffers for one call.
pub(crate) struct FusedUpdate<'a, R: UpdateRule> {
    pub rule: &'a R,
    pub step: ParamStep,
    pub state: Mutex<&'a mut HostBuffers>,
}

fn contiguous<'s, T>(data: &'s [T], l: &Layout, what: &str) -> candle_core::Result<&'s [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("minibatch-optim fused update: {what} is not contiguous"),
    }
}

fn contiguous_mut<'s, T>(
    data: &'s mut [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'s mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("minibatch-optim fused update: {what} is not contiguous"),
    }
}

impl<R: UpdateRule> InplaceOp2 for FusedUpdate<'_, R> {
    fn name(&self) -> &'static str {
        "minibatch-fused-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let mut guard = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("optimizer state lock poisoned".into()))?;
        let state: &mut HostBuffers = &mut guard;
        match (s1, s2, state) {
            (CpuStorage::F32(p), CpuStorage::F32(g), HostBuffers::F32(s)) => {
                let p = contiguous_mut(p, l1, "parameter")?;
                let g = contiguous(g, l2, "gradient")?;
                run_native(self.rule, self.step, p, g, s);
            }
            (CpuStorage::F64(p), CpuStorage::F64(g), HostBuffers::F64(s)) => {
                let p = contiguous_mut(p, l1, "parameter")?;
                let g = contiguous(g, l2, "gradient")?;
                run_native(self.rule, self.step, p, g, s);
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(g), HostBuffers::F32(s)) => {
                let p = contiguous_mut(p, l1, "parameter")?;
                let g = contiguous(g, l2, "gradient")?;
                run_half(self.rule, self.step, p, g, s);
            }
            (CpuStorage::F16(p), CpuStorage::F16(g), HostBuffers::F32(s)) => {
                let p = contiguous_mut(p, l1, "parameter")?;
                let g = contiguous(g, l2, "gradient")?;
                run_half(self.rule, self.step, p, g, s);
            }
            (p, g, _) => candle_core::bail!(
                "minibatch-optim fused update: unsupported dtypes parameter {:?} / gradient {:?}",
                p.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}

/// Raw pointers to one parameter's data, shared by the pool's tasks; each task
/// touches a disjoint index range only.
struct Shared<P, S> {
    param: *mut P,
    grad: *const P,
    state: [*mut S; MAX_STATE_BUFFERS],
    n_state: usize,
}
// SAFETY: the pointers are only dereferenced on disjoint ranges (one per task)
// while the owning slices are mutably borrowed by `drive`.
unsafe impl<P: Send, S: Send> Send for Shared<P, S> {}
// SAFETY: as for `Send`: the tasks that share it write disjoint ranges only.
unsafe impl<P: Sync, S: Sync> Sync for Shared<P, S> {}

/// Runs `body` over `[0, n)` in chunks, on candle's CPU thread pool for
/// large tensors.
fn drive<P, S, B>(param: &mut [P], grad: &[P], state: &mut [Vec<S>], body: B)
where
    P: Send + Sync,
    S: Send + Sync,
    B: Fn(&mut [P], &[P], &mut [&mut [S]]) + Sync,
{
    let n = param.len();
    debug_assert_eq!(grad.len(), n);
    debug_assert!(state.iter().all(|s| s.len() == n));
    let k = state.len().min(MAX_STATE_BUFFERS);
    // candle's own CPU pool (the one its element-wise ops use, whose workers
    // spin a while after each op): a second pool (rayon's) would compete
    // with those spinning workers for the cores.
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    if n <= PARALLEL_THRESHOLD || threads <= 1 {
        let mut subs: [&mut [S]; MAX_STATE_BUFFERS] = std::array::from_fn(|_| Default::default());
        for (sub, buf) in subs.iter_mut().zip(state.iter_mut()) {
            *sub = &mut buf[..];
        }
        body(param, grad, &mut subs[..k]);
        return;
    }
    let chunk = (n.div_ceil(threads * 4)).max(MIN_CHUNK);
    let n_chunks = n.div_ceil(chunk);
    let mut ptrs = [std::ptr::null_mut(); MAX_STATE_BUFFERS];
    for (p, buf) in ptrs.iter_mut().zip(state.iter_mut()) {
        *p = buf.as_mut_ptr();
    }
    let shared = Shared {
        param: param.as_mut_ptr(),
        grad: grad.as_ptr(),
        state: ptrs,
        n_state: k,
    };
    pool.execute_chunked(n_chunks, |chunks| {
        for c in chunks {
            let shared = &shared;
            let start = c * chunk;
            let len = chunk.min(n - start);
            // SAFETY: chunks [start, start + len) are disjoint across tasks and in
            // bounds of every buffer (all have length n); the borrows of `param`,
            // `grad` and `state` outlive this parallel loop.
            unsafe {
                let p = std::slice::from_raw_parts_mut(shared.param.add(start), len);
                let g = std::slice::from_raw_parts(shared.grad.add(start), len);
                let mut subs: [&mut [S]; MAX_STATE_BUFFERS] =
                    std::array::from_fn(|_| Default::default());
                for (sub, ptr) in subs
                    .iter_mut()
                    .zip(shared.state.iter())
                    .take(shared.n_state)
                {
                    *sub = std::slice::from_raw_parts_mut(ptr.add(start), len);
                }
                body(p, g, &mut subs[..shared.n_state]);
            }
        }
    });
}

/// Runs `body` over matching chunks of `dst` and `src` (same length), on
/// candle's CPU pool for large tensors: the averaged weights' in-place pass.
pub(crate) fn drive_pair<P, B>(dst: &mut [P], src: &[P], body: B)
where
    P: Send + Sync,
    B: Fn(&mut [P], &[P]) + Sync,
{
    let mut no_state: [Vec<P>; 0] = [];
    drive(dst, src, &mut no_state, |d, s, _| body(d, s));
}

/// f32 / f64 parameters: the rule runs directly on the storage.
pub(crate) fn run_native<R: UpdateRule, F: Float>(
    rule: &R,
    step: ParamStep,
    param: &mut [F],
    grad: &[F],
    state: &mut [Vec<F>],
) {
    drive(param, grad, state, |p, g, s| rule.update(step, p, g, s));
}

/// A 16-bit float parameter element, upcast to f32 for the update.
pub(crate) trait HalfElem: Copy + Send + Sync + Default + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}
impl HalfElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl HalfElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// bf16 / f16 parameters: blocks are upcast into stack scratch, updated in
/// f32 against f32 state, and rounded back.
pub(crate) fn run_half<R: UpdateRule, H: HalfElem>(
    rule: &R,
    step: ParamStep,
    param: &mut [H],
    grad: &[H],
    state: &mut [Vec<f32>],
) {
    drive(param, grad, state, |p, g, s| {
        let mut pf = [0f32; HALF_BLOCK];
        let mut gf = [0f32; HALF_BLOCK];
        let mut start = 0;
        while start < p.len() {
            let len = HALF_BLOCK.min(p.len() - start);
            for j in 0..len {
                pf[j] = p[start + j].to_f32();
                gf[j] = g[start + j].to_f32();
            }
            let mut subs: [&mut [f32]; MAX_STATE_BUFFERS] =
                std::array::from_fn(|_| Default::default());
            let k = s.len();
            for (sub, buf) in subs.iter_mut().zip(s.iter_mut()) {
                *sub = &mut buf[start..start + len];
            }
            rule.update(step, &mut pf[..len], &gf[..len], &mut subs[..k]);
            for j in 0..len {
                p[start + j] = H::from_f32(pf[j]);
            }
            start += len;
        }
    });
}
