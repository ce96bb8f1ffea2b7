//! [`AveragedWeights`]: an EMA or SWA average of the trained weights as a
//! trainer callback, saved in checkpoints and resumed to the bit.

use std::sync::{Arc, Mutex, MutexGuard};

use minibatch_optim::AveragedModel;
use serde_json::{json, Value};

use crate::callbacks::{Callback, Control};
use crate::error::{Result, TrainError};
use crate::history::StepRecord;

/// Keeps a [`minibatch_optim::AveragedModel`] (EMA or SWA) of the model's
/// weights up to date during [`Trainer::fit`](crate::Trainer::fit): after
/// optimizer step `start_step` and every `every` steps after it, the
/// average folds in the current weights (PyTorch's
/// `swa_model.update_parameters(model)` in the training loop).
///
/// It is a [`Callback`]: add it with `TrainerBuilder::callback`, keeping a
/// clone (clones share the average) to read the average afterwards or to
/// evaluate with it:
/// `ema.with_averaged(|| trainer.evaluate(&val_loader))` runs the evaluation
/// with the averaged weights in the model and restores the trained ones.
/// Its state (the averages, `n_averaged`, the rule) is part of every
/// checkpoint, so a resumed run has the same averages, to the bit, as an
/// uninterrupted one. (The averages are kept as hex in `trainer.json`: fine
/// for the adapters or heads of a fine-tune; for a large model, average a
/// [`select`](minibatch_optim::select)ed subset.)
///
/// The trainer calls step callbacks after every step on the CPU; on other
/// devices only at logging points, so set `log_every_steps(every)` there.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_optim::{AveragedModel, Averaging};
/// use minibatch_train::AveragedWeights;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let varmap = VarMap::new();
/// let _ = candle_nn::linear(4, 2, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// let ema = AveragedWeights::new(AveragedModel::from_varmap(&varmap, Averaging::Ema { decay: 0.999 })?);
/// let handle = ema.clone(); // give `ema` to TrainerBuilder::callback, keep `handle`
/// assert_eq!(handle.model().n_averaged(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AveragedWeights {
    inner: Arc<Mutex<AveragedModel>>,
    start_step: u64,
    every: u64,
}

impl AveragedWeights {
    /// Averages after every optimizer step, from the first.
    pub fn new(model: AveragedModel) -> Self {
        Self {
            inner: Arc::new(Mutex::new(model)),
            start_step: 0,
            every: 1,
        }
    }

    /// The first (0-based, global) optimizer step after which the average
    /// is updated (SWA usually starts late in training).
    pub fn start_at_step(mut self, step: u64) -> Self {
        self.start_step = step;
        self
    }

    /// Updates the average every `n` steps (from the start step); `0` is
    /// taken as 1.
    pub fn every_steps(mut self, n: u64) -> Self {
        self.every = n.max(1);
        self
    }

    /// The average (locked while the guard lives).
    pub fn model(&self) -> MutexGuard<'_, AveragedModel> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the averaged weights in the model's variables and puts
    /// the trained ones back afterwards, bit for bit: evaluation with the
    /// averaged weights (`ema.with_averaged(|| trainer.evaluate(&val))`).
    pub fn with_averaged<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        Ok(self.model().with_averaged(f)?)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

impl Callback for AveragedWeights {
    fn name(&self) -> &str {
        "averaged_weights"
    }

    fn on_step_end(&mut self, info: &StepRecord) -> Result<Control> {
        if info.step >= self.start_step && (info.step - self.start_step).is_multiple_of(self.every)
        {
            self.model().update_parameters()?;
        }
        Ok(Control::Continue)
    }

    fn state(&self) -> Value {
        match self.model().state_bytes() {
            Ok(bytes) => json!({
                "start_step": self.start_step,
                "every": self.every,
                "average": to_hex(&bytes),
            }),
            // state() cannot fail; load_state reports the missing average
            Err(e) => json!({ "error": e.to_string() }),
        }
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        let bad =
            |what: &str| TrainError::Config(format!("averaged_weights checkpoint state: {what}"));
        if let Some(e) = state.get("error").and_then(Value::as_str) {
            return Err(bad(&format!("the average could not be saved: {e}")));
        }
        let start = state.get("start_step").and_then(Value::as_u64);
        let every = state.get("every").and_then(Value::as_u64);
        if start != Some(self.start_step) || every != Some(self.every) {
            return Err(bad(&format!(
                "saved with start_step {start:?} / every {every:?}, this callback has {} / {}",
                self.start_step, self.every
            )));
        }
        let bytes = state
            .get("average")
            .and_then(Value::as_str)
            .and_then(from_hex)
            .ok_or_else(|| bad("missing or corrupt `average`"))?;
        self.model().load_state_bytes(&bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(super::from_hex(&super::to_hex(&b)).unwrap(), b);
        assert!(super::from_hex("abc").is_none());
        assert!(super::from_hex("zz").is_none());
    }
}
