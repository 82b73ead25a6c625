use candle_core::Tensor;

use super::{
    draw_pairs, row_mse, tangent, DataKind, DistillConfig, MeanFlowTangent, MeanFlowVelocity, Objective, StepContext,
    Weighting,
};
use crate::flow_map::{FlowMap, Point, Tangent};
use crate::kernels::no_grad;
use crate::{state, Error, Result};

/// MeanFlow's defaults, each chosen by a measurement (`docs/cli.md`, "Recipes"):
/// - on points, the plain squared error on uniform pairs with 25% of the batch on the diagonal, not the paper's
///   adaptive weight, logit-normal times and 75% diagonal (`flowmap train --method meanflow --data checkerboard
///   --steps 8000 --batch 512`: 2-NFE energy distance 0.0012 against 0.0035), and the target built from the
///   batch's estimate of the marginal velocity ([`MeanFlowVelocity::Batch`]: 1/2/4-NFE 0.00049 / 0.00015 /
///   0.00013 against 0.00111 / 0.00049 / 0.00040 with `x1 − x0`);
/// - on labelled data or images, the paper's conditional velocity `x1 − x0` (the batch estimate treats the batch
///   as an unconditional data law, and in image dimensions its weights degenerate to the row's own `x0`);
/// - on images, the paper's adaptive weight `1/(‖Δ‖² + 10⁻³)`, whose bias shrinks with the dimension: fine-tuning
///   the shipped MNIST teacher 500 steps, class accuracy at 1/2/4/8 NFE 98.6 / 94.4 / 96.0 / 95.6% against 95.2 /
///   92.0 / 92.8 / 91.2% with the plain squared error.
pub(crate) fn recipe(c: &mut DistillConfig, data: DataKind) {
    c.weighting = Weighting::Constant;
    c.continuous.meanflow_velocity = MeanFlowVelocity::Batch;
    if data.labelled || data.image {
        c.continuous.meanflow_velocity = MeanFlowVelocity::Conditional;
    }
    if data.image {
        c.weighting = Weighting::Adaptive { c: 1e-3, p: 1.0 };
    }
}

/// MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), trained from data with no
/// teacher.
///
/// The average velocity satisfies `F(x_t, t, s) = v(x_t, t) − (t − s)·dF/dt` with `d/dt` along the flow;
/// MeanFlow replaces the marginal velocity by the conditional one, `v_c = x1 − x0`, and takes `dF/dt` by one
/// JVP of `F_θ⁻` along `(v_c, 1, 0)`: `u = v_c − (t − s)·dF/dt` and
///
/// `L(θ) = E ‖F_θ(x_t, t, s) − sg(u)‖²`
///
/// or, with `Weighting::Adaptive { c, p }`, the paper's `E sg(w)·‖F_θ − sg(u)‖²`, `w = 1/(‖Δ‖² + c)^p`,
/// `Δ = F_θ − u`. The target is linear in `v_c`, so `E[u | x_t]` is the exact target and the plain loss is
/// minimised by the true average velocity. The adaptive weight is not: its stationary point is the
/// `1/(‖Δ‖² + c)^p`-weighted mean of the noisy targets, which leans towards the targets that happen to lie
/// close to the current prediction. With thousands of dimensions `‖Δ‖²` barely varies between rows and the
/// bias is small; in two it dominates — on the analytic three-Gaussian mixture the relative flow-map error
/// after 4,000 steps is 1.04 with `p = 1` (0.83 with the paper's time sampling as well) and 0.040 with the
/// plain loss (`cargo run --release -p flowmap-cli --example meanflow_bias -- adaptive|paper|plain`).
/// The rows with `s = t` (the diagonal fraction) reduce to conditional flow matching. With
/// [`MeanFlowTangent::Model`](super::MeanFlowTangent) the JVP moves `x` along the target network's own
/// diagonal `F_θ⁻(x_t, t, t)` instead of `v_c` (same loss, lower-variance but, until the diagonal is learned,
/// biased target). With [`MeanFlowVelocity::Batch`](super::MeanFlowVelocity), the default of
/// [`DistillConfig::for_method`], the batch's estimate of the marginal velocity ([`batch_velocity`]) replaces
/// `v_c`, in the target and in the tangent: a lower-variance target, biased only by treating the batch as the
/// data law (on checkerboard it cut the 2-NFE energy distance threefold; see the config's doc).
///
/// With guidance scales on the condition (`train --guidance-range`), `v_c` is replaced by the guided
/// field of the paper's §4.2, `ṽ = ω·v_c + (1 − ω)·sg F_θ⁻(x_t, t, t | ∅)` on labelled rows
/// (`objective::guided_data_velocity`), and `ω` is the map's input: one network that
/// samples the guided field at any `ω` of its range in one evaluation.
pub struct MeanFlow {
    pub cfg: DistillConfig,
}

impl Objective for MeanFlow {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (x, t, s, _) = draw_pairs(&self.cfg, cx)?;
        let c = cx.cond;
        let vc = match self.cfg.continuous.meanflow_velocity {
            MeanFlowVelocity::Conditional => cx.path.conditional_velocity(cx.x0, cx.x1, &t)?,
            MeanFlowVelocity::Batch if cx.path.name() != "linear" || !c.is_none() => {
                return Err(Error::arg(format!(
                    "MeanFlow's batch velocity assumes the linear path and an unconditional model (got the {} path{}); use the conditional velocity (meanflow_velocity = conditional)",
                    cx.path.name(),
                    if c.is_none() { "" } else { " and class labels" }
                )))
            }
            MeanFlowVelocity::Batch => batch_velocity(&x, &t, cx.batch_x0)?,
        };
        // Guidance from data: `ṽ = ω·v_c + (1 − ω)·F⁻(x_t, t, t | ∅)` on labelled rows, in the target and
        // in the tangent (the paper's `(ṽ, 1, 0)`).
        let vc = super::guided_data_velocity(cx, &x, &t, &vc, c)?;
        let along = match self.cfg.continuous.meanflow_tangent {
            MeanFlowTangent::Conditional => vc.clone(),
            MeanFlowTangent::Model => no_grad(|| cx.target.average_velocity(&x, &t, &t, c))?,
        };
        let at = Point {
            x: &x,
            t: &t,
            s: &s,
            cond: c,
        };
        let (_, df_dt) = tangent(
            cx.target,
            self.cfg.continuous.jvp,
            &at,
            &Tangent::along_start(&along, &at)?,
        )?;
        let u = (&vc - df_dt.broadcast_mul(&state::per_row(&(&t - &s)?, &x)?)?)?.detach();
        let f = cx.model.average_velocity(&x, &t, &s, c)?;
        let r = row_mse(&f, &u)?;
        match self.cfg.weighting {
            Weighting::Adaptive { c, p } => {
                let w = r.detach().affine(1.0, c)?.powf(-p)?;
                Ok((r * w)?.mean_all()?)
            }
            Weighting::Constant | Weighting::Normalized => Ok(r.mean_all()?),
        }
    }
}

/// The batch estimate of the marginal velocity at `x_t` (`b × …`, at times `t`, `b × 1`) with the data
/// `x0` (`n × …`, the same state shape) as the data law: `v̂ = (x_t − Σ_j w_j·x0_j) / t`, where
/// `w_j = softmax_j(−‖x_t − (1 − t)·x0_j‖² / 2t²)` is the posterior of `x0_j` given `x_t` on the linear
/// path. Detached; `t` is floored at 1e-4. On the CPU in f32 one fused pass per row
/// (`kernels::posterior_mean`), elsewhere candle's ops (the two agree to f32 rounding; tested).
pub fn batch_velocity(xt: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Tensor> {
    if xt.rank() < 2 || x0.dims().get(1..) != xt.dims().get(1..) || t.elem_count() != xt.dim(0)? {
        return Err(crate::Error::arg(format!(
            "batch velocity: x_t is {:?}, data {:?}, times {:?}",
            xt.dims(),
            x0.dims(),
            t.dims()
        )));
    }
    let v = batch_velocity_rows(&state::rows(xt)?, t, &state::rows(x0)?)?;
    if xt.rank() == 2 {
        return Ok(v);
    }
    Ok(v.reshape(xt.shape())?)
}

/// [`batch_velocity`] on flattened `b × d` and `n × d` states.
fn batch_velocity_rows(xt: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Tensor> {
    let b = xt.dim(0)?;
    let t = t.reshape((b, 1))?.clamp(1e-4, 1.0)?.detach();
    let (xt, x0) = (xt.detach(), x0.detach());
    if let Some(mean) = crate::kernels::posterior_mean(&xt, &t, &x0)? {
        return Ok((xt - mean)?.broadcast_div(&t)?);
    }
    // ‖x_t − a·x0_j‖² = ‖x_t‖² − 2a·x_t·x0_j + a²‖x0_j‖² with a = 1 − t: (b × 1), (b × n), (1 × n) terms.
    let a = t.affine(-1.0, 1.0)?;
    let xx = xt.sqr()?.sum_keepdim(1)?;
    let zz = x0.sqr()?.sum_keepdim(1)?.t()?;
    let cross = xt.matmul(&x0.t()?)?;
    let sq = xx
        .broadcast_sub(&cross.broadcast_mul(&(&a * 2.0)?)?)?
        .broadcast_add(&zz.broadcast_mul(&a.sqr()?)?)?;
    let logits = sq.broadcast_div(&(t.sqr()? * -2.0)?)?;
    // Softmax over the data points from primitive ops.
    let e = logits.broadcast_sub(&logits.max_keepdim(1)?)?.exp()?;
    let w = e.broadcast_div(&e.sum_keepdim(1)?)?;
    Ok((xt - w.matmul(&x0)?)?.broadcast_div(&t)?)
}
