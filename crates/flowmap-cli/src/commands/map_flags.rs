//! The settings of the flow-map objectives and of a fresh student network, shared by `distill` and `train`.

use anyhow::{bail, Result};
use clap::Args;
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::objective::{
    DistillConfig, EpsSchedule, JvpMode, MeanFlowTangent, MeanFlowVelocity, Method, TargetNet, TimeDistribution,
    Weighting,
};
use flowmap::pipeline::RunConfig;

use crate::arch::ArchFlags;

/// Settings of the flow-map objectives and of a fresh student network.
#[derive(Args)]
pub struct MapFlags {
    /// Fixed teacher step fraction ε of the discrete objectives (default: annealed 0.5 → 0.02).
    #[arg(long)]
    pub eps: Option<f64>,
    /// Fraction of each batch on the diagonal s = t.
    #[arg(long)]
    pub diagonal_fraction: Option<f64>,
    /// Spacing ρ of the consistency-distillation grid t_k = (k/N)^ρ (cm only; 1 is uniform, default 4).
    #[arg(long)]
    pub cm_time_power: Option<f64>,
    /// Fraction of the off-diagonal pairs on the jumps of 1-, 2-, 4- and 8-step uniform grids.
    #[arg(long)]
    pub grid_fraction: Option<f64>,
    /// Weighting: constant, normalized or adaptive.
    #[arg(long)]
    pub weighting: Option<String>,
    /// Target network θ⁻: current or ema.
    #[arg(long)]
    pub target: Option<String>,
    /// (t, s) distribution: uniform or logit-normal.
    #[arg(long)]
    pub times: Option<String>,
    /// Tangents of the continuous-time objectives: exact (forward-mode JVP) or fd (finite differences).
    #[arg(long)]
    pub jvp: Option<String>,
    /// MeanFlow's JVP tangent in x: conditional (x1 − x0, the default) or model (the network's own diagonal).
    #[arg(long)]
    pub meanflow_tangent: Option<String>,
    /// The velocity MeanFlow's target is built from: conditional (x1 − x0, the default) or batch (the batch's
    /// estimate of the marginal velocity).
    #[arg(long)]
    pub meanflow_velocity: Option<String>,
    /// A fresh student's backbone (network teachers set the student's themselves; an MLP student defaults
    /// to width 256, depth 3, 8 time frequencies up to 4).
    #[command(flatten)]
    pub arch: ArchFlags,
}

impl MapFlags {
    pub fn objective(&self, base: DistillConfig, method: Method) -> Result<DistillConfig> {
        let mut dcfg = base;
        if let Some(e) = self.eps {
            dcfg.eps = EpsSchedule::Fixed { eps: e };
        }
        if let Some(f) = self.diagonal_fraction {
            dcfg.times.diagonal_fraction = f;
        }
        if let Some(rho) = self.cm_time_power {
            if method != Method::Cm {
                bail!("--cm-time-power applies to --method cm only");
            }
            dcfg.continuous.cm_time_power = rho;
        }
        if let Some(f) = self.grid_fraction {
            dcfg.times.grid_fraction = f;
        }
        if let Some(w) = &self.weighting {
            dcfg.weighting = match w.as_str() {
                "constant" => Weighting::Constant,
                "normalized" => Weighting::Normalized,
                "adaptive" => Weighting::Adaptive { c: 1e-3, p: 1.0 },
                other => bail!("unknown weighting '{other}' (expected constant, normalized or adaptive)"),
            };
        }
        if let Some(t) = &self.target {
            dcfg.target = match t.as_str() {
                "current" => TargetNet::Current,
                "ema" => TargetNet::Ema,
                other => bail!("unknown target '{other}' (expected current or ema)"),
            };
        }
        if let Some(t) = &self.times {
            dcfg.times.distribution = match t.as_str() {
                "uniform" => TimeDistribution::Uniform,
                "logit-normal" => TimeDistribution::LogitNormal { mean: 0.0, std: 1.0 },
                other => bail!("unknown time distribution '{other}' (expected uniform or logit-normal)"),
            };
        }
        if let Some(j) = &self.jvp {
            dcfg.continuous.jvp = match j.as_str() {
                "exact" => JvpMode::Exact,
                "fd" => JvpMode::FiniteDifference { h: 1e-3 },
                other => bail!("unknown JVP mode '{other}' (expected exact or fd)"),
            };
        }
        if let Some(m) = &self.meanflow_tangent {
            dcfg.continuous.meanflow_tangent = meanflow_choice(
                method,
                "tangent",
                m,
                &[
                    ("conditional", MeanFlowTangent::Conditional),
                    ("model", MeanFlowTangent::Model),
                ],
            )?;
        }
        if let Some(m) = &self.meanflow_velocity {
            dcfg.continuous.meanflow_velocity = meanflow_choice(
                method,
                "velocity",
                m,
                &[
                    ("conditional", MeanFlowVelocity::Conditional),
                    ("batch", MeanFlowVelocity::Batch),
                ],
            )?;
        }
        dcfg.validate()?;
        Ok(dcfg)
    }

    pub fn arch(&self, shape: &[usize], classes: Option<usize>, file: &RunConfig) -> Result<Arch> {
        let mlp = MlpConfig {
            time_features: 8,
            max_frequency: 4.0,
            ..MlpConfig::for_shape(shape)
        };
        self.arch.build(shape, classes, file, mlp)
    }
}

/// The value of `--meanflow-<what>` among `options`: an error for any method but meanflow, or an unknown name.
pub fn meanflow_choice<T: Copy>(method: Method, what: &str, name: &str, options: &[(&str, T)]) -> Result<T> {
    if method != Method::Meanflow {
        bail!("--meanflow-{what} applies to --method meanflow only");
    }
    match options.iter().find(|(n, _)| *n == name) {
        Some(&(_, v)) => Ok(v),
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            bail!("unknown MeanFlow {what} '{name}' (expected {})", names.join(" or "))
        }
    }
}
