//! The parameters of a candle `VarMap`, in one stable order.

use candle_core::Var;
use candle_nn::VarMap;

use crate::{OptimError, Result};

/// Every variable of `varmap` with its name, sorted by name.
///
/// A `VarMap` is a `HashMap` behind a lock, so its iteration order changes
/// from run to run; everything that must be reproducible (optimizer state
/// keys, checkpoint files, gradient checks) lists parameters through this.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> minibatch_optim::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let _ = candle_nn::linear(2, 3, vb.pp("fc"))?;
/// let names: Vec<String> = minibatch_optim::varmap_vars(&varmap)?.into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["fc.bias", "fc.weight"]);
/// # Ok(()) }
/// ```
pub fn varmap_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| OptimError::InvalidSetup("the VarMap's lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    drop(data);
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
