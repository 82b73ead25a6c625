use candle_core::Tensor;

use super::{pair_loss_drawing, row_mse, DiagonalTarget, DistillConfig, Objective, StepContext};
use crate::flow_map::FlowMap;
use crate::kernels::no_grad;
use crate::ode::{self, Scheme, Solver};
use crate::teacher::VelocityField;
use crate::{state, Result, Rng};

/// Consistency trajectory models (Kim et al. 2024, "Consistency Trajectory Models"), the distillation core:
/// the teacher is solved from `t` part of the way to an intermediate `u = t − λ(t − s)`, `λ ~ U(0, 1]`
/// (Heun, `ctm_steps_per_unit` steps per unit time), and the target map finishes the trip:
///
/// `L(θ) = E ‖f_θ(x_t, t, s) − sg f_θ⁻(Φ^{Heun}_{t→u}(x_t), u, s)‖² / (t − s)²`,
///
/// plus the diagonal flow-matching term. At `λ = 1` it is direct regression on a teacher solve; as
/// `λ → 0` the Eulerian objective.
pub struct ConsistencyTrajectory<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Objective for ConsistencyTrajectory<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        // λ for every off-diagonal row of the global batch; the solve's steps are fixed by the longest
        // jump of the whole batch, so every rank of a data-parallel run takes the same.
        let draw = |rng: &mut Rng, n: usize| -> Vec<f64> { (0..n).map(|_| 1.0 - rng.uniform()).collect() };
        pair_loss_drawing(
            &self.cfg,
            cx,
            DiagonalTarget::Teacher(self.teacher),
            draw,
            |cx, rows, all_lam| {
                let (x, t, s) = (&rows.x, &rows.t, &rows.s);
                let lam = rows.shard.local(&all_lam);
                let u = (t - (t - s)?.broadcast_mul(&super::column(&lam, x)?)?)?;
                let (at, as_) = (&rows.all_t, &rows.all_s);
                let all_u = (at - (at - as_)?.broadcast_mul(&super::column(&all_lam, at)?)?)?;
                let longest = (at - all_u)?
                    .max_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
                let steps = ((longest * self.cfg.continuous.ctm_steps_per_unit as f64).ceil() as usize).max(1);
                let c = &rows.cond;
                let xu = ode::solve(self.teacher, Solver::fixed(Scheme::Heun, steps), x, t, &u, c)?;
                let y = no_grad(|| cx.target.map(&xu, &u, s, c))?;
                // In average-velocity form: F(x_t, t, s) against (y − x_t)/(s − t).
                let target = (y - x)?.broadcast_div(&state::per_row(&(s - t)?, x)?)?;
                Ok(row_mse(&rows.f, &target)?.mean_all()?)
            },
        )
    }
}
