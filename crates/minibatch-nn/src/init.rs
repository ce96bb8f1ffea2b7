//! Seeded initialisation: what `torch.manual_seed` gives a PyTorch program.
//!
//! candle 0.11's CPU random number generator cannot be seeded
//! (`Device::set_seed` errors on the CPU), so `VarBuilder::from_varmap`
//! draws different initial weights on every run. [`seeded_var_builder`]
//! returns a `VarBuilder` over the same [`VarMap`] whose new variables are
//! drawn from a ChaCha8 stream keyed by `(seed, full parameter name)`: the
//! initial value of `"encoder.fc1.weight"` is a pure function of the seed and
//! that name. It does not depend on the order layers are built in, on other
//! layers, on threads or on the run.
//!
//! The distributions are the ones the layer asked for through candle's
//! [`Init`] hint, so every `minibatch::nn` layer, every candle-nn layer and
//! any model that takes a `VarBuilder` keeps its usual initialisation
//! (PyTorch's defaults where candle follows them: Kaiming for weights,
//! uniform ±1/√fan_in for biases, N(0, 1) for embeddings, ones and zeros for
//! norms). Only the random numbers differ from candle's unseeded ones.
//!
//! The values are not PyTorch's own random stream: the same seed gives the
//! same weights here on every run and every machine, not the weights
//! `torch.manual_seed` gives in Python.

use std::sync::PoisonError;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarBuilder` that creates the variables it is asked for in `varmap`,
/// drawn reproducibly from `seed`.
///
/// * A name already in `varmap` is returned as is (the same `Var`, so it
///   trains), after checking that its shape, dtype and device are the ones
///   asked for; a mismatch is an error naming the variable and both values.
/// * A new name is drawn from the layer's [`Init`] hint (`Const`,
///   `Randn { mean, stdev }`, `Uniform { lo, up }` or `Kaiming`, with the
///   same fan and gain rules as candle-nn) using a ChaCha8 generator keyed by
///   `seed` on a stream picked by a fixed 64-bit FNV-1a hash of the full
///   parameter name, drawn in `f64` and converted to the asked dtype, then
///   inserted into `varmap`.
///
/// Building the same model twice, in two fresh `VarMap`s with the same seed,
/// gives bit-identical initial weights; a different seed or a different name
/// gives different ones. `contains_tensor` answers whether the name is already
/// in the `VarMap`, as candle's `VarMap` backend does.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarMap;
///
/// let dev = Device::Cpu;
/// let draw = || -> candle_core::Result<Vec<f32>> {
///     let varmap = VarMap::new();
///     let vb = minibatch_nn::seeded_var_builder(&varmap, 42, DType::F32, &dev);
///     let layer = minibatch_nn::linear(4, 3, vb.pp("fc1"))?;
///     layer.weight().flatten_all()?.to_vec1::<f32>()
/// };
/// assert_eq!(draw()?, draw()?); // the same seed gives the same weights
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// The `SimpleBackend` behind [`seeded_var_builder`].
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(var) = vars.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "seeded_var_builder: `{name}` is already in the VarMap with shape {:?}, asked for {:?}",
                    var.shape(),
                    s
                );
            }
            check_dtype_device(name, var.as_tensor(), dtype, dev)?;
            return Ok(var.as_tensor().clone());
        }
        let values = draw(&h, &s, self.seed, name)?;
        let tensor = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let vars = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match vars.get(name) {
            Some(var) => {
                check_dtype_device(name, var.as_tensor(), dtype, dev)?;
                Ok(var.as_tensor().clone())
            }
            None => candle_core::bail!(
                "seeded_var_builder: `{name}` is not in the VarMap, and a new variable needs a shape: use `get` instead of `get_unchecked`"
            ),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }
}

/// An existing variable handed back in another dtype or on another device
/// would be a copy the optimizer never sees: refuse it.
fn check_dtype_device(name: &str, t: &Tensor, dtype: DType, dev: &Device) -> Result<()> {
    if t.dtype() != dtype {
        candle_core::bail!(
            "seeded_var_builder: `{name}` is already in the VarMap as {:?}, asked for {dtype:?}",
            t.dtype()
        );
    }
    if !t.device().same_device(dev) {
        candle_core::bail!(
            "seeded_var_builder: `{name}` is already in the VarMap on {:?}, asked for {dev:?}",
            t.device()
        );
    }
    Ok(())
}

/// 64-bit FNV-1a: a fixed, documented hash (std's `DefaultHasher` may change
/// between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The generator of parameter `name` under `seed`: key from the seed, stream
/// from the name.
fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name.as_bytes()));
    rng
}

/// Uniform in `[0, 1)` from the top 53 bits of one draw.
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `n` values of the distribution `init` asks for, for a tensor of shape `s`.
fn draw(init: &Init, s: &Shape, seed: u64, name: &str) -> Result<Vec<f64>> {
    let n = s.elem_count();
    let mut rng = rng_for(seed, name);
    let values = match *init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(&mut rng, n, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            // candle-nn's Init::var, drawn from our generator.
            let fan = fan.for_shape(s);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, n, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
            }
        }
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        candle_core::bail!("seeded_var_builder: the init {init:?} of `{name}` drew {bad}");
    }
    Ok(values)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f64> {
    (0..n).map(|_| lo + (up - lo) * unit(rng)).collect()
}

/// Box-Muller, both outputs of each pair used.
fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, stdev: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = 1.0 - unit(rng); // (0, 1]: ln is finite
        let u2 = unit(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        out.push(mean + stdev * r * cos);
        out.push(mean + stdev * r * sin);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of the FNV specification.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn unit_is_in_range() {
        let mut rng = rng_for(0, "x");
        for _ in 0..10_000 {
            let u = unit(&mut rng);
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
