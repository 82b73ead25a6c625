use candle_core::Tensor;

use super::{combine, diagonal_loss, draw_pairs, row_mse, split_rows, DistillConfig, Objective, StepContext};
use crate::jvp::TangentMap;
use crate::ode::{self, Solver};
use crate::teacher::VelocityField;
use crate::Result;

/// Direct regression on the teacher's solutions, the plain knowledge-distillation baseline (Luhman &
/// Luhman 2021, "Knowledge Distillation in Iterative Generative Models"), for every pair `(t, s)`:
///
/// `L(θ) = E ‖f_θ(x_t, t, s) − Φ_{t→s}(x_t)‖² / (t − s)²`, with Φ by dopri5 on the teacher at `tol`,
///
/// plus the diagonal flow-matching term. Exact targets, at the price of an ODE solve per batch.
pub struct DirectRegression<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
    pub tol: f64,
}

impl<'a> Objective for DirectRegression<'a> {
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "direct"
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
            let phi = ode::solve(self.teacher, Solver::dopri5(self.tol), x, t, s)?.detach();
            let target = (phi - x)?.broadcast_div(&(s - t)?)?;
            let f = cx.model.average_velocity(x, t, s)?;
            Some(row_mse(&f, &target)?.mean_all()?)
        } else {
            None
        };
        combine(diag, n_diag, off, n_off)
    }
}
