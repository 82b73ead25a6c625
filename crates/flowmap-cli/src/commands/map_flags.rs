//! The settings of the flow-map objectives and of a fresh student network, shared by `distill` and `train`.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use flowmap::backbone::Arch;
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
    #[arg(long, value_enum)]
    pub weighting: Option<WeightingFlag>,
    /// Target network θ⁻: current or ema.
    #[arg(long, value_enum)]
    pub target: Option<TargetFlag>,
    /// (t, s) distribution: uniform or logit-normal.
    #[arg(long, value_enum)]
    pub times: Option<TimesFlag>,
    /// Tangents of the continuous-time objectives: exact (forward-mode JVP) or fd (finite differences).
    #[arg(long, value_enum)]
    pub jvp: Option<JvpFlag>,
    /// MeanFlow's JVP tangent in x: conditional (x1 − x0, the default) or model (the network's own diagonal).
    #[arg(long, value_enum)]
    pub meanflow_tangent: Option<MeanFlowTangentFlag>,
    /// The velocity MeanFlow's target is built from: conditional (x1 − x0, the default) or batch (the batch's
    /// estimate of the marginal velocity).
    #[arg(long, value_enum)]
    pub meanflow_velocity: Option<MeanFlowVelocityFlag>,
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
        if let Some(w) = self.weighting {
            dcfg.weighting = w.into();
        }
        if let Some(t) = self.target {
            dcfg.target = t.into();
        }
        if let Some(t) = self.times {
            dcfg.times.distribution = t.into();
        }
        if let Some(j) = self.jvp {
            dcfg.continuous.jvp = j.into();
        }
        if let Some(m) = self.meanflow_tangent {
            meanflow_only(method, "tangent")?;
            dcfg.continuous.meanflow_tangent = m.into();
        }
        if let Some(m) = self.meanflow_velocity {
            meanflow_only(method, "velocity")?;
            dcfg.continuous.meanflow_velocity = m.into();
        }
        dcfg.validate()?;
        Ok(dcfg)
    }

    pub fn arch(&self, shape: &[usize], classes: Option<usize>, file: &RunConfig) -> Result<Arch> {
        self.arch
            .build(shape, classes, file, &flowmap::pipeline::student_defaults())
    }
}

/// `--meanflow-<what>` is an error for any method but meanflow.
fn meanflow_only(method: Method, what: &str) -> Result<()> {
    if method != Method::Meanflow {
        bail!("--meanflow-{what} applies to --method meanflow only");
    }
    Ok(())
}

/// `--weighting`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightingFlag {
    /// `w = 1`: the raw squared error of the maps.
    Constant,
    /// `w = 1/(ε(t − s))²`.
    Normalized,
    /// `1/(sg(r) + 10⁻³)`: MeanFlow's adaptive weight.
    Adaptive,
}

impl From<WeightingFlag> for Weighting {
    fn from(w: WeightingFlag) -> Self {
        match w {
            WeightingFlag::Constant => Weighting::Constant,
            WeightingFlag::Normalized => Weighting::Normalized,
            WeightingFlag::Adaptive => Weighting::Adaptive { c: 1e-3, p: 1.0 },
        }
    }
}

/// `--target`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetFlag {
    /// The current parameters under stop-gradient.
    Current,
    /// The EMA of the parameters.
    Ema,
}

impl From<TargetFlag> for TargetNet {
    fn from(t: TargetFlag) -> Self {
        match t {
            TargetFlag::Current => TargetNet::Current,
            TargetFlag::Ema => TargetNet::Ema,
        }
    }
}

/// `--times`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TimesFlag {
    /// `(t, s)` uniform on the triangle `0 ≤ s ≤ t ≤ 1`.
    Uniform,
    /// The max and min of two `sigmoid(N(0, 1))` draws.
    LogitNormal,
}

impl From<TimesFlag> for TimeDistribution {
    fn from(t: TimesFlag) -> Self {
        match t {
            TimesFlag::Uniform => TimeDistribution::Uniform,
            TimesFlag::LogitNormal => TimeDistribution::LogitNormal { mean: 0.0, std: 1.0 },
        }
    }
}

/// `--jvp`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum JvpFlag {
    /// The exact forward-mode JVP.
    Exact,
    /// Central finite differences, `h = 10⁻³`.
    Fd,
}

impl From<JvpFlag> for JvpMode {
    fn from(j: JvpFlag) -> Self {
        match j {
            JvpFlag::Exact => JvpMode::Exact,
            JvpFlag::Fd => JvpMode::FiniteDifference { h: 1e-3 },
        }
    }
}

/// `--meanflow-tangent`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MeanFlowTangentFlag {
    /// The conditional velocity `x1 − x0`.
    Conditional,
    /// The network's own diagonal.
    Model,
}

impl From<MeanFlowTangentFlag> for MeanFlowTangent {
    fn from(m: MeanFlowTangentFlag) -> Self {
        match m {
            MeanFlowTangentFlag::Conditional => MeanFlowTangent::Conditional,
            MeanFlowTangentFlag::Model => MeanFlowTangent::Model,
        }
    }
}

/// `--meanflow-velocity`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MeanFlowVelocityFlag {
    /// The conditional velocity `x1 − x0`.
    Conditional,
    /// The batch's estimate of the marginal velocity.
    Batch,
}

impl From<MeanFlowVelocityFlag> for MeanFlowVelocity {
    fn from(m: MeanFlowVelocityFlag) -> Self {
        match m {
            MeanFlowVelocityFlag::Conditional => MeanFlowVelocity::Conditional,
            MeanFlowVelocityFlag::Batch => MeanFlowVelocity::Batch,
        }
    }
}
