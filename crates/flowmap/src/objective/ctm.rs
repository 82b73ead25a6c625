use candle_core::Tensor;

use super::{combine, diagonal_loss, draw_pairs, row_mse, split_rows, DistillConfig, Objective, StepContext};
use crate::jvp::TangentMap;
use crate::ode::{self, Scheme, Solver};
use crate::teacher::VelocityField;
use crate::Result;

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
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "ctm"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (xt, t, s, n_diag) = draw_pairs(&self.cfg, cx)?;
        let (d, o) = split_rows(n_diag, &[&xt, &t, &s])?;
        let diag = if n_diag > 0 {
            Some(diagonal_loss(cx.model, self.teacher, &d[0], &d[1])?)
        } else {
            None
        };
        let n_off = xt.dim(0)? - n_diag;
        let off = if n_off > 0 {
            let (x, t, s) = (&o[0], &o[1], &o[2]);
            let lam: Vec<f64> = (0..n_off).map(|_| 1.0 - cx.rng.uniform()).collect();
            let lam = super::column(&lam, x)?;
            let u = (t - (t - s)?.broadcast_mul(&lam)?)?;
            let longest = (t - &u)?
                .max_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            let steps = ((longest * self.cfg.continuous.ctm_steps_per_unit as f64).ceil() as usize).max(1);
            let xu = ode::solve(self.teacher, Solver::fixed(Scheme::Heun, steps), x, t, &u)?.detach();
            let y = cx.target.map(&xu, &u, s)?.detach();
            // In average-velocity form: F(x_t, t, s) against (y − x_t)/(s − t).
            let target = (y - x)?.broadcast_div(&(s - t)?)?;
            let f = cx.model.average_velocity(x, t, s)?;
            Some(row_mse(&f, &target)?.mean_all()?)
        } else {
            None
        };
        combine(diag, n_diag, off, n_off)
    }
}
