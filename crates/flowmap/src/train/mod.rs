//! The one training loop. It owns the optimiser (AdamW with warm-up and cosine decay), the EMA of the
//! weights and the data stream; an [`Objective`] supplies the loss. Under a [`RunControl`] it also writes
//! its whole state ([`TrainState`]) on a schedule, resumes from one bit-exactly, stops cleanly on request
//! and recovers from non-finite values by rolling back.
//!
//! In pieces: this file holds the settings ([`TrainConfig`]), what a run reports ([`TrainLog`], [`Progress`])
//! and what it trains ([`Trainable`]); `control` how it is supervised ([`RunControl`], [`Recovery`]);
//! `step` one step's condition and loss; `learner` the parameters, the progression, the checkpointer and
//! the rollback guard, composed by [`fit_controlled`]; `state` the saved state.

mod control;
mod learner;
mod state;
mod step;

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

pub use control::{LossHook, Recovery, RunControl, StateSink, StepHook};
pub use learner::fit_controlled;
pub use state::{StateMeta, TrainState};

use crate::backbone::Backbone;
use crate::data::DataSource;
use crate::objective::Objective;
use crate::path::ProbabilityPath;
use crate::{Error, Result};

/// Optimisation settings shared by every objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Linear learning-rate warm-up, in steps; then cosine decay to `lr_final_fraction·lr`.
    pub warmup_steps: usize,
    pub lr_final_fraction: f64,
    /// Decay of the EMA of the weights (used for sampling and, if chosen, as the target `θ⁻`).
    pub ema_decay: f64,
    pub seed: u64,
    /// A wall-clock budget: when set, training stops after this many seconds (or `steps`, whichever comes
    /// first) and schedules follow the elapsed fraction of the budget.
    pub max_seconds: Option<f64>,
    /// The probability that a class-conditional model sees a training example under the null class instead
    /// of its label, so that one network is both conditional and unconditional (classifier-free guidance
    /// needs both). Unconditional models ignore it.
    pub label_dropout: f64,
    /// Distil classifier-free guidance into a flow map: every training row draws a scale `w` uniformly
    /// from `[lo, hi]` (its condition's [`crate::Cond::guidance`]), which the map takes as an input and the
    /// per-row guided teacher applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_range: Option<[f64; 2]>,
    /// The precision of the matrix products ([`crate::kernels::Precision`]): f32, or bf16 operands with f32
    /// sums (mixed precision; weights, optimiser, EMA and checkpoints stay f32). An f32 run's records do
    /// not name it, so they read as before.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: crate::kernels::Precision,
}

fn is_f32(p: &crate::kernels::Precision) -> bool {
    *p == crate::kernels::Precision::F32
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 4000,
            batch_size: 1024,
            lr: 2e-3,
            weight_decay: 0.0,
            warmup_steps: 100,
            lr_final_fraction: 0.05,
            ema_decay: 0.999,
            seed: 0,
            max_seconds: None,
            label_dropout: 0.1,
            guidance_range: None,
            precision: crate::kernels::Precision::F32,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::arg("training needs at least 1 step (steps = 0)"));
        }
        if self.batch_size == 0 {
            return Err(Error::arg("the batch size must be at least 1 (batch_size = 0)"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::arg(format!("learning rate must be positive, got {}", self.lr)));
        }
        if let Some(r) = self.guidance_range {
            crate::backbone::check_guidance_range(r)?;
        }
        if !(0.0..1.0).contains(&self.label_dropout) {
            return Err(Error::arg(format!(
                "label dropout must lie in [0, 1), got {}",
                self.label_dropout
            )));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(Error::arg(format!(
                "EMA decay must lie in [0, 1), got {}",
                self.ema_decay
            )));
        }
        Ok(())
    }

    /// The learning rate at a step and training progress `p ∈ [0, 1]`: linear warm-up over the first
    /// `warmup_steps`, then cosine decay in `p` to `lr_final_fraction·lr`.
    pub fn lr_at(&self, step: usize, p: f64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.lr_final_fraction;
        self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p.clamp(0.0, 1.0)).cos()))
    }

    /// Training progress after `step` steps and `elapsed` seconds.
    pub fn progress(&self, step: usize, elapsed: f64) -> f64 {
        let by_steps = step as f64 / self.steps as f64;
        match self.max_seconds {
            Some(budget) => by_steps.max(elapsed / budget).min(1.0),
            None => by_steps,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainLog {
    /// `(step, loss)`, smoothed over the logging interval.
    pub losses: Vec<(usize, f64)>,
    pub steps: usize,
    pub seconds: f64,
    /// What happened besides steps (rollbacks after non-finite values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<TrainEvent>,
}

/// Something a run did besides a step: a rollback, with its reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainEvent {
    pub step: usize,
    pub what: String,
}

impl TrainLog {
    /// Mean loss over the first and last tenth of the run.
    pub fn first_last(&self) -> (f64, f64) {
        let n = self.losses.len().max(1);
        let k = (n / 10).max(1);
        let mean = |v: &[(usize, f64)]| v.iter().map(|p| p.1).sum::<f64>() / v.len().max(1) as f64;
        (
            mean(&self.losses[..k.min(self.losses.len())]),
            mean(&self.losses[n.saturating_sub(k).min(self.losses.len())..]),
        )
    }
}

/// How a run reports its progress: called after every step (a progress bar, a log, nothing).
pub trait Progress {
    /// `step` steps are done; `loss` is the loss smoothed over the logging interval that ended at this
    /// step, if one did.
    fn step(&self, step: usize, loss: Option<f64>);
    /// Something happened besides a step (a rollback).
    fn event(&self, _event: &TrainEvent) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn step(&self, _: usize, _: Option<f64>) {}
}

impl<F: Fn(usize, Option<f64>)> Progress for F {
    fn step(&self, step: usize, loss: Option<f64>) {
        self(step, loss)
    }
}

/// The parameters a run optimises and the models that read them.
pub struct Trainable<'a, M: ?Sized> {
    /// The live parameters `θ`.
    pub params: &'a VarMap,
    /// The model reading `params`.
    pub model: &'a M,
    /// The EMA parameters and the model reading them.
    pub ema: Option<(&'a VarMap, &'a M)>,
    /// Use the EMA model as the target `θ⁻` (else the live model, under stop-gradient).
    pub ema_target: bool,
    /// The probability path the model is trained on.
    pub path: &'a dyn ProbabilityPath,
    /// The classes of a class-conditional model (its null class is this number); an unconditional
    /// model's batches carry no labels.
    pub classes: Option<usize>,
    /// The live model's backbone, whose dropout (if it has any) draws step `k`'s masks from the seed and
    /// `k` alone, so that a resumed run draws the same masks.
    pub backbone: Option<&'a dyn Backbone>,
}

/// Runs `cfg.steps` steps of `objective` on batches from `data` (states with their labels, if any),
/// reporting each step to `progress`.
pub fn fit<O: Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    data: &DataSource,
    cfg: &TrainConfig,
    device: &Device,
    progress: &dyn Progress,
) -> Result<TrainLog> {
    fit_with_hook(objective, trainable, data, cfg, device, progress, 0, &mut |_| Ok(()))
}

/// [`fit`], calling `hook(step)` before the first step and after every `every` steps (never if `every = 0`).
#[allow(clippy::too_many_arguments)]
pub fn fit_with_hook<O: Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    data: &DataSource,
    cfg: &TrainConfig,
    device: &Device,
    progress: &dyn Progress,
    every: usize,
    hook: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<TrainLog> {
    let ctl = RunControl {
        monitor: (every > 0).then_some((every, hook)),
        ..RunControl::default()
    };
    fit_controlled(
        objective,
        trainable,
        data,
        cfg,
        device,
        progress,
        &serde_json::Value::Null,
        ctl,
    )
}

/// Errors, before anything is allocated, when a batch of `batch` samples of `per_sample` bytes cannot fit
/// in the memory available (Linux's `MemAvailable`; elsewhere nothing is checked).
fn check_batch_fits(per_sample: usize, batch: usize) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let need = per_sample.saturating_mul(batch) as u64;
    if need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(Error::arg(format!(
            "a training batch of {batch} needs at least {:.1} GiB (estimated), more than the {:.1} GiB available: lower the batch size",
            gib(need),
            gib(available)
        )));
    }
    Ok(())
}

/// The memory the system can give this process now, in bytes (Linux).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
