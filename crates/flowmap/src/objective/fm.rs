use candle_core::Tensor;

use super::{column, row_mse, Objective, StepContext};
use crate::teacher::VelocityField;
use crate::Result;

/// Conditional flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling";
/// Liu et al. 2023, "Flow Straight and Fast"):
///
/// `L(φ) = E_{t ~ U[0,1], x0, x1} ‖v_φ(x_t, t, c) − (α̇_t x0 + σ̇_t x1)‖²`, with `x_t = α_t x0 + σ_t x1` on the
/// context's path and `c` the batch's condition; on the linear path the target is `x1 − x0`. The minimiser
/// is the marginal velocity `v(x, t, c) = E[x1 − x0 | x_t = x, c]` whose ODE `dx/dτ = v` transports noise
/// (`t = 1`) to data (`t = 0`).
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowMatching;

impl FlowMatching {
    pub fn new() -> Self {
        FlowMatching
    }
}

impl Objective for FlowMatching {
    type Model = dyn VelocityField;

    fn loss(&self, cx: &mut StepContext<'_, dyn VelocityField>) -> Result<Tensor> {
        let t = column(&cx.shard.local(&cx.rng.uniform_vec(cx.shard.global)), cx.x0)?;
        let xt = cx.path.interpolate(cx.x0, cx.x1, &t)?;
        let target = cx.path.conditional_velocity(cx.x0, cx.x1, &t)?;
        let v = cx.model.velocity(&xt, &t, cx.cond)?;
        Ok(row_mse(&v, &target)?.mean_all()?)
    }
}
