//! Configuration shared by the distillation objectives: step size ε, the (t, s) distribution, the
//! weighting and the target network. Serialised into checkpoints and readable from TOML.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// A distillation method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Eulerian map distillation: move the start point along the teacher.
    Emd,
    /// Lagrangian map distillation: move the end point along the teacher.
    Lmd,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Emd => "emd",
            Method::Lmd => "lmd",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "emd" => Ok(Method::Emd),
            "lmd" => Ok(Method::Lmd),
            _ => Err(Error::arg(format!("unknown method '{s}' (expected emd or lmd)"))),
        }
    }
}

/// The step fraction ε of the teacher step in the discrete objectives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EpsSchedule {
    Fixed {
        eps: f64,
    },
    /// Geometric interpolation from `start` to `end` over training.
    Annealed {
        start: f64,
        end: f64,
    },
}

impl EpsSchedule {
    pub fn at(&self, progress: f64) -> f64 {
        match *self {
            EpsSchedule::Fixed { eps } => eps,
            EpsSchedule::Annealed { start, end } => start * (end / start).powf(progress.clamp(0.0, 1.0)),
        }
    }
    fn validate(&self) -> Result<()> {
        let ok = |e: f64| e > 0.0 && e <= 1.0;
        let good = match *self {
            EpsSchedule::Fixed { eps } => ok(eps),
            EpsSchedule::Annealed { start, end } => ok(start) && ok(end),
        };
        if good {
            Ok(())
        } else {
            Err(Error::Config(format!("ε must lie in (0, 1], got {self:?}")))
        }
    }
}

/// The marginal law of the times of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TimeDistribution {
    /// `(t, s)` uniform on the triangle `0 ≤ s ≤ t ≤ 1` (the max and min of two uniforms).
    Uniform,
    /// The max and min of two `sigmoid(N(mean, std²))` draws.
    LogitNormal { mean: f64, std: f64 },
}

/// How `(t, s)` pairs are drawn for a batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimeSampling {
    pub distribution: TimeDistribution,
    /// Fraction of each batch on the diagonal `s = t` (trained by flow matching on the teacher).
    pub diagonal_fraction: f64,
}

impl TimeSampling {
    /// Returns `(t, s, n_diag)`, diagonal rows first.
    pub fn sample(&self, b: usize, rng: &mut Rng) -> (Vec<f64>, Vec<f64>, usize) {
        let n_diag = ((b as f64) * self.diagonal_fraction).round() as usize;
        let n_diag = n_diag.min(b);
        let mut t = Vec::with_capacity(b);
        let mut s = Vec::with_capacity(b);
        let draw = |rng: &mut Rng| match self.distribution {
            TimeDistribution::Uniform => rng.uniform(),
            TimeDistribution::LogitNormal { mean, std } => 1.0 / (1.0 + (-(mean + std * rng.normal())).exp()),
        };
        for i in 0..b {
            let a = draw(rng);
            if i < n_diag {
                t.push(a);
                s.push(a);
            } else {
                let c = draw(rng);
                t.push(a.max(c));
                s.push(a.min(c));
            }
        }
        (t, s, n_diag)
    }
}

/// The per-pair weight `w(t, s)` of the squared residual `‖f_θ(x_t, t, s) − ŷ‖²`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Weighting {
    /// `w = 1`: the raw squared error of the maps.
    Constant,
    /// `w = 1/(ε(t − s))²`: the residual divided by the length of the teacher step.
    Normalized,
    /// The normalised residual `r` reweighted by `1/(sg(r) + c)^p` (MeanFlow's adaptive weight).
    Adaptive { c: f64, p: f64 },
}

/// Which parameters produce the stop-gradient target `θ⁻`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetNet {
    /// The current parameters under stop-gradient.
    Current,
    /// The exponential moving average of the parameters.
    Ema,
}

/// Configuration of the discrete distillation objectives (EMD and LMD).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    pub eps: EpsSchedule,
    pub times: TimeSampling,
    pub weighting: Weighting,
    pub target: TargetNet,
}

impl Default for DistillConfig {
    /// Defaults chosen by `flowmap bench ablation` (see `bench/ablation.md`).
    fn default() -> Self {
        DistillConfig {
            eps: EpsSchedule::Annealed { start: 0.5, end: 0.05 },
            times: TimeSampling {
                distribution: TimeDistribution::Uniform,
                diagonal_fraction: 0.25,
            },
            weighting: Weighting::Normalized,
            target: TargetNet::Current,
        }
    }
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        self.eps.validate()?;
        if !(0.0..1.0).contains(&self.times.diagonal_fraction) {
            return Err(Error::Config("diagonal_fraction must lie in [0, 1)".into()));
        }
        if let TimeDistribution::LogitNormal { std, .. } = self.times.distribution {
            if !(std > 0.0) {
                return Err(Error::Config("logit-normal std must be positive".into()));
            }
        }
        if let Weighting::Adaptive { c, p } = self.weighting {
            if !(c > 0.0 && p >= 0.0) {
                return Err(Error::Config("adaptive weighting needs c > 0 and p ≥ 0".into()));
            }
        }
        Ok(())
    }
}
