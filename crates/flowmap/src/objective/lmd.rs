use candle_core::Tensor;

use super::{assemble_loss, combine, diagonal_loss, draw_pairs, DistillConfig, Objective, StepContext};
use crate::jvp::TangentMap;
use crate::teacher::VelocityField;
use crate::Result;

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
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "lmd"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (xt, t, s, n_diag) = draw_pairs(&self.cfg, cx)?;
        let b = xt.dim(0)?;
        let diag = if n_diag > 0 {
            let x = xt.narrow(0, 0, n_diag)?;
            Some(diagonal_loss(cx.model, self.teacher, &x, &t.narrow(0, 0, n_diag)?)?)
        } else {
            None
        };
        let n_off = b - n_diag;
        let off = if n_off > 0 {
            let eps = self.cfg.eps.at(cx.progress);
            let (x, t, s) = (
                xt.narrow(0, n_diag, n_off)?,
                t.narrow(0, n_diag, n_off)?,
                s.narrow(0, n_diag, n_off)?,
            );
            let s_mid = (&s + ((&t - &s)? * eps)?)?; // s' = s + ε(t − s)
            let f_mid = cx.target.average_velocity(&x, &t, &s_mid)?.detach();
            let y_mid = (&x + f_mid.broadcast_mul(&(&s_mid - &t)?)?)?; // y' = f⁻(x_t, t, s')
            let v = self.teacher.velocity(&y_mid, &s_mid)?.detach();
            let target = ((v * eps)? + (f_mid * (1.0 - eps))?)?;
            let f = cx.model.average_velocity(&x, &t, &s)?;
            Some(assemble_loss(&self.cfg, eps, &f, &target, &t, &s)?)
        } else {
            None
        };
        combine(diag, n_diag, off, n_off)
    }
}
