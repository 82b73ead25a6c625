//! The one training loop. It owns the optimiser (AdamW with warm-up and cosine decay), the EMA of the
//! weights and the data stream; an [`Objective`] supplies the loss. Under a [`RunControl`] it also writes
//! its whole state ([`TrainState`]) on a schedule, resumes from one bit-exactly, stops cleanly on request
//! and recovers from non-finite values by rolling back.

mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarMap};
use serde::{Deserialize, Serialize};

pub use state::{StateMeta, TrainState};

use crate::backbone::{vars_sorted, Backbone};
use crate::cond::Cond;
use crate::data::DataSource;
use crate::objective::{Objective, ObjectiveState, StepContext};
use crate::optim::{AdamW, Ema};
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
    /// Distil classifier-free guidance into a flow map: every training row draws a scale `w` uniformly
    /// from `[lo, hi]` (its condition's [`Cond::guidance`]), which the map takes as an input and the
    /// per-row guided teacher applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_range: Option<[f64; 2]>,
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

/// Recovery from a non-finite loss or gradient: the loop keeps a good state in memory every `keep_every`
/// steps; on a NaN or an infinity it rolls back to it, multiplies the learning rate by `lr_factor`, draws
/// fresh batches and goes on. A run that has rolled back `max_rollbacks` times within `window` steps
/// stops at the next non-finite value, with [`Error::Diverged`] (its last good state written, if it writes
/// states).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recovery {
    /// `0` turns recovery off: the first non-finite value ends the run.
    pub keep_every: usize,
    pub lr_factor: f64,
    pub max_rollbacks: usize,
    pub window: usize,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            keep_every: 50,
            lr_factor: 0.5,
            max_rollbacks: 3,
            window: 1000,
        }
    }
}

impl Recovery {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr_factor > 0.0 && self.lr_factor < 1.0) {
            return Err(Error::arg(format!(
                "the learning-rate factor after a rollback must lie in (0, 1), got {}",
                self.lr_factor
            )));
        }
        Ok(())
    }
}

/// A fault injected on purpose, to test recovery: the loss of the named steps is made NaN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The first time step `k` runs (a rolled-back run passes it again, cleanly).
    Once(usize),
    /// Every step from `k` on.
    From(usize),
}

/// Where a run's states go.
pub type StateSink<'a> = &'a mut dyn FnMut(&TrainState) -> Result<()>;
/// Called with a step number.
pub type StepHook<'a> = &'a mut dyn FnMut(usize) -> Result<()>;

/// How a run keeps what it has done: states written on a schedule, a resumed state, a stop flag (an
/// interrupt), recovery from non-finite values and a monitor. [`RunControl::default`] writes nothing and
/// recovers with [`Recovery::default`].
#[derive(Default)]
pub struct RunControl<'a> {
    /// Write the state every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Write the state when this many minutes have passed since the last.
    pub checkpoint_minutes: Option<f64>,
    /// Where states go: on the schedule above, when stopped, at the end of a run that writes states, and
    /// (the last good one) when recovery gives up.
    pub save_state: Option<StateSink<'a>>,
    /// The state to continue from.
    pub resume: Option<TrainState>,
    /// When set (by a signal handler, say), the run finishes its step, writes its state and returns
    /// [`Error::Interrupted`].
    pub stop: Option<&'a AtomicBool>,
    pub recovery: Recovery,
    pub fault: Option<Fault>,
    /// `(every, hook)`: `hook(step)` before the first step and after every `every` steps.
    pub monitor: Option<(usize, StepHook<'a>)>,
}

impl RunControl<'_> {
    /// Whether the state is written at the end of the run too (so that it can be lengthened): when states
    /// are written on a schedule, or the run was resumed.
    fn writes_final_state(&self, resumed: bool) -> bool {
        self.save_state.is_some() && (self.checkpoint_every.is_some() || self.checkpoint_minutes.is_some() || resumed)
    }
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

/// The loop's whole mutable state, apart from the parameters themselves.
struct Loop {
    step: usize,
    rng: Rng,
    log: TrainLog,
    acc: f64,
    acc_n: usize,
    lr_scale: f64,
    rollbacks: Vec<usize>,
}

/// [`fit`] under `ctl`: the run's `config` (a JSON value naming everything that fixes its result) is
/// written into its states, and a resumed state must carry the same.
#[allow(clippy::too_many_arguments)]
pub fn fit_controlled<O: Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    data: &DataSource,
    cfg: &TrainConfig,
    device: &Device,
    progress: &dyn Progress,
    config: &serde_json::Value,
    mut ctl: RunControl<'_>,
) -> Result<TrainLog> {
    cfg.validate()?;
    ctl.recovery.validate()?;
    if let (Some(b), true) = (trainable.backbone, device.is_cpu()) {
        check_batch_fits(b.arch().train_bytes_per_sample(), cfg.batch_size)?;
    }
    let live = vars_sorted(trainable.params);
    let mut opt = AdamW::new(
        live.clone(),
        ParamsAdamW {
            lr: cfg.lr_at(0, 0.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let ema = match trainable.ema {
        Some((ema_vars, _)) => Some((
            Ema::new(ema_vars, trainable.params, cfg.ema_decay)?,
            vars_sorted(ema_vars),
        )),
        None => None,
    };
    let target = match (trainable.ema_target, trainable.ema) {
        (true, Some((_, m))) => m,
        (true, None) => return Err(Error::arg("an EMA target needs EMA parameters")),
        (false, _) => trainable.model,
    };
    let ema_vars: &[(String, Var)] = ema.as_ref().map_or(&[], |e| &e.1);
    let mut lp = Loop {
        step: 0,
        rng: Rng::new(cfg.seed),
        log: TrainLog::default(),
        acc: 0.0,
        acc_n: 0,
        lr_scale: 1.0,
        rollbacks: Vec::new(),
    };
    let (mut elapsed_before, mut resumed) = (0.0, false);
    if let Some(state) = ctl.resume.take() {
        state.check_config(config)?;
        restore(&state, &live, ema_vars, &mut opt, objective)?;
        lp = Loop {
            step: state.meta.step,
            rng: Rng::from_state(&state.meta.rng)?,
            log: state.meta.log.clone(),
            acc: state.meta.acc,
            acc_n: state.meta.acc_n,
            lr_scale: state.meta.lr_scale,
            rollbacks: state.meta.rollbacks.clone(),
        };
        elapsed_before = state.meta.elapsed;
        resumed = true;
    }
    let log_every = if cfg.max_seconds.is_some() {
        50
    } else {
        (cfg.steps / 200).max(1)
    };
    let start = Instant::now();
    let elapsed = |start: &Instant| elapsed_before + start.elapsed().as_secs_f64();
    let capture = |lp: &Loop, opt: &AdamW, secs: f64| -> Result<TrainState> {
        let copy = |vars: &[(String, Var)]| -> Result<Vec<(String, Tensor)>> {
            vars.iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect()
        };
        let obj = objective.save_state()?;
        let adam = opt.state()?;
        Ok(TrainState {
            live: copy(&live)?,
            ema: copy(ema_vars)?,
            meta: StateMeta {
                format: state::FORMAT,
                step: lp.step,
                adam_step: adam.step,
                rng: lp.rng.state(),
                log: lp.log.clone(),
                acc: lp.acc,
                acc_n: lp.acc_n,
                elapsed: secs,
                lr_scale: lp.lr_scale,
                rollbacks: lp.rollbacks.clone(),
                objective: obj.value,
                config: config.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            adam,
            objective: obj.tensors,
        })
    };
    let keep = ctl.recovery.keep_every;
    let mut good = if keep > 0 {
        Some(capture(&lp, &opt, elapsed(&start))?)
    } else {
        None
    };
    let mut last_write = Instant::now();
    let mut faulted = false;
    if let Some((_, hook)) = ctl.monitor.as_mut() {
        hook(lp.step)?;
    }
    while lp.step < cfg.steps {
        let step = lp.step;
        if ctl.stop.is_some_and(|f| f.load(Ordering::SeqCst)) {
            if let Some(save) = ctl.save_state.as_mut() {
                save(&capture(&lp, &opt, elapsed(&start))?)?;
            }
            return Err(Error::Interrupted { step });
        }
        let frac = cfg.progress(step, elapsed(&start));
        if cfg.max_seconds.is_some() && frac >= 1.0 {
            break;
        }
        opt.set_learning_rate(cfg.lr_at(step, frac) * lp.lr_scale);
        if let Some(b) = trainable.backbone {
            b.set_dropout_seed(Some(cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        }
        let rng = &mut lp.rng;
        let batch = data.sample_batch(cfg.batch_size, rng, DType::F32, device)?;
        let cond = match trainable.classes {
            Some(c) if cfg.label_dropout > 0.0 => batch.cond.drop_labels(cfg.label_dropout, c, rng)?,
            Some(_) => batch.cond,
            None => Cond::none(),
        };
        let cond = match cfg.guidance_range {
            Some([lo, hi]) => {
                let n = batch.x0.dim(0)?;
                let w: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect();
                cond.with_guidance(&Tensor::from_vec(w, (n, 1), device)?)?
            }
            None => cond,
        };
        let x1 = rng.normal_tensor(batch.x0.shape(), DType::F32, device)?;
        let mut cx = StepContext {
            model: trainable.model,
            target,
            x0: &batch.x0,
            x1: &x1,
            cond: &cond,
            classes: trainable.classes,
            path: trainable.path,
            progress: frac,
            step,
            rng,
        };
        let loss = objective.loss(&mut cx)?;
        let mut value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let inject = match ctl.fault {
            Some(Fault::Once(k)) if k == step && !faulted => {
                faulted = true;
                true
            }
            Some(Fault::From(k)) => step >= k,
            _ => false,
        };
        if inject {
            value = f64::NAN;
        }
        let failure = if !value.is_finite() {
            Some(format!("the loss is {value}"))
        } else {
            let grads = loss.backward()?;
            if opt.grads_finite(&grads)? {
                opt.step(&grads)?;
                if let Some((ema, _)) = &ema {
                    ema.update(step)?;
                }
                None
            } else {
                Some("a gradient is not finite".to_string())
            }
        };
        if let Some(reason) = failure {
            let r = ctl.recovery;
            lp.rollbacks.retain(|&k| k + r.window > step);
            let Some(back) = good.as_ref().filter(|_| lp.rollbacks.len() < r.max_rollbacks) else {
                let mut reason = reason;
                if good.is_some() {
                    reason = format!(
                        "{reason}, after {} rollbacks within {} steps",
                        lp.rollbacks.len(),
                        r.window
                    );
                }
                // The last good state, with the stream moved on (a resumed run draws fresh batches) and the
                // learning rate as reduced.
                if let (Some(save), Some(mut g)) = (ctl.save_state.as_mut(), good.take()) {
                    g.meta.rng = lp.rng.state();
                    g.meta.lr_scale = lp.lr_scale;
                    save(&g)?;
                }
                return Err(Error::Diverged { step, reason });
            };
            restore(back, &live, ema_vars, &mut opt, objective)?;
            lp.rollbacks.push(step);
            lp.lr_scale *= r.lr_factor;
            lp.step = back.meta.step;
            lp.log = back.meta.log.clone();
            lp.acc = back.meta.acc;
            lp.acc_n = back.meta.acc_n;
            let event = TrainEvent {
                step,
                what: format!(
                    "{reason}: rolled back to step {}, learning rate ×{}",
                    lp.step, lp.lr_scale
                ),
            };
            progress.event(&event);
            lp.log.events.push(event);
            continue;
        }
        lp.acc += value;
        lp.acc_n += 1;
        lp.step = step + 1;
        let mut logged = None;
        if lp.step.is_multiple_of(log_every) {
            let mean = lp.acc / lp.acc_n as f64;
            lp.log.losses.push((lp.step, mean));
            logged = Some(mean);
            lp.acc = 0.0;
            lp.acc_n = 0;
        }
        progress.step(lp.step, logged);
        let keep_now = keep > 0 && lp.step.is_multiple_of(keep);
        let due = ctl.checkpoint_every.is_some_and(|n| n > 0 && lp.step.is_multiple_of(n))
            || ctl
                .checkpoint_minutes
                .is_some_and(|m| last_write.elapsed().as_secs_f64() >= m * 60.0);
        let write_now = due && lp.step < cfg.steps && ctl.save_state.is_some();
        if keep_now || write_now {
            // One capture serves both the state kept for recovery and the one written.
            let state = capture(&lp, &opt, elapsed(&start))?;
            if let (true, Some(save)) = (write_now, ctl.save_state.as_mut()) {
                save(&state)?;
                last_write = Instant::now();
            }
            if keep_now {
                good = Some(state);
            }
        }
        if let Some((every, hook)) = ctl.monitor.as_mut() {
            if lp.step.is_multiple_of(*every) {
                hook(lp.step)?;
            }
        }
    }
    if ctl.writes_final_state(resumed) {
        let state = capture(&lp, &opt, elapsed(&start))?;
        if let Some(save) = ctl.save_state.as_mut() {
            save(&state)?;
        }
    }
    let mut log = lp.log;
    if lp.acc_n > 0 {
        log.losses.push((lp.step, lp.acc / lp.acc_n as f64));
    }
    log.steps = lp.step;
    log.seconds = elapsed(&start);
    Ok(log)
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

/// Sets the parameters, the EMA, the optimiser and the objective to `state`'s.
fn restore<O: Objective>(
    state: &TrainState,
    live: &[(String, Var)],
    ema: &[(String, Var)],
    opt: &mut AdamW,
    objective: &O,
) -> Result<()> {
    set_vars(live, &state.live, "parameters")?;
    set_vars(ema, &state.ema, "EMA parameters")?;
    opt.load_state(&state.adam)?;
    objective.load_state(&ObjectiveState {
        tensors: state.objective.clone(),
        value: state.meta.objective.clone(),
    })
}

fn set_vars(vars: &[(String, Var)], values: &[(String, Tensor)], what: &str) -> Result<()> {
    let same = vars.len() == values.len()
        && vars
            .iter()
            .zip(values)
            .all(|((a, v), (b, t))| a == b && v.dims() == t.dims());
    if !same {
        return Err(Error::arg(format!(
            "the training state's {what} do not match the model's (another architecture?)"
        )));
    }
    for ((_, v), (_, t)) in vars.iter().zip(values) {
        v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}
