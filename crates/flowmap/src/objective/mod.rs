//! Training objectives. One training loop ([`crate::train`]) drives every objective through [`Objective`]:
//! the objective draws times, builds its targets and returns a scalar loss; the loop owns the optimiser,
//! the EMA and the data.
//!
//! - [`FlowMatching`]: the teacher `v_φ` (and a flow map's diagonal, its `s → t` limit);
//! - [`Emd`]: Eulerian map distillation, discrete;
//! - [`Lmd`]: Lagrangian map distillation, discrete.
//!
//! The distillation residuals are written in the average-velocity space. With `f = x + (s − t)·F`, both
//! discrete targets take the form `f(x_t, t, s) − ŷ = (s − t)·(F(x_t, t, s) − sg[ε·v + (1 − ε)·F⁻])`, so the
//! normalised residual is computed without the cancellation of subtracting two nearby states.

mod config;
mod consistency;
mod continuous;
mod ctm;
mod direct;
mod emd;
mod fm;
mod lmd;
mod meanflow;
mod progressive;
pub mod registry;
mod self_distill;

use crate::kernels::no_grad;
use candle_core::Tensor;

pub use config::{
    ContinuousConfig, DataKind, DistillConfig, EpsSchedule, JvpMode, MeanFlowTangent, MeanFlowVelocity, TargetNet,
    TimeDistribution, TimeSampling, Weighting,
};
pub use consistency::ConsistencyDistillation;
pub use continuous::{EmdContinuous, LmdContinuous};
pub use ctm::ConsistencyTrajectory;
pub use direct::DirectRegression;
pub use emd::Emd;
pub use fm::FlowMatching;
pub use lmd::Lmd;
pub use meanflow::{batch_velocity, MeanFlow};
pub use progressive::Progressive;
pub use registry::Method;
pub use self_distill::{SelfLmd, Shortcut};

use crate::cond::Cond;
use crate::dist::Shard;
use crate::flow_map::{FiniteDifference, FlowMap, Point, Tangent};
use crate::path::ProbabilityPath;
use crate::state;
use crate::teacher::VelocityField;
use crate::{Error, Result, Rng};

/// What an objective sees at one training step.
pub struct StepContext<'a, M: ?Sized> {
    /// The model being trained, `θ`.
    pub model: &'a M,
    /// The target model `θ⁻`: the EMA of `θ`, or `θ` itself (objectives always stop its gradient).
    pub target: &'a M,
    /// Data `x0`, `B × …` (points `B × D`, images `B × C × H × W`): this rank's rows of the batch.
    pub x0: &'a Tensor,
    /// The whole batch's data (every rank's rows; `x0` itself in one process): the data law of
    /// estimators that average over the batch ([`batch_velocity`]).
    pub batch_x0: &'a Tensor,
    /// Which rows of the global batch `x0` holds ([`crate::dist`]): an objective draws its per-row random
    /// values for the whole global batch and keeps this block, so that a data-parallel run draws what
    /// one process draws.
    pub shard: Shard,
    /// Noise `x1 ~ N(0, I)`, shaped like `x0`.
    pub x1: &'a Tensor,
    /// The batch's condition (its class labels, or none; a guidance scale per row when guidance is
    /// trained into the map).
    pub cond: &'a Cond,
    /// The number of classes of a class-conditional model (its null class is this index), or `None`.
    pub classes: Option<usize>,
    /// The probability path `x_t = α_t·x0 + σ_t·x1` the model is trained on.
    pub path: &'a dyn ProbabilityPath,
    /// Training progress in [0, 1] (for annealed schedules).
    pub progress: f64,
    /// The step number.
    pub step: usize,
    /// The run's seeded random stream.
    pub rng: &'a mut Rng,
}

/// A training objective for models of type `Model` (a velocity field or a flow map).
///
/// The loss is the mean over the batch's rows of a per-row loss, so that a data-parallel run, whose ranks each
/// hold a block of rows ([`StepContext::shard`]), averages to it. Per-row random values are drawn for all
/// `cx.shard.global` rows of the batch and this rank's kept with `cx.shard.local(…)`, so that every rank's
/// stream moves as one process's does; `tests/objective.rs` checks both for every registered method.
pub trait Objective {
    type Model: ?Sized;
    /// The scalar loss of one batch.
    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor>;
    /// What the objective carries from one step to the next (progressive's frozen map), for a training
    /// checkpoint; most objectives carry nothing.
    fn save_state(&self) -> Result<ObjectiveState> {
        Ok(ObjectiveState::default())
    }
    /// Restores what [`Objective::save_state`] returned.
    fn load_state(&self, _state: &ObjectiveState) -> Result<()> {
        Ok(())
    }
}

/// An objective's own state between steps: named tensors and a JSON value.
#[derive(Clone, Debug, Default)]
pub struct ObjectiveState {
    pub tensors: Vec<(String, Tensor)>,
    pub value: serde_json::Value,
}

/// A `B × 1` column from a slice.
pub(crate) fn column(v: &[f64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, (v.len(), 1), like.device())?.to_dtype(like.dtype())?)
}

/// Mean over every non-batch axis of the squared difference, per row: `B × 1`.
pub(crate) fn row_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    state::row_mean(&(a - b)?.sqr()?)
}

/// Draws `(t, s)` for a distillation batch and returns `x_t` on the path, the time columns and the
/// number of leading diagonal rows (`s = t`), all of this rank's rows.
pub(crate) fn draw_pairs<M: ?Sized>(
    cfg: &DistillConfig,
    cx: &mut StepContext<'_, M>,
) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let p = Pairs::draw(cfg, cx)?;
    Ok((p.xt, p.t, p.s, p.n_diag))
}

/// One batch's `(t, s)` pairs: drawn for every row of the global batch (diagonal rows first), and this
/// rank's rows of them with `x_t` on the path.
struct Pairs {
    all_t: Vec<f64>,
    all_s: Vec<f64>,
    all_diag: usize,
    xt: Tensor,
    t: Tensor,
    s: Tensor,
    n_diag: usize,
}

impl Pairs {
    fn draw<M: ?Sized>(cfg: &DistillConfig, cx: &mut StepContext<'_, M>) -> Result<Pairs> {
        let (all_t, all_s, all_diag) = cfg.times.sample(cx.shard.global, cx.rng);
        let t = column(&cx.shard.local(&all_t), cx.x0)?;
        let s = column(&cx.shard.local(&all_s), cx.x0)?;
        let xt = cx.path.interpolate(cx.x0, cx.x1, &t)?;
        let n_diag = cx.shard.count_below(all_diag);
        Ok(Pairs {
            all_t,
            all_s,
            all_diag,
            xt,
            t,
            s,
            n_diag,
        })
    }
}

/// The shared discrete-distillation loss: diagonal rows regress `F(x, t, t)` on the teacher velocity,
/// off-diagonal rows regress `F(x_t, t, s)` on `target_f` (already detached), weighted by `cfg.weighting`.
pub(crate) fn assemble_loss(
    cfg: &DistillConfig,
    eps: f64,
    model_f: &Tensor,
    target_f: &Tensor,
    t: &Tensor,
    s: &Tensor,
) -> Result<Tensor> {
    // Normalised residual ‖F − F̂‖² (mean over D) equals ‖f − ŷ‖² / (t − s)².
    let r = row_mse(model_f, target_f)?;
    let gap2 = (t - s)?.sqr()?;
    let w = match cfg.weighting {
        Weighting::Constant => gap2,
        Weighting::Normalized => (gap2.ones_like()? / (eps * eps))?,
        Weighting::Adaptive { c, p } => {
            let rn = (r.detach() / (eps * eps))?;
            (rn.affine(1.0, c)?.powf(-p)? / (eps * eps))?
        }
    };
    Ok((r * w)?.mean_all()?)
}

/// What the diagonal rows `s = t` of a batch regress `F(x_t, t, t)` on.
#[derive(Clone, Copy)]
pub(crate) enum DiagonalTarget<'a> {
    /// The teacher velocity `v_φ(x_t, t)`.
    Teacher(&'a dyn VelocityField),
    /// The teacher velocity, evaluated over the whole batch in one pass, for an objective whose
    /// off-diagonal rows need it too ([`Rows::v`]).
    TeacherEverywhere(&'a dyn VelocityField),
    /// The conditional velocity `x1 − x0` (flow matching on data).
    Data,
}

/// The off-diagonal rows of a batch: `x_t`, its times, its condition, and the model's `F_θ(x_t, t, s)`
/// there (tracked).
pub(crate) struct Rows {
    pub x: Tensor,
    pub t: Tensor,
    pub s: Tensor,
    pub cond: Cond,
    pub f: Tensor,
    /// The teacher velocity `v_φ(x_t, t)` on these rows, for [`DiagonalTarget::TeacherEverywhere`].
    pub v: Option<Tensor>,
    /// Which of the global batch's off-diagonal rows these are (all of them in one process).
    pub shard: Shard,
    /// `t` and `s` of every off-diagonal row of the global batch, columns (`rows.t`, `rows.s` in one
    /// process): for settings fixed by the whole batch, as the number of steps of a teacher solve.
    pub all_t: Tensor,
    pub all_s: Tensor,
}

/// The shape shared by the pair objectives: draw `(t, s)` with the configured diagonal fraction; the
/// diagonal rows regress `F(x_t, t, t)` on `diagonal`; the others get the objective's own loss `off`; the
/// two means are combined in proportion to their row counts.
///
/// The model runs once over the whole batch (the diagonal rows carry `s = t`), and so does the teacher
/// for [`DiagonalTarget::TeacherEverywhere`]: one pass of `B` rows rather than two smaller ones. On the
/// CPU a diagonal quarter of a 256-row batch is too small to split across cores, and ran on one while the
/// other waited.
pub(crate) fn pair_loss<M: FlowMap + ?Sized>(
    cfg: &DistillConfig,
    cx: &mut StepContext<'_, M>,
    diagonal: DiagonalTarget<'_>,
    off: impl FnOnce(&mut StepContext<'_, M>, &Rows) -> Result<Tensor>,
) -> Result<Tensor> {
    pair_loss_drawing(cfg, cx, diagonal, |_, _| (), |cx, rows, ()| off(cx, rows))
}

/// [`pair_loss`] for an objective that draws random values for its off-diagonal rows: `draw(rng, n)`
/// draws them for the `n` off-diagonal rows of the global batch, right after the times (nothing draws in
/// between), on every rank, whether or not the rank holds any of those rows; `off` gets the draws.
pub(crate) fn pair_loss_drawing<M: FlowMap + ?Sized, D>(
    cfg: &DistillConfig,
    cx: &mut StepContext<'_, M>,
    diagonal: DiagonalTarget<'_>,
    draw: impl FnOnce(&mut Rng, usize) -> D,
    off: impl FnOnce(&mut StepContext<'_, M>, &Rows, D) -> Result<Tensor>,
) -> Result<Tensor> {
    let Pairs {
        all_t,
        all_s,
        all_diag,
        xt,
        t,
        s,
        n_diag,
    } = Pairs::draw(cfg, cx)?;
    let all_off = cx.shard.global - all_diag;
    let draws = (all_off > 0).then(|| draw(cx.rng, all_off));
    let shard = cx.shard.clone();
    let c = cx.cond;
    let f = cx.model.average_velocity(&xt, &t, &s, c)?;
    let v = match diagonal {
        DiagonalTarget::TeacherEverywhere(v) => Some(no_grad(|| v.velocity(&xt, &t, c))?),
        _ => None,
    };
    let mut columns = vec![&xt, &t, &s, cx.x0, cx.x1, &f];
    columns.extend(&v);
    let (d, o) = split_rows(n_diag, &columns)?;
    let n = xt.dim(0)?;
    let n_off = n - n_diag;
    // The flow-matching limit on the diagonal: `mean ‖F(x_t, t, t) − target‖²`.
    let diag = match (n_diag, diagonal) {
        (0, _) => None,
        (_, DiagonalTarget::Teacher(v)) => {
            let target = no_grad(|| v.velocity(&d[0], &d[1], &c.narrow(0, n_diag)?))?;
            Some(row_mse(&d[5], &target)?.mean_all()?)
        }
        (_, DiagonalTarget::TeacherEverywhere(_)) => Some(row_mse(&d[5], &d[6])?.mean_all()?),
        (_, DiagonalTarget::Data) => {
            let vc = cx.path.conditional_velocity(&d[3], &d[4], &d[1])?;
            let target = guided_data_velocity(cx, &d[0], &d[1], &vc, &c.narrow(0, n_diag)?)?;
            Some(row_mse(&d[5], &target)?.mean_all()?)
        }
    };
    let off = if n_off > 0 {
        let mut o = o.into_iter();
        let mut next = || o.next().expect("a slice of every column");
        let (x, t, s, _, _, f) = (next(), next(), next(), next(), next(), next());
        let v = v.is_some().then(next);
        let cond = c.narrow(n_diag, n_off)?;
        let (all_t, all_s) = if shard.is_whole() {
            (t.clone(), s.clone())
        } else {
            (column(&all_t[all_diag..], cx.x0)?, column(&all_s[all_diag..], cx.x0)?)
        };
        let shard = shard.tail(all_diag);
        let rows = Rows {
            x,
            t,
            s,
            cond,
            f,
            v,
            shard,
            all_t,
            all_s,
        };
        Some(off(cx, &rows, draws.expect("drawn for the off-diagonal rows"))?)
    } else {
        None
    };
    let w = |k: usize| k as f64 / n as f64;
    Ok(match (diag, off) {
        (Some(d), Some(o)) => ((d * w(n_diag))? + (o * w(n_off))?)?,
        (Some(d), None) => d,
        (None, Some(o)) => o,
        (None, None) => unreachable!("a batch has rows"),
    })
}

/// The velocity a data-only method regresses its diagonal on, with classifier-free guidance trained in
/// from data (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", §4.2 and its appendix).
///
/// Without guidance scales on the condition this is the conditional velocity `v_c` as given. With a scale
/// `ω` on each row (`Cond::guidance`), a row with a class label gets
///
/// `ṽ = ω·v_c + (1 − ω)·sg F_θ⁻(x_t, t, t | ∅)`,
///
/// the conditional velocity mixed with the target network's own unconditional instantaneous velocity. As
/// `E[v_c | x_t, c] = v(x_t, t | c)`, the regression's minimiser is `ω·v(x_t, t | c) + (1 − ω)·F(x_t, t, t | ∅)`,
/// which is the guided field `v_ω = v(∅) + ω·(v(c) − v(∅))` once the network's unconditional diagonal is
/// the unconditional velocity. It learns that from the rows whose label was dropped (the null class),
/// which keep `v_c`. `ω = 1` gives `v_c` exactly.
pub(crate) fn guided_data_velocity<M: FlowMap + ?Sized>(
    cx: &StepContext<'_, M>,
    x: &Tensor,
    t: &Tensor,
    vc: &Tensor,
    cond: &Cond,
) -> Result<Tensor> {
    let Some(w) = cond.guidance() else {
        return Ok(vc.clone());
    };
    let (Some(labels), Some(classes)) = (cond.class_labels(), cx.classes) else {
        return Err(crate::Error::arg(
            "guidance trained from data needs class labels: it mixes the conditional velocity with the unconditional one",
        ));
    };
    let b = x.dim(0)?;
    let null = cond.to_null(b, classes, x.device())?;
    let unconditional = no_grad(|| cx.target.average_velocity(x, t, t, &null))?;
    // `m (1 − ω)` per row, `m = 0` on the null-class rows: `ṽ = v_c + m (1 − ω)·(F⁻(∅) − v_c)`.
    let labelled = labels.ne(classes as u32)?.to_dtype(vc.dtype())?.reshape((b, 1))?;
    let gain = (w.to_dtype(vc.dtype())?.affine(-1.0, 1.0)? * labelled)?;
    Ok((vc + (unconditional - vc)?.broadcast_mul(&crate::state::per_row(&gain, vc)?)?)?)
}

/// Rows `0..n` and `n..` of each tensor.
pub(crate) fn split_rows(n: usize, ts: &[&Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let b = ts[0].dim(0)?;
    let head = ts
        .iter()
        .map(|t| t.narrow(0, 0, n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tail = ts
        .iter()
        .map(|t| t.narrow(0, n, b - n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((head, tail))
}

/// `g / (‖g‖ + c)` per row: the tangent normalisation of Align Your Flow.
pub(crate) fn normalize_tangent(g: &Tensor, c: f64) -> Result<Tensor> {
    let norm = state::row_sum(&g.sqr()?)?.sqrt()?.affine(1.0, c)?;
    Ok(g.broadcast_div(&state::per_row(&norm, g)?)?)
}

/// The JVP of `F` at `at` along `along`: the map's own tangent ([`JvpMode::Exact`]) or central differences.
pub(crate) fn tangent(map: &dyn FlowMap, mode: JvpMode, at: &Point<'_>, along: &Tangent) -> Result<(Tensor, Tensor)> {
    match mode {
        JvpMode::Exact => map
            .as_tangent()
            .ok_or_else(|| {
                Error::arg(
                    "this model has no exact tangent; train it with finite-difference tangents (the jvp setting)",
                )
            })?
            .average_velocity_jvp(at, along),
        JvpMode::FiniteDifference { h } => {
            crate::flow_map::TangentMap::average_velocity_jvp(&FiniteDifference { map, h }, at, along)
        }
    }
}

/// Builds the objective of any flow-map `method` (by its [`registry`] entry). Teacher-based methods need
/// `teacher`; progressive flow-map matching also needs the student's live parameters and architecture (it
/// snapshots them).
pub fn build<'a>(
    method: Method,
    teacher: Option<&'a dyn VelocityField>,
    cfg: DistillConfig,
    student: Option<(&candle_nn::VarMap, &crate::backbone::Arch)>,
) -> Result<Box<dyn Objective<Model = dyn FlowMap> + 'a>> {
    cfg.validate()?;
    if !method.needs_teacher() && teacher.is_some() {
        return Err(Error::arg(format!(
            "'{method}' trains from data alone and takes no teacher"
        )));
    }
    (method.info().build)(&registry::BuildArgs {
        method,
        teacher,
        cfg,
        student,
    })
}

impl<M: ?Sized, O: Objective<Model = M> + ?Sized> Objective for Box<O> {
    type Model = M;
    fn loss(&self, cx: &mut StepContext<'_, M>) -> Result<Tensor> {
        (**self).loss(cx)
    }
    fn save_state(&self) -> Result<ObjectiveState> {
        (**self).save_state()
    }
    fn load_state(&self, state: &ObjectiveState) -> Result<()> {
        (**self).load_state(state)
    }
}
