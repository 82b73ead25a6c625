use candle_core::Tensor;

use super::lmd::lagrangian_step_loss;
use super::progressive::two_half_steps;
use super::{pair_loss, row_mse, DataKind, DiagonalTarget, DistillConfig, Objective, StepContext, TargetNet};
use crate::flow_map::Diagonal;
use crate::flow_map::FlowMap;
use crate::Result;

/// Self-LMD's defaults: its targets come from the EMA of the weights (with the current weights its own diagonal
/// feeds back into its targets, and it diverged on checkerboard within 7,000 steps in `flowmap bench compare`),
/// and on images 90% of the batch sits on the diagonal instead of 25%: in image dimensions the off-diagonal
/// targets' errors reach the diagonal through the shared weights, and a diagonal that drifts teaches the map its
/// drift (500-step fine-tunes of the shipped MNIST teacher: class accuracy at 1/2/4/8 NFE 97.6 / 95.0 / 94.0 /
/// 94.0% against 84.0 / 78.4 / 79.0 / 74.0% at 25%; `docs/cli.md`, "Recipes").
pub(crate) fn self_lmd_recipe(c: &mut DistillConfig, data: DataKind) {
    c.target = TargetNet::Ema;
    if data.image {
        c.times.diagonal_fraction = 0.9;
    }
}

/// Shortcut's defaults: on images 75% of the batch on the diagonal, as its paper does (500-step fine-tunes of
/// the shipped MNIST teacher: class accuracy at 1/2/4/8 NFE 98.0 / 95.0 / 94.2 / 93.2% against 96.2 / 93.0 /
/// 92.6 / 91.8% at 25%).
pub(crate) fn shortcut_recipe(c: &mut DistillConfig, data: DataKind) {
    if data.image {
        c.times.diagonal_fraction = 0.75;
    }
}

/// Lagrangian self-distillation (Boffi et al. 2025, "How to build a consistency model: learning flow maps
/// via self-distillation"), from data with no teacher. The diagonal is trained by conditional flow
/// matching, `‖F_θ(x_t, t, t) − (x1 − x0)‖²`; off the diagonal the map follows its own diagonal as the
/// velocity, `∂_s f = sg F_θ⁻(f, s, s)`, in the discrete Lagrangian form: `s' = s + ε(t − s)`,
/// `y' = sg f_θ⁻(x_t, t, s')`, `ŷ = y' + (s − s')·sg F_θ⁻(y', s', s')`, and
/// `L = E w(t, s)·‖f_θ(x_t, t, s) − ŷ‖²`.
///
/// The discrete step matters: the continuous form regresses `F(x, t, s)` on `F⁻(f, s, s) + (t − s)·∂_s F⁻`,
/// whose fixed-point iteration has gain `|t − s|/s > 1` once `t > 2s`, and diverged on checkerboard once the map's own
/// diagonal was its teacher; the discrete target blends in `(1 − ε)·F⁻(x, t, s')` and stays contractive.
pub struct SelfLmd {
    pub cfg: DistillConfig,
}

impl Objective for SelfLmd {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        let eps = self.cfg.eps.at(cx.progress);
        pair_loss(&self.cfg, cx, DiagonalTarget::Data, |cx, r| {
            lagrangian_step_loss(&self.cfg, eps, &Diagonal(cx.target), cx.target, r)
        })
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
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        pair_loss(&self.cfg, cx, DiagonalTarget::Data, |cx, rows| {
            let target = two_half_steps(|x, t, s| cx.target.average_velocity(x, t, s, &rows.cond), rows)?;
            Ok(row_mse(&rows.f, &target)?.mean_all()?)
        })
    }
}
