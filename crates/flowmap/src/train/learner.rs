//! The training loop, in pieces: the parameters with their optimiser and EMA ([`Params`]), where the run is
//! ([`Progression`]: step, random stream, loss log, learning-rate scale), the checkpointer that writes states
//! on a schedule ([`Checkpointer`]), the rollback guard that recovers from non-finite values ([`Guard`]),
//! and [`fit_controlled`], which composes them around one step ([`super::step`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::ParamsAdamW;

use super::control::{Recovery, RunControl, StateSink};
use super::state::{self, StateMeta, TrainState};
use super::step::{self, At};
use super::{check_batch_fits, Progress, TrainConfig, TrainEvent, TrainLog, Trainable};
use crate::backbone::vars_sorted;
use crate::data::DataSource;
use crate::dist::{check_agreement, Collective, Shard};
use crate::objective::{Objective, ObjectiveState};
use crate::optim::{AdamW, Ema};
use crate::{Error, Result, Rng};

/// The parameters a run updates, by name in a fixed order, with the optimiser and the EMA that move with
/// them.
struct Params {
    live: Vec<(String, Var)>,
    opt: AdamW,
    ema: Option<(Ema, Vec<(String, Var)>)>,
}

impl Params {
    fn new<M: ?Sized>(trainable: &Trainable<'_, M>, cfg: &TrainConfig) -> Result<Self> {
        let live = vars_sorted(trainable.params);
        let opt = AdamW::new(
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
        Ok(Params { live, opt, ema })
    }

    fn ema_vars(&self) -> &[(String, Var)] {
        self.ema.as_ref().map_or(&[], |e| &e.1)
    }

    /// Steps the optimiser (and the EMA) on the gradients of `loss` (averaged over the ranks of a
    /// data-parallel run) when every one is finite; otherwise moves nothing and says why.
    fn update(&mut self, loss: &Tensor, step: usize, ranks: Option<&dyn Collective>) -> Result<Option<String>> {
        let mut grads = loss.backward()?;
        if let Some(c) = ranks {
            self.average_gradients(&mut grads, c)?;
        }
        if !self.opt.grads_finite(&grads)? {
            return Ok(Some("a gradient is not finite".to_string()));
        }
        self.opt.step(&grads)?;
        if let Some((ema, _)) = &self.ema {
            ema.update(step)?;
        }
        Ok(None)
    }

    /// Replaces every parameter's gradient by its mean over the ranks: one flat vector on the parameters'
    /// device, the gradients in parameter-name order and then one flag per parameter (whether this rank
    /// has its gradient), averaged in one reduction ([`Collective::all_reduce_mean_tensor`]). A parameter
    /// no rank has a gradient for keeps none.
    fn average_gradients(&mut self, grads: &mut GradStore, c: &dyn Collective) -> Result<()> {
        let Some((_, first)) = self.live.first() else {
            return Ok(());
        };
        let device = first.device().clone();
        let mut parts = Vec::with_capacity(self.live.len() + 1);
        let mut present = Vec::with_capacity(self.live.len());
        let mut values = 0;
        for (_, v) in &self.live {
            values += v.elem_count();
            let g = grads.get(v);
            parts.push(match g {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(v.elem_count(), DType::F32, &device)?,
            });
            present.push(if g.is_some() { 1f32 } else { 0.0 });
        }
        parts.push(Tensor::new(present.as_slice(), &device)?);
        let flat = c.all_reduce_mean_tensor(&Tensor::cat(&parts, 0)?)?;
        let present = flat.narrow(0, values, self.live.len())?.to_vec1::<f32>()?;
        let mut at = 0;
        for ((_, v), p) in self.live.iter().zip(present) {
            let n = v.elem_count();
            if p > 0.0 {
                grads.insert(v, flat.narrow(0, at, n)?.reshape(v.shape())?.to_dtype(v.dtype())?);
            }
            at += n;
        }
        Ok(())
    }

    /// A fingerprint of the parameters' bits (FNV-1a), to check that every rank starts from the same.
    fn fingerprint(&self) -> Result<String> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (_, v) in self.live.iter().chain(self.ema_vars()) {
            for x in v.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                h = (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        Ok(format!("{h:016x}"))
    }

    /// Sets the parameters, the EMA, the optimiser and the objective to `state`'s.
    fn restore<O: Objective>(&mut self, state: &TrainState, objective: &O) -> Result<()> {
        set_vars(&self.live, &state.live, "parameters")?;
        set_vars(self.ema_vars(), &state.ema, "EMA parameters")?;
        self.opt.load_state(&state.adam)?;
        objective.load_state(&ObjectiveState {
            tensors: state.objective.clone(),
            value: state.meta.objective.clone(),
        })
    }

    /// The run's whole state after `at.step` steps, `seconds` into it.
    fn capture<O: Objective>(
        &self,
        at: &Progression,
        objective: &O,
        seconds: f64,
        config: &serde_json::Value,
    ) -> Result<TrainState> {
        let copy = |vars: &[(String, Var)]| -> Result<Vec<(String, Tensor)>> {
            vars.iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect()
        };
        let obj = objective.save_state()?;
        let adam = self.opt.state()?;
        Ok(TrainState {
            live: copy(&self.live)?,
            ema: copy(self.ema_vars())?,
            meta: StateMeta {
                format: state::FORMAT,
                step: at.step,
                adam_step: adam.step,
                rng: at.rng.state(),
                log: at.log.clone(),
                acc: at.acc,
                acc_n: at.acc_n,
                elapsed: seconds,
                lr_scale: at.lr_scale,
                rollbacks: at.rollbacks.clone(),
                objective: obj.value,
                config: config.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            adam,
            objective: obj.tensors,
        })
    }
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

/// Where a run is, apart from its parameters: the step, the random stream, the loss log with the
/// logging interval in progress, the learning-rate scale recovery has applied and the steps it rolled
/// back at. All of it is in every [`TrainState`].
struct Progression {
    step: usize,
    rng: Rng,
    log: TrainLog,
    acc: f64,
    acc_n: usize,
    lr_scale: f64,
    rollbacks: Vec<usize>,
}

impl Progression {
    fn new(seed: u64) -> Self {
        Progression {
            step: 0,
            rng: Rng::new(seed),
            log: TrainLog::default(),
            acc: 0.0,
            acc_n: 0,
            lr_scale: 1.0,
            rollbacks: Vec::new(),
        }
    }

    fn from_state(state: &TrainState) -> Result<Self> {
        Ok(Progression {
            step: state.meta.step,
            rng: Rng::from_state(&state.meta.rng)?,
            log: state.meta.log.clone(),
            acc: state.meta.acc,
            acc_n: state.meta.acc_n,
            lr_scale: state.meta.lr_scale,
            rollbacks: state.meta.rollbacks.clone(),
        })
    }

    /// The step in progress is done with loss `value`: counts it, and every `log_every` steps closes the
    /// logging interval and returns its mean loss.
    fn record(&mut self, value: f64, log_every: usize) -> Option<f64> {
        self.acc += value;
        self.acc_n += 1;
        self.step += 1;
        if !self.step.is_multiple_of(log_every) {
            return None;
        }
        let mean = self.acc / self.acc_n as f64;
        self.log.losses.push((self.step, mean));
        self.acc = 0.0;
        self.acc_n = 0;
        Some(mean)
    }

    /// The log of a finished run: the open interval closed, the steps and seconds filled in.
    fn finish(self, seconds: f64) -> TrainLog {
        let mut log = self.log;
        if self.acc_n > 0 {
            log.losses.push((self.step, self.acc / self.acc_n as f64));
        }
        log.steps = self.step;
        log.seconds = seconds;
        log
    }
}

/// Writes a run's states: on the schedule (every `every` steps, or `minutes` after the last write), and
/// whenever the loop asks (an interrupt, the last good state of a run that gave up, the end).
struct Checkpointer<'a> {
    every: Option<usize>,
    minutes: Option<f64>,
    sink: Option<StateSink<'a>>,
    last_write: Instant,
}

impl Checkpointer<'_> {
    /// Whether the schedule writes a state after `step` of `steps` steps.
    fn due(&self, step: usize, steps: usize) -> bool {
        let due = self.every.is_some_and(|n| n > 0 && step.is_multiple_of(n))
            || self
                .minutes
                .is_some_and(|m| self.last_write.elapsed().as_secs_f64() >= m * 60.0);
        due && step < steps && self.sink.is_some()
    }

    /// Writes `state` for the schedule, which counts its minutes from now.
    fn write_scheduled(&mut self, state: &TrainState) -> Result<()> {
        self.write(state)?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Writes `state`, if the run writes states.
    fn write(&mut self, state: &TrainState) -> Result<()> {
        match self.sink.as_mut() {
            Some(save) => save(state),
            None => Ok(()),
        }
    }
}

/// Recovery from non-finite values: the good state kept every `keep_every` steps, and the rollback to
/// it (see [`Recovery`]).
struct Guard {
    recovery: Recovery,
    good: Option<TrainState>,
}

impl Guard {
    /// Whether the state after `step` is kept as the good one.
    fn keeps(&self, step: usize) -> bool {
        self.recovery.keep_every > 0 && step.is_multiple_of(self.recovery.keep_every)
    }

    /// Step `step` failed for `reason`: rolls the run back to the good state, with a lower learning rate
    /// and the random stream moved on, and returns what happened; or, when recovery is off or has rolled
    /// back too often, writes the last good state and returns [`Error::Diverged`].
    fn roll_back<O: Objective>(
        &mut self,
        step: usize,
        reason: String,
        at: &mut Progression,
        params: &mut Params,
        objective: &O,
        states: &mut Checkpointer<'_>,
    ) -> Result<TrainEvent> {
        let r = self.recovery;
        at.rollbacks.retain(|&k| k + r.window > step);
        let Some(back) = self.good.as_ref().filter(|_| at.rollbacks.len() < r.max_rollbacks) else {
            let mut reason = reason;
            if self.good.is_some() {
                reason = format!(
                    "{reason}, after {} rollbacks within {} steps",
                    at.rollbacks.len(),
                    r.window
                );
            }
            // The last good state, with the stream moved on (a resumed run draws fresh batches) and the
            // learning rate as reduced.
            if let Some(mut g) = self.good.take() {
                g.meta.rng = at.rng.state();
                g.meta.lr_scale = at.lr_scale;
                states.write(&g)?;
            }
            return Err(Error::Diverged { step, reason });
        };
        params.restore(back, objective)?;
        at.rollbacks.push(step);
        at.lr_scale *= r.lr_factor;
        at.step = back.meta.step;
        at.log = back.meta.log.clone();
        at.acc = back.meta.acc;
        at.acc_n = back.meta.acc_n;
        Ok(TrainEvent {
            step,
            what: format!(
                "{reason}: rolled back to step {}, learning rate ×{}",
                at.step, at.lr_scale
            ),
        })
    }
}

/// [`super::fit`] under `ctl`: the run's `config` (a JSON value naming everything that fixes its result) is
/// written into its states, and a resumed state must carry the same.
/// The run computes its matrix products in `cfg.precision` ([`crate::kernels::with_precision`]).
#[allow(clippy::too_many_arguments)]
pub fn fit_controlled<O: Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    data: &DataSource,
    cfg: &TrainConfig,
    device: &candle_core::Device,
    progress: &dyn Progress,
    config: &serde_json::Value,
    ctl: RunControl<'_>,
) -> Result<TrainLog> {
    let _precision = crate::kernels::PrecisionScope::enter(cfg.precision);
    cfg.validate()?;
    ctl.recovery.validate()?;
    if let (Some(b), true) = (trainable.backbone, device.is_cpu()) {
        check_batch_fits(b.arch().train_bytes_per_sample(), cfg.batch_size)?;
    }
    let mut params = Params::new(trainable, cfg)?;
    let target = match (trainable.ema_target, trainable.ema) {
        (true, Some((_, m))) => m,
        (true, None) => return Err(Error::arg("an EMA target needs EMA parameters")),
        (false, _) => trainable.model,
    };
    let RunControl {
        checkpoint_every,
        checkpoint_minutes,
        save_state,
        resume,
        stop,
        recovery,
        mut loss_hook,
        mut monitor,
        collective,
    } = ctl;
    // A data-parallel run (more than one rank); one rank is the single-process run.
    let ranks = collective.filter(|c| c.world() > 1);
    let mut at = Progression::new(cfg.seed);
    let mut elapsed_before = 0.0;
    let resumed = resume.is_some();
    if let Some(state) = resume {
        state.check_config(config)?;
        params.restore(&state, objective)?;
        at = Progression::from_state(&state)?;
        elapsed_before = state.meta.elapsed;
    }
    // The state is written at the end too (so the run can be lengthened) when states are written on a
    // schedule, or the run was resumed.
    let writes_final = save_state.is_some() && (checkpoint_every.is_some() || checkpoint_minutes.is_some() || resumed);
    let log_every = if cfg.max_seconds.is_some() {
        50
    } else {
        (cfg.steps / 200).max(1)
    };
    let start = Instant::now();
    let elapsed = || elapsed_before + start.elapsed().as_secs_f64();
    if let Some(c) = ranks {
        check_ranks(c, trainable, cfg, config, &params, at.step)?;
    }
    let mut guard = Guard { recovery, good: None };
    if recovery.keep_every > 0 {
        guard.good = Some(params.capture(&at, objective, elapsed(), config)?);
    }
    let mut states = Checkpointer {
        every: checkpoint_every,
        minutes: checkpoint_minutes,
        sink: save_state,
        last_write: Instant::now(),
    };
    if let Some((_, hook)) = monitor.as_mut() {
        hook(at.step)?;
    }
    while at.step < cfg.steps {
        let step = at.step;
        let mut stopping = stop.is_some_and(|f| f.load(Ordering::SeqCst));
        if let Some(c) = ranks {
            // One rank interrupted stops them all, after the same step.
            let mut any = [if stopping { 1.0 } else { 0.0 }];
            c.all_reduce_sum_f64(&mut any)?;
            stopping = any[0] > 0.0;
        }
        if stopping {
            states.write(&params.capture(&at, objective, elapsed(), config)?)?;
            return Err(Error::Interrupted { step });
        }
        let frac = cfg.progress(step, elapsed());
        if cfg.max_seconds.is_some() && frac >= 1.0 {
            break;
        }
        params.opt.set_learning_rate(cfg.lr_at(step, frac) * at.lr_scale);
        if let Some(b) = trainable.backbone {
            b.set_dropout_seed(Some(cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        }
        let here = At { step, progress: frac };
        let (loss, mut value) = step::batch_loss(
            objective,
            trainable,
            target,
            data,
            cfg,
            here,
            &mut at.rng,
            device,
            ranks,
        )?;
        if let Some(hook) = loss_hook.as_mut() {
            value = hook(step, value);
        }
        if let Some(c) = ranks {
            // The batch's loss is the mean of the ranks' (equal blocks); a non-finite one on any rank makes
            // it non-finite on all, so every rank rolls back together.
            let mut mean = [value];
            c.all_reduce_sum_f64(&mut mean)?;
            value = mean[0] / c.world() as f64;
        }
        let failure = match value.is_finite() {
            false => Some(format!("the loss is {value}")),
            true => params.update(&loss, step, ranks)?,
        };
        if let Some(reason) = failure {
            let event = guard.roll_back(step, reason, &mut at, &mut params, objective, &mut states)?;
            progress.event(&event);
            at.log.events.push(event);
            continue;
        }
        let logged = at.record(value, log_every);
        progress.step(at.step, logged);
        let (keep_now, write_now) = (guard.keeps(at.step), states.due(at.step, cfg.steps));
        if keep_now || write_now {
            // One capture serves both the state kept for recovery and the one written.
            let state = params.capture(&at, objective, elapsed(), config)?;
            if write_now {
                states.write_scheduled(&state)?;
            }
            if keep_now {
                guard.good = Some(state);
            }
        }
        if let Some((every, hook)) = monitor.as_mut() {
            if at.step.is_multiple_of(*every) {
                hook(at.step)?;
            }
        }
    }
    if writes_final {
        states.write(&params.capture(&at, objective, elapsed(), config)?)?;
    }
    Ok(at.finish(elapsed()))
}

/// Refuses a data-parallel run whose ranks would not compute one run: settings a rank decides alone
/// (a wall-clock budget, dropout masks drawn per rank's rows), and ranks that disagree on the run's
/// settings or start from different parameters.
fn check_ranks<M: ?Sized>(
    c: &dyn Collective,
    trainable: &Trainable<'_, M>,
    cfg: &TrainConfig,
    config: &serde_json::Value,
    params: &Params,
    step: usize,
) -> Result<()> {
    if cfg.max_seconds.is_some() {
        return Err(Error::Ranks(
            "a data-parallel run trains for a number of steps, not until a clock runs out (each rank's clock differs)"
                .into(),
        ));
    }
    if trainable.backbone.is_some_and(|b| b.uses_dropout()) {
        return Err(Error::Ranks(
            "dropout is not supported in a data-parallel run yet (its masks are drawn per rank's rows)".into(),
        ));
    }
    Shard::of(c.rank(), c.world(), cfg.batch_size).map_err(|e| Error::Ranks(e.to_string()))?;
    let settings = serde_json::json!({ "config": config, "train": cfg, "step": step });
    check_agreement(c, "the run's settings", &settings.to_string())?;
    check_agreement(c, "the starting parameters", &params.fingerprint()?)
}
