//! Sampling. One sampler: start from noise at `t = 1` and apply a flow map along a descending time grid
//! `1 = t_0 > t_1 > … > t_k = 0`. A learned map costs one network evaluation (NFE) per step; the teacher's
//! ODE sampler is the same loop over [`SolverMap`], whose NFE is the solver's velocity evaluations.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::flow_map::{CountedMap, FlowMap, SolverMap};
use crate::ode::{self, Solver};
use crate::teacher::{Counted, VelocityField};
use crate::{Error, Result, Rng};

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

/// Applies `map` along `grid` starting from `noise` (the state at `t = 1`).
pub fn run_grid(map: &dyn FlowMap, noise: &Tensor, grid: &TimeGrid) -> Result<Tensor> {
    let b = noise.dim(0)?;
    let mut x = noise.clone();
    for w in grid.times().windows(2) {
        let t = Tensor::full(w[0], (b, 1), noise.device())?.to_dtype(noise.dtype())?;
        let s = Tensor::full(w[1], (b, 1), noise.device())?.to_dtype(noise.dtype())?;
        x = map.map(&x, &t, &s)?;
    }
    Ok(x)
}

/// k-step flow-map sampling: one NFE per grid step.
pub fn sample_map(map: &dyn FlowMap, noise: &Tensor, grid: &TimeGrid) -> Result<Sampled> {
    let counted = CountedMap::new(map);
    let x = run_grid(&counted, noise, grid)?;
    Ok(Sampled { x, nfe: counted.nfe() })
}

/// The teacher's ODE sampler from `t = 1` to `t = 0`; NFE counts velocity evaluations.
pub fn sample_ode(field: &dyn VelocityField, noise: &Tensor, solver: Solver) -> Result<Sampled> {
    let counted = Counted::new(field);
    let map = SolverMap::new(&counted, solver);
    let x = run_grid(&map, noise, &TimeGrid::uniform(1)?)?;
    Ok(Sampled { x, nfe: counted.nfe() })
}

/// Seeded `N(0, I)` noise, `n × dim`, f32.
pub fn noise(n: usize, dim: usize, seed: u64, device: &Device) -> Result<Tensor> {
    Rng::derive(seed, "noise").normal_tensor((n, dim), DType::F32, device)
}
