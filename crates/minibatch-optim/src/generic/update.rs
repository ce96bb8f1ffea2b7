//! Updating one parameter: the fused in-place pass on the host, candle
//! tensor ops on other devices, a host round trip for rules without them.

use std::sync::Mutex;

use candle_core::{DType, Tensor, Var, WithDType};

use super::param_state::{Buffers, ParamState};
use crate::kernel::{run_native, FusedUpdate};
use crate::{Float, OptimError, ParamStep, Result, UpdateRule};

/// Checks that `grad` fits parameter `name` (shape, dtype, device).
pub(super) fn check_grad(name: &str, var: &Var, grad: &Tensor) -> Result<()> {
    let reason = if grad.shape() != var.shape() {
        format!("shape {:?} vs parameter {:?}", grad.dims(), var.dims())
    } else if grad.dtype() != var.dtype() {
        format!("dtype {:?} vs parameter {:?}", grad.dtype(), var.dtype())
    } else if !grad.device().same_device(var.device()) {
        format!("device {:?} vs parameter {:?}", grad.device(), var.device())
    } else {
        return Ok(());
    };
    Err(OptimError::GradientMismatch {
        name: name.to_string(),
        reason,
    })
}

/// One update of `var` with `grad` (already checked), advancing its state.
pub(super) fn update_param<R: UpdateRule>(
    rule: &R,
    var: &Var,
    grad: &Tensor,
    st: &mut ParamState,
) -> Result<()> {
    let step = st.next_step();
    match &mut st.bufs {
        Buffers::Host(bufs) => {
            let contiguous;
            let grad = if grad.is_contiguous() {
                grad
            } else {
                contiguous = grad.contiguous()?;
                &contiguous
            };
            let op = FusedUpdate {
                rule,
                step,
                state: Mutex::new(bufs),
            };
            var.as_tensor().inplace_op2(grad, &op)?;
        }
        Buffers::Device(ts) => device_update(rule, step, var, grad, ts)?,
    }
    st.step = step.t;
    st.new_buffers = 0;
    Ok(())
}

/// Tensor-path update of one parameter (non-CPU devices, or forced).
fn device_update<R: UpdateRule>(
    rule: &R,
    step: ParamStep,
    var: &Var,
    grad: &Tensor,
    state: &mut [Tensor],
) -> Result<()> {
    let half = matches!(var.dtype(), DType::BF16 | DType::F16);
    let (p, g) = if half {
        (
            var.as_tensor().to_dtype(DType::F32)?,
            grad.to_dtype(DType::F32)?,
        )
    } else {
        (var.as_tensor().detach(), grad.detach())
    };
    if let Some(new) = rule.update_tensors(step, &p, &g, state)? {
        var.set(&new.to_dtype(var.dtype())?)?;
        return Ok(());
    }
    if p.dtype() == DType::F64 {
        host_round_trip::<R, f64>(rule, step, var, &p, &g, state)
    } else {
        host_round_trip::<R, f32>(rule, step, var, &p, &g, state)
    }
}

fn host_round_trip<R: UpdateRule, F: Float + WithDType>(
    rule: &R,
    step: ParamStep,
    var: &Var,
    p: &Tensor,
    g: &Tensor,
    state: &mut [Tensor],
) -> Result<()> {
    let mut pv: Vec<F> = p.flatten_all()?.to_vec1()?;
    let gv: Vec<F> = g.flatten_all()?.to_vec1()?;
    let mut sv = Vec::with_capacity(state.len());
    for t in state.iter() {
        sv.push(t.flatten_all()?.to_vec1::<F>()?);
    }
    run_native(rule, step, &mut pv, &gv, &mut sv);
    let dev = var.device();
    let new = Tensor::from_vec(pv, var.shape(), dev)?.to_dtype(var.dtype())?;
    var.set(&new)?;
    for (t, v) in state.iter_mut().zip(sv) {
        *t = Tensor::from_vec(v, var.shape(), dev)?;
    }
    Ok(())
}
