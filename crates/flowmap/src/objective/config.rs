//! Configuration shared by the distillation objectives: step size ε, the (t, s) distribution, the
//! weighting and the target network. Serialised into checkpoints and readable from TOML.

use serde::{Deserialize, Serialize};

use super::registry::Method;
use crate::{Error, Result, Rng};

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
    /// Exact forward-mode JVP through the network ([`crate::layers::Jvp`]).
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
    /// 4,000 steps and 0.044 against 0.018 after 12,000 (`cargo run --release -p flowmap-cli --example meanflow_bias --
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

/// What a method's recipe may depend on: whether the data are images (`C × H × W` states) and labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataKind {
    pub image: bool,
    pub labelled: bool,
}

impl DataKind {
    /// The kind of data with states of `state_shape`, labelled or not.
    pub fn of(state_shape: &[usize], labelled: bool) -> Self {
        DataKind {
            image: state_shape.len() == 3,
            labelled,
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
    /// The defaults for `method` on unlabelled points: [`DistillConfig::for_data`] with a 2-D state.
    pub fn for_method(method: Method) -> Self {
        DistillConfig::for_data(method, &[2], false)
    }

    /// The defaults for `method` on data whose examples have shape `state_shape` (`[d]` for points,
    /// `[C, H, W]` for images), labelled or not: [`DistillConfig::default`], then the method's own recipe
    /// (its registry entry's `recipe`, written beside its loss with the measurements that chose it).
    pub fn for_data(method: Method, state_shape: &[usize], labelled: bool) -> Self {
        let mut c = DistillConfig::default();
        (method.info().recipe)(&mut c, DataKind::of(state_shape, labelled));
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
