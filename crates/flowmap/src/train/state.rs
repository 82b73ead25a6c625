//! The whole state of a training run between two steps, as one value that saves to and loads from one
//! safetensors file: the parameters, their EMA, the optimiser's moments and step, the objective's own state,
//! the random stream's position (which fixes the data order and every random draw), the schedule's progress,
//! the loss log and the run's configuration. A run resumed from it is the same run: its final checkpoint is
//! byte-identical to the one an uninterrupted run writes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::TrainLog;
use crate::optim::AdamState;
use crate::rng::RngState;
use crate::{Error, Result};

/// The metadata key of a training state file.
const KEY: &str = "flowmap_train_state";
/// The version of the state format.
pub(crate) const FORMAT: u32 = 1;

/// A training run's state after `step` steps.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// The live parameters `θ`, by name.
    pub live: Vec<(String, Tensor)>,
    /// The EMA parameters, by name (empty for a run without an EMA).
    pub ema: Vec<(String, Tensor)>,
    /// The optimiser's step and moments.
    pub adam: AdamState,
    /// The objective's own tensors (progressive's frozen map), by name.
    pub objective: Vec<(String, Tensor)>,
    /// Everything else.
    pub meta: StateMeta,
}

/// The scalar part of a [`TrainState`], stored as JSON in the file's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateMeta {
    pub format: u32,
    /// Steps completed.
    pub step: usize,
    /// Updates the optimiser has made (its bias correction).
    pub adam_step: usize,
    /// The run's random stream, positioned before the next step's draws.
    pub rng: RngState,
    /// The loss log so far, and the loss sum and count of the logging interval in progress.
    pub log: TrainLog,
    pub acc: f64,
    pub acc_n: usize,
    /// Seconds trained so far (the progress of a time-budgeted schedule).
    pub elapsed: f64,
    /// The factor recovery from non-finite values has multiplied the learning rate by (1 if none).
    pub lr_scale: f64,
    /// The steps at which the run rolled back.
    pub rollbacks: Vec<usize>,
    /// The objective's own scalar state.
    pub objective: serde_json::Value,
    /// The run's configuration: a resumed run must have the same (see [`TrainState::check_config`]).
    pub config: serde_json::Value,
    pub version: String,
}

const PREFIXES: [&str; 5] = ["live/", "ema/", "adam.m/", "adam.v/", "objective/"];

impl TrainState {
    /// Writes the state to `path` atomically (a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        let mut push = |prefix: &str, name: &str, t: &Tensor| named.push((format!("{prefix}{name}"), t.clone()));
        for (n, t) in &self.live {
            push(PREFIXES[0], n, t);
        }
        for (n, t) in &self.ema {
            push(PREFIXES[1], n, t);
        }
        for (n, m, v) in &self.adam.moments {
            push(PREFIXES[2], n, m);
            push(PREFIXES[3], n, v);
        }
        for (n, t) in &self.objective {
            push(PREFIXES[4], n, t);
        }
        let json = serde_json::to_string(&self.meta).expect("state metadata serialises");
        crate::checkpoint::write_named(path, &named, KEY, &json)
    }

    /// Reads a state written by [`TrainState::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (raw, tensors) = crate::checkpoint::read_tensors(&bytes, path, KEY).map_err(|e| match e {
            Error::Checkpoint { msg, .. } if msg.starts_with("no ") => {
                Error::checkpoint(path, "is not a training state (no flowmap_train_state metadata)")
            }
            e => e,
        })?;
        let meta: StateMeta = serde_json::from_str(&raw)
            .map_err(|e| Error::checkpoint(path, format!("bad training-state metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(Error::checkpoint(
                path,
                format!("training-state format {} is not this version's ({FORMAT})", meta.format),
            ));
        }
        let mut groups: [BTreeMap<String, Tensor>; 5] = Default::default();
        for (name, t) in tensors {
            let Some(k) = PREFIXES.iter().position(|p| name.starts_with(p)) else {
                return Err(Error::checkpoint(
                    path,
                    format!("unexpected tensor '{name}' in a training state"),
                ));
            };
            groups[k].insert(name[PREFIXES[k].len()..].to_string(), t);
        }
        let [live, ema, m, v, objective] = groups;
        if m.len() != v.len() || m.keys().ne(v.keys()) {
            return Err(Error::checkpoint(
                path,
                "the optimiser's first and second moments differ in names",
            ));
        }
        let moments = m.into_iter().zip(v).map(|((n, m), (_, v))| (n, m, v)).collect();
        Ok(TrainState {
            live: live.into_iter().collect(),
            ema: ema.into_iter().collect(),
            adam: AdamState {
                step: meta.adam_step,
                moments,
            },
            objective: objective.into_iter().collect(),
            meta,
        })
    }

    /// Errors unless `config` (the configuration of the run about to resume from this state) is the one
    /// the state was written under. Only `train.steps` may differ (a run can be lengthened), and not below
    /// the steps already done. The error names every key that differs.
    pub fn check_config(&self, config: &serde_json::Value) -> Result<()> {
        let (mut was, mut now) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &self.meta.config, &mut was);
        flatten("", config, &mut now);
        let keys: std::collections::BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        let mut differ = Vec::new();
        for k in keys {
            let (a, b) = (was.get(k), now.get(k));
            if a == b {
                continue;
            }
            if k == "train.steps" {
                let steps = b.and_then(|b| b.parse::<usize>().ok()).unwrap_or(0);
                if steps < self.meta.step {
                    return Err(Error::arg(format!(
                        "cannot resume: the state has done {} steps, more than the {steps} asked for",
                        self.meta.step
                    )));
                }
                continue;
            }
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
            differ.push(format!("{k} (state {}, now {})", show(a), show(b)));
        }
        if !differ.is_empty() {
            return Err(Error::arg(format!(
                "cannot resume: the run's configuration differs from the state's in {}",
                differ.join(", ")
            )));
        }
        Ok(())
    }
}

/// `value`'s leaves as `a.b.c → text`.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        v => {
            out.insert(prefix.to_string(), v.to_string());
        }
    }
}
