use candle_core::Tensor;

use super::{draw_pairs, ones, row_mse, tangent, DistillConfig, Objective, StepContext, Weighting};
use crate::jvp::TangentMap;
use crate::Result;

/// MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), trained from data with no
/// teacher.
///
/// The average velocity satisfies `F(x_t, t, s) = v(x_t, t) − (t − s)·dF/dt` with `d/dt` along the flow;
/// MeanFlow replaces the marginal velocity by the conditional one, `v_c = x1 − x0`, and takes `dF/dt` by one
/// JVP of `F_θ⁻` along `(v_c, 1, 0)`: `u = v_c − (t − s)·dF/dt` and
///
/// `L(θ) = E sg(w)·‖F_θ(x_t, t, s) − sg(u)‖²`, `w = 1/(‖Δ‖² + c)^p`, `Δ = F_θ − u`
///
/// (the adaptive weight; `c`, `p` from `Weighting::Adaptive`, default `c = 1e-3`, `p = 1`). The rows with
/// `s = t` (the diagonal fraction) reduce to conditional flow matching.
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
        let (_, df_dt) = tangent(
            cx.target,
            self.cfg.continuous.jvp,
            &x,
            &t,
            &s,
            &vc,
            &ones(&t)?,
            &s.zeros_like()?,
        )?;
        let u = (&vc - df_dt.broadcast_mul(&(&t - &s)?)?)?.detach();
        let f = cx.model.average_velocity(&x, &t, &s)?;
        let r = row_mse(&f, &u)?;
        let (c, p) = match self.cfg.weighting {
            Weighting::Adaptive { c, p } => (c, p),
            _ => (1e-3, 1.0),
        };
        let w = r.detach().affine(1.0, c)?.powf(-p)?;
        Ok((r * w)?.mean_all()?)
    }
}
