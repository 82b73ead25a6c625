use candle_core::Tensor;

use super::continuous::lagrangian_tangent;
use super::{combine, diagonal_data_loss, draw_pairs, normalize_tangent, row_mse, split_rows};
use super::{DistillConfig, Objective, StepContext};
use crate::flow_map::Diagonal;
use crate::jvp::TangentMap;
use crate::Result;

/// Lagrangian self-distillation (Boffi et al. 2025, "How to build a consistency model: learning flow maps
/// via self-distillation"), from data with no teacher. The diagonal is trained by conditional flow
/// matching, `‖F_θ(x_t, t, t) − (x1 − x0)‖²`; off the diagonal the map follows its own diagonal as the
/// velocity, `∂_s f = sg F_θ⁻(f, s, s)`: with `g = F⁻(f⁻, s, s) + r·(t − s)·∂_s F⁻ − F⁻` and
/// `ĝ = g / (‖g‖ + c)`, `L = E ‖F_θ(x_t, t, s) − sg(F⁻ + ĝ)‖²`.
pub struct SelfLmd {
    pub cfg: DistillConfig,
}

impl Objective for SelfLmd {
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "self-lmd"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (xt, t, s, n_diag) = draw_pairs(&self.cfg, cx)?;
        let (d, o) = split_rows(n_diag, &[&xt, &t, &s, cx.x0, cx.x1])?;
        let diag = if n_diag > 0 {
            Some(diagonal_data_loss(cx.model, &d[0], &d[1], &d[3], &d[4])?)
        } else {
            None
        };
        let n_off = xt.dim(0)? - n_diag;
        let off = if n_off > 0 {
            let (x, t, s) = (&o[0], &o[1], &o[2]);
            let r = if self.cfg.continuous.warmup <= 0.0 {
                1.0
            } else {
                (cx.progress / self.cfg.continuous.warmup).min(1.0)
            };
            let velocity = Diagonal(cx.target);
            let (g, f_minus) = lagrangian_tangent(cx.target, &velocity, &self.cfg, x, t, s, r)?;
            let target = (f_minus + normalize_tangent(&g, self.cfg.continuous.tangent_c)?)?.detach();
            let f = cx.model.average_velocity(x, t, s)?;
            Some(row_mse(&f, &target)?.mean_all()?)
        } else {
            None
        };
        combine(diag, n_diag, off, n_off)
    }
}

/// Shortcut models (Frans et al. 2025, "One Step Diffusion via Shortcut Models"), from data with no
/// teacher: the diagonal by conditional flow matching, and self-consistency off it — one step equals two
/// half steps of the stop-gradient map. With `m = (t + s)/2`, `x_m = f⁻(x_t, t, m)`:
///
/// `L = E ‖F_θ(x_t, t, s) − sg ½(F⁻(x_t, t, m) + F⁻(x_m, m, s))‖²`.
pub struct Shortcut {
    pub cfg: DistillConfig,
}

impl Objective for Shortcut {
    type Model = dyn TangentMap;

    fn name(&self) -> &'static str {
        "shortcut"
    }

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let (xt, t, s, n_diag) = draw_pairs(&self.cfg, cx)?;
        let (d, o) = split_rows(n_diag, &[&xt, &t, &s, cx.x0, cx.x1])?;
        let diag = if n_diag > 0 {
            Some(diagonal_data_loss(cx.model, &d[0], &d[1], &d[3], &d[4])?)
        } else {
            None
        };
        let n_off = xt.dim(0)? - n_diag;
        let off = if n_off > 0 {
            let (x, t, s) = (&o[0], &o[1], &o[2]);
            let m = ((t + s)? * 0.5)?;
            let f1 = cx.target.average_velocity(x, t, &m)?;
            let xm = (x + f1.broadcast_mul(&(&m - t)?)?)?;
            let f2 = cx.target.average_velocity(&xm, &m, s)?;
            let target = ((f1 + f2)? * 0.5)?.detach();
            let f = cx.model.average_velocity(x, t, s)?;
            Some(row_mse(&f, &target)?.mean_all()?)
        } else {
            None
        };
        combine(diag, n_diag, off, n_off)
    }
}
