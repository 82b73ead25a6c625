//! `flowmap._flowmap`: the native module of the Python package. It is a thin layer over the library's
//! end-to-end API (`flowmap::pipeline`): arrays in and out through the `numpy` crate, the GIL released
//! around every long call, progress and Ctrl-C through a [`Progress`](flowmap::train::Progress) that briefly re-attaches, and the
//! library's errors as the Python classes of `flowmap.errors`. Defaults, argument names and docstrings live
//! in the Python package (`flowmap/__init__.py`); this module takes every setting explicitly.

mod convert;
mod errors;
mod progress;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use numpy::{PyArrayDyn, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use flowmap::data::DataSource;
use flowmap::flow_map::FlowMap;
use flowmap::objective::{registry, DataKind, Method};
use flowmap::pipeline::{self, Classes, Generation, MapJob, Model, RunConfig, Teacher};
use flowmap::sample::{Sampler, TimeGrid};
use flowmap::teacher::VelocityField;
use flowmap::train::TrainState;

use convert::{array_out, batch_in, column};
use errors::{arg_err, to_py};
use progress::Reporter;

/// Rust's allocations in this module go through mimalloc, as the CLI's do, and freed memory stays in the
/// process: a training step frees and re-allocates the same activation buffers every step, and pages given
/// back to the OS return zero-filled at the next fault (the CLI's `alloc.rs` has the measurement). With the
/// system allocator, training through Python ran 9.5% slower than the CLI (`bench/python/overhead.py`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (declared by `libmimalloc-sys` only with its `extended` feature).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e`; -1 never purges.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// A data source: a spec (`checkerboard`, `mnist`, a file) or an array held in memory.
#[pyclass(module = "flowmap._flowmap", name = "Data", frozen)]
pub struct PyData {
    inner: DataSource,
}

#[pymethods]
impl PyData {
    /// The data a spec names.
    #[staticmethod]
    fn spec(py: Python<'_>, spec: &str) -> PyResult<Self> {
        let spec = spec.to_string();
        let inner = py.detach(move || DataSource::from_spec(&spec)).map_err(to_py)?;
        Ok(PyData { inner })
    }

    /// An array: `N × D` points, or `N × H × W` / `N × C × H × W` images (`uint8` tells pixels `0..=255`),
    /// with `N` labels for images.
    #[staticmethod]
    #[pyo3(signature = (name, values, uint8, labels=None))]
    fn array(
        name: &str,
        values: PyReadonlyArrayDyn<'_, f64>,
        uint8: bool,
        labels: Option<PyReadonlyArray1<'_, i64>>,
    ) -> PyResult<Self> {
        let shape = values.shape().to_vec();
        let data: Vec<f64> = values.as_array().iter().copied().collect();
        let labels = labels
            .map(|l| {
                l.as_array()
                    .iter()
                    .map(|&v| u32::try_from(v).map_err(|_| arg_err(format!("label {v} is not a non-negative integer"))))
                    .collect::<PyResult<Vec<u32>>>()
            })
            .transpose()?;
        let inner = DataSource::from_array(name, &shape, data, uint8, labels).map_err(to_py)?;
        Ok(PyData { inner })
    }

    /// The name checkpoints record.
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    /// The shape of one state.
    #[getter]
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }

    /// The number of classes of labelled data.
    #[getter]
    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }

    /// `n` held-out states (as many as there are), seeded, in the model's `[−1, 1]` for images.
    fn heldout<'py>(&self, py: Python<'py>, n: usize, seed: u64) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let v: Vec<f32> = self.inner.heldout(n, seed).iter().map(|&x| x as f32).collect();
        let rows = v.len() / self.inner.dim().max(1);
        array_out(py, v, &flowmap::state::batch_shape(rows, &self.inner.state_shape()))
    }
}

/// A run's whole training state (an interrupted run's, say): resume from it, or write it.
#[pyclass(module = "flowmap._flowmap", name = "TrainState", frozen)]
pub struct PyTrainState {
    pub(crate) inner: TrainState,
}

#[pymethods]
impl PyTrainState {
    /// A state written by `save` or by a run's checkpoint schedule.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(PyTrainState {
            inner: TrainState::load(&path).map_err(to_py)?,
        })
    }
    fn save(&self, path: PathBuf) -> PyResult<()> {
        self.inner.save(&path).map_err(to_py)
    }
    /// The steps done.
    #[getter]
    fn step(&self) -> usize {
        self.inner.meta.step
    }
    fn __repr__(&self) -> String {
        format!("TrainState(step={})", self.inner.meta.step)
    }
}

/// A model: a flow map, a consistency model, a teacher network or the analytic mixture teacher.
#[pyclass(module = "flowmap._flowmap", name = "Model", frozen)]
pub struct PyModel {
    inner: Model,
    device: Device,
}

impl PyModel {
    fn teacher(&self) -> PyResult<&Teacher> {
        match &self.inner {
            Model::Teacher(t) => Ok(t),
            Model::Map(..) => Err(arg_err(
                "a flow map is not a teacher (a teacher checkpoint was expected)",
            )),
        }
    }
}

#[pymethods]
impl PyModel {
    /// A flowmap checkpoint, or `gmm:SPEC.json`.
    #[staticmethod]
    fn load(py: Python<'_>, path: &str, device: &str) -> PyResult<Self> {
        let device = flowmap::parse_device(device).map_err(to_py)?;
        let (spec, dev) = (path.to_string(), device.clone());
        let inner = py.detach(move || Model::load(&spec, &dev)).map_err(to_py)?;
        Ok(PyModel { inner, device })
    }

    /// `teacher`, `flow_map`, `consistency_model`, or `analytic` (the Gaussian-mixture teacher).
    #[getter]
    fn kind(&self) -> &'static str {
        match &self.inner {
            Model::Map(_, ck) if ck.meta.kind.boundary_only() => "consistency_model",
            Model::Map(..) => "flow_map",
            Model::Teacher(Teacher::Net { .. }) => "teacher",
            Model::Teacher(Teacher::Gmm(_)) => "analytic",
        }
    }

    #[getter]
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }

    #[getter]
    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }

    /// The guidance range a guidance-distilled map was trained for.
    #[getter]
    fn guidance_range(&self) -> Option<[f64; 2]> {
        match &self.inner {
            Model::Map(net, _) => net.arch().guidance(),
            Model::Teacher(_) => None,
        }
    }

    /// The checkpoint metadata as JSON (none for the analytic teacher).
    #[getter]
    fn metadata_json(&self) -> Option<String> {
        self.inner
            .meta()
            .map(|m| serde_json::to_string(m).expect("metadata serialises"))
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(to_py)
    }

    /// `n` samples in the data's own range (see the package's `Model.sample`).
    #[pyo3(signature = (n, nfe, classes, class_list, guidance, guide, grid, grid_power, solver, sampler, seed, precision))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        nfe: usize,
        classes: Option<&str>,
        class_list: Option<Vec<u32>>,
        guidance: Option<f64>,
        guide: Option<PyRef<'py, PyModel>>,
        grid: Option<Vec<f64>>,
        grid_power: f64,
        solver: &str,
        sampler: Option<&str>,
        seed: u64,
        precision: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let classes = match (classes, class_list) {
            (_, Some(l)) => Some(Classes::Each(l)),
            (Some(s), None) => Some(s.parse::<Classes>().map_err(to_py)?),
            (None, None) => None,
        };
        let g = Generation {
            nfe,
            grid: grid.map(TimeGrid::custom).transpose().map_err(to_py)?,
            grid_power,
            solver: solver.to_string(),
            sampler: sampler.map(Sampler::parse).transpose().map_err(to_py)?,
            classes,
            guidance,
            seed,
            precision: precision.parse().map_err(to_py)?,
        };
        let guide = guide.as_ref().map(|m| m.teacher()).transpose()?;
        let device = &self.device;
        // The generator is built (every setting checked) on the detached thread: it is not `Sync`.
        let (x, _) = py
            .detach(|| self.inner.generator(&g, guide)?.sample(n, device))
            .map_err(to_py)?;
        let dims = x.dims().to_vec();
        let v = py
            .detach(|| x.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| to_py(e.into()))?;
        array_out(py, v, &dims)
    }

    /// The map `f(x, t, s)` of a flow map, or a teacher's `Φ_{t→s}` by `solver`, on states in the data's
    /// range.
    #[pyo3(signature = (x, t, s, classes, class_list, guidance, solver, steps, tol))]
    #[allow(clippy::too_many_arguments)]
    fn map<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f32>,
        t: PyReadonlyArray1<'py, f32>,
        s: PyReadonlyArray1<'py, f32>,
        classes: Option<&str>,
        class_list: Option<Vec<u32>>,
        guidance: Option<f64>,
        solver: &str,
        steps: usize,
        tol: f64,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let device = &self.device;
        let shape = self.inner.state_shape();
        let scale = self.inner.scale();
        let xb = batch_in(&x, &shape, scale, device)?;
        let rows = xb.dim(0).map_err(|e| to_py(e.into()))?;
        // Both columns have `rows` entries here (a single value is broadcast).
        let ((tv, tc), (sv, sc)) = (column(&t, rows, "t", device)?, column(&s, rows, "s", device)?);
        if let Some(i) = (0..rows).find(|&i| sv[i] > tv[i]) {
            return Err(arg_err(format!(
                "s = {} is greater than t = {} (row {i}): flow maps go down in time (0 ≤ s ≤ t ≤ 1)",
                sv[i], tv[i]
            )));
        }
        if let Some(v) = tv.iter().chain(&sv).find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(arg_err(format!("time {v} is outside [0, 1]")));
        }
        let cond = self.cond(classes, class_list, rows)?;
        let y = py
            .detach(|| -> flowmap::Result<Tensor> {
                match &self.inner {
                    Model::Map(net, ck) => {
                        if ck.meta.kind.boundary_only() && sv.iter().any(|&v| v != 0.0) {
                            return Err(flowmap::Error::arg(
                                "a consistency model maps only to s = 0: it was trained on the boundary",
                            ));
                        }
                        pipeline::map_at(net, guidance)?.map(&xb, &tc, &sc, &cond)
                    }
                    Model::Teacher(tch) => {
                        let solver = flowmap::ode::parse_solver(solver, steps, tol)?;
                        let field = pipeline::guided(tch, guidance, None)?;
                        flowmap::flow_map::SolverMap::new(&*field, solver).map(&xb, &tc, &sc, &cond)
                    }
                }
            })
            .map_err(to_py)?;
        let y = pipeline::to_data_range(&y, scale).map_err(to_py)?;
        let dims = y.dims().to_vec();
        let v = y
            .flatten_all()
            .and_then(|y| y.to_vec1::<f32>())
            .map_err(|e| to_py(e.into()))?;
        array_out(py, v, &dims)
    }

    /// A teacher's velocity `v(x, t)` (per unit time, in the model's `[−1, 1]` units).
    #[pyo3(signature = (x, t, classes, class_list, guidance))]
    fn velocity<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f32>,
        t: PyReadonlyArray1<'py, f32>,
        classes: Option<&str>,
        class_list: Option<Vec<u32>>,
        guidance: Option<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let teacher = self.teacher()?;
        let device = &self.device;
        let xb = batch_in(&x, &self.inner.state_shape(), self.inner.scale(), device)?;
        let rows = xb.dim(0).map_err(|e| to_py(e.into()))?;
        let (_, tc) = column(&t, rows, "t", device)?;
        let cond = self.cond(classes, class_list, rows)?;
        let v = py
            .detach(|| pipeline::guided(teacher, guidance, None)?.velocity(&xb, &tc, &cond))
            .map_err(to_py)?;
        let dims = v.dims().to_vec();
        let flat = v
            .flatten_all()
            .and_then(|v| v.to_vec1::<f32>())
            .map_err(|e| to_py(e.into()))?;
        array_out(py, flat, &dims)
    }
}

impl PyModel {
    fn cond(&self, classes: Option<&str>, class_list: Option<Vec<u32>>, rows: usize) -> PyResult<flowmap::Cond> {
        let spec = match (classes, class_list) {
            (_, Some(l)) => {
                if l.len() != rows {
                    return Err(arg_err(format!("{} classes for {rows} states", l.len())));
                }
                Some(Classes::Each(l))
            }
            (Some(s), None) => Some(s.parse::<Classes>().map_err(to_py)?),
            (None, None) => None,
        };
        Classes::cond(spec.as_ref(), 0, rows, self.inner.num_classes(), &self.device).map_err(to_py)
    }
}

/// How a run is set up: its configuration (`{"train": …, "distill": …, "arch": …}` as JSON), the long-run
/// controls, and the progress callback.
struct RunSetup {
    config: RunConfig,
    reporter: Reporter,
    state: Option<PathBuf>,
    checkpoint_every: Option<usize>,
    resume: Option<TrainState>,
}

impl RunSetup {
    fn new(
        config_json: &str,
        progress: Option<Py<PyAny>>,
        state: Option<PathBuf>,
        checkpoint_every: Option<usize>,
        resume: Option<PyRef<'_, PyTrainState>>,
    ) -> PyResult<Self> {
        let config = RunConfig::from_json(config_json).map_err(to_py)?;
        if checkpoint_every.is_some() && state.is_none() {
            return Err(arg_err(
                "a checkpoint schedule writes the training state: give state=PATH",
            ));
        }
        Ok(RunSetup {
            config,
            reporter: Reporter::new(progress),
            state,
            checkpoint_every,
            resume: resume.map(|r| r.inner.clone()),
        })
    }

    /// `base` (the defaults, or a recipe's) with the `train` settings laid over it, validated.
    fn train_config(&self, base: flowmap::train::TrainConfig) -> PyResult<flowmap::train::TrainConfig> {
        let cfg = self.config.train_config_over(base).map_err(to_py)?;
        cfg.validate().map_err(to_py)?;
        Ok(cfg)
    }

    /// Runs `train` under a [`flowmap::train::RunControl`] that writes states to `state` (every
    /// `checkpoint_every` steps, and when interrupted) and stops on Ctrl-C; an interrupt becomes
    /// `flowmap.errors.TrainingInterrupted` carrying the state.
    fn run<T: Send>(
        self,
        py: Python<'_>,
        train: impl FnOnce(&Reporter, flowmap::train::RunControl<'_>) -> flowmap::Result<T> + Send,
    ) -> PyResult<T> {
        let RunSetup {
            reporter,
            state,
            checkpoint_every,
            resume,
            ..
        } = self;
        let mut last: Option<TrainState> = None;
        let result = py.detach(|| {
            let mut sink = |s: &TrainState| -> flowmap::Result<()> {
                if let Some(p) = &state {
                    s.save(p)?;
                }
                last = Some(s.clone());
                Ok(())
            };
            let ctl = flowmap::train::RunControl {
                checkpoint_every,
                save_state: Some(&mut sink),
                resume,
                stop: Some(reporter.stop_flag()),
                ..Default::default()
            };
            train(&reporter, ctl)
        });
        reporter.finish(py);
        match result {
            Ok(v) => {
                reporter.take_error()?;
                Ok(v)
            }
            Err(flowmap::Error::Interrupted { step }) => {
                // A callback that raised stops the run as an interrupt does; its own error wins.
                reporter.take_error()?;
                Err(errors::interrupted(
                    py,
                    step,
                    state.as_deref(),
                    last.map(|s| PyTrainState { inner: s }),
                ))
            }
            Err(e) => Err(to_py(e)),
        }
    }
}

/// The backbone of a run: `arch` (a kind) or the configuration's, with the `[arch]` settings, validated.
fn build_arch(
    config: &RunConfig,
    kind: Option<&str>,
    data: &DataSource,
    defaults: &[(&str, toml::Table)],
) -> PyResult<flowmap::backbone::Arch> {
    let arch = config
        .base_arch(kind, &data.state_shape(), data.num_classes(), defaults)
        .map_err(to_py)?;
    arch.validate().map_err(to_py)?;
    Ok(arch)
}

/// Trains a teacher by conditional flow matching.
#[pyfunction]
#[pyo3(signature = (data, config_json, arch, device, minutes, progress, state, checkpoint_every, resume))]
#[allow(clippy::too_many_arguments)]
fn train_teacher(
    py: Python<'_>,
    data: PyRef<'_, PyData>,
    config_json: &str,
    arch: Option<&str>,
    device: &str,
    minutes: Option<f64>,
    progress: Option<Py<PyAny>>,
    state: Option<PathBuf>,
    checkpoint_every: Option<usize>,
    resume: Option<PyRef<'_, PyTrainState>>,
) -> PyResult<PyModel> {
    let device = flowmap::parse_device(device).map_err(to_py)?;
    let setup = RunSetup::new(config_json, progress, state, checkpoint_every, resume)?;
    let mut cfg = setup.train_config(Default::default())?;
    let arch = build_arch(&setup.config, arch, &data.inner, &[])?;
    let data = &data.inner;
    if let Some(m) = minutes {
        let plan = py
            .detach(|| pipeline::plan_teacher(m * 60.0, data, &arch, &cfg, &device))
            .map_err(to_py)?;
        cfg.steps = plan.steps;
    }
    let dev = device.clone();
    let trained = setup.run(py, move |reporter, ctl| {
        pipeline::train_teacher_controlled(data, &arch, &cfg, &dev, reporter, ctl)
    })?;
    Ok(PyModel {
        inner: trained.into(),
        device,
    })
}

/// Trains a flow map by `method`: distilling `teacher`, or from `data` alone.
#[pyfunction]
#[pyo3(signature = (method, data, teacher, config_json, arch, device, guide, init, minutes, progress, state, checkpoint_every, resume))]
#[allow(clippy::too_many_arguments)]
fn train_map(
    py: Python<'_>,
    method: Option<&str>,
    data: Option<PyRef<'_, PyData>>,
    teacher: Option<PyRef<'_, PyModel>>,
    config_json: &str,
    arch: Option<&str>,
    device: &str,
    guide: Option<PyRef<'_, PyModel>>,
    init: Option<PyRef<'_, PyModel>>,
    minutes: Option<f64>,
    progress: Option<Py<PyAny>>,
    state: Option<PathBuf>,
    checkpoint_every: Option<usize>,
    resume: Option<PyRef<'_, PyTrainState>>,
) -> PyResult<PyModel> {
    let named: Option<Method> = method.map(str::parse).transpose().map_err(to_py)?;
    let device = flowmap::parse_device(device).map_err(to_py)?;
    let setup = RunSetup::new(config_json, progress, state, checkpoint_every, resume)?;
    let teacher = teacher.as_ref().map(|t| t.teacher()).transpose()?;
    let guide = guide.as_ref().map(|t| t.teacher()).transpose()?;
    let init = init.as_ref().map(|t| t.teacher()).transpose()?;
    let owned;
    let data: &DataSource = match (&data, teacher) {
        (Some(d), _) => &d.inner,
        (None, Some(t)) => {
            owned = py.detach(|| t.data()).map_err(to_py)?;
            &owned
        }
        (None, None) => return Err(arg_err("training from data needs the data")),
    };
    // Without a method, a distillation takes the recommended one-step recipe for its kind of data.
    let (method, recommendation) = match (named, teacher) {
        (Some(m), _) => (m, None),
        (None, Some(_)) => {
            let r = registry::recommended(DataKind::of(&data.state_shape(), data.num_classes().is_some()));
            (r.method, Some(r))
        }
        (None, None) => {
            return Err(arg_err(
                "name the method that trains from data (flowmap.methods() lists them)",
            ))
        }
    };
    let cfg = setup.train_config(recommendation.as_ref().map(|r| r.train.clone()).unwrap_or_default())?;
    let recipe = recommendation.map(|r| r.why);
    if teacher.is_some() && arch.is_some() {
        return Err(arg_err(
            "a network teacher fixes the student's backbone (it starts as the teacher); drop arch",
        ));
    }
    let shape = data.state_shape();
    let base = flowmap::objective::DistillConfig::for_data(method, &shape, data.num_classes().is_some());
    let objective = setup.config.distill_config_over(base).map_err(to_py)?;
    objective.validate().map_err(to_py)?;
    let student = build_arch(&setup.config, arch, data, &pipeline::student_defaults())?;
    let mut job = MapJob {
        teacher,
        guide,
        init,
        objective,
        train: cfg,
        arch: student,
        device: device.clone(),
        recipe,
        ..MapJob::new(method, data)
    };
    if let Some(m) = minutes {
        let plan = py.detach(|| job.plan_budget(m * 60.0)).map_err(to_py)?;
        job.train.steps = plan.steps;
    }
    let trained = setup.run(py, |reporter, ctl| job.run_controlled(reporter, ctl))?;
    Ok(PyModel {
        inner: trained.into(),
        device,
    })
}

/// Scores a model on held-out data; the rows (and any exact-map report) as JSON.
#[pyfunction]
#[pyo3(signature = (model, data, nfes, n, seed, sampler, grid_power, guidance, guide))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    model: PyRef<'_, PyModel>,
    data: Option<PyRef<'_, PyData>>,
    nfes: Vec<usize>,
    n: usize,
    seed: u64,
    sampler: Option<&str>,
    grid_power: f64,
    guidance: Option<f64>,
    guide: Option<PyRef<'_, PyModel>>,
) -> PyResult<String> {
    let guide = guide.as_ref().map(|t| t.teacher()).transpose()?;
    let e = pipeline::Evaluate {
        nfes,
        n,
        seed,
        sampler: sampler.map(Sampler::parse).transpose().map_err(to_py)?,
        grid_power,
        guidance,
        guide,
        classifier: None,
    };
    let (m, device) = (&model.inner, &model.device);
    let data: Option<&DataSource> = data.as_ref().map(|d| &d.inner);
    let json = py
        .detach(|| -> flowmap::Result<serde_json::Value> {
            let owned;
            let data = match data {
                Some(d) => d,
                None => {
                    owned = match m {
                        Model::Map(_, ck) => pipeline::data_of(&ck.meta)?,
                        Model::Teacher(t) => t.data()?,
                    };
                    &owned
                }
            };
            Ok(match pipeline::evaluate(m, data, &e, device)? {
                pipeline::Evaluation::Points { rows, exact, .. } => {
                    serde_json::json!({ "rows": rows, "exact_map": exact })
                }
                pipeline::Evaluation::Images { rows, .. } => serde_json::json!({ "rows": rows }),
            })
        })
        .map_err(to_py)?;
    Ok(json.to_string())
}

/// The methods of the registry: `(name, needs_teacher, summary)`.
#[pyfunction]
fn methods() -> Vec<(String, bool, String)> {
    Method::all()
        .map(|m| (m.name().to_string(), m.needs_teacher(), m.info().summary.to_string()))
        .collect()
}

/// Sets the number of compute threads (call before the first computation; results are the same bits at
/// any count).
#[pyfunction]
fn set_threads(n: usize) {
    flowmap::set_compute_threads(n);
}

/// The default training settings (`TrainConfig::default`), as JSON.
#[pyfunction]
fn train_defaults() -> String {
    serde_json::to_string(&flowmap::train::TrainConfig::default()).expect("settings serialise")
}

/// The library's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _flowmap(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // SAFETY: sets a documented mimalloc option; any value is valid for this one.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    m.add_class::<PyData>()?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyTrainState>()?;
    m.add_function(wrap_pyfunction!(train_teacher, m)?)?;
    m.add_function(wrap_pyfunction!(train_map, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(train_defaults, m)?)?;
    Ok(())
}
