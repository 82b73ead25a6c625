//! Each distillation loss vanishes to O(ε²) at the exact flow map of the analytic teacher and stays
//! positive for a perturbed map.

mod common;

use candle_core::Tensor;
use common::*;
use flowmap::flow_map::{FlowMap, SolverMap};
use flowmap::objective::{
    DistillConfig, Emd, EpsSchedule, Lmd, Objective, StepContext, TimeDistribution, TimeSampling, Weighting,
};
use flowmap::ode::Solver;
use flowmap::teacher::GmmVelocity;
use flowmap::Rng;

/// Φ plus `δ·sin(2x)` in the average velocity.
struct Perturbed<'a> {
    exact: &'a SolverMap<GmmVelocity>,
    delta: f64,
}

impl FlowMap for Perturbed<'_> {
    fn dim(&self) -> usize {
        2
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> flowmap::Result<Tensor> {
        let f = self.exact.average_velocity(x, t, s)?;
        Ok((f + ((x * 2.0)?.sin()? * self.delta)?)?)
    }
}

fn cfg(eps: f64) -> DistillConfig {
    DistillConfig {
        eps: EpsSchedule::Fixed { eps },
        times: TimeSampling {
            distribution: TimeDistribution::Uniform,
            diagonal_fraction: 0.0,
        },
        weighting: Weighting::Normalized,
        ..DistillConfig::default()
    }
}

fn loss(method: &str, map: &dyn FlowMap, eps: f64, diagonal_fraction: f64) -> f64 {
    let teacher = teacher();
    let (x0, x1) = pairs(256, 21);
    let mut rng = Rng::new(4);
    let mut cx = StepContext {
        model: map,
        target: map,
        x0: &x0,
        x1: &x1,
        progress: 0.0,
        rng: &mut rng,
    };
    let mut c = cfg(eps);
    c.times.diagonal_fraction = diagonal_fraction;
    let l = match method {
        "emd" => Emd::new(&teacher, c).loss(&mut cx).unwrap(),
        _ => Lmd::new(&teacher, c).loss(&mut cx).unwrap(),
    };
    scalar(&l)
}

#[test]
fn discrete_losses_vanish_at_second_order_at_the_exact_map() {
    let exact = SolverMap::new(
        teacher(),
        Solver::Dopri5 {
            rtol: 1e-10,
            atol: 1e-10,
        },
    );
    let perturbed = Perturbed {
        exact: &exact,
        delta: 0.2,
    };
    for method in ["emd", "lmd"] {
        let (l1, l2) = (loss(method, &exact, 0.1, 0.0), loss(method, &exact, 0.05, 0.0));
        let order = (l1 / l2).log2() / 2.0; // loss ~ ε^{2·order}
        assert!(
            (order - 1.0).abs() < 0.25,
            "{method}: L(0.1) = {l1:e}, L(0.05) = {l2:e}, residual order {order}"
        );
        let p = loss(method, &perturbed, 0.05, 0.0);
        assert!(
            p > 20.0 * l2,
            "{method}: perturbed map loss {p:e} is not clearly above the exact map's {l2:e}"
        );
        // Including the diagonal term: zero at Φ (F(x, t, t) = v exactly), positive when perturbed.
        let (d_exact, d_pert) = (loss(method, &exact, 0.05, 0.5), loss(method, &perturbed, 0.05, 0.5));
        assert!(
            d_exact < l2 && d_pert > 20.0 * d_exact,
            "{method} with diagonal: exact {d_exact:e}, perturbed {d_pert:e}"
        );
    }
}
