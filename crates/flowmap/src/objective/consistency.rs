use candle_core::Tensor;

use super::{column, DistillConfig, Objective, StepContext};
use crate::jvp::TangentMap;
use crate::ode::{self, Scheme};
use crate::path::{LinearPath, ProbabilityPath};
use crate::teacher::VelocityField;
use crate::Result;

/// Consistency distillation (Song et al. 2023, "Consistency Models"): the flow map restricted to the
/// boundary `s = 0`, `f(x, t, 0)`, anchored by `f(x, 0, 0) = x`.
///
/// On the grid `t_k = k/N`, `k ~ U{1, …, N}`: `x_{t_{k−1}}` is one teacher Heun step from `x_{t_k}`, and
///
/// `L(θ) = E ‖f_θ(x_{t_k}, t_k, 0) − sg f_θ⁻(x_{t_{k−1}}, t_{k−1}, 0)‖² / Δt²`, `Δt = 1/N`.
///
/// It is the Eulerian objective at `s = 0` with the step `ε = Δt / t_k`. The trained map is valid only
/// for `s = 0`: sample it with the multistep consistency sampler.
pub struct ConsistencyDistillation<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Objective for ConsistencyDistillation<'a> {
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "cm"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let b = cx.x0.dim(0)?;
        let n = self.cfg.continuous.cm_intervals;
        let k: Vec<f64> = (0..b).map(|_| (1 + cx.rng.below(n)) as f64).collect();
        let t = column(&k.iter().map(|k| k / n as f64).collect::<Vec<_>>(), cx.x0)?;
        let t_prev = column(&k.iter().map(|k| (k - 1.0) / n as f64).collect::<Vec<_>>(), cx.x0)?;
        let zero = t.zeros_like()?;
        let xt = LinearPath.interpolate(cx.x0, cx.x1, &t)?;
        let x_prev = ode::step(self.teacher, Scheme::Heun, &xt, &t, &t_prev)?.detach();
        let target = cx.target.map(&x_prev, &t_prev, &zero)?.detach();
        let f = cx.model.map(&xt, &t, &zero)?;
        Ok(((f - target)?.sqr()?.mean_keepdim(1)?.mean_all()? * (n * n) as f64)?)
    }
}
