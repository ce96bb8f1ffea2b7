//! The state of one parameter: its step count and state buffers, on the host
//! or on the parameter's device.

use candle_core::{DType, Device, Tensor, Var};

use crate::kernel::HostBuffers;
use crate::{OptimError, ParamStep, Result, UpdateRule};

/// The state buffers of one parameter: host vectors for CPU parameters,
/// tensors on the parameter's device otherwise.
#[derive(Debug, Clone)]
pub(super) enum Buffers {
    Host(HostBuffers),
    Device(Vec<Tensor>),
}

/// The state of one parameter: created on its first update.
#[derive(Debug, Clone)]
pub(super) struct ParamState {
    /// Updates received so far.
    pub step: u64,
    /// Bit `k`: buffer `k` has not been updated yet (see [`ParamStep`]).
    pub new_buffers: u8,
    pub bufs: Buffers,
}

/// The dtype state buffers are kept in for a parameter dtype.
pub(super) fn state_dtype(name: &str, dtype: DType) -> Result<DType> {
    match dtype {
        DType::F64 => Ok(DType::F64),
        DType::F32 | DType::BF16 | DType::F16 => Ok(DType::F32),
        dtype => Err(OptimError::UnsupportedDtype {
            name: name.to_string(),
            dtype,
        }),
    }
}

/// A mask with the low `k` bits set.
pub(super) fn all_new(k: usize) -> u8 {
    if k >= 8 {
        u8::MAX
    } else {
        (1u8 << k) - 1
    }
}

/// One buffer of `value`s, shaped like `var`, on its device.
fn device_buffer(value: f64, sdt: DType, var: &Var) -> Result<Tensor> {
    Ok(if sdt == DType::F64 {
        Tensor::full(value, var.shape(), var.device())?
    } else {
        Tensor::full(value as f32, var.shape(), var.device())?
    })
}

impl ParamState {
    /// Fresh state for `var` (no update yet): every buffer at the rule's
    /// initial value, on the host unless `on_device`.
    pub fn new<R: UpdateRule>(rule: &R, var: &Var, on_device: bool, name: &str) -> Result<Self> {
        let sdt = state_dtype(name, var.dtype())?;
        let names = rule.state_names();
        let n = var.elem_count();
        let bufs = if on_device {
            let mut ts = Vec::with_capacity(names.len());
            for k in 0..names.len() {
                ts.push(device_buffer(rule.initial_state(k), sdt, var)?);
            }
            Buffers::Device(ts)
        } else if sdt == DType::F64 {
            Buffers::Host(HostBuffers::F64(
                (0..names.len())
                    .map(|k| vec![rule.initial_state(k); n])
                    .collect(),
            ))
        } else {
            Buffers::Host(HostBuffers::F32(
                (0..names.len())
                    .map(|k| vec![rule.initial_state(k) as f32; n])
                    .collect(),
            ))
        };
        Ok(Self {
            step: 0,
            new_buffers: all_new(names.len()),
            bufs,
        })
    }

    /// What the next update of this parameter is told.
    pub fn next_step(&self) -> ParamStep {
        ParamStep {
            t: self.step + 1,
            new_buffers: self.new_buffers,
        }
    }

    /// Whether buffer `k` holds data (has been updated at least once).
    pub fn holds(&self, k: usize) -> bool {
        (self.new_buffers >> k) & 1 == 0
    }

    /// This state with the buffers of `rule` (whose names may differ from
    /// `old_names`, the layout the state has now): buffers whose name is
    /// kept keep their content, added ones start at the rule's initial value
    /// and are marked new. The caller has checked that no buffer holding
    /// data is dropped.
    pub fn relayout<R: UpdateRule>(&self, old_names: &[&str], rule: &R, var: &Var) -> Result<Self> {
        let names = rule.state_names();
        let sdt = state_dtype("", var.dtype())?;
        let n = var.elem_count();
        let mut new_buffers = 0u8;
        let old_of = |name: &str| old_names.iter().position(|o| *o == name);
        for (k, name) in names.iter().enumerate() {
            let bit = match old_of(name) {
                Some(i) => (self.new_buffers >> i) & 1,
                None => 1,
            };
            new_buffers |= bit << k;
        }
        let bufs = match &self.bufs {
            Buffers::Host(HostBuffers::F32(b)) => Buffers::Host(HostBuffers::F32(
                names
                    .iter()
                    .enumerate()
                    .map(|(k, name)| match old_of(name) {
                        Some(i) => b[i].clone(),
                        None => vec![rule.initial_state(k) as f32; n],
                    })
                    .collect(),
            )),
            Buffers::Host(HostBuffers::F64(b)) => Buffers::Host(HostBuffers::F64(
                names
                    .iter()
                    .enumerate()
                    .map(|(k, name)| match old_of(name) {
                        Some(i) => b[i].clone(),
                        None => vec![rule.initial_state(k); n],
                    })
                    .collect(),
            )),
            Buffers::Device(ts) => {
                let mut out = Vec::with_capacity(names.len());
                for (k, name) in names.iter().enumerate() {
                    out.push(match old_of(name) {
                        Some(i) => ts[i].clone(),
                        None => device_buffer(rule.initial_state(k), sdt, var)?,
                    });
                }
                Buffers::Device(out)
            }
        };
        Ok(Self {
            step: self.step,
            new_buffers,
            bufs,
        })
    }

    /// Buffer `k` as a tensor of `var`'s shape on the CPU (f32 or f64).
    pub fn buffer_on_cpu(&self, k: usize, var: &Var) -> Result<Tensor> {
        let (shape, cpu) = (var.shape().clone(), &Device::Cpu);
        Ok(match &self.bufs {
            Buffers::Host(HostBuffers::F32(b)) => Tensor::from_slice(&b[k], shape, cpu)?,
            Buffers::Host(HostBuffers::F64(b)) => Tensor::from_slice(&b[k], shape, cpu)?,
            Buffers::Device(ts) => ts[k].to_device(cpu)?,
        })
    }
}
