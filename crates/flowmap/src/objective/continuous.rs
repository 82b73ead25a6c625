use candle_core::Tensor;

use super::{pair_loss, row_mse, tangent, DataKind, DiagonalTarget, DistillConfig, Objective, StepContext};
use crate::cond::Cond;
use crate::flow_map::{FlowMap, Point, Tangent};
use crate::kernels::no_grad;
use crate::teacher::VelocityField;
use crate::{state, Result};

/// `‖F_θ − sg(F⁻ + g/(‖g‖ + c))‖²`: one normalised step along the residual `g`.
pub(crate) fn normalized_step_loss(f: &Tensor, f_minus: &Tensor, g: &Tensor, c: f64) -> Result<Tensor> {
    let target = (f_minus + super::normalize_tangent(g, c)?)?.detach();
    Ok(row_mse(f, &target)?.mean_all()?)
}

/// The warm-up weight `r ∈ [0, 1]` of the tangent's time-derivative term.
pub(crate) fn ramp(cfg: &DistillConfig, progress: f64) -> f64 {
    if cfg.continuous.warmup <= 0.0 {
        1.0
    } else {
        (progress / cfg.continuous.warmup).min(1.0)
    }
}

/// Continuous LMD's defaults on images: 0.4 of the run's learning rate (`lr_scale`) and `tangent_c = 0.01`.
/// Its normalised tangent step is unstable at large gaps in image dimensions: at the bench's 5·10⁻⁴ its class
/// accuracy at 1 and 2 NFE was 87.2 and 89.4%; at 2·10⁻⁴ with `c = 0.01`, 96.8 and 91.0% (500-step fine-tunes
/// of the shipped MNIST teacher; the table and the grid-row trade it replaced are in `docs/cli.md`, "Recipes").
pub(crate) fn lmd_cont_recipe(c: &mut DistillConfig, data: DataKind) {
    if data.image {
        c.lr_scale = 0.4;
        c.continuous.tangent_c = 0.01;
    }
}

/// Eulerian map distillation in continuous time (Sabour et al. 2025, "Align Your Flow", AYF-EMD).
///
/// The map is constant along the teacher's flow, `d/dt f(x_t, t, s) = 0` with `dx_t/dt = v_φ`, which for
/// `f = x + (s − t)·F` reads `F = v_φ − (t − s)·dF/dt`. One JVP of `F_θ⁻` along `(ẋ, ṫ, ṡ) = (v_φ, 1, 0)`
/// gives `dF/dt`; with the tangent `g = (v_φ − F⁻) − r·(t − s)·dF/dt` (`r` ramps 0 → 1 over the warm-up)
/// normalised as `ĝ = g / (‖g‖ + c)`,
///
/// `L(θ) = E ‖F_θ(x_t, t, s) − sg(F_θ⁻ + ĝ)‖²`,
///
/// plus the diagonal flow-matching term. Its gradient is `−2 ĝ·∂_θ F`: a normalised step along the
/// residual of the Eulerian equation, which vanishes exactly at the teacher's flow map.
pub struct EmdContinuous<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Objective for EmdContinuous<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let r = ramp(&self.cfg, cx.progress);
        pair_loss(
            &self.cfg,
            cx,
            DiagonalTarget::TeacherEverywhere(self.teacher),
            |cx, rows| {
                let (x, t, s) = (&rows.x, &rows.t, &rows.s);
                let v = rows.v.clone().expect("the teacher's velocity on every row");
                let at = Point {
                    x,
                    t,
                    s,
                    cond: &rows.cond,
                };
                let (f_minus, df_dt) =
                    tangent(cx.target, self.cfg.continuous.jvp, &at, &Tangent::along_start(&v, &at)?)?;
                let g = ((&v - &f_minus)? - df_dt.broadcast_mul(&state::per_row(&((t - s)? * r)?, x)?)?)?;
                normalized_step_loss(&rows.f, &f_minus, &g, self.cfg.continuous.tangent_c)
            },
        )
    }
}

/// Lagrangian map distillation in continuous time (Boffi et al. 2025, "How to build a consistency model";
/// Sabour et al. 2025, "Align Your Flow").
///
/// The end point follows the teacher, `∂_s f(x, t, s) = v_φ(f(x, t, s), s)`, which for `f = x + (s − t)·F`
/// reads `F = v_φ(f, s) + (t − s)·∂_s F`. One JVP of `F_θ⁻` along `(0, 0, 1)` gives `∂_s F`; with
/// `g = v_φ(sg f⁻, s) + r·(t − s)·∂_s F⁻ − F⁻` and `ĝ = g / (‖g‖ + c)`,
///
/// `L(θ) = E ‖F_θ(x_t, t, s) − sg(F_θ⁻ + ĝ)‖²`,
///
/// plus the diagonal flow-matching term.
pub struct LmdContinuous<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Objective for LmdContinuous<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let r = ramp(&self.cfg, cx.progress);
        pair_loss(&self.cfg, cx, DiagonalTarget::Teacher(self.teacher), |cx, rows| {
            let at = Point {
                x: &rows.x,
                t: &rows.t,
                s: &rows.s,
                cond: &rows.cond,
            };
            let (g, f_minus) = lagrangian_tangent(cx.target, self.teacher, &self.cfg, &at, r)?;
            normalized_step_loss(&rows.f, &f_minus, &g, self.cfg.continuous.tangent_c)
        })
    }
}

/// The Lagrangian residual `g = v(f⁻, s) + r·(t − s)·∂_s F⁻ − F⁻` and `F⁻`, for velocity `v`.
pub(crate) fn lagrangian_tangent(
    target: &dyn FlowMap,
    v: &dyn VelocityField,
    cfg: &DistillConfig,
    at: &Point<'_>,
    r: f64,
) -> Result<(Tensor, Tensor)> {
    let (x, t, s, c): (&Tensor, &Tensor, &Tensor, &Cond) = (at.x, at.t, at.s, at.cond);
    let (f_minus, df_ds) = tangent(target, cfg.continuous.jvp, at, &Tangent::along_end(at)?)?;
    let y = (x + f_minus.broadcast_mul(&state::per_row(&(s - t)?, x)?)?)?; // f⁻(x, t, s)
    let vy = no_grad(|| v.velocity(&y, s, c))?;
    let g = ((vy + df_ds.broadcast_mul(&state::per_row(&((t - s)? * r)?, x)?)?)? - &f_minus)?;
    Ok((g, f_minus))
}
