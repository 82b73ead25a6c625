//! End-to-end jobs over the library: train a teacher, distill a flow map, evaluate, and the demo. The CLI
//! is a thin layer over these functions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint, CheckpointMeta, ModelKind};
use crate::data::{self, DataSource, GaussianMixture};
use crate::flow_map::{init_from_teacher, FlowMap, FlowMapNet, SolverMap};
use crate::jvp::TangentMap;
use crate::metrics::{self, Distances, MapError};
use crate::nn::MlpConfig;
use crate::objective::{DistillConfig, FlowMatching, Method, TargetNet};
use crate::ode::{Scheme, Solver};
use crate::sample::{self, Sampler, TimeGrid};
use crate::teacher::{GmmVelocity, VelocityField, VelocityNet};
use crate::train::{fit, TrainConfig, TrainLog, Trainable};
use crate::{Error, Result};

/// A progress bar for `n` steps (hidden when `show` is false or stderr is not a terminal).
pub fn progress_bar(n: u64, label: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    if n == 0 {
        // A run bounded by time, not steps.
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{prefix:>12} {spinner} {pos} steps {elapsed_precise} {msg}")
                .expect("valid template"),
        );
        pb.set_prefix(label.to_string());
        return pb;
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Dopri5 tolerance for the exact solution operator at a given precision.
pub fn exact_solver(dtype: DType) -> Solver {
    match dtype {
        DType::F64 => Solver::exact(),
        _ => Solver::dopri5(1e-5),
    }
}

/// A teacher: a trained velocity network, or the analytic Gaussian-mixture velocity.
pub enum Teacher {
    Net {
        net: VelocityNet,
        vars: VarMap,
        meta: CheckpointMeta,
    },
    Gmm(GmmVelocity),
}

impl VelocityField for Teacher {
    fn dim(&self) -> usize {
        match self {
            Teacher::Net { net, .. } => net.dim(),
            Teacher::Gmm(g) => g.dim(),
        }
    }
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self {
            Teacher::Net { net, .. } => net.velocity(x, t),
            Teacher::Gmm(g) => g.velocity(x, t),
        }
    }
}

impl Teacher {
    /// `gmm:SPEC.json` (the analytic teacher) or a teacher checkpoint.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        if let Some(path) = spec.strip_prefix("gmm:") {
            return Ok(Teacher::Gmm(GmmVelocity::new(GaussianMixture::from_file(Path::new(
                path,
            ))?)));
        }
        let ck = Checkpoint::load(Path::new(spec))?;
        let (net, vars) = ck.velocity_net(device)?;
        Ok(Teacher::Net {
            net,
            vars,
            meta: ck.meta,
        })
    }

    /// The data the teacher models: its training data, or the mixture itself.
    pub fn data(&self) -> Result<DataSource> {
        match self {
            Teacher::Gmm(g) => Ok(DataSource::Mixture(g.mixture().clone())),
            Teacher::Net { meta, .. } => data_of(meta),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Teacher::Gmm(_) => "analytic gaussian mixture".into(),
            Teacher::Net { meta, .. } => format!("velocity network trained on {}", meta.data),
        }
    }
}

/// Rebuilds the data source recorded in a checkpoint.
pub fn data_of(meta: &CheckpointMeta) -> Result<DataSource> {
    match &meta.mixture {
        Some(m) => Ok(DataSource::Mixture(m.clone())),
        None => DataSource::from_spec(&meta.data),
    }
}

fn mixture_of(data: &DataSource) -> Option<GaussianMixture> {
    match data {
        DataSource::Mixture(m) => Some(m.clone()),
        _ => None,
    }
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

/// Trains a velocity network on `data` by conditional flow matching.
pub fn train_teacher(
    data: &DataSource,
    arch: &MlpConfig,
    cfg: &TrainConfig,
    device: &Device,
    progress: &ProgressBar,
) -> Result<TrainedTeacher> {
    if arch.dim != data.dim() {
        return Err(Error::arg(format!(
            "model dimension {} does not match data dimension {}",
            arch.dim,
            data.dim()
        )));
    }
    let (live, ema) = (VarMap::new(), VarMap::new());
    let net = VelocityNet::new(arch, VarBuilder::from_varmap(&live, DType::F32, device))?;
    let ema_net = VelocityNet::new(arch, VarBuilder::from_varmap(&ema, DType::F32, device))?;
    seed_params(&live, cfg.seed)?;
    let trainable = Trainable::<dyn VelocityField> {
        params: &live,
        model: &net,
        ema: Some((&ema, &ema_net)),
        ema_target: false,
    };
    let log = fit(&FlowMatching::new(), &trainable, data, cfg, device, progress)?;
    let meta = CheckpointMeta {
        kind: ModelKind::Teacher,
        model: arch.clone(),
        path: "linear".into(),
        data: data.name(),
        mixture: mixture_of(data),
        training: serde_json::json!({ "objective": "fm", "train": cfg }),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(TrainedTeacher {
        net: ema_net,
        vars: ema,
        meta,
        log,
    })
}

/// Re-initialises every parameter from the run's seed (candle's own initialisers draw from an unseeded
/// generator), keeping candle's scale: uniform on ±1/√fan_in for weights and biases.
pub fn seed_params(vars: &VarMap, seed: u64) -> Result<()> {
    let mut rng = crate::Rng::derive(seed, "init");
    for (name, var) in crate::flow_map::vars_sorted(vars) {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let fan_in = if name.ends_with("bias") {
            // candle's Linear bias init uses the layer's fan-in; recover it from the weight's shape.
            let w = vars
                .data()
                .lock()
                .expect("vars")
                .get(&name.replace("bias", "weight"))
                .map(|w| w.dims()[1]);
            w.unwrap_or(n)
        } else {
            *dims.last().unwrap_or(&1)
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
        var.set(&Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A distilled flow map: the EMA network and its training log.
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

/// Distils a flow map from `teacher` with a teacher-based `method` (see [`Method::needs_teacher`]). A
/// network teacher seeds the student with its own weights (so the student starts as one teacher Euler
/// step); the analytic teacher gets a fresh network of architecture `arch`. `monitor(step, ema_map)` is
/// called every `n` steps when given.
#[allow(clippy::too_many_arguments)]
pub fn distill(
    teacher: &Teacher,
    data: &DataSource,
    method: Method,
    dcfg: &DistillConfig,
    cfg: &TrainConfig,
    arch: &MlpConfig,
    device: &Device,
    progress: &ProgressBar,
    monitor: Option<(usize, &mut dyn FnMut(usize, &FlowMapNet) -> Result<()>)>,
) -> Result<TrainedMap> {
    if !method.needs_teacher() {
        return Err(Error::arg(format!("'{method}' trains from data and takes no teacher")));
    }
    if teacher.dim() != data.dim() {
        return Err(Error::arg(format!(
            "teacher dimension {} does not match data dimension {}",
            teacher.dim(),
            data.dim()
        )));
    }
    train_flow_map(Some(teacher), data, method, dcfg, cfg, arch, device, progress, monitor)
}

/// Trains a flow map from data alone with a teacher-free `method` (MeanFlow, self-LMD, shortcut).
#[allow(clippy::too_many_arguments)]
pub fn train_map(
    data: &DataSource,
    method: Method,
    dcfg: &DistillConfig,
    cfg: &TrainConfig,
    arch: &MlpConfig,
    device: &Device,
    progress: &ProgressBar,
    monitor: Option<(usize, &mut dyn FnMut(usize, &FlowMapNet) -> Result<()>)>,
) -> Result<TrainedMap> {
    if method.needs_teacher() {
        return Err(Error::arg(format!("'{method}' distils a teacher; use distill")));
    }
    if arch.dim != data.dim() {
        return Err(Error::arg(format!(
            "model dimension {} does not match data dimension {}",
            arch.dim,
            data.dim()
        )));
    }
    train_flow_map(None, data, method, dcfg, cfg, arch, device, progress, monitor)
}

#[allow(clippy::too_many_arguments)]
fn train_flow_map(
    teacher: Option<&Teacher>,
    data: &DataSource,
    method: Method,
    dcfg: &DistillConfig,
    cfg: &TrainConfig,
    arch: &MlpConfig,
    device: &Device,
    progress: &ProgressBar,
    monitor: Option<(usize, &mut dyn FnMut(usize, &FlowMapNet) -> Result<()>)>,
) -> Result<TrainedMap> {
    dcfg.validate()?;
    let arch = match teacher {
        Some(Teacher::Net { meta, .. }) => meta.model.clone(),
        _ => arch.clone(),
    };
    let (live, ema) = (VarMap::new(), VarMap::new());
    let net = FlowMapNet::new(&arch, VarBuilder::from_varmap(&live, DType::F32, device))?;
    let ema_net = FlowMapNet::new(&arch, VarBuilder::from_varmap(&ema, DType::F32, device))?;
    match teacher {
        Some(Teacher::Net { vars, .. }) => init_from_teacher(&live, vars)?,
        _ => seed_params(&live, cfg.seed)?,
    }
    let trainable = Trainable::<dyn TangentMap> {
        params: &live,
        model: &net,
        ema: Some((&ema, &ema_net)),
        ema_target: dcfg.target == TargetNet::Ema,
    };
    let objective = crate::objective::build(
        method,
        teacher.map(|t| t as &dyn VelocityField),
        *dcfg,
        Some((&live, &arch)),
    )?;
    let log = match monitor {
        None => fit(&objective, &trainable, data, cfg, device, progress)?,
        Some((every, f)) => {
            let mut hook = |step: usize| f(step, &ema_net);
            crate::train::fit_with_hook(&objective, &trainable, data, cfg, device, progress, every, &mut hook)?
        }
    };
    let meta = CheckpointMeta {
        kind: ModelKind::FlowMap,
        model: arch,
        path: "linear".into(),
        data: data.name(),
        mixture: mixture_of(data),
        training: serde_json::json!({
            "objective": method.name(),
            "teacher": teacher.map(|t| t.describe()),
            "distill": dcfg,
            "train": cfg,
        }),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(TrainedMap {
        net: ema_net,
        vars: ema,
        meta,
        log,
    })
}

/// One row of an evaluation table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRow {
    pub model: String,
    pub sampler: String,
    pub nfe: usize,
    #[serde(flatten)]
    pub distances: Distances,
    pub seconds: f64,
}

/// Settings shared by evaluations.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Samples generated per row (and held-out points compared against).
    pub n: usize,
    pub seed: u64,
    /// Cap on points for the O(n²) distances (MMD², and the energy distance above two dimensions).
    pub max_points: usize,
    /// A flow map's k-step grid is `TimeGrid::power(k, grid_power)`; 1 is uniform.
    pub grid_power: f64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            n: 10_000,
            seed: 0,
            max_points: 10_000,
            grid_power: 1.0,
        }
    }
}

fn tensor_to_vec(x: &Tensor) -> Result<Vec<f64>> {
    Ok(x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Samples of a flow map at each NFE (grids `TimeGrid::power(k, s.grid_power)`, walked by `sampler`),
/// scored against `reference`.
#[allow(clippy::too_many_arguments)]
pub fn eval_map(
    name: &str,
    map: &dyn FlowMap,
    nfes: &[usize],
    sampler: Sampler,
    reference: &[f64],
    checkerboard: bool,
    s: &EvalSettings,
    device: &Device,
) -> Result<(Vec<EvalRow>, Vec<Vec<f64>>)> {
    let d = map.dim();
    let z = sample::noise(s.n, d, s.seed, device)?;
    let mut rows = vec![];
    let mut samples = vec![];
    for &k in nfes {
        let start = Instant::now();
        let out = sample::sample_with(map, &z, &TimeGrid::power(k, s.grid_power)?, sampler, s.seed)?;
        let seconds = start.elapsed().as_secs_f64();
        let x = tensor_to_vec(&out.x)?;
        let walk = match sampler {
            Sampler::Deterministic => "map".to_string(),
            Sampler::Consistency => "consistency".to_string(),
            Sampler::Gamma { gamma } => format!("γ={gamma}"),
        };
        let grid = if s.grid_power == 1.0 || k == 1 {
            String::new()
        } else {
            format!(", ρ={}", s.grid_power)
        };
        rows.push(EvalRow {
            model: name.into(),
            sampler: format!("{k}-step {walk}{grid}"),
            nfe: out.nfe,
            distances: metrics::distances(&x, reference, d, checkerboard, s.max_points),
            seconds,
        });
        samples.push(x);
    }
    Ok((rows, samples))
}

/// Samples of the teacher's ODE sampler for each solver, scored against `reference`.
pub fn eval_teacher(
    name: &str,
    field: &dyn VelocityField,
    solvers: &[Solver],
    reference: &[f64],
    checkerboard: bool,
    s: &EvalSettings,
    device: &Device,
) -> Result<(Vec<EvalRow>, Vec<Vec<f64>>)> {
    let d = field.dim();
    let z = sample::noise(s.n, d, s.seed, device)?;
    let mut rows = vec![];
    let mut samples = vec![];
    for &solver in solvers {
        let start = Instant::now();
        let out = sample::sample_ode(field, &z, solver)?;
        let seconds = start.elapsed().as_secs_f64();
        let x = tensor_to_vec(&out.x)?;
        rows.push(EvalRow {
            model: name.into(),
            sampler: solver.to_string(),
            nfe: out.nfe,
            distances: metrics::distances(&x, reference, d, checkerboard, s.max_points),
            seconds,
        });
        samples.push(x);
    }
    Ok((rows, samples))
}

/// A Markdown table of evaluation rows.
pub fn eval_table(rows: &[EvalRow]) -> String {
    let kl = rows.iter().any(|r| r.distances.kl.is_some());
    let mut s = String::from("| model | sampler | NFE | energy distance | sliced W2 | MMD² |");
    s += if kl { " KL (histogram) |\n" } else { "\n" };
    s += "|---|---|---:|---:|---:|---:|";
    s += if kl { "---:|\n" } else { "\n" };
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.5} | {:.4} | {:.5} |",
            r.model, r.sampler, r.nfe, r.distances.energy, r.distances.sliced_w2, r.distances.mmd2
        );
        if kl {
            s += &r
                .distances
                .kl
                .map(|v| format!(" {v:.4} |"))
                .unwrap_or_else(|| " – |".into());
        }
        s += "\n";
    }
    s
}

/// Flow-map errors of `map` against the teacher's exact Φ on the pairs of an `n`-point grid.
pub fn map_errors(
    map: &dyn FlowMap,
    teacher: &dyn VelocityField,
    data: &DataSource,
    n_grid: usize,
    n_points: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<MapError>> {
    let x0 = data::to_tensor(
        &data.heldout(n_points, seed),
        n_points.min(points_available(data, n_points)),
        data.dim(),
        DType::F32,
        device,
    )?;
    let x1 = sample::noise(x0.dim(0)?, data.dim(), seed + 1, device)?;
    let exact = SolverMap::new(teacher, exact_solver(DType::F32));
    metrics::flow_map_errors(map, &exact, &x0, &x1, &metrics::triangle_grid(n_grid))
}

fn points_available(data: &DataSource, n: usize) -> usize {
    match data {
        DataSource::Points { heldout, .. } => heldout.rows.min(n),
        _ => n,
    }
}

/// The semigroup error of `map` on a 5-point grid of times, on held-out data.
pub fn semigroup(map: &dyn FlowMap, data: &DataSource, n_points: usize, seed: u64, device: &Device) -> Result<f64> {
    let n = points_available(data, n_points);
    let x0 = data::to_tensor(&data.heldout(n, seed), n, data.dim(), DType::F32, device)?;
    let x1 = sample::noise(n, data.dim(), seed + 1, device)?;
    metrics::semigroup_error(map, &x0, &x1, 5)
}

/// The teacher solvers evaluated by the demo: Euler at 1 to 128 steps, and dopri5.
pub fn teacher_solvers() -> Vec<Solver> {
    let mut v: Vec<Solver> = [1, 2, 4, 8, 16, 32, 64, 128]
        .into_iter()
        .map(|k| Solver::fixed(Scheme::Euler, k))
        .collect();
    v.push(Solver::dopri5(1e-5));
    v
}

/// Output folder helper: creates it and returns file paths inside it.
pub struct OutDir(pub PathBuf);

impl OutDir {
    pub fn create(path: &Path) -> Result<Self> {
        crate::io::create_dir(path)?;
        Ok(OutDir(path.to_path_buf()))
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// A TOML run configuration: optional `[train]` and `[distill]` tables (see [`TrainConfig`] and
/// [`DistillConfig`] for the keys). Both may be partial: keys a table leaves out keep their defaults, which
/// for `[distill]` are the method's own ([`RunConfig::distill_config`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub train: Option<TrainConfig>,
    /// The `[distill]` table as written; [`RunConfig::distill_config`] lays it over a method's defaults.
    #[serde(default)]
    pub distill: Option<toml::Table>,
}

impl RunConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Config(e.message().to_string()))?;
        // Catch a misspelt or ill-typed `[distill]` key now, whichever method it is used with.
        cfg.distill_config(Method::Emd)?;
        Ok(cfg)
    }
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// `method`'s defaults ([`DistillConfig::for_method`]) with the `[distill]` table laid over them: a
    /// sub-table such as `[distill.continuous]` changes only the keys it names, while a table with a `kind`
    /// (`weighting = { kind = "adaptive", c = 1e-3, p = 0.5 }`) replaces the setting whole.
    pub fn distill_config(&self, method: Method) -> Result<DistillConfig> {
        let base = DistillConfig::for_method(method);
        let Some(table) = &self.distill else {
            return Ok(base);
        };
        let mut merged = toml::Value::try_from(base).map_err(|e| Error::Config(e.to_string()))?;
        overlay(&mut merged, table);
        merged
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(format!("[distill]: {}", e.message())))
    }
}

/// Lays `over` onto `base` key by key, recursing into sub-tables; a table with a `kind` key (a tagged
/// choice such as the weighting) replaces its counterpart instead of merging with it.
fn overlay(base: &mut toml::Value, over: &toml::Table) {
    match base {
        toml::Value::Table(b) if !over.contains_key("kind") => {
            for (k, v) in over {
                match (b.get_mut(k), v) {
                    (Some(slot @ toml::Value::Table(_)), toml::Value::Table(t)) => overlay(slot, t),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *base = toml::Value::Table(over.clone()),
    }
}

/// A flow map measured against the exact flow map of a Gaussian mixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExactMapReport {
    /// `E‖f − Φ‖² / E‖Φ − x‖²` with `(t, s)` uniform on the triangle, per row.
    pub relative_error_uniform: f64,
    /// Mean relative error over the pairs of an 11-point grid.
    pub relative_error_grid: f64,
    /// Semigroup error over the triples of a 5-point grid.
    pub semigroup: f64,
}

/// Measures `map` against the exact Φ of `mixture` (dopri5 at 1e-6 on the closed-form velocity) on `n`
/// held-out points.
pub fn exact_map_report(
    map: &dyn FlowMap,
    mixture: &GaussianMixture,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<ExactMapReport> {
    let data = DataSource::Mixture(mixture.clone());
    let teacher = GmmVelocity::new(mixture.clone());
    let exact = SolverMap::new(&teacher, Solver::dopri5(1e-6));
    let x0 = data::to_tensor(&data.heldout(n, seed), n, mixture.dim(), DType::F32, device)?;
    let x1 = sample::noise(n, mixture.dim(), seed + 7, device)?;
    let grid = metrics::flow_map_errors(map, &exact, &x0, &x1, &metrics::triangle_grid(11))?;
    Ok(ExactMapReport {
        relative_error_uniform: metrics::relative_error_uniform(map, &exact, &x0, &x1, seed)?,
        relative_error_grid: metrics::mean_relative(&grid),
        semigroup: metrics::semigroup_error(map, &x0, &x1, 5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::{EpsSchedule, Weighting};

    #[test]
    fn partial_config_tables_keep_the_methods_defaults() {
        let cfg = RunConfig::from_toml(
            "[train]\nsteps = 7\n[distill]\neps = { kind = \"fixed\", eps = 0.1 }\n[distill.continuous]\ncm_intervals = 128\n",
        )
        .unwrap();
        assert_eq!(cfg.train.as_ref().unwrap().steps, 7);
        assert_eq!(cfg.train.as_ref().unwrap().lr, TrainConfig::default().lr);
        // MeanFlow's own default weighting survives a table that does not mention it.
        let mf = cfg.distill_config(Method::Meanflow).unwrap();
        let mut want = DistillConfig::for_method(Method::Meanflow);
        want.eps = EpsSchedule::Fixed { eps: 0.1 };
        want.continuous.cm_intervals = 128;
        assert_eq!(mf, want);
        assert_eq!(
            RunConfig::default().distill_config(Method::Cm).unwrap(),
            DistillConfig::for_method(Method::Cm)
        );
        // A tagged choice is replaced whole, not merged with the default's fields.
        let cfg = RunConfig::from_toml("[distill]\nweighting = { kind = \"adaptive\", c = 0.01, p = 0.5 }\n").unwrap();
        let w = cfg.distill_config(Method::Meanflow).unwrap().weighting;
        assert_eq!(w, Weighting::Adaptive { c: 0.01, p: 0.5 });
        let cfg = RunConfig::from_toml("[distill]\nweighting = { kind = \"constant\" }\n").unwrap();
        assert_eq!(cfg.distill_config(Method::Emd).unwrap().weighting, Weighting::Constant);
    }

    #[test]
    fn misspelt_or_ill_typed_config_keys_are_errors() {
        for (text, needle) in [
            ("[distill.continuous]\ncm_interval = 128\n", "cm_interval"),
            ("[distill]\ntimes = { diagonal_fractio = 0.5 }\n", "diagonal_fractio"),
            ("[distill.continuous]\ncm_intervals = \"many\"\n", "invalid type"),
            ("[train]\nstep = 7\n", "step"),
            ("[trian]\nsteps = 7\n", "trian"),
        ] {
            let err = RunConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "'{err}' does not name '{needle}'");
        }
    }
}
