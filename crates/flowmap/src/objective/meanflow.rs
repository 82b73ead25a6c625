use candle_core::Tensor;

use super::{draw_pairs, ones, row_mse, tangent, DistillConfig, MeanFlowTangent, Objective, StepContext, Weighting};
use crate::jvp::TangentMap;
use crate::kernels::no_grad;
use crate::Result;

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
/// plain loss (`cargo run --release --example meanflow_bias -- adaptive|paper|plain`).
/// The rows with `s = t` (the diagonal fraction) reduce to conditional flow matching. With
/// [`MeanFlowTangent::Model`](super::MeanFlowTangent) the JVP moves `x` along the target network's own
/// diagonal `F_θ⁻(x_t, t, t)` instead of `v_c` (same loss, lower-variance but, until the diagonal is learned,
/// biased target).
pub struct MeanFlow {
    pub cfg: DistillConfig,
}

impl Objective for MeanFlow {
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "meanflow"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (x, t, s, _) = draw_pairs(&self.cfg, cx)?;
        let vc = (cx.x1 - cx.x0)?;
        let along = match self.cfg.continuous.meanflow_tangent {
            MeanFlowTangent::Conditional => vc.clone(),
            MeanFlowTangent::Model => no_grad(|| cx.target.average_velocity(&x, &t, &t))?,
        };
        let (_, df_dt) = tangent(
            cx.target,
            self.cfg.continuous.jvp,
            &x,
            &t,
            &s,
            &along,
            &ones(&t)?,
            &s.zeros_like()?,
        )?;
        let u = (&vc - df_dt.broadcast_mul(&(&t - &s)?)?)?.detach();
        let f = cx.model.average_velocity(&x, &t, &s)?;
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
