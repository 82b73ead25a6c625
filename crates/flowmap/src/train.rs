//! The one training loop. It owns the optimiser (AdamW with warm-up and cosine decay), the EMA of the
//! weights and the data stream; an [`Objective`] supplies the loss.

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{ParamsAdamW, VarMap};
use serde::{Deserialize, Serialize};

use crate::cond::Cond;
use crate::data::DataSource;
use crate::objective::{Objective, StepContext};
use crate::optim::AdamW;
use crate::optim::Ema;
use crate::path::ProbabilityPath;
use crate::{Error, Result, Rng};

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
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::arg("--steps must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::arg("--batch must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::arg(format!("learning rate must be positive, got {}", self.lr)));
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
    cfg.validate()?;
    let vars = trainable.params.all_vars();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: cfg.lr_at(0, 0.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let ema = match trainable.ema {
        Some((ema_vars, _)) => Some(Ema::new(ema_vars, trainable.params, cfg.ema_decay)?),
        None => None,
    };
    let target = match (trainable.ema_target, trainable.ema) {
        (true, Some((_, m))) => m,
        (true, None) => return Err(Error::arg("an EMA target needs EMA parameters")),
        (false, _) => trainable.model,
    };
    let mut rng = Rng::new(cfg.seed);
    let mut log = TrainLog::default();
    let log_every = if cfg.max_seconds.is_some() {
        50
    } else {
        (cfg.steps / 200).max(1)
    };
    let (mut acc, mut acc_n) = (0.0, 0usize);
    let start = Instant::now();
    if every > 0 {
        hook(0)?;
    }
    let mut steps_done = 0;
    for step in 0..cfg.steps {
        let frac = cfg.progress(step, start.elapsed().as_secs_f64());
        if cfg.max_seconds.is_some() && frac >= 1.0 {
            break;
        }
        opt.set_learning_rate(cfg.lr_at(step, frac));
        let batch = data.sample_batch(cfg.batch_size, &mut rng, DType::F32, device)?;
        let cond = match trainable.classes {
            Some(c) if cfg.label_dropout > 0.0 => batch.cond.drop_labels(cfg.label_dropout, c, &mut rng)?,
            Some(_) => batch.cond,
            None => Cond::none(),
        };
        let x1 = rng.normal_tensor(batch.x0.shape(), DType::F32, device)?;
        let mut cx = StepContext {
            model: trainable.model,
            target,
            x0: &batch.x0,
            x1: &x1,
            cond: &cond,
            path: trainable.path,
            progress: frac,
            step,
            rng: &mut rng,
        };
        let loss = objective.loss(&mut cx)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Diverged { step, loss: value });
        }
        opt.backward_step(&loss)?;
        if let Some(ema) = &ema {
            ema.update(step)?;
        }
        acc += value;
        acc_n += 1;
        let mut logged = None;
        if (step + 1) % log_every == 0 {
            let mean = acc / acc_n as f64;
            log.losses.push((step + 1, mean));
            logged = Some(mean);
            acc = 0.0;
            acc_n = 0;
        }
        progress.step(step + 1, logged);
        if every > 0 && (step + 1) % every == 0 {
            hook(step + 1)?;
        }
        steps_done = step + 1;
    }
    if acc_n > 0 {
        log.losses.push((steps_done, acc / acc_n as f64));
    }
    log.steps = steps_done;
    log.seconds = start.elapsed().as_secs_f64();
    Ok(log)
}
