//! Training history: one record per epoch and per optimizer step, written as
//! CSV and JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// What happened in one epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch number (0-based).
    pub epoch: u64,
    /// Optimizer steps taken so far (global, after this epoch).
    pub steps: u64,
    /// Mean training loss over the epoch's samples.
    #[serde(with = "float")]
    pub train_loss: f64,
    /// Training metrics by name (for example `accuracy`).
    #[serde(with = "float::map")]
    pub train_metrics: BTreeMap<String, f64>,
    /// Mean validation loss, when a validation loader is set.
    #[serde(with = "float::option")]
    pub val_loss: Option<f64>,
    /// Validation metrics by name.
    #[serde(with = "float::map")]
    pub val_metrics: BTreeMap<String, f64>,
    /// The learning rate in force at the end of the epoch (before an epoch schedule steps).
    pub lr: f64,
    /// Wall time of the training part of the epoch, seconds.
    ///
    /// The three timings are `None` for epochs trained before a resume
    /// whose timings are not in `out_dir`'s `history.json`: checkpoints hold
    /// no wall-clock time, so that identical runs write identical bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_time_s: Option<f64>,
    /// Training samples per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_s: Option<f64>,
    /// Share of the epoch's wall time spent waiting for the loader (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_wait_share: Option<f64>,
}

impl EpochRecord {
    /// Looks a quantity up by name: `train_loss`, `val_loss`, `lr`,
    /// `train_<metric>`, `val_<metric>`.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "train_loss" | "loss" => Some(self.train_loss),
            "val_loss" => self.val_loss,
            "lr" => Some(self.lr),
            _ => {
                if let Some(m) = name.strip_prefix("val_") {
                    self.val_metrics.get(m).copied()
                } else if let Some(m) = name.strip_prefix("train_") {
                    self.train_metrics.get(m).copied()
                } else {
                    None
                }
            }
        }
    }

    /// [`EpochRecord::get`], or a [`TrainError::UnknownMetric`] naming what
    /// the record holds.
    pub fn require(&self, name: &str) -> Result<f64> {
        self.get(name).ok_or_else(|| TrainError::UnknownMetric {
            name: name.to_string(),
            available: self.names().join(", "),
        })
    }

    /// The names [`EpochRecord::get`] answers for this record.
    pub fn names(&self) -> Vec<String> {
        let mut v = vec!["train_loss".to_string(), "lr".to_string()];
        v.extend(self.train_metrics.keys().map(|k| format!("train_{k}")));
        if self.val_loss.is_some() {
            v.push("val_loss".into());
        }
        v.extend(self.val_metrics.keys().map(|k| format!("val_{k}")));
        v
    }
}

/// Serde for floats that may be NaN or infinite (a diverged validation loss,
/// a metric without samples): JSON has no such numbers, and `serde_json`
/// would write `null` and fail to read it back (or, inside an `Option`, turn
/// it into `None`). Non-finite values are written as the strings `"NaN"`,
/// `"inf"` and `"-inf"`.
pub(crate) mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
    }

    fn text(v: f64) -> &'static str {
        if v.is_nan() {
            "NaN"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        }
    }

    fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f64, E> {
        match r {
            Repr::Num(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(E::custom(format!("expected a number, got {other:?}"))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_str(text(*v))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }

    #[derive(serde::Serialize, Deserialize)]
    struct Wrap(#[serde(with = "super::float")] f64);

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            serde::Serialize::serialize(&v.map(Wrap), s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }

    pub mod map {
        use super::*;
        use std::collections::BTreeMap;

        pub fn serialize<S: Serializer>(
            v: &BTreeMap<String, f64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_map(v.iter().map(|(k, x)| (k, Wrap(*x))))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, f64>, D::Error> {
            let m = BTreeMap::<String, Wrap>::deserialize(d)?;
            Ok(m.into_iter().map(|(k, w)| (k, w.0)).collect())
        }
    }
}

/// One optimizer step: what the history keeps and what
/// [`Callback::on_step_end`](crate::Callback::on_step_end) receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Global optimizer step (0-based: the step this record's update was).
    pub step: u64,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Index (within the epoch) of the last batch folded into this step.
    pub batch: u64,
    /// Loss of the step (mean over its micro-batches), before the update.
    #[serde(with = "float")]
    pub loss: f64,
    /// Learning rate used for the update.
    pub lr: f64,
}

/// Per-epoch and per-step records of a run.
///
/// ```
/// use minibatch_train::{EpochRecord, History};
/// let mut h = History::default();
/// h.epochs.push(EpochRecord { epoch: 0, train_loss: 0.5, ..Default::default() });
/// let csv = h.epochs_csv();
/// assert!(csv.starts_with("epoch,steps,train_loss"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// One record per finished epoch.
    pub epochs: Vec<EpochRecord>,
    /// One record per optimizer step.
    pub steps: Vec<StepRecord>,
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

impl History {
    /// This history without the epochs' wall-clock timings (`epoch_time_s`,
    /// `samples_per_s`, `data_wait_share` set to `None`): what a checkpoint
    /// saves, so that two identical runs write identical checkpoints. The
    /// timings stay in the trainer's history and its `out_dir` files.
    pub fn without_timings(&self) -> History {
        let mut h = self.clone();
        for e in &mut h.epochs {
            e.epoch_time_s = None;
            e.samples_per_s = None;
            e.data_wait_share = None;
        }
        h
    }

    /// Copies the timings of `other`'s epoch records into this history's
    /// records that lack them, where both records are the same epoch (same
    /// epoch number, step count and bit-identical training loss). A resume
    /// uses it to take the timings of the epochs before the checkpoint from
    /// the `history.json` the earlier run wrote.
    pub fn fill_timings_from(&mut self, other: &History) {
        for e in &mut self.epochs {
            let Some(o) = other.epochs.iter().find(|o| {
                o.epoch == e.epoch
                    && o.steps == e.steps
                    && o.train_loss.to_bits() == e.train_loss.to_bits()
            }) else {
                continue;
            };
            if e.epoch_time_s.is_none() {
                e.epoch_time_s = o.epoch_time_s;
            }
            if e.samples_per_s.is_none() {
                e.samples_per_s = o.samples_per_s;
            }
            if e.data_wait_share.is_none() {
                e.data_wait_share = o.data_wait_share;
            }
        }
    }

    /// The epoch table as CSV (metric columns are the union over epochs).
    pub fn epochs_csv(&self) -> String {
        let mut train_names: Vec<&String> = Vec::new();
        let mut val_names: Vec<&String> = Vec::new();
        for e in &self.epochs {
            for k in e.train_metrics.keys() {
                if !train_names.contains(&k) {
                    train_names.push(k);
                }
            }
            for k in e.val_metrics.keys() {
                if !val_names.contains(&k) {
                    val_names.push(k);
                }
            }
        }
        let mut out = String::from("epoch,steps,train_loss");
        for k in &train_names {
            out.push_str(&format!(",train_{k}"));
        }
        out.push_str(",val_loss");
        for k in &val_names {
            out.push_str(&format!(",val_{k}"));
        }
        out.push_str(",lr,epoch_time_s,samples_per_s,data_wait_share\n");
        for e in &self.epochs {
            out.push_str(&format!("{},{},{}", e.epoch, e.steps, e.train_loss));
            for k in &train_names {
                out.push_str(&format!(",{}", fmt_opt(e.train_metrics.get(*k).copied())));
            }
            out.push_str(&format!(",{}", fmt_opt(e.val_loss)));
            for k in &val_names {
                out.push_str(&format!(",{}", fmt_opt(e.val_metrics.get(*k).copied())));
            }
            out.push_str(&format!(
                ",{},{},{},{}\n",
                e.lr,
                fmt_opt(e.epoch_time_s),
                fmt_opt(e.samples_per_s),
                fmt_opt(e.data_wait_share)
            ));
        }
        out
    }

    /// The step table as CSV.
    pub fn steps_csv(&self) -> String {
        let mut out = String::from("step,epoch,batch,loss,lr\n");
        for s in &self.steps {
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                s.step, s.epoch, s.batch, s.loss, s.lr
            ));
        }
        out
    }

    /// The whole history as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| TrainError::json("history", e))
    }

    /// Parses what [`History::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| TrainError::json("history", e))
    }

    /// Writes `history_epochs.csv`, `history_steps.csv` and `history.json`
    /// into `dir` (created if needed), each atomically. Returns the paths.
    pub fn save(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let files = [
            ("history_epochs.csv", self.epochs_csv()),
            ("history_steps.csv", self.steps_csv()),
            ("history.json", self.to_json()?),
        ];
        let mut paths = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            minibatch_optim::write_atomic(&p, text.as_bytes())?;
            paths.push(p);
        }
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> History {
        let mut h = History::default();
        for e in 0..2u64 {
            let mut r = EpochRecord {
                epoch: e,
                steps: 10 * (e + 1),
                train_loss: 1.0 / (e + 1) as f64,
                val_loss: Some(0.9),
                lr: 0.1,
                ..Default::default()
            };
            r.train_metrics.insert("accuracy".into(), 0.5);
            r.val_metrics.insert("accuracy".into(), 0.6);
            h.epochs.push(r);
        }
        h.steps.push(StepRecord {
            step: 0,
            epoch: 0,
            batch: 0,
            loss: 2.5,
            lr: 0.1,
        });
        h
    }

    #[test]
    fn csv_has_metric_columns_and_one_row_per_epoch() {
        let csv = sample().epochs_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "epoch,steps,train_loss,train_accuracy,val_loss,val_accuracy,lr,epoch_time_s,samples_per_s,data_wait_share"
        );
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("1,20,0.5,0.5,0.9,0.6,0.1"));
        assert_eq!(
            sample().steps_csv(),
            "step,epoch,batch,loss,lr\n0,0,0,2.5,0.1\n"
        );
    }

    #[test]
    fn json_round_trips_and_files_are_written() {
        let h = sample();
        assert_eq!(History::from_json(&h.to_json().unwrap()).unwrap(), h);
        let dir = tempfile::tempdir().unwrap();
        let paths = h.save(dir.path()).unwrap();
        assert_eq!(paths.len(), 3);
        let back = std::fs::read_to_string(dir.path().join("history.json")).unwrap();
        assert_eq!(History::from_json(&back).unwrap(), h);
        assert_eq!(h.epochs[1].get("val_accuracy"), Some(0.6));
        assert_eq!(h.epochs[1].get("nope"), None);
        assert!(h.epochs[1]
            .require("nope")
            .unwrap_err()
            .to_string()
            .contains("val_accuracy"));
    }

    #[test]
    fn timings_are_left_out_of_checkpoints_and_filled_back() {
        let mut h = sample();
        h.epochs[0].epoch_time_s = Some(1.5);
        h.epochs[0].samples_per_s = Some(1000.0);
        h.epochs[0].data_wait_share = Some(0.25);
        h.epochs[1].epoch_time_s = Some(2.5);
        let bare = h.without_timings();
        let json = bare.to_json().unwrap();
        for field in ["epoch_time_s", "samples_per_s", "data_wait_share"] {
            assert!(!json.contains(field), "{field} in {json}");
        }
        let mut back = History::from_json(&json).unwrap();
        assert_eq!(back, bare);
        assert_eq!(back.epochs[0].epoch_time_s, None);
        // the CSV leaves unknown timings empty
        let csv = back.epochs_csv();
        assert!(csv.lines().nth(1).unwrap().ends_with(",0.1,,,"), "{csv}");
        // another run's record of epoch 1 (a different loss) is not taken
        let mut other = h.clone();
        other.epochs[1].train_loss = 0.75;
        back.fill_timings_from(&other);
        assert_eq!(back.epochs[0], h.epochs[0]);
        assert_eq!(back.epochs[1].epoch_time_s, None);
        back.fill_timings_from(&h);
        assert_eq!(back, h);
    }

    #[test]
    fn non_finite_values_survive_a_round_trip() {
        let mut h = sample();
        h.epochs[0].val_loss = Some(f64::NAN);
        h.epochs[0]
            .val_metrics
            .insert("accuracy".into(), f64::INFINITY);
        h.epochs[1].train_loss = f64::NEG_INFINITY;
        let back = History::from_json(&h.to_json().unwrap()).unwrap();
        assert!(back.epochs[0].val_loss.unwrap().is_nan());
        assert_eq!(back.epochs[0].val_metrics["accuracy"], f64::INFINITY);
        assert_eq!(back.epochs[1].train_loss, f64::NEG_INFINITY);
        assert_eq!(back.epochs[1].val_loss, Some(0.9));
        let bad = h.to_json().unwrap().replace("\"NaN\"", "\"nope\"");
        assert!(History::from_json(&bad).is_err());
    }
}
