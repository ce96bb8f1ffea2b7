//! Gradient checkpointing (activation recomputation), PyTorch's
//! `torch.utils.checkpoint.checkpoint`: [`checkpoint`] runs a block forward
//! and keeps only its input and output; the backward pass runs the block again
//! to get the intermediate activations it needs.
//!
//! # How it works
//!
//! candle records the graph of every op whose inputs are tracked, and a
//! tensor keeps its whole graph (every intermediate activation) alive until
//! the backward pass. [`checkpoint`] runs `f` on a detached copy of the input,
//! detaches the result and drops that graph, so the block's intermediates are
//! freed at once. What stays in the graph is one node, `y = op(x, λ)`, whose
//! inputs are the block input `x` and `λ`, a one-element tensor computed from
//! the block's parameters by a chain of small link nodes: the edges through
//! which their gradients reach the parameters, at no copy of them.
//!
//! When the backward pass reaches that node with `∂L/∂y`, it runs `f` again
//! on a Var copy of `x` (the same ops, so the same values), takes the
//! gradient of `Σ y ⊙ ∂L/∂y` inside the block with candle's own backward,
//! and hands `∂L/∂x` on; the link nodes, which the backward pass reaches
//! right after, hand each parameter its gradient. Dropout masks are the same in both
//! runs: the [`Dropout`](crate::Dropout) key (step and call index) is saved
//! before the forward pass and replayed for the recomputation. The gradients
//! are those of a run without checkpointing (the same ops in the same order;
//! the tests compare them bit for bit).
//!
//! # Cost
//!
//! Memory: per block, its input and output instead of all its intermediates;
//! during the backward pass, one block's intermediates and gradients at a
//! time. Time: one more forward pass of each block (PyTorch's trade: about a
//! third more per step).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, TensorId, Var,
};

use crate::dropout::{rng_state, set_rng_state, RngState};

/// The block function of a [`checkpoint`]: the same computation every call.
type BlockFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// Runs `f(x)` keeping only its input and output for the backward pass,
/// which recomputes `f` (see the [module docs](self)).
///
/// The trainable parameters are found, not listed: the forward pass walks
/// the graph of `f`'s output for the `Var`s it reached (tensors that are not
/// tracked, such as frozen weights, are constants), so every one of them gets
/// its gradient. `f` must compute the same thing each time it is called (it
/// runs twice in a training step); a recomputation that reaches other `Var`s
/// is an error. When nothing `f` reads is tracked (evaluation of a frozen
/// model), this is just `f(x)`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use minibatch_nn::{recompute::checkpoint, Linear};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?)?;
/// let x = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.]], &dev)?)?;
/// let layer = Linear::new(w.as_tensor().clone(), None);
/// let block = move |h: &Tensor| layer.forward(h)?.tanh();
///
/// let y = checkpoint(block.clone(), x.as_tensor())?;
/// let g = y.sum_all()?.backward()?;
/// let plain = block(x.as_tensor())?.sum_all()?.backward()?;
/// for t in [w.as_tensor(), x.as_tensor()] {
///     assert_eq!(g.get(t).unwrap().to_vec2::<f32>()?, plain.get(t).unwrap().to_vec2::<f32>()?);
/// }
/// # Ok(()) }
/// ```
pub fn checkpoint<F>(f: F, x: &Tensor) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let rng = rng_state();
    let y = f(&x.detach())?;
    let params = vars_of(&y);
    if !x.track_op() && params.is_empty() {
        // Nothing to differentiate: the plain result, graph and all (none).
        return Ok(y);
    }
    let y0 = y.detach();
    drop(y); // the block's intermediates go with its graph
    let grads = Grads::default();
    let link = link(&params, &grads, x)?;
    let op = Recompute {
        f: Arc::new(f),
        params,
        rng,
        output: Mutex::new(Some(y0)),
        grads,
    };
    x.apply_op2_arc(&link, Arc::new(Box::new(op)))
}

/// The parameters' gradients, from the recomputation to the link nodes.
type Grads = Arc<Mutex<HashMap<TensorId, Tensor>>>;

fn lock(grads: &Grads) -> Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
    grads
        .lock()
        .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned gradient lock".into()))
}

/// `λ`: the parameters chained by [`Link`] nodes, two more per node (a lone
/// parameter is its own `λ`; none gives an untracked placeholder).
fn link(params: &[Tensor], grads: &Grads, like: &Tensor) -> Result<Tensor> {
    let placeholder = || Tensor::zeros(1, like.dtype(), like.device());
    let Some((first, rest)) = params.split_first() else {
        return placeholder();
    };
    let mut acc = first.clone();
    for pair in rest.chunks(2) {
        let b = match pair.get(1) {
            Some(b) => b.clone(),
            None => placeholder()?,
        };
        let node = Link {
            grads: grads.clone(),
        };
        acc = acc.apply_op3_arc(&pair[0], &b, Arc::new(Box::new(node)))?;
    }
    Ok(acc)
}

/// A gradient for `arg` of the backward pass: the parameter's own, taken
/// from `grads`, or zero for a link node (a one-element tensor whose value
/// nothing reads); none for an untracked placeholder.
fn grad_for(arg: &Tensor, grads: &Grads) -> Result<Option<Tensor>> {
    if !arg.track_op() {
        return Ok(None);
    }
    match lock(grads)?.remove(&arg.id()) {
        Some(g) => Ok(Some(g)),
        None => Ok(Some(arg.zeros_like()?)),
    }
}

/// A one-element zero of `s`'s dtype on `s`'s device.
fn one_zero<S>(s: &S) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = Shape::from(1);
    Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
}

/// A link of `λ`: its value is a one-element zero; its backward pass hands
/// out the gradients the recomputation left in `grads`.
struct Link {
    grads: Grads,
}

impl CustomOp3 for Link {
    fn name(&self) -> &'static str {
        "checkpoint-link"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        one_zero(s)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        one_zero(s)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            grad_for(a, &self.grads)?,
            grad_for(b, &self.grads)?,
            grad_for(c, &self.grads)?,
        ))
    }
}

/// The `Var`s that `y`'s graph reaches, in the graph's order.
fn vars_of(y: &Tensor) -> Vec<Tensor> {
    y.sorted_nodes()
        .into_iter()
        .filter(|n| n.is_variable())
        .cloned()
        .collect()
}

/// The graph node of a [`checkpoint`]: forward hands out the output computed
/// beforehand, backward recomputes the block.
struct Recompute {
    f: Arc<BlockFn>,
    /// The Vars the block reads.
    params: Vec<Tensor>,
    /// The dropout key before the forward pass.
    rng: RngState,
    /// The block output, taken by the forward pass.
    output: Mutex<Option<Tensor>>,
    /// Where the recomputation leaves the parameters' gradients.
    grads: Grads,
}

impl Recompute {
    /// The precomputed output's storage (a copy, so the op owns its result).
    fn take_output<S>(
        &self,
        pick: impl Fn(&Storage, &Layout) -> Option<Result<S>>,
    ) -> Result<(S, Shape)> {
        let y = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned output lock".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("checkpoint: the node was evaluated twice".into())
            })?;
        let y = y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        if layout.start_offset() != 0 {
            // The result of an op has offset 0; only a view of a larger tensor has another.
            candle_core::bail!(
                "checkpoint: the block output is a view with an offset: make it contiguous"
            );
        }
        let copied = pick(&storage, layout).ok_or_else(|| {
            candle_core::Error::Msg("checkpoint: the block output is on another device".into())
        })??;
        Ok((copied, y.shape().clone()))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take_output(|s, l| match s {
            Storage::Cpu(s) => Some(s.try_clone(l)),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take_output(|s, l| match s {
            Storage::Cuda(s) => Some(s.try_clone(l)),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        link: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = if x.track_op() {
            Some(Var::from_tensor(&x.detach())?)
        } else {
            None
        };
        let input = xv
            .as_ref()
            .map_or_else(|| x.detach(), |v| v.as_tensor().clone());
        let after_forward = rng_state();
        set_rng_state(self.rng);
        let y = (self.f)(&input);
        set_rng_state(after_forward);
        let y = y?;
        let input_id = input.id();
        let found: HashSet<TensorId> = vars_of(&y)
            .iter()
            .map(Tensor::id)
            .filter(|&id| id != input_id)
            .collect();
        let expected: HashSet<TensorId> = self.params.iter().map(Tensor::id).collect();
        if found != expected {
            candle_core::bail!(
                "checkpoint: the recomputed block reads other Vars than its forward pass did \
                 ({} against {}): the function must compute the same thing every call",
                found.len(),
                expected.len()
            );
        }
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        let grad_x = match &xv {
            Some(v) => Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            }),
            None => None,
        };
        {
            let mut cache = lock(&self.grads)?;
            for p in &self.params {
                let g = match grads.get(p) {
                    Some(g) => g.clone(),
                    None => p.zeros_like()?,
                };
                cache.insert(p.id(), g);
            }
        }
        // λ is a lone parameter (its gradient), a link (zero) or untracked.
        let grad_link = grad_for(link, &self.grads)?;
        Ok((grad_x, grad_link))
    }
}
