//! Device discovery and parsing.

use candle_core::Device;

use crate::error::{DataError, Result};

/// The devices tests and examples should exercise: the CPU always, plus
/// CUDA device 0 when the crate is built with the `cuda` feature, a device
/// answers, and the environment variable `MINIBATCH_NO_CUDA` is unset.
///
/// ```
/// let devices = minibatch_data::available_devices();
/// assert!(devices[0].is_cpu());
/// ```
pub fn available_devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    {
        if std::env::var_os("MINIBATCH_NO_CUDA").is_none() {
            if let Ok(d) = Device::new_cuda(0) {
                devices.push(d);
            }
        }
    }
    devices
}

/// Parses `"cpu"`, `"cuda"` (device 0) or `"cuda:N"` into a [`Device`].
///
/// Without the `cuda` feature, or when no CUDA device answers, asking for
/// CUDA is a [`DataError::Device`] saying so; it never panics.
///
/// ```
/// let cpu = minibatch_data::parse_device("cpu").unwrap();
/// assert!(cpu.is_cpu());
/// assert!(minibatch_data::parse_device("tpu").is_err());
/// ```
pub fn parse_device(s: &str) -> Result<Device> {
    let t = s.trim().to_ascii_lowercase();
    if t == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if t == "cuda" || t == "gpu" {
        0
    } else if let Some(n) = t.strip_prefix("cuda:") {
        n.parse::<usize>().map_err(|_| {
            DataError::Device(format!(
                "cannot parse device {s:?}: expected cpu, cuda or cuda:N"
            ))
        })?
    } else {
        return Err(DataError::Device(format!(
            "unknown device {s:?}: expected cpu, cuda or cuda:N"
        )));
    };
    cuda_device(ordinal, s)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize, s: &str) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        DataError::Device(format!(
            "no CUDA device answered for {s:?} (ordinal {ordinal}): {e}"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize, s: &str) -> Result<Device> {
    Err(DataError::Device(format!(
        "device {s:?} needs CUDA support: rebuild with `--features cuda`"
    )))
}
