//! Configuration shared by the distillation objectives: step size ε, the (t, s) distribution, the
//! weighting and the target network. Serialised into checkpoints and readable from TOML.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// A flow-map training method: distillation from a teacher, or training from data alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Eulerian map distillation, discrete: move the start point along the teacher.
    Emd,
    /// Lagrangian map distillation, discrete: move the end point along the teacher.
    Lmd,
    /// Eulerian map distillation in continuous time (a JVP along the teacher's flow).
    EmdCont,
    /// Lagrangian map distillation in continuous time (a JVP in `s`).
    LmdCont,
    /// Consistency distillation: the map restricted to `s = 0`.
    Cm,
    /// Consistency trajectory model: the teacher solved part of the way, then the target map.
    Ctm,
    /// Progressive flow-map matching: two half steps of a frozen map teach one full step.
    Progressive,
    /// Direct regression on the teacher's dopri5 solutions.
    Direct,
    /// MeanFlow, from data alone.
    Meanflow,
    /// Lagrangian self-distillation, from data alone.
    SelfLmd,
    /// Shortcut self-consistency, from data alone.
    Shortcut,
}

impl Method {
    pub const ALL: [Method; 11] = [
        Method::Emd,
        Method::Lmd,
        Method::EmdCont,
        Method::LmdCont,
        Method::Cm,
        Method::Ctm,
        Method::Progressive,
        Method::Direct,
        Method::Meanflow,
        Method::SelfLmd,
        Method::Shortcut,
    ];

    /// The method's entry in the registry ([`super::registry`]).
    pub fn info(self) -> &'static super::registry::MethodInfo {
        super::registry::info(self)
    }

    /// The name on the command line and in checkpoints.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Whether the method distils a teacher (`flowmap distill`) or trains from data (`flowmap train`).
    pub fn needs_teacher(self) -> bool {
        self.info().needs_teacher
    }

    /// Whether the objective takes a tangent of the map (a JVP, exact or by finite differences).
    pub fn needs_tangent(self) -> bool {
        self.info().needs_tangent
    }

    /// Whether the trained map is defined only for `s = 0` (a consistency model).
    pub fn boundary_only(self) -> bool {
        self.info().boundary_only
    }

    fn list(teacher: bool) -> String {
        Method::ALL
            .iter()
            .filter(|m| m.needs_teacher() == teacher)
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parses a method for `flowmap distill` (teacher-based methods).
    pub fn parse_distill(s: &str) -> Result<Self> {
        let m: Method = s.parse()?;
        if !m.needs_teacher() {
            return Err(Error::arg(format!(
                "'{s}' trains from data without a teacher: use `flowmap train --method {s} --data SPEC`"
            )));
        }
        Ok(m)
    }

    /// Parses a method for `flowmap train` (teacher-free methods).
    pub fn parse_train(s: &str) -> Result<Self> {
        let m: Method = s.parse()?;
        if m.needs_teacher() {
            return Err(Error::arg(format!(
                "'{s}' distils a teacher: use `flowmap distill --teacher T --method {s}` (teacher-free methods: {})",
                Method::list(false)
            )));
        }
        Ok(m)
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
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            Error::arg(format!(
                "unknown method '{s}' (distillation: {}; from data: {})",
                Method::list(true),
                Method::list(false)
            ))
        })
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

/// The smallest gap `t − s` of an off-diagonal pair.
pub const MIN_GAP: f64 = 1e-3;

/// How `(t, s)` pairs are drawn for a batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSampling {
    pub distribution: TimeDistribution,
    /// Fraction of each batch on the diagonal `s = t` (trained by flow matching on the teacher).
    pub diagonal_fraction: f64,
    /// Fraction of the off-diagonal rows on the jumps of uniform few-step grids: `K` uniform on
    /// `{1, 2, 4, …, grid_steps}`, `k` uniform on `{1, …, K}`, `(t, s) = (k/K, (k − 1)/K)`. These are the
    /// dyadic step sizes of shortcut models (Frans et al. 2025), and exactly the pairs a `K`-step sampler
    /// evaluates; the other rows keep `distribution`, so the map stays trained everywhere. Off by default:
    /// on checkerboard it did not help the 2-NFE energy distance (LMD, 5,000 steps, 20,000 points: 0.00044
    /// at 0 and at 0.25, 0.00100 at 0.5; MeanFlow, 16,000 steps, 200,000 points: 0.00056 at 0, 0.00057 at
    /// 0.25).
    #[serde(default)]
    pub grid_fraction: f64,
    /// The finest grid of the grid rows (a power of two).
    #[serde(default = "default_grid_steps")]
    pub grid_steps: usize,
}

fn default_grid_steps() -> usize {
    8
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
        // Grid rows last; none drawn (and the random stream untouched) when the fraction is 0.
        let n_grid = (((b - n_diag) as f64) * self.grid_fraction).round() as usize;
        let n_grid = n_grid.min(b - n_diag);
        let levels = self.grid_steps.max(1).ilog2() as usize + 1;
        for i in 0..b {
            if i >= b - n_grid {
                let k_steps = 1usize << rng.below(levels);
                let k = 1 + rng.below(k_steps);
                t.push(k as f64 / k_steps as f64);
                s.push((k - 1) as f64 / k_steps as f64);
                continue;
            }
            let a = draw(rng);
            if i < n_diag {
                t.push(a);
                s.push(a);
            } else {
                let c = draw(rng);
                // Off-diagonal pairs keep a gap of at least MIN_GAP, so targets divided by (t − s) stay
                // well-conditioned in f32.
                let hi = a.max(c).max(MIN_GAP);
                let lo = a.min(c).min(hi - MIN_GAP).max(0.0);
                t.push(hi);
                s.push(lo);
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

/// How the continuous-time objectives take the tangent of `F`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JvpMode {
    /// Exact forward-mode JVP through the network ([`crate::jvp`]).
    Exact,
    /// Central finite differences with step `h`.
    FiniteDifference { h: f64 },
}

/// Which velocity MeanFlow's JVP moves `x` along when it takes `dF/dt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeanFlowTangent {
    /// The conditional velocity `v_c = x1 − x0` (Geng et al. 2025).
    #[default]
    Conditional,
    /// The network's own instantaneous velocity `F_θ⁻(x_t, t, t)` (its diagonal), as in later MeanFlow
    /// work: the JVP term then carries no sampling noise of `v_c`, and its mean is exact once the diagonal
    /// has learned the marginal velocity. Measured on the analytic mixture it does worse, because until
    /// then the diagonal's error biases the target: relative flow-map error 0.071 against 0.040 after
    /// 4,000 steps and 0.044 against 0.018 after 12,000 (`cargo run --release --example meanflow_bias --
    /// model-tangent|plain [STEPS]`), so the conditional velocity stays the default.
    Model,
}

/// The velocity MeanFlow's target is built from (and, with [`MeanFlowTangent::Conditional`], its JVP
/// tangent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeanFlowVelocity {
    /// The pair's conditional velocity `v_c = x1 − x0` (Geng et al. 2025).
    #[default]
    Conditional,
    /// The batch's estimate of the marginal velocity: the posterior mean of `x1 − x0` given `x_t` when the
    /// batch's data points are the data law, `v̂(x_t, t) = Σ_j w_j·(x_t − x0_j)/t` with
    /// `w_j ∝ exp(−‖x_t − (1 − t)·x0_j‖² / 2t²)`, the row's own `x0` among the `x0_j` (the stable target
    /// field of Xu et al. 2023, "Stable Target Field for Reduced Variance Score Estimation in Diffusion
    /// Models"). It averages out the noise of `v_c` where many data points could have produced `x_t` (large
    /// `t`) and reduces to `v_c` where one could (small `t`); it is biased by treating a batch as the
    /// data law, less so the larger the batch.
    Batch,
}

/// `cm_time_power` of configurations saved before the field existed: the uniform grid.
fn uniform_cm_grid() -> f64 {
    1.0
}

/// Settings of the continuous-time and multi-step objectives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContinuousConfig {
    /// Fraction of training over which the tangent weight `r` ramps from 0 to 1.
    pub warmup: f64,
    /// `c` in the tangent normalisation `ĝ = g / (‖g‖ + c)`.
    pub tangent_c: f64,
    pub jvp: JvpMode,
    /// Number of intervals of the consistency-distillation time grid.
    pub cm_intervals: usize,
    /// The grid's spacing: `t_k = (k/N)^ρ`. `ρ = 1` is uniform; larger `ρ` puts more of the grid near
    /// the data, where the flow turns fastest (the role of ρ in Karras et al.'s σ schedule). On
    /// checkerboard (4,300 steps at batch 512, 200,000-point energy distance, `flowmap distill --method cm
    /// --cm-time-power ρ` then `flowmap eval`), the uniform grid's consistency model gets worse with every
    /// sampling step (1, 2, 4, 8 NFE: 0.0083, 0.017, 0.027, 0.043; its error against Φ_{t→0} is 12-16%
    /// relative at t ≤ 0.125, where four Heun steps of 1/64 cover the fastest part of the flow); ρ = 2 gives
    /// 0.00046 to 0.00072, and ρ = 3, 4, 5, 7 all give 0.00029 ± 0.00002 at 1 NFE and 0.00022 at 8.
    #[serde(default = "uniform_cm_grid")]
    pub cm_time_power: f64,
    /// Heun steps per unit time of the teacher solve in CTM.
    pub ctm_steps_per_unit: usize,
    /// Steps per stage of progressive flow-map matching (the frozen map is refreshed after each).
    pub progressive_stage_steps: usize,
    /// MeanFlow's JVP tangent in `x`.
    pub meanflow_tangent: MeanFlowTangent,
    /// The velocity MeanFlow's target is built from.
    pub meanflow_velocity: MeanFlowVelocity,
}

impl Default for ContinuousConfig {
    fn default() -> Self {
        ContinuousConfig {
            warmup: 0.1,
            tangent_c: 0.1,
            jvp: JvpMode::Exact,
            cm_intervals: 64,
            cm_time_power: 4.0,
            ctm_steps_per_unit: 8,
            progressive_stage_steps: 500,
            meanflow_tangent: MeanFlowTangent::Conditional,
            meanflow_velocity: MeanFlowVelocity::Conditional,
        }
    }
}

/// Configuration of the flow-map objectives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub eps: EpsSchedule,
    pub times: TimeSampling,
    pub weighting: Weighting,
    pub target: TargetNet,
    #[serde(default)]
    pub continuous: ContinuousConfig,
    /// The objective's learning rate relative to the run's (`TrainConfig::lr`): the training loop steps at
    /// `lr · lr_scale`. 1 for every objective but those whose measurements asked for less (see
    /// [`DistillConfig::for_data`]). A fixed setting, unlike the loop's own recovery factor, which a
    /// rollback after non-finite values lowers during the run (it multiplies this one).
    #[serde(default = "unit_lr_scale")]
    pub lr_scale: f64,
}

/// `lr_scale` of configurations saved before the field existed.
fn unit_lr_scale() -> f64 {
    1.0
}

impl Default for DistillConfig {
    /// Defaults chosen by measurement: `flowmap bench ablation` on the analytic mixture
    /// (`bench/ablation/ablation.md`: normalised weighting, diagonal fraction 0.25, current weights and uniform
    /// pairs each beat their alternatives) and an ε sweep of EMD on checkerboard at 5,000 steps, where annealing
    /// to 0.02 beat 0.05 and 0.01 at 2 NFE (energy distance 0.00071 against 0.00084 and 0.00082). Short runs
    /// favour a larger final ε (0.05 wins the 600-step ablation).
    fn default() -> Self {
        DistillConfig {
            eps: EpsSchedule::Annealed { start: 0.5, end: 0.02 },
            times: TimeSampling {
                distribution: TimeDistribution::Uniform,
                diagonal_fraction: 0.25,
                grid_fraction: 0.0,
                grid_steps: 8,
            },
            weighting: Weighting::Normalized,
            target: TargetNet::Current,
            continuous: ContinuousConfig::default(),
            lr_scale: 1.0,
        }
    }
}

impl DistillConfig {
    /// The defaults for `method`: [`DistillConfig::default`], except where a measurement prescribes
    /// otherwise. MeanFlow trains with the plain squared error (see [`crate::objective::MeanFlow`] for why
    /// its paper's adaptive weight is biased in low dimension) on uniform pairs with 25% of the batch on the
    /// diagonal: `flowmap train --method meanflow --data checkerboard --steps 8000 --batch 512` gave 2-NFE
    /// energy distance 0.0012, against 0.0035 with logit-normal(0, 1) times and 75% on the diagonal
    /// (`--times logit-normal --diagonal-fraction 0.75`, close to the paper's logit-normal(−0.4, 1)) and
    /// 0.0014 with uniform times and 75%.
    /// Its target starts from the batch's estimate of the marginal velocity ([`MeanFlowVelocity::Batch`])
    /// rather than `x1 − x0`: `flowmap train --method meanflow --data checkerboard --steps 8000 --batch 512
    /// --seed 1 [--meanflow-velocity conditional]`, 200,000-point energy distance at 1, 2 and 4 NFE on the
    /// grid `ρ = 2` (`flowmap eval --grid-power 2`): 0.00049, 0.00015, 0.00013 against 0.00111, 0.00049,
    /// 0.00040 with `x1 − x0`, for 17% more time per step.
    /// The consistency model takes its targets from the EMA of the weights, as in Song et al. 2023's
    /// consistency distillation: on checkerboard (4,300 steps at batch 512, 200,000-point energy distance,
    /// `flowmap distill --method cm [--target ema]`) 1-NFE 0.00026 and 0.00025 over two seeds against 0.00029
    /// and 0.00030 with the current weights, 2-NFE (through `t = 0.3`) 0.00019 and 0.00020 against 0.00022;
    /// an adaptive (pseudo-Huber-like, `p = 0.5`) weight and grids of 32 or 128 intervals did not help.
    /// Self-LMD takes its targets from the EMA of the weights: with the current weights its own diagonal
    /// feeds back into its targets and it diverged on checkerboard within 7,000 steps (`flowmap bench
    /// compare`), while with the EMA it trained stably for 10,000 steps (2-NFE energy distance 0.0058).
    pub fn for_method(method: Method) -> Self {
        let mut c = DistillConfig::default();
        match method {
            Method::Meanflow => {
                c.weighting = Weighting::Constant;
                c.continuous.meanflow_velocity = MeanFlowVelocity::Batch;
            }
            Method::SelfLmd | Method::Cm => c.target = TargetNet::Ema,
            _ => {}
        }
        c
    }

    /// The defaults for `method` on data whose examples have shape `state_shape` (`[d]` for points,
    /// `[C, H, W]` for images), labelled or not: [`DistillConfig::for_method`], then what the data changes.
    ///
    /// MeanFlow's batch estimate of the marginal velocity treats the batch as an unconditional data law,
    /// and in image dimensions its posterior weights degenerate to the row's own `x0`: on labelled data or
    /// images it starts from the paper's conditional velocity `x1 − x0`. On images it also takes the
    /// paper's adaptive weight `1/(‖Δ‖² + 10⁻³)` (`‖Δ‖²` the row's mean squared error; its bias, which
    /// ruled it out on points, shrinks with the dimension). Fine-tuning the shipped MNIST teacher for 500
    /// steps at batch 64 (`cargo run --release --example mnist_probe -- meanflow 500
    /// [weighting=constant]`, 500 samples, seed 0), the plain
    /// squared error's high-variance long-jump rows pull the small steps off the data: class accuracy at
    /// 1, 2, 4, 8 NFE 95.2, 92.0, 92.8, 91.2% (FD 90, 48, 47, 48) against 98.6, 94.4, 96.0, 95.6% (FD 110,
    /// 40, 40, 40) with the adaptive weight. (`p = 0.5`: 98.0, 94.8, 94.8, 94.4%; 75% of the batch on the
    /// diagonal with the plain loss: 94.4, 89.6, 91.0, 90.2%.)
    ///
    /// The methods whose diagonal is their own teacher put most of an image batch on the diagonal instead
    /// of 25%: shortcut 75%, as its paper does, self-LMD 90%. In image dimensions the off-diagonal
    /// targets' errors reach the diagonal through the shared weights, and a diagonal that drifts teaches
    /// the map its drift. The same fine-tune (`-- self-lmd 500 [diag=0.25|0.75]`, `-- shortcut 500
    /// [diag=0.25]`): self-LMD's class accuracy at 1, 2, 4, 8 NFE 84.0, 78.4, 79.0, 74.0% (FD 78, 78, 76,
    /// 82, speckled digits) against 96.4, 93.6, 92.8, 91.2% (FD 84, 54, 46, 42); shortcut's 96.2, 93.0,
    /// 92.6, 91.8% (FD 83, 49, 47, 46) against 98.0, 95.0, 94.2, 93.2% (FD 83, 42, 37, 35). (Self-LMD with
    /// the adaptive weight collapsed to 58–67%; with the current weights as its target it diverged, as on
    /// checkerboard; with a fixed ε = 0.1 it reached 81–91%.) Self-LMD's accuracy keeps rising with the
    /// fraction, at some cost in FD: at 0.5, 96.0, 93.2, 92.0, 91.0% (FD 67, 53, 47, 46); at 0.9, 97.6,
    /// 95.0, 94.0, 94.0% (FD 88, 59, 50, 45); `bench mnist` at 0.75 had it 1–2 points below the teacher's
    /// dopri5 at 4 and 8 NFE.
    ///
    /// Continuous LMD on images steps at 0.4 of the run's learning rate, with `tangent_c = 0.01`. Its
    /// normalised tangent step is unstable at large gaps in image dimensions: at the bench's 5·10⁻⁴ its
    /// class accuracy at 1 and 2 NFE was 87.2 and 89.4% (FD 65, 49). At 2·10⁻⁴ with `c = 0.01`, 500 steps:
    /// 96.8, 91.0% (FD 76, 48) (`mnist_probe -- lmd-cont 500 tangent_c=0.01 lr=2e-4`, before the scale
    /// existed). A quarter of the off-diagonal rows on the few-step grids' jumps (`grid_fraction = 0.25`)
    /// lifted that short run's 2-NFE accuracy to 96.0% (98.8, 96.0, 94.6, 93.8% at 1, 2, 4, 8 NFE, FD 126,
    /// 55, 42, 37) and was the recipe until the bench's budget grew to 2,000 steps, where it costs more than
    /// it gives: `bench mnist` at 2,000 steps had lmd-cont at 1-NFE FD 109 and, on the uniform 4-step grid
    /// alone, 90.5% accuracy, and over three evaluation seeds (`flowmap eval --n 1000 --seed 0|1|2`) its
    /// 4-step accuracy is 90.5, 92.1, 91.6% against the teacher's dopri5 on the same noise 94.4, 94.9,
    /// 92.8% (3, 5, 6 and 8 steps, or 4 steps on a ρ = √2 or √½ power grid, are within 2 points: the
    /// exact grid jumps the rows trained are where the map is worst). Without the grid rows
    /// (`mnist_probe -- lmd-cont 2000 grid=0`, the same three seeds): 1-NFE FD 85–86 at 98.8–99.4%, 2-NFE
    /// FD 40–42 at 96.4–97.1%, 4-NFE FD 26–27 at 94.3, 95.1, 94.9%, 8-NFE FD 24–25 at 93.4–94.5% (FD with
    /// them: 106–109, 43–45, 25–27 and 23–25). At 1,000 steps it is a trade: without the grid rows 1-NFE FD
    /// 75 against 214–218 and a higher accuracy at every NFE (4 steps: 95.6–96.0% against 93.5–94.4%), but
    /// 2-NFE FD 59 against 32–34 and 4-NFE 31–33 against 26–29.
    pub fn for_data(method: Method, state_shape: &[usize], labelled: bool) -> Self {
        let mut c = DistillConfig::for_method(method);
        let image = state_shape.len() == 3;
        if method == Method::Meanflow {
            if labelled || image {
                c.continuous.meanflow_velocity = MeanFlowVelocity::Conditional;
            }
            if image {
                c.weighting = Weighting::Adaptive { c: 1e-3, p: 1.0 };
            }
        }
        match method {
            Method::SelfLmd if image => c.times.diagonal_fraction = 0.9,
            Method::Shortcut if image => c.times.diagonal_fraction = 0.75,
            Method::LmdCont if image => {
                c.lr_scale = 0.4;
                c.continuous.tangent_c = 0.01;
            }
            _ => {}
        }
        c
    }

    pub fn validate(&self) -> Result<()> {
        self.eps.validate()?;
        if !(self.lr_scale > 0.0 && self.lr_scale.is_finite()) {
            return Err(Error::Config(format!(
                "lr_scale must be positive, got {}",
                self.lr_scale
            )));
        }
        if !(0.0..1.0).contains(&self.times.diagonal_fraction) {
            return Err(Error::Config("diagonal_fraction must lie in [0, 1)".into()));
        }
        let grid = &self.times;
        if !(0.0..=1.0).contains(&grid.grid_fraction) || !grid.grid_steps.is_power_of_two() {
            return Err(Error::Config(format!(
                "grid pairs need grid_fraction in [0, 1] and grid_steps a power of two, got {} and {}",
                grid.grid_fraction, grid.grid_steps
            )));
        }
        if let TimeDistribution::LogitNormal { std, .. } = self.times.distribution {
            if !(std > 0.0) {
                return Err(Error::Config("logit-normal std must be positive".into()));
            }
        }
        let c = &self.continuous;
        if !(c.warmup >= 0.0 && c.tangent_c > 0.0 && c.cm_intervals > 0 && c.ctm_steps_per_unit > 0) {
            return Err(Error::Config(
                "continuous settings need warmup ≥ 0, tangent_c > 0 and positive step counts".into(),
            ));
        }
        if !(c.cm_time_power >= 1.0 && c.cm_time_power.is_finite()) {
            return Err(Error::Config(format!(
                "cm_time_power must be at least 1, got {}",
                c.cm_time_power
            )));
        }
        if let JvpMode::FiniteDifference { h } = c.jvp {
            if !(h > 0.0) {
                return Err(Error::Config("finite-difference step h must be positive".into()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_pairs_are_the_jumps_of_dyadic_grids_and_the_other_rows_are_unchanged() {
        let plain = DistillConfig::default().times;
        let grid = TimeSampling {
            grid_fraction: 0.5,
            grid_steps: 4,
            ..plain
        };
        let (b, n_off) = (400, 300);
        let (t, s, n_diag) = grid.sample(b, &mut Rng::new(3));
        assert_eq!(n_diag, 100);
        let mut seen = std::collections::BTreeSet::new();
        for (&t, &s) in t[b - n_off / 2..].iter().zip(&s[b - n_off / 2..]) {
            let k_steps = (1.0 / (t - s)).round();
            assert!([1.0, 2.0, 4.0].contains(&k_steps), "gap {}", t - s);
            assert!(
                (t * k_steps - (t * k_steps).round()).abs() < 1e-12,
                "t = {t} is off the grid"
            );
            seen.insert(((t * 4.0).round() as u32, (s * 4.0).round() as u32));
        }
        // Every jump of the 1-, 2- and 4-step grids (1 + 2 + 4 of them) shows up among 150 rows.
        assert_eq!(seen.len(), 7);
        // The diagonal and the first off-diagonal rows follow the plain law; with no grid rows the
        // random stream is the one a configuration without the field draws.
        let (t0, s0, _) = plain.sample(b, &mut Rng::new(3));
        assert_eq!(t[..n_diag], t0[..n_diag]);
        assert_eq!(s[..n_diag], s0[..n_diag]);
        assert!(s[n_diag..b - n_off / 2].iter().zip(&t[n_diag..]).all(|(s, t)| s < t));
        let bad = DistillConfig {
            times: TimeSampling { grid_steps: 6, ..grid },
            ..DistillConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
