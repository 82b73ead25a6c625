//! Isotropic Gaussian mixtures, read from a JSON spec: `{"means": [[...], ...], "stds": [...], "weights": [...]}`.
//!
//! The mixture is both a data source and, through [`crate::teacher::GmmVelocity`], a teacher whose velocity
//! field and flow map are known exactly.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// An isotropic Gaussian mixture `Σ_k w_k N(μ_k, σ_k² I)` in any dimension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GaussianMixture {
    pub means: Vec<Vec<f64>>,
    pub stds: Vec<f64>,
    pub weights: Vec<f64>,
}

impl GaussianMixture {
    /// Validates the spec and normalises the weights to sum to one.
    pub fn new(means: Vec<Vec<f64>>, stds: Vec<f64>, weights: Vec<f64>) -> Result<Self> {
        let k = means.len();
        if k == 0 {
            return Err(Error::data("gaussian mixture: 'means' is empty"));
        }
        if stds.len() != k || weights.len() != k {
            return Err(Error::data(format!(
                "gaussian mixture: {k} means but {} stds and {} weights",
                stds.len(),
                weights.len()
            )));
        }
        let d = means[0].len();
        if d == 0 {
            return Err(Error::data("gaussian mixture: means have dimension 0"));
        }
        for (i, m) in means.iter().enumerate() {
            if m.len() != d {
                return Err(Error::data(format!(
                    "gaussian mixture: mean {i} has dimension {} but mean 0 has {d}",
                    m.len()
                )));
            }
            if m.iter().any(|v| !v.is_finite()) {
                return Err(Error::data(format!("gaussian mixture: mean {i} is not finite")));
            }
        }
        if let Some(i) = stds.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::data(format!(
                "gaussian mixture: std {i} must be positive and finite"
            )));
        }
        if let Some(i) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(Error::data(format!(
                "gaussian mixture: weight {i} must be non-negative and finite"
            )));
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(Error::data("gaussian mixture: weights sum to zero"));
        }
        let weights = weights.iter().map(|w| w / total).collect();
        Ok(GaussianMixture { means, stds, weights })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: GaussianMixture =
            serde_json::from_str(text).map_err(|e| Error::data(format!("gaussian mixture spec: {e}")))?;
        GaussianMixture::new(raw.means, raw.stds, raw.weights)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::data(format!("{}: {e}", path.display())))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("mixture serialises")
    }

    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    pub fn components(&self) -> usize {
        self.means.len()
    }

    /// `n` samples, row-major `n × dim`.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f64> {
        let d = self.dim();
        let mut cdf = Vec::with_capacity(self.weights.len());
        let mut acc = 0.0;
        for w in &self.weights {
            acc += w;
            cdf.push(acc);
        }
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let u = rng.uniform() * acc;
            let k = cdf.iter().position(|c| u < *c).unwrap_or(cdf.len() - 1);
            for j in 0..d {
                out.push(self.means[k][j] + self.stds[k] * rng.normal());
            }
        }
        out
    }

    /// A 2-D mixture of three components of different widths, used by tests, the demo and benchmarks.
    pub fn three_widths() -> Self {
        GaussianMixture::new(
            vec![vec![-1.5, -0.5], vec![1.5, -0.5], vec![0.0, 1.5]],
            vec![0.15, 0.4, 0.25],
            vec![0.3, 0.4, 0.3],
        )
        .expect("valid mixture")
    }
}
