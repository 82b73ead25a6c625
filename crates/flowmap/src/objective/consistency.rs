use candle_core::Tensor;

use super::{column, row_mse, DataKind, DistillConfig, Objective, StepContext, TargetNet, Weighting};
use crate::flow_map::FlowMap;
use crate::kernels::no_grad;
use crate::ode::{self, Scheme};
use crate::teacher::VelocityField;
use crate::Result;

/// The consistency model's defaults: its targets come from the EMA of the weights, as in Song et al. 2023's
/// consistency distillation. On checkerboard (4,300 steps at batch 512, `flowmap distill --method cm
/// [--target ema]`, 200,000-point energy distance) 1-NFE 0.00026 and 0.00025 over two seeds against 0.00029 and
/// 0.00030 with the current weights; an adaptive weight and grids of 32 or 128 intervals did not help.
pub(crate) fn recipe(c: &mut DistillConfig, _: DataKind) {
    c.target = TargetNet::Ema;
}

/// Consistency distillation (Song et al. 2023, "Consistency Models"): the flow map restricted to the
/// boundary `s = 0`, `f(x, t, 0)`, anchored by `f(x, 0, 0) = x`.
///
/// On the grid `t_k = (k/N)^ρ`, `k ~ U{1, …, N}`: `x_{t_{k−1}}` is one teacher Heun step from `x_{t_k}`, and
///
/// `L(θ) = E ‖f_θ(x_{t_k}, t_k, 0) − sg f_θ⁻(x_{t_{k−1}}, t_{k−1}, 0)‖² / (t_k − t_{k−1})²`.
///
/// It is the Eulerian objective at `s = 0` with the step `ε = (t_k − t_{k−1}) / t_k`. `ρ > 1`
/// (`cm_time_power`) refines the grid near the data, where the flow turns fastest and a uniform grid's
/// teacher steps are least accurate, as the ρ of Karras et al. 2022's σ schedule does. `N` follows the curriculum of
/// Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models"): coarse grids first, whose
/// long steps propagate the boundary condition quickly, then finer ones, whose short steps are accurate;
/// here `N` grows geometrically from 4 to `cm_intervals` over training. The trained map is valid only
/// for `s = 0`: sample it with the multistep consistency sampler.
pub struct ConsistencyDistillation<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
}

impl<'a> Objective for ConsistencyDistillation<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let n = intervals(self.cfg.continuous.cm_intervals, cx.progress);
        let rho = self.cfg.continuous.cm_time_power;
        let k: Vec<f64> = (0..cx.shard.global).map(|_| (1 + cx.rng.below(n)) as f64).collect();
        let k = cx.shard.local(&k);
        let time = |k: f64| (k / n as f64).powf(rho);
        let t_host: Vec<f64> = k.iter().map(|&k| time(k)).collect();
        let t_prev_host: Vec<f64> = k.iter().map(|&k| time(k - 1.0)).collect();
        let inv_dt2: Vec<f64> = t_host
            .iter()
            .zip(&t_prev_host)
            .map(|(t, p)| 1.0 / (t - p).powi(2))
            .collect();
        let (t, t_prev) = (column(&t_host, cx.x0)?, column(&t_prev_host, cx.x0)?);
        let zero = t.zeros_like()?;
        let c = cx.cond;
        let xt = cx.path.interpolate(cx.x0, cx.x1, &t)?;
        let x_prev = no_grad(|| ode::step(self.teacher, Scheme::Heun, &xt, &t, &t_prev, c))?;
        let target = no_grad(|| cx.target.map(&x_prev, &t_prev, &zero, c))?;
        let f = cx.model.map(&xt, &t, &zero, c)?;
        let r = row_mse(&f, &target)?;
        let inv_dt2 = column(&inv_dt2, cx.x0)?;
        let w = match self.cfg.weighting {
            Weighting::Constant => inv_dt2.ones_like()?,
            Weighting::Normalized => inv_dt2,
            Weighting::Adaptive { c, p } => ((r.detach() * &inv_dt2)?.affine(1.0, c)?.powf(-p)? * inv_dt2)?,
        };
        Ok((r * w)?.mean_all()?)
    }
}

/// The curriculum's grid size at training progress `p ∈ [0, 1]`: `4·(N/4)^p`, rounded, in `[min(4, N), N]`.
pub(crate) fn intervals(n_final: usize, p: f64) -> usize {
    let start = 4.min(n_final) as f64;
    let n = start * (n_final as f64 / start).powf(p.clamp(0.0, 1.0));
    (n.round() as usize).clamp(start as usize, n_final.max(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn curriculum_runs_from_four_to_the_final_grid() {
        assert_eq!(super::intervals(64, 0.0), 4);
        assert_eq!(super::intervals(64, 0.5), 16);
        assert_eq!(super::intervals(64, 1.0), 64);
        assert_eq!(super::intervals(2, 0.3), 2);
    }
}
