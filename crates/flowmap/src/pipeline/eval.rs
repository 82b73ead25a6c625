//! Evaluation jobs: samples scored against held-out data, and maps measured against the exact Φ.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::exact_solver;
use crate::cond::Cond;
use crate::data::{self, DataSource, GaussianMixture};
use crate::flow_map::{FlowMap, SolverMap};
use crate::metrics::{self, Distances, MapError, PathPoints};
use crate::ode::{Scheme, Solver};
use crate::path::ProbabilityPath;
use crate::sample::{self, SampleContext, Sampler, TimeGrid};
use crate::teacher::{GmmVelocity, VelocityField};
use crate::{state, Result};

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

/// How a row's sampler label names a flow map's `k`-step power grid: `", ρ=…"`, or nothing where the grid is
/// uniform (`ρ = 1`) or a single step (where every power gives the same grid).
pub(super) fn grid_suffix(k: usize, rho: f64) -> String {
    if rho == 1.0 || k == 1 {
        String::new()
    } else {
        format!(", ρ={rho}")
    }
}

/// Samples of a flow map at each NFE (grids `TimeGrid::power(k, s.grid_power)`, walked by `sampler` under
/// `cx`, whose seed is replaced by `s.seed`), scored against `reference`.
#[allow(clippy::too_many_arguments)]
pub fn eval_map(
    name: &str,
    map: &dyn FlowMap,
    nfes: &[usize],
    sampler: Sampler,
    cx: &SampleContext<'_>,
    reference: &[f64],
    checkerboard: bool,
    s: &EvalSettings,
    device: &Device,
) -> Result<(Vec<EvalRow>, Vec<Vec<f64>>)> {
    let shape = map.state_shape();
    let d = state::numel(&shape);
    let z = sample::noise(s.n, &shape, s.seed, device)?;
    let cx = SampleContext { seed: s.seed, ..*cx };
    let mut rows = vec![];
    let mut samples = vec![];
    for &k in nfes {
        let start = Instant::now();
        let out = sample::sample_with(map, &z, &TimeGrid::power(k, s.grid_power)?, sampler, &cx)?;
        let seconds = start.elapsed().as_secs_f64();
        let x = tensor_to_vec(&out.x)?;
        let walk = match sampler {
            Sampler::Deterministic => "map".to_string(),
            Sampler::Consistency => "consistency".to_string(),
            Sampler::Gamma { gamma } => format!("γ={gamma}"),
        };
        let grid = grid_suffix(k, s.grid_power);
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

/// Samples of the teacher's ODE sampler for each solver under condition `c`, scored against `reference`.
#[allow(clippy::too_many_arguments)]
pub fn eval_teacher(
    name: &str,
    field: &dyn VelocityField,
    solvers: &[Solver],
    c: &Cond,
    reference: &[f64],
    checkerboard: bool,
    s: &EvalSettings,
    device: &Device,
) -> Result<(Vec<EvalRow>, Vec<Vec<f64>>)> {
    let shape = field.state_shape();
    let d = state::numel(&shape);
    let z = sample::noise(s.n, &shape, s.seed, device)?;
    let mut rows = vec![];
    let mut samples = vec![];
    for &solver in solvers {
        let start = Instant::now();
        let out = sample::sample_ode(field, &z, solver, c)?;
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

/// `n` held-out states of `data` (as many as it has) with their labels, and seeded noise beside them.
fn heldout_points(
    data: &DataSource,
    n: usize,
    seed: u64,
    noise_seed: u64,
    device: &Device,
) -> Result<(Tensor, Tensor, Cond)> {
    let n = points_available(data, n);
    let shape = data.state_shape();
    let x0 = data::to_batch(&data.heldout(n, seed), n, &shape, DType::F32, device)?;
    let x1 = sample::noise(n, &shape, noise_seed, device)?;
    let cond = match (data.heldout_labels(n), data.num_classes()) {
        (Some(l), Some(c)) => Cond::from_classes(&l, c, device)?,
        _ => Cond::none(),
    };
    Ok((x0, x1, cond))
}

/// Flow-map errors of `map` against the teacher's exact Φ on the pairs of an `n`-point grid, on held-out
/// data on `path`.
#[allow(clippy::too_many_arguments)]
pub fn map_errors(
    map: &dyn FlowMap,
    teacher: &dyn VelocityField,
    data: &DataSource,
    path: &dyn ProbabilityPath,
    n_grid: usize,
    n_points: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<MapError>> {
    let (x0, x1, cond) = heldout_points(data, n_points, seed, seed + 1, device)?;
    let exact = SolverMap::new(teacher, exact_solver(DType::F32));
    let p = PathPoints {
        x0: &x0,
        x1: &x1,
        cond: &cond,
        path,
    };
    metrics::flow_map_errors(map, &exact, &p, &metrics::triangle_grid(n_grid))
}

fn points_available(data: &DataSource, n: usize) -> usize {
    match data {
        DataSource::Points { heldout, .. } => heldout.rows.min(n),
        _ => n,
    }
}

/// The semigroup error of `map` on a 5-point grid of times, on held-out data on `path`.
pub fn semigroup(
    map: &dyn FlowMap,
    data: &DataSource,
    path: &dyn ProbabilityPath,
    n_points: usize,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let (x0, x1, cond) = heldout_points(data, n_points, seed, seed + 1, device)?;
    let p = PathPoints {
        x0: &x0,
        x1: &x1,
        cond: &cond,
        path,
    };
    metrics::semigroup_error(map, &p, 5)
}

/// The teacher solvers evaluated by the demo: Euler at 1 to 128 steps, and dopri5.
pub fn teacher_solvers() -> Vec<Solver> {
    euler_and_dopri5(&[1, 2, 4, 8, 16, 32, 64, 128], 1e-5)
}

/// Euler at each of `nfes`, then dopri5 at relative tolerance `tol`: a teacher beside maps at the same NFE,
/// and the teacher's own best.
pub fn euler_and_dopri5(nfes: &[usize], tol: f64) -> Vec<Solver> {
    let mut v: Vec<Solver> = nfes.iter().map(|&k| Solver::fixed(Scheme::Euler, k)).collect();
    v.push(Solver::dopri5(tol));
    v
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
/// held-out points, on the linear path.
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
    let x1 = sample::noise(n, &[mixture.dim()], seed + 7, device)?;
    let p = PathPoints {
        x0: &x0,
        x1: &x1,
        cond: Cond::none_ref(),
        path: &**teacher.path(),
    };
    let grid = metrics::flow_map_errors(map, &exact, &p, &metrics::triangle_grid(11))?;
    Ok(ExactMapReport {
        relative_error_uniform: metrics::relative_error_uniform(map, &exact, &p, seed)?,
        relative_error_grid: metrics::mean_relative(&grid),
        semigroup: metrics::semigroup_error(map, &p, 5)?,
    })
}
