use candle_core::Tensor;

use super::{assemble_loss, pair_loss, DiagonalTarget, DistillConfig, Objective, StepContext};
use crate::flow_map::FlowMap;
use crate::kernels::no_grad;
use crate::teacher::VelocityField;
use crate::{state, Result};

/// Eulerian map distillation, discrete (Sabour et al. 2025, "Align Your Flow"; Boffi et al. 2025,
/// "How to build a consistency model: learning flow maps via self-distillation").
///
/// The semigroup property `f(x_t, t, s) = f(Φ_{t→t'}(x_t), t', s)` with the start point moved one teacher
/// Euler step towards `s`: `t' = t + ε(s − t)`, `x_{t'} = x_t + ε(s − t)·v_φ(x_t, t)`, and
///
/// `L(θ) = E w(t, s)·‖f_θ(x_t, t, s) − sg f_θ⁻(x_{t'}, t', s)‖²`,
///
/// plus, on a fraction of the batch with `s = t`, the flow-matching limit `‖F_θ(x_t, t, t) − v_φ(x_t, t)‖²`.
/// In average-velocity form the residual is `(s − t)·(F_θ(x_t, t, s) − sg[ε v_φ(x_t, t) + (1 − ε) F_θ⁻(x_{t'}, t', s)])`.
/// As `ε → 0` with `w = 1/(ε(t − s))²` this is the continuous Eulerian condition
/// `∂_t f + ∇_x f · v_φ = 0`; the loss vanishes to `O(ε²)` at the exact flow map.
pub struct Emd<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Emd<'a> {
    pub fn new(teacher: &'a dyn VelocityField, cfg: DistillConfig) -> Self {
        Emd { teacher, cfg }
    }
}

impl<'a> Objective for Emd<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let eps = self.cfg.eps.at(cx.progress);
        pair_loss(
            &self.cfg,
            cx,
            DiagonalTarget::TeacherEverywhere(self.teacher),
            |cx, r| {
                let v = r.v.clone().expect("the teacher's velocity on every row");
                let step = ((&r.s - &r.t)? * eps)?; // t' − t = ε(s − t) ≤ 0
                let t_mid = (&r.t + &step)?;
                let x_mid = (&r.x + v.broadcast_mul(&state::per_row(&step, &r.x)?)?)?;
                let f_target = no_grad(|| cx.target.average_velocity(&x_mid, &t_mid, &r.s, &r.cond))?;
                let target = ((v * eps)? + (f_target * (1.0 - eps))?)?;
                assemble_loss(&self.cfg, eps, &r.f, &target, &r.t, &r.s)
            },
        )
    }
}
