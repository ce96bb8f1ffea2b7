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
//! freed at once. What stays in the graph is one node, `y = op(x, θ)`, whose
//! inputs are the block input `x` and `θ`, the block's trainable parameters
//! flattened into one vector (one copy of them: the edge through which their
//! gradients reach the parameters).
//!
//! When the backward pass reaches that node with `∂L/∂y`, it runs `f` again
//! on a Var copy of `x` (the same ops, so the same values), takes the
//! gradient of `Σ y ⊙ ∂L/∂y` inside the block with candle's own backward,
//! and hands `∂L/∂x` and `∂L/∂θ` on. Dropout masks are the same in both
//! runs: the [`Dropout`](crate::Dropout) key (step and call index) is saved
//! before the forward pass and replayed for the recomputation. The gradients
//! are those of a run without checkpointing (the same ops in the same order;
//! the tests compare them bit for bit).
//!
//! # Cost
//!
//! Memory: per block, its input and output and the copy of its parameters
//! instead of all its intermediates; during the backward pass, one block's
//! intermediates at a time. Time: one more forward pass of each block and
//! the parameter copy (PyTorch's trade: about a third more per step).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

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
    let theta = if params.is_empty() {
        // An untracked placeholder: only x needs a gradient.
        Tensor::zeros(1, x.dtype(), x.device())?
    } else {
        let dtype = params[0].dtype();
        if let Some(p) = params.iter().find(|p| p.dtype() != dtype) {
            candle_core::bail!(
                "checkpoint: the block's parameters have dtypes {dtype:?} and {:?}: one dtype per block",
                p.dtype()
            );
        }
        let flat = params
            .iter()
            .map(|p| p.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    let op = Recompute {
        f: Arc::new(f),
        params,
        rng,
        output: Mutex::new(Some(y0)),
    };
    x.apply_op2_arc(&theta, Arc::new(Box::new(op)))
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
    /// The Vars the block reads, in the order of θ.
    params: Vec<Tensor>,
    /// The dropout key before the forward pass.
    rng: RngState,
    /// The block output, taken by the forward pass.
    output: Mutex<Option<Tensor>>,
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
        _theta: &Tensor,
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
        let grad_theta = if self.params.is_empty() {
            None
        } else {
            let flat = self
                .params
                .iter()
                .map(|p| match grads.get(p) {
                    Some(g) => g.flatten_all(),
                    None => p.zeros_like()?.flatten_all(),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&flat, 0)?)
        };
        Ok((grad_x, grad_theta))
    }
}
