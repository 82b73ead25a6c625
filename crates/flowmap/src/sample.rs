//! Sampling. One sampler: start from noise at `t = 1` and apply a flow map along a descending time grid
//! `1 = t_0 > t_1 > … > t_k = 0`. A learned map costs one network evaluation (NFE) per step; the teacher's
//! ODE sampler is the same loop over [`SolverMap`], whose NFE is the solver's velocity evaluations.

use crate::kernels::no_grad;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::cond::Cond;
use crate::flow_map::{CountedMap, FlowMap, SolverMap};
use crate::ode::{self, Solver};
use crate::path::{LinearPath, ProbabilityPath};
use crate::teacher::{Counted, VelocityField};
use crate::{state, Error, Result, Rng};

/// A descending time grid from 1 to 0: the schedule of a k-step sampler, as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimeGrid(Vec<f64>);

impl TimeGrid {
    /// `k` equal steps from 1 to 0.
    pub fn uniform(k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::arg("the number of steps (NFE) must be at least 1"));
        }
        Ok(TimeGrid((0..=k).map(|i| 1.0 - i as f64 / k as f64).collect()))
    }
    /// Any grid that starts at 1, ends at 0 and strictly decreases.
    pub fn custom(times: Vec<f64>) -> Result<Self> {
        ode::check_grid(&times)?;
        if times[0] != 1.0 || *times.last().expect("two times") != 0.0 {
            return Err(Error::arg(format!(
                "a sampling grid must run from 1 to 0, got {times:?}"
            )));
        }
        Ok(TimeGrid(times))
    }
    /// `k` steps at `t_i = (1 − i/k)^ρ`: `ρ = 1` is uniform, `ρ > 1` spends the steps near the data,
    /// `ρ < 1` near the noise (the ρ of Karras et al. 2022's σ schedule, applied to time).
    pub fn power(k: usize, rho: f64) -> Result<Self> {
        if !(rho > 0.0 && rho.is_finite()) {
            return Err(Error::arg(format!("a grid's power ρ must be positive, got {rho}")));
        }
        let uniform = TimeGrid::uniform(k)?;
        TimeGrid::custom(uniform.0.iter().map(|t| t.powf(rho)).collect())
    }
    pub fn times(&self) -> &[f64] {
        &self.0
    }
    /// The number of map applications.
    pub fn steps(&self) -> usize {
        self.0.len() - 1
    }
}

impl FromStr for TimeGrid {
    type Err = Error;
    /// A comma-separated list such as `1,0.6,0`.
    fn from_str(s: &str) -> Result<Self> {
        let times = s
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| Error::arg(format!("bad time '{v}' in grid '{s}'")))
            })
            .collect::<Result<Vec<_>>>()?;
        TimeGrid::custom(times)
    }
}

impl fmt::Display for TimeGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|t| format!("{t}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Samples and the exact number of network evaluations spent on them.
pub struct Sampled {
    pub x: Tensor,
    pub nfe: usize,
}

/// What samples are drawn under: the condition (class labels, or none), the probability path the
/// stochastic samplers re-noise along, and the seed of that re-noising.
#[derive(Clone, Copy)]
pub struct SampleContext<'a> {
    pub cond: &'a Cond,
    pub path: &'a dyn ProbabilityPath,
    pub seed: u64,
}

impl SampleContext<'static> {
    /// Unconditional, on the linear path.
    pub fn new(seed: u64) -> Self {
        SampleContext {
            cond: Cond::none_ref(),
            path: &LinearPath,
            seed,
        }
    }
}

impl<'a> SampleContext<'a> {
    pub fn with_cond<'b>(self, cond: &'b Cond) -> SampleContext<'b>
    where
        'a: 'b,
    {
        SampleContext { cond, ..self }
    }
    pub fn with_path<'b>(self, path: &'b dyn ProbabilityPath) -> SampleContext<'b>
    where
        'a: 'b,
    {
        SampleContext { path, ..self }
    }
}

/// Applies `map` along `grid` starting from `noise` (the state at `t = 1`), under condition `c`.
pub fn run_grid(map: &dyn FlowMap, noise: &Tensor, grid: &TimeGrid, c: &Cond) -> Result<Tensor> {
    let b = noise.dim(0)?;
    let mut x = noise.clone();
    for w in grid.times().windows(2) {
        let t = Tensor::full(w[0], (b, 1), noise.device())?.to_dtype(noise.dtype())?;
        let s = Tensor::full(w[1], (b, 1), noise.device())?.to_dtype(noise.dtype())?;
        // No graph: sampling never needs gradients, and one would grow with the number of steps.
        x = no_grad(|| map.map(&x, &t, &s, c))?;
    }
    Ok(x)
}

/// k-step flow-map sampling: one NFE per grid step.
pub fn sample_map(map: &dyn FlowMap, noise: &Tensor, grid: &TimeGrid, c: &Cond) -> Result<Sampled> {
    let counted = CountedMap::new(map);
    let x = run_grid(&counted, noise, grid, c)?;
    Ok(Sampled { x, nfe: counted.nfe() })
}

/// The teacher's ODE sampler from `t = 1` to `t = 0`; NFE counts velocity evaluations.
pub fn sample_ode(field: &dyn VelocityField, noise: &Tensor, solver: Solver, c: &Cond) -> Result<Sampled> {
    let counted = Counted::new(field);
    let map = SolverMap::new(&counted, solver);
    let x = run_grid(&map, noise, &TimeGrid::uniform(1)?, c)?;
    Ok(Sampled { x, nfe: counted.nfe() })
}

/// Rows per chunk when sampling states of `shape` at bounded memory: images 256 at a time, points all at
/// once (so that their samples are the bits of one batch).
pub fn chunk_rows(shape: &[usize]) -> usize {
    if shape.len() >= 3 {
        256
    } else {
        usize::MAX
    }
}

/// `run` on consecutive chunks of at most `chunk` rows of `noise` and of `cx.cond`, the samples joined in
/// order; chunk `i > 0` re-noises from a seed of its own. The NFE reported is the most any chunk spent (the
/// per-sample cost). With one chunk this is `run(noise, cx)` itself.
pub fn in_chunks(
    noise: &Tensor,
    cx: &SampleContext<'_>,
    chunk: usize,
    mut run: impl FnMut(&Tensor, &SampleContext<'_>) -> Result<Sampled>,
) -> Result<Sampled> {
    let n = noise.dim(0)?;
    if n <= chunk {
        return run(noise, cx);
    }
    let (mut parts, mut nfe) = (Vec::new(), 0);
    for (i, start) in (0..n).step_by(chunk.max(1)).enumerate() {
        let len = chunk.min(n - start);
        let cond = cx.cond.narrow(start, len)?;
        let sub = SampleContext {
            cond: &cond,
            path: cx.path,
            seed: chunk_seed(cx.seed, i),
        };
        let out = run(&noise.narrow(0, start, len)?, &sub)?;
        nfe = nfe.max(out.nfe);
        parts.push(out.x);
    }
    Ok(Sampled {
        x: Tensor::cat(&parts, 0)?,
        nfe,
    })
}

/// The seed of chunk `i` of a run seeded `seed`: the run's own for the first chunk, a derived one after.
fn chunk_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        seed
    } else {
        Rng::derive(seed, &format!("chunk-{i}")).below(usize::MAX) as u64
    }
}

/// Samples `n` states of shape `shape` chunk by chunk, holding one chunk at a time: chunk `i` is the next
/// `chunk` rows of the noise [`noise`]`(n, shape, seed)` draws and gets the seed [`in_chunks`] gives it, so the
/// samples are those of `in_chunks` on the whole noise. `run(noise, seed, start)` samples rows
/// `start..start + len`; `sink(samples)` receives them in order. Returns the NFE of the costliest chunk.
pub fn stream(
    n: usize,
    shape: &[usize],
    seed: u64,
    chunk: usize,
    device: &Device,
    mut run: impl FnMut(&Tensor, u64, usize) -> Result<Sampled>,
    mut sink: impl FnMut(&Tensor) -> Result<()>,
) -> Result<usize> {
    let mut rng = Rng::derive(seed, "noise");
    let mut nfe = 0;
    for (i, start) in (0..n).step_by(chunk.max(1)).enumerate() {
        let len = chunk.max(1).min(n - start);
        let z = rng.normal_tensor(state::batch_shape(len, shape), DType::F32, device)?;
        let out = run(&z, chunk_seed(seed, i), start)?;
        nfe = nfe.max(out.nfe);
        sink(&out.x)?;
    }
    Ok(nfe)
}

/// Seeded `N(0, I)` noise for `n` states of shape `shape` (`n × shape…`), f32.
pub fn noise(n: usize, shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    Rng::derive(seed, "noise").normal_tensor(state::batch_shape(n, shape), DType::F32, device)
}

/// How a flow map walks the grid.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sampler {
    /// `x ← f(x, t_i, t_{i+1})`.
    Deterministic,
    /// Multistep consistency sampling (Song et al. 2023): jump to data, `x̂0 = f(x, t_i, 0)`, then re-noise
    /// to the next time along the path, `x = α_{t_{i+1}}·x̂0 + σ_{t_{i+1}}·z` (on the linear path
    /// `(1 − t_{i+1})·x̂0 + t_{i+1}·z`). The sampler for consistency models.
    Consistency,
    /// CTM's γ-sampling (Kim et al. 2024): jump to `ŝ = (1 − γ)·t_{i+1}`, then re-noise forward to `s = t_{i+1}`
    /// along the path: `x = (α_s/α_ŝ)·x_ŝ + sqrt(σ_s² − (α_s σ_ŝ/α_ŝ)²)·z`, on the linear path
    /// `((1 − s)/(1 − ŝ))·x_ŝ + sqrt(s² − ((1 − s) ŝ/(1 − ŝ))²)·z`.
    /// `γ = 0` is deterministic, `γ = 1` the consistency sampler.
    Gamma { gamma: f64 },
}

impl Sampler {
    /// Parses `deterministic`, `consistency` or `gamma:G`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "deterministic" => Ok(Sampler::Deterministic),
            "consistency" => Ok(Sampler::Consistency),
            _ => match s.strip_prefix("gamma:").map(str::parse::<f64>) {
                Some(Ok(g)) if (0.0..=1.0).contains(&g) => Ok(Sampler::Gamma { gamma: g }),
                _ => Err(Error::arg(format!(
                    "unknown sampler '{s}' (expected deterministic, consistency or gamma:G with G in [0, 1])"
                ))),
            },
        }
    }

    /// Whether the sampler only ever evaluates the map at `s = 0`.
    pub fn boundary_only(self) -> bool {
        matches!(self, Sampler::Consistency) || matches!(self, Sampler::Gamma { gamma } if gamma == 1.0)
    }
}

/// The one sampler: walks `grid` from `noise` at `t = 1` with `map`, by `sampler`, under `cx` (its
/// condition, the path the stochastic samplers re-noise along and the seed of that re-noising). One NFE per
/// grid step.
pub fn sample_with(
    map: &dyn FlowMap,
    noise: &Tensor,
    grid: &TimeGrid,
    sampler: Sampler,
    cx: &SampleContext<'_>,
) -> Result<Sampled> {
    let gamma = match sampler {
        Sampler::Deterministic => return sample_map(map, noise, grid, cx.cond),
        Sampler::Consistency => 1.0,
        Sampler::Gamma { gamma } => gamma,
    };
    let counted = CountedMap::new(map);
    let b = noise.dim(0)?;
    let mut rng = Rng::derive(cx.seed, "renoise");
    let col = |v: f64| -> Result<Tensor> { Ok(Tensor::full(v, (b, 1), noise.device())?.to_dtype(noise.dtype())?) };
    let mut x = noise.clone();
    for w in grid.times().windows(2) {
        let (t, s) = (w[0], w[1]);
        let s_hat = (1.0 - gamma) * s;
        x = no_grad(|| counted.map(&x, &col(t)?, &col(s_hat)?, cx.cond))?;
        if s > s_hat {
            let z = rng.normal_tensor(noise.shape(), noise.dtype(), noise.device())?;
            // x_s = α_s x0 + σ_s z given x_ŝ = α_ŝ x0 + σ_ŝ z': scale by α_s/α_ŝ, add the missing variance.
            let ((alpha_s, sigma_s), (alpha_hat, sigma_hat)) = (cx.path.alpha_sigma(s)?, cx.path.alpha_sigma(s_hat)?);
            let keep = alpha_s / alpha_hat;
            let sd = (sigma_s * sigma_s - (keep * sigma_hat).powi(2)).max(0.0).sqrt();
            x = ((x * keep)? + (z * sd)?)?;
        }
    }
    Ok(Sampled { x, nfe: counted.nfe() })
}

/// The grid powers [`select_grid`] tries by default: from `t_1 = 0.79` to `t_1 = 0.125` at two steps.
pub const GRID_POWERS: [f64; 7] = [
    1.0 / 3.0,
    0.5,
    std::f64::consts::FRAC_1_SQRT_2,
    1.0,
    std::f64::consts::SQRT_2,
    2.0,
    3.0,
];

/// The outcome of [`select_grid`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridChoice {
    /// The winning power ρ and its grid ([`TimeGrid::power`]).
    pub rho: f64,
    pub grid: TimeGrid,
    /// `(ρ, validation energy distance)` for every candidate, in the order tried.
    pub scores: Vec<(f64, f64)>,
}

/// Chooses the `k`-step schedule of `map` like any other hyperparameter: samples `n` points with each
/// power grid `TimeGrid::power(k, ρ)`, `ρ ∈ powers`, walked by `sampler`, and keeps the one whose energy
/// distance to `validation` (`n_v × d`, row-major) is smallest (the first on ties).
///
/// A learned map is exact on no grid, and which grid hides its errors best differs between maps: on
/// checkerboard a MeanFlow map's 2-step energy distance is 0.00056 through `t = 0.5` and 0.00022 through
/// `t = 0.25`, an LMD map's 0.00051 and 0.00032 through `t = 0.7`. `validation` must be independent of the
/// data the choice is finally scored on (another draw), or the score is biased in the grid's favour.
/// The validation noise is derived from `cx.seed` apart from [`noise`]'s. Deterministic for a given seed. In one
/// and two dimensions the distance sorts projections (a second at 200,000 points); above two it sums all
/// pairs, `O(n · n_v)`, so keep both to a few thousand there.
#[allow(clippy::too_many_arguments)]
pub fn select_grid(
    map: &dyn FlowMap,
    k: usize,
    sampler: Sampler,
    powers: &[f64],
    validation: &[f64],
    n: usize,
    cx: &SampleContext<'_>,
    device: &Device,
) -> Result<GridChoice> {
    let (shape, seed) = (map.state_shape(), cx.seed);
    let d = state::numel(&shape);
    if powers.is_empty() || validation.is_empty() || validation.len() % d != 0 {
        return Err(Error::arg(format!(
            "grid selection needs candidate powers and validation data of dimension {d}"
        )));
    }
    let z = Rng::derive(seed, "grid-validation").normal_tensor(state::batch_shape(n, &shape), DType::F32, device)?;
    let mut scores = Vec::with_capacity(powers.len());
    let mut best: Option<(f64, f64, TimeGrid)> = None;
    for &rho in powers {
        let grid = TimeGrid::power(k, rho)?;
        let x = sample_with(map, &z, &grid, sampler, cx)?.x;
        let x = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let e = crate::metrics::energy_distance(&x, validation, d);
        scores.push((rho, e));
        // NaN never wins: a diverged grid is skipped.
        if best.as_ref().map_or(e.is_finite(), |b| e < b.1) {
            best = Some((rho, e, grid));
        }
    }
    let (rho, _, grid) = best.ok_or_else(|| Error::arg("every candidate grid gave a non-finite energy distance"))?;
    Ok(GridChoice { rho, grid, scores })
}
