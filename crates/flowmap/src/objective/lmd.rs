use candle_core::Tensor;

use super::{assemble_loss, pair_loss, DiagonalTarget, DistillConfig, Objective, Rows, StepContext};
use crate::flow_map::FlowMap;
use crate::kernels::no_grad;
use crate::teacher::VelocityField;
use crate::{state, Result};

/// Lagrangian map distillation, discrete (Boffi et al. 2025, "How to build a consistency model: learning
/// flow maps via self-distillation"; Sabour et al. 2025, "Align Your Flow").
///
/// The end point is moved along the teacher: `s' = s + ε(t − s)`, `y' = sg f_θ⁻(x_t, t, s')`, then one
/// teacher Euler step from `s'` down to `s`, derived from `dx/dτ = v`:
/// `ŷ = y' + (s − s')·v_φ(y', s')` (note `s − s' = −ε(t − s) ≤ 0`), and
///
/// `L(θ) = E w(t, s)·‖f_θ(x_t, t, s) − ŷ‖²`,
///
/// plus the diagonal flow-matching term on a fraction of the batch. In average-velocity form the residual
/// is `(s − t)·(F_θ(x_t, t, s) − sg[ε v_φ(y', s') + (1 − ε) F_θ⁻(x_t, t, s')])`. As `ε → 0` this is the
/// Lagrangian condition `∂_s f(x, t, s) = v_φ(f(x, t, s), s)`.
pub struct Lmd<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Lmd<'a> {
    pub fn new(teacher: &'a dyn VelocityField, cfg: DistillConfig) -> Self {
        Lmd { teacher, cfg }
    }
}

impl<'a> Objective for Lmd<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let eps = self.cfg.eps.at(cx.progress);
        pair_loss(&self.cfg, cx, DiagonalTarget::Teacher(self.teacher), |cx, r| {
            lagrangian_step_loss(&self.cfg, eps, self.teacher, cx.target, r)
        })
    }
}

/// The discrete Lagrangian residual for the off-diagonal rows `r`, with velocity `v` for the end step.
pub(crate) fn lagrangian_step_loss(
    cfg: &DistillConfig,
    eps: f64,
    v: &dyn VelocityField,
    target: &dyn FlowMap,
    r: &Rows,
) -> Result<Tensor> {
    let s_mid = (&r.s + ((&r.t - &r.s)? * eps)?)?; // s' = s + ε(t − s)
    let f_mid = no_grad(|| target.average_velocity(&r.x, &r.t, &s_mid, &r.cond))?;
    let y_mid = (&r.x + f_mid.broadcast_mul(&state::per_row(&(&s_mid - &r.t)?, &r.x)?)?)?; // y' = f⁻(x_t, t, s')
    let v = no_grad(|| v.velocity(&y_mid, &s_mid, &r.cond))?;
    let target = ((v * eps)? + (f_mid * (1.0 - eps))?)?;
    assemble_loss(cfg, eps, &r.f, &target, &r.t, &r.s)
}
