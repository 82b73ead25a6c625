use candle_core::Tensor;

use super::{pair_loss, row_mse, DiagonalTarget, DistillConfig, Objective, StepContext};
use crate::flow_map::FlowMap;
use crate::ode::{self, Solver};
use crate::teacher::VelocityField;
use crate::{state, Result};

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
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        pair_loss(&self.cfg, cx, DiagonalTarget::Teacher(self.teacher), |_, rows| {
            let (x, t, s) = (&rows.x, &rows.t, &rows.s);
            let phi = ode::solve(self.teacher, Solver::dopri5(self.tol), x, t, s, &rows.cond)?;
            let target = (phi - x)?.broadcast_div(&state::per_row(&(s - t)?, x)?)?;
            Ok(row_mse(&rows.f, &target)?.mean_all()?)
        })
    }
}
