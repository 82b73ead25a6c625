//! Training jobs: a teacher by flow matching, and a flow map by any method of the family.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::{linear, mixture_of, Teacher};
use crate::backbone::Arch;
use crate::checkpoint::{self, CheckpointMeta, ModelKind};
use crate::data::DataSource;
use crate::dist::Collective;
use crate::flow_map::{FlowMap, FlowMapNet};
use crate::objective::{DistillConfig, FlowMatching, JvpMode, Method, TargetNet};
use crate::path::ProbabilityPath;
use crate::teacher::{Autoguided, Guided, VelocityField, VelocityNet};
use crate::train::{fit_controlled, Progress, RunControl, TrainConfig, TrainLog, TrainState, Trainable};
use crate::{Error, Result};
use serde::Serialize;

/// Errors unless `weak` can guide `strong`: the same states, classes and probability path.
pub fn check_guide(strong: &Teacher, weak: &Teacher) -> Result<()> {
    crate::teacher::check_same_states(strong, weak)?;
    if strong.num_classes() != weak.num_classes() {
        let n = |c: Option<usize>| c.map_or("no classes".to_string(), |c| format!("{c} classes"));
        return Err(Error::arg(format!(
            "the guiding model has {}, the guided model {}: autoguidance needs the same conditioning",
            n(weak.num_classes()),
            n(strong.num_classes())
        )));
    }
    let (a, b) = (strong.path()?, weak.path()?);
    if a.name() != b.name() {
        return Err(Error::arg(format!(
            "the guiding model was trained on the {} path, the guided model on the {}",
            b.name(),
            a.name()
        )));
    }
    Ok(())
}

/// A run planned for a wall-clock budget ([`plan_budget`]): the steps it runs, and the probe that timed them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BudgetPlan {
    pub budget_seconds: f64,
    /// Steps of the same job run (and thrown away) to time one step.
    pub probe_steps: usize,
    /// Wall-clock seconds the probe took, set-up included (spent from the budget).
    pub probe_seconds: f64,
    /// Seconds per training step, as the probe's loop measured it.
    pub seconds_per_step: f64,
    /// The steps that fit in what the probe left of the budget (at least 1).
    pub steps: usize,
}

/// Steps of a probe: enough to time steps past the first ones' one-off costs (allocations, first kernel
/// launches), few enough to cost little of a budget.
pub const PROBE_STEPS: usize = 30;

/// The time of each step of a probe.
struct StepClock(std::cell::RefCell<Vec<std::time::Instant>>);

impl Progress for StepClock {
    fn step(&self, _: usize, _: Option<f64>) {
        self.0.borrow_mut().push(std::time::Instant::now());
    }
}

/// Plans a run for `budget_seconds` of wall clock: `probe(k, progress)` runs `k` steps of the same job (a
/// throwaway run), reporting each to `progress`, and the steady rate over the probe's second half prices a
/// step. The run gets the steps that fit in what is left of the budget at that rate, so its schedule
/// (warm-up, decay, curricula) is the one of a run with that many `steps`, and that run reproduces it bit
/// for bit; a budget in steps is also one that a slower or faster machine repeats.
pub fn plan_budget(budget_seconds: f64, probe: impl FnOnce(usize, &dyn Progress) -> Result<()>) -> Result<BudgetPlan> {
    plan_budget_on(budget_seconds, None, probe)
}

/// [`plan_budget`] for a data-parallel run: every rank probes together (`probe` trains under `collective`),
/// and every rank gets rank 0's plan, so that they run the same steps.
pub fn plan_budget_on(
    budget_seconds: f64,
    collective: Option<&dyn Collective>,
    probe: impl FnOnce(usize, &dyn Progress) -> Result<()>,
) -> Result<BudgetPlan> {
    let plan = plan_alone(budget_seconds, probe)?;
    let Some(c) = collective.filter(|c| c.world() > 1) else {
        return Ok(plan);
    };
    let fields = [
        plan.budget_seconds,
        plan.probe_steps as f64,
        plan.probe_seconds,
        plan.seconds_per_step,
        plan.steps as f64,
    ];
    let mut bytes: Vec<u8> = fields.iter().flat_map(|v| v.to_le_bytes()).collect();
    c.broadcast(&mut bytes)?;
    let v: Vec<f64> = bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Ok(BudgetPlan {
        budget_seconds: v[0],
        probe_steps: v[1] as usize,
        probe_seconds: v[2],
        seconds_per_step: v[3],
        steps: v[4] as usize,
    })
}

fn plan_alone(budget_seconds: f64, probe: impl FnOnce(usize, &dyn Progress) -> Result<()>) -> Result<BudgetPlan> {
    if !(budget_seconds > 0.0 && budget_seconds.is_finite()) {
        return Err(Error::arg(format!(
            "a time budget must be positive, got {budget_seconds} s"
        )));
    }
    let start = std::time::Instant::now();
    let clock = StepClock(Default::default());
    probe(PROBE_STEPS, &clock)?;
    let probe_seconds = start.elapsed().as_secs_f64();
    let times = clock.0.into_inner();
    let half = times.len() / 2;
    let seconds_per_step = match (times.get(half), times.last()) {
        (Some(a), Some(b)) if times.len() - 1 > half => (*b - *a).as_secs_f64() / (times.len() - 1 - half) as f64,
        _ => probe_seconds / PROBE_STEPS as f64,
    }
    .max(1e-9);
    let left = (budget_seconds - probe_seconds).max(0.0);
    Ok(BudgetPlan {
        budget_seconds,
        probe_steps: PROBE_STEPS,
        probe_seconds,
        seconds_per_step,
        steps: ((left / seconds_per_step).floor() as usize).max(1),
    })
}

/// [`plan_budget`] for [`train_teacher`]: the probe trains the same teacher for a few steps.
pub fn plan_teacher(
    budget_seconds: f64,
    data: &DataSource,
    arch: &Arch,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<BudgetPlan> {
    plan_teacher_on(budget_seconds, data, arch, cfg, device, None)
}

/// [`plan_teacher`] for a data-parallel run ([`plan_budget_on`]).
pub fn plan_teacher_on(
    budget_seconds: f64,
    data: &DataSource,
    arch: &Arch,
    cfg: &TrainConfig,
    device: &Device,
    collective: Option<&dyn Collective>,
) -> Result<BudgetPlan> {
    plan_budget_on(budget_seconds, collective, |k, clock| {
        let probe = TrainConfig {
            steps: k,
            ..cfg.clone()
        };
        let ctl = RunControl {
            collective,
            ..RunControl::default()
        };
        train_teacher_controlled(data, arch, &probe, device, clock, ctl).map(drop)
    })
}

/// A trained teacher: the EMA network (used for sampling and distillation) and its training log.
pub struct TrainedTeacher {
    pub net: VelocityNet,
    pub vars: VarMap,
    pub meta: CheckpointMeta,
    pub log: TrainLog,
}

impl TrainedTeacher {
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.vars, &self.meta)
    }
    pub fn into_teacher(self) -> Teacher {
        Teacher::Net {
            net: self.net,
            vars: self.vars,
            meta: self.meta,
        }
    }
}

/// Errors unless a model of architecture `arch` reads the states (and labels) of `data`.
fn check_fits(arch: &Arch, data: &DataSource) -> Result<()> {
    let (a, d) = (arch.state_shape(), data.state_shape());
    if a != d {
        let dims = |s: &[usize]| s.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("×");
        return Err(Error::arg(format!(
            "model state shape {} (dimension {}) does not match data state shape {} (dimension {})",
            dims(&a),
            crate::state::numel(&a),
            dims(&d),
            data.dim()
        )));
    }
    if let (Some(m), Some(d)) = (arch.num_classes(), data.num_classes()) {
        if d > m {
            return Err(Error::arg(format!(
                "the data has {d} classes, but the model was built for {m}"
            )));
        }
    }
    Ok(())
}

/// Trains a velocity network on `data` by conditional flow matching on the linear path.
pub fn train_teacher(
    data: &DataSource,
    arch: &Arch,
    cfg: &TrainConfig,
    device: &Device,
    progress: &dyn Progress,
) -> Result<TrainedTeacher> {
    train_teacher_controlled(data, arch, cfg, device, progress, RunControl::default())
}

/// [`train_teacher`] under `ctl` (checkpoints of the training state, resume, interrupts, recovery).
pub fn train_teacher_controlled(
    data: &DataSource,
    arch: &Arch,
    cfg: &TrainConfig,
    device: &Device,
    progress: &dyn Progress,
    ctl: RunControl<'_>,
) -> Result<TrainedTeacher> {
    check_fits(arch, data)?;
    if cfg.guidance_range.is_some() {
        return Err(Error::arg(
            "a teacher is guided when it is sampled; a guidance range distils guidance into a flow map",
        ));
    }
    let (live, ema) = (VarMap::new(), VarMap::new());
    let net = VelocityNet::new(arch, VarBuilder::from_varmap(&live, DType::F32, device))?;
    let ema_net = VelocityNet::new(arch, VarBuilder::from_varmap(&ema, DType::F32, device))?;
    arch.seed_params(&live, cfg.seed)?;
    let path = linear();
    let trainable = Trainable::<dyn VelocityField> {
        params: &live,
        model: &net,
        ema: Some((&ema, &ema_net)),
        ema_target: false,
        path: &*path,
        classes: arch.num_classes(),
        // Dropout (where the backbone has it) on the live network only: the EMA network samples.
        backbone: Some(net.backbone()),
    };
    let training = serde_json::json!({ "objective": "fm", "train": cfg });
    let config = run_config(&training, arch, data);
    let log = fit_controlled(
        &FlowMatching::new(),
        &trainable,
        data,
        cfg,
        device,
        progress,
        &config,
        ctl,
    )?;
    let meta = CheckpointMeta {
        kind: ModelKind::Teacher,
        arch: arch.clone(),
        path: path.name().into(),
        data: data.name(),
        mixture: mixture_of(data),
        training,
        version: env!("CARGO_PKG_VERSION").into(),
        scale: data.scale(),
    };
    Ok(TrainedTeacher {
        net: ema_net,
        vars: ema,
        meta,
        log,
    })
}

/// What fixes a run's result, for its training states: the `training` record of its checkpoint, the
/// architecture and the data.
fn run_config(training: &serde_json::Value, arch: &Arch, data: &DataSource) -> serde_json::Value {
    let mut config = training.clone();
    config["arch"] = serde_json::to_value(arch).expect("architecture serialises");
    config["data"] = serde_json::Value::String(data.name());
    config
}

/// A trained flow map: the EMA network and its training log.
pub struct TrainedMap {
    pub net: FlowMapNet,
    pub vars: VarMap,
    pub meta: CheckpointMeta,
    pub log: TrainLog,
}

impl TrainedMap {
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.vars, &self.meta)
    }
}

/// A flow-map training job, as one value: the method, the teacher it distils (teacher-based methods) or
/// none (methods that train from data), the data, the objective's and the optimiser's settings, a fresh
/// student's architecture and the device.
///
/// A network teacher seeds the student with its own weights by its architecture's rule
/// ([`Arch::init_from_teacher`]: the student starts as one teacher Euler step) and fixes the student's
/// architecture and path; the analytic teacher and the data-only methods get a fresh network of `arch`.
#[derive(Clone)]
pub struct MapJob<'a> {
    pub method: Method,
    pub teacher: Option<&'a Teacher>,
    pub data: &'a DataSource,
    pub objective: DistillConfig,
    pub train: TrainConfig,
    pub arch: Arch,
    /// The probability path of a job without a teacher (a teacher brings its own).
    pub path: Arc<dyn ProbabilityPath>,
    pub device: Device,
    /// A network teacher whose weights seed a data-only method's student (fine-tuning a flow-matching
    /// model into a MeanFlow map, say) without being its target; the student takes its architecture.
    pub init: Option<&'a Teacher>,
    /// Autoguidance: with a guidance range, the teacher is guided by this weaker model of the same data
    /// (`v_w = v_weak + w·(v − v_weak)`, [`Autoguided`]) instead of by its null class.
    pub guide: Option<&'a Teacher>,
    /// Why the method was chosen, where the caller did not name it (the recommended recipe): recorded in
    /// the checkpoint's training record.
    pub recipe: Option<&'static str>,
}

impl<'a> MapJob<'a> {
    /// A job with the method's default settings, a default MLP student, the linear path, on the CPU.
    pub fn new(method: Method, data: &'a DataSource) -> Self {
        MapJob {
            method,
            teacher: None,
            data,
            objective: DistillConfig::for_data(method, &data.state_shape(), data.num_classes().is_some()),
            train: TrainConfig::default(),
            arch: Arch::Mlp(crate::backbone::MlpConfig::for_shape(&data.state_shape())),
            path: linear(),
            device: Device::Cpu,
            init: None,
            guide: None,
            recipe: None,
        }
    }

    /// [`plan_budget`] for this job: the probe runs it for a few steps.
    pub fn plan_budget(&self, budget_seconds: f64) -> Result<BudgetPlan> {
        self.plan_budget_on(budget_seconds, None)
    }

    /// [`MapJob::plan_budget`] for a data-parallel run ([`plan_budget_on`]).
    pub fn plan_budget_on(&self, budget_seconds: f64, collective: Option<&dyn Collective>) -> Result<BudgetPlan> {
        plan_budget_on(budget_seconds, collective, |k, clock| {
            let probe = MapJob {
                train: TrainConfig {
                    steps: k,
                    ..self.train.clone()
                },
                ..self.clone()
            };
            let ctl = RunControl {
                collective,
                ..RunControl::default()
            };
            probe.run_controlled(clock, ctl).map(drop)
        })
    }

    /// Runs the job, reporting each step to `progress`.
    pub fn run(&self, progress: &dyn Progress) -> Result<TrainedMap> {
        self.run_monitored(progress, 0, &mut |_, _| Ok(()))
    }

    /// [`MapJob::run`], calling `monitor(step, ema_map)` before the first step and every `every` steps
    /// (never when `every = 0`).
    pub fn run_monitored(
        &self,
        progress: &dyn Progress,
        every: usize,
        monitor: &mut dyn FnMut(usize, &FlowMapNet) -> Result<()>,
    ) -> Result<TrainedMap> {
        self.run_inner(progress, RunControl::default(), every, monitor)
    }

    /// [`MapJob::run`] under `ctl` (checkpoints of the training state, resume, interrupts, recovery).
    pub fn run_controlled(&self, progress: &dyn Progress, ctl: RunControl<'_>) -> Result<TrainedMap> {
        self.run_inner(progress, ctl, 0, &mut |_, _| Ok(()))
    }

    fn run_inner(
        &self,
        progress: &dyn Progress,
        ctl: RunControl<'_>,
        every: usize,
        monitor: &mut dyn FnMut(usize, &FlowMapNet) -> Result<()>,
    ) -> Result<TrainedMap> {
        let method = self.method;
        match (method.needs_teacher(), self.teacher) {
            (true, None) => return Err(Error::arg(format!("'{method}' distils a teacher; use distill"))),
            (false, Some(_)) => return Err(Error::arg(format!("'{method}' trains from data and takes no teacher"))),
            _ => {}
        }
        self.objective.validate()?;
        if self.init.is_some() && self.teacher.is_some() {
            return Err(Error::arg(
                "a distillation starts from its teacher; `init` is for data-only methods",
            ));
        }
        if matches!(self.init, Some(Teacher::Gmm(_))) {
            return Err(Error::arg("only a network teacher can seed a student"));
        }
        let seed_from = self.teacher.or(self.init);
        let mut arch = match seed_from {
            Some(Teacher::Net { meta, .. }) => meta.arch.clone(),
            _ => self.arch.clone(),
        };
        // Guidance trained into the map: a guidance input on the student, and for a distillation the
        // teacher guided per row by the scale each training row draws, by its null class or by a weaker
        // model (from data, the objective mixes the conditional velocity with the map's own unconditional
        // one: `guided_data_velocity`).
        let guided_teacher: Option<Box<dyn VelocityField + '_>> = match (self.train.guidance_range, self.guide) {
            (None, None) => None,
            (None, Some(_)) => return Err(Error::arg("a guiding model is distilled with a guidance range")),
            (Some(_), _) if arch.guidance().is_some() => {
                return Err(Error::arg(match self.teacher {
                    Some(_) => "the teacher already has a guidance input",
                    None => "the initial network already has a guidance input",
                }))
            }
            (Some(range), Some(weak)) => {
                let Some(strong) = self.teacher else {
                    return Err(Error::arg(format!(
                        "'{method}' trains from data; a guiding model guides a teacher (use distill)"
                    )));
                };
                check_guide(strong, weak)?;
                arch = arch.with_guidance(range);
                Some(Box::new(Autoguided::per_row(
                    strong as &dyn VelocityField,
                    weak as &dyn VelocityField,
                )?))
            }
            (Some(range), None) => {
                let Some(classes) = arch.num_classes() else {
                    return Err(Error::arg(match self.teacher {
                        Some(_) => "a guidance range needs a class-conditional teacher (trained on labelled data), or a guiding model",
                        None => "a guidance range from data needs labelled data: the guided field mixes the conditional and the unconditional velocity",
                    }));
                };
                if self.teacher.is_none() && self.train.label_dropout <= 0.0 {
                    return Err(Error::arg(
                        "guidance from data learns the unconditional velocity from dropped labels: set a label dropout above 0",
                    ));
                }
                arch = arch.with_guidance(range);
                self.teacher
                    .map(|t| Box::new(Guided::per_row(t as &dyn VelocityField, classes)) as Box<dyn VelocityField>)
            }
        };
        let teacher_field: Option<&dyn VelocityField> = match &guided_teacher {
            Some(g) => Some(&**g),
            None => self.teacher.map(|t| t as &dyn VelocityField),
        };
        if let Some(t) = self.teacher {
            if t.state_shape() != self.data.state_shape() {
                return Err(Error::arg(format!(
                    "teacher dimension {} does not match data dimension {}",
                    crate::state::numel(&t.state_shape()),
                    self.data.dim()
                )));
            }
        }
        check_fits(&arch, self.data)?;
        let path = match self.teacher {
            Some(t) => t.path()?,
            None => self.path.clone(),
        };
        let device = &self.device;
        let (live, ema) = (VarMap::new(), VarMap::new());
        let net = FlowMapNet::new(&arch, VarBuilder::from_varmap(&live, DType::F32, device))?;
        let ema_net = FlowMapNet::new(&arch, VarBuilder::from_varmap(&ema, DType::F32, device))?;
        if method.needs_tangent() && self.objective.continuous.jvp == JvpMode::Exact && net.as_tangent().is_none() {
            return Err(Error::arg(format!(
                "'{method}' takes a tangent, and the {} backbone has no exact one: use finite-difference tangents (the jvp setting)",
                arch.name()
            )));
        }
        match seed_from {
            Some(Teacher::Net { vars, .. }) => arch.init_from_teacher(&live, vars)?,
            _ => arch.seed_params(&live, self.train.seed)?,
        }
        let trainable = Trainable::<dyn FlowMap> {
            params: &live,
            model: &net,
            ema: Some((&ema, &ema_net)),
            ema_target: self.objective.target == TargetNet::Ema,
            path: &*path,
            classes: arch.num_classes(),
            backbone: Some(net.backbone()),
        };
        let objective = crate::objective::build(method, teacher_field, self.objective, Some((&live, &arch)))?;
        let mut training = serde_json::json!({
            "objective": method.name(),
            "teacher": self.teacher.map(|t| t.describe()),
            "distill": self.objective,
            "train": self.train,
        });
        if let Some(t) = self.init {
            training["init"] = serde_json::Value::String(t.describe());
        }
        if let Some(g) = self.guide {
            training["guide"] = serde_json::Value::String(g.describe());
        }
        let config = run_config(&training, &arch, self.data);
        // Why the method was chosen is a note, not a setting: a resumed run that names the method matches.
        if let Some(why) = self.recipe {
            training["recommended"] = serde_json::Value::String(why.to_string());
        }
        let mut hook = |step: usize| monitor(step, &ema_net);
        // The job's monitor sees the EMA map; the loop's is built here (a `ctl.monitor` is not used).
        let ctl = RunControl {
            checkpoint_every: ctl.checkpoint_every,
            checkpoint_minutes: ctl.checkpoint_minutes,
            save_state: ctl.save_state.map(|f| f as &mut dyn FnMut(&TrainState) -> Result<()>),
            resume: ctl.resume,
            stop: ctl.stop,
            recovery: ctl.recovery,
            loss_hook: ctl.loss_hook.map(|f| f as &mut dyn FnMut(usize, f64) -> f64),
            monitor: (every > 0).then_some((every, &mut hook as &mut dyn FnMut(usize) -> Result<()>)),
            collective: ctl.collective,
        };
        // The objective's learning rate; the recorded configuration keeps the run's and the scale apart.
        let train = TrainConfig {
            lr: self.train.lr * self.objective.lr_scale,
            ..self.train.clone()
        };
        let log = fit_controlled(
            &objective, &trainable, self.data, &train, device, progress, &config, ctl,
        )?;
        let meta = CheckpointMeta {
            kind: if method.boundary_only() {
                ModelKind::ConsistencyModel
            } else {
                ModelKind::FlowMap
            },
            arch,
            path: path.name().into(),
            data: self.data.name(),
            mixture: mixture_of(self.data),
            training,
            version: env!("CARGO_PKG_VERSION").into(),
            scale: self.data.scale(),
        };
        Ok(TrainedMap {
            net: ema_net,
            vars: ema,
            meta,
            log,
        })
    }
}
