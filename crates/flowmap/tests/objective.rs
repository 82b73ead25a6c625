//! Every flow-map objective vanishes (to its discretisation order) at the exact flow map of the analytic
//! Gaussian-mixture teacher, and is clearly positive for a perturbed map; every teacher-based objective also
//! vanishes at the exact flow map of the classifier-free-guided mixture, each row at its own scale.

mod common;

use candle_core::Tensor;
use common::*;
use flowmap::data::GaussianMixture;
use flowmap::dist::Shard;
use flowmap::flow_map::FiniteDifference;
use flowmap::flow_map::{FlowMap, SolverMap};
use flowmap::objective::{
    self, DistillConfig, EpsSchedule, MeanFlowTangent, MeanFlowVelocity, Method, Objective, Progressive, StepContext,
    TimeDistribution, TimeSampling, Weighting,
};
use flowmap::ode::Solver;
use flowmap::teacher::{GmmVelocity, Guided, VelocityField};
use flowmap::Rng;

/// Φ of a mixture's velocity field `V` (plain or guided), optionally plus `δ·sin(2x)` in the average
/// velocity (`δ` a 1 × 1 tensor, so that a test can take the loss's gradient in it).
struct Map<V = GmmVelocity> {
    exact: SolverMap<V>,
    delta: Tensor,
}

impl<V: VelocityField> FlowMap for Map<V> {
    fn state_shape(&self) -> Vec<usize> {
        vec![2]
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &flowmap::Cond) -> flowmap::Result<Tensor> {
        let f = self.exact.average_velocity(x, t, s, c)?;
        Ok((f + (x * 2.0)?.sin()?.broadcast_mul(&self.delta)?)?)
    }
}

fn map(g: &GaussianMixture, delta: f64) -> FiniteDifference<Map> {
    tilted_map(g, Tensor::full(delta, (1, 1), &candle_core::Device::Cpu).unwrap())
}

fn tilted_map(g: &GaussianMixture, delta: Tensor) -> FiniteDifference<Map> {
    exact_map(GmmVelocity::new(g.clone()), delta)
}

/// Φ of `field` (dopri5 at 1e-10) plus `δ·sin(2x)`, with finite-difference tangents.
fn exact_map<V: VelocityField>(field: V, delta: Tensor) -> FiniteDifference<Map<V>> {
    let exact = SolverMap::new(
        field,
        Solver::Dopri5 {
            rtol: 1e-10,
            atol: 1e-10,
        },
    );
    FiniteDifference {
        map: Map { exact, delta },
        h: 1e-4,
    }
}

fn cfg(eps: f64, diagonal_fraction: f64) -> DistillConfig {
    let mut c = DistillConfig {
        eps: EpsSchedule::Fixed { eps },
        times: TimeSampling {
            distribution: TimeDistribution::Uniform,
            diagonal_fraction,
            grid_fraction: 0.0,
            grid_steps: 8,
        },
        weighting: Weighting::Normalized,
        ..DistillConfig::default()
    };
    c.continuous.jvp = objective::JvpMode::FiniteDifference { h: 1e-4 };
    c
}

fn loss_of(objective: &dyn Objective<Model = dyn FlowMap>, m: &(dyn FlowMap + 'static), g: &GaussianMixture) -> f64 {
    scalar(&loss_tensor(objective, m, m, g, 256, 21, flowmap::Cond::none_ref()))
}

/// The objective's loss on `n` mixture points and noise drawn with `seed`, `model` trained against `target`.
fn loss_tensor(
    objective: &dyn Objective<Model = dyn FlowMap>,
    model: &(dyn FlowMap + 'static),
    target: &(dyn FlowMap + 'static),
    g: &GaussianMixture,
    n: usize,
    seed: u64,
    cond: &flowmap::Cond,
) -> Tensor {
    let mut rng = Rng::new(seed);
    let x0 = flowmap::data::to_tensor(
        &g.sample(n, &mut rng),
        n,
        2,
        candle_core::DType::F64,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    loss_on(objective, model, target, &x0, cond, &mut rng)
}

/// The objective's loss on the data `x0` and noise drawn from `rng`; a labelled condition has the test
/// mixtures' three components as its classes (null class 3).
fn loss_on(
    objective: &dyn Objective<Model = dyn FlowMap>,
    model: &(dyn FlowMap + 'static),
    target: &(dyn FlowMap + 'static),
    x0: &Tensor,
    cond: &flowmap::Cond,
    rng: &mut Rng,
) -> Tensor {
    let shard = Shard::whole(x0.dim(0).unwrap());
    loss_on_shard(objective, model, target, x0, cond, rng, shard)
}

/// [`loss_on`] for one rank's block `shard` of the batch `x0` (its noise drawn for the whole batch).
fn loss_on_shard(
    objective: &dyn Objective<Model = dyn FlowMap>,
    model: &(dyn FlowMap + 'static),
    target: &(dyn FlowMap + 'static),
    batch_x0: &Tensor,
    cond: &flowmap::Cond,
    rng: &mut Rng,
    shard: Shard,
) -> Tensor {
    let x1 = rng
        .normal_tensor(batch_x0.shape(), candle_core::DType::F64, &candle_core::Device::Cpu)
        .unwrap();
    let (lo, n) = (shard.rows.start, shard.len());
    let (x0, x1) = (batch_x0.narrow(0, lo, n).unwrap(), x1.narrow(0, lo, n).unwrap());
    let cond = if cond.is_none() {
        cond.clone()
    } else {
        cond.narrow(lo, n).unwrap()
    };
    let mut cx = StepContext {
        model,
        target,
        x0: &x0,
        batch_x0,
        shard,
        x1: &x1,
        cond: &cond,
        classes: cond.class_labels().map(|_| 3),
        path: &flowmap::path::LinearPath,
        progress: 1.0,
        step: 0,
        rng,
    };
    objective.loss(&mut cx).unwrap()
}

fn loss(method: Method, g: &GaussianMixture, delta: f64, c: DistillConfig) -> f64 {
    let teacher = GmmVelocity::new(g.clone());
    let t = method.needs_teacher().then_some(&teacher as &dyn VelocityField);
    let o = objective::build(method, t, c, None).unwrap();
    loss_of(o.as_ref(), &map(g, delta), g)
}

/// Data parallelism: split over 2 and 4 ranks, every map objective's batch loss is the mean of the ranks'
/// losses (each rank drawing the whole batch's randomness and keeping its rows), and every rank's random
/// stream ends where one process's does.
#[test]
fn every_objective_splits_over_ranks_into_the_mean_of_their_losses() {
    let g = mixture();
    let teacher = GmmVelocity::new(g.clone());
    let m = map(&g, 0.2);
    for method in Method::all() {
        let mut c = cfg(0.1, 0.25);
        c.times.grid_fraction = 0.25;
        let t = method.needs_teacher().then_some(&teacher as &dyn VelocityField);
        let o = match method {
            // Progressive matching's frozen map, which the registry builds from a student's parameters.
            Method::Progressive => Box::new(Progressive::with_frozen(&teacher, c, Box::new(map(&g, 0.1)))),
            _ => objective::build(method, t, c, None).unwrap(),
        };
        let run = |rank: usize, world: usize| {
            let mut rng = Rng::new(21);
            let n = 64;
            let x0 = flowmap::data::to_tensor(
                &g.sample(n, &mut rng),
                n,
                2,
                candle_core::DType::F64,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let shard = Shard::of(rank, world, n).unwrap();
            let l = scalar(&loss_on_shard(
                o.as_ref(),
                &m,
                &m,
                &x0,
                flowmap::Cond::none_ref(),
                &mut rng,
                shard,
            ));
            (l, rng.uniform())
        };
        let (whole, next) = run(0, 1);
        for world in [2, 4] {
            let parts: Vec<(f64, f64)> = (0..world).map(|r| run(r, world)).collect();
            let mean = parts.iter().map(|p| p.0).sum::<f64>() / world as f64;
            // Not to the last bit: the test's exact map is an adaptive solve, whose steps follow the rows
            // it is given; so are direct regression's targets (dopri5 at its tolerance, 1e-5 by default).
            let tol = if method == Method::Direct { 1e-3 } else { 1e-6 };
            assert!(
                (mean - whole).abs() <= tol * whole.abs(),
                "{method}: {world} ranks' mean loss {mean:e}, one process's {whole:e}"
            );
            assert!(
                parts.iter().all(|p| p.1 == next),
                "{method}: a rank's stream moved differently"
            );
        }
    }
}

/// The loss at Φ is tiny and the perturbed map's is far larger.
fn check(method: Method, g: &GaussianMixture, c: DistillConfig, tiny: f64) -> (f64, f64) {
    let (exact, perturbed) = (loss(method, g, 0.0, c), loss(method, g, 0.2, c));
    assert_vanishes(method, "the exact map", exact, perturbed, tiny);
    (exact, perturbed)
}

/// `exact` (the loss at `map`) is below `tiny` and the perturbed map's loss is over 100 times larger.
fn assert_vanishes(method: Method, map: &str, exact: f64, perturbed: f64, tiny: f64) {
    assert!(
        exact < tiny,
        "{method}: loss at {map} {exact:e} (expected below {tiny:e})"
    );
    assert!(
        perturbed > 100.0 * exact.max(1e-12),
        "{method}: perturbed {perturbed:e} vs exact {exact:e}"
    );
}

#[test]
fn discrete_objectives_vanish_at_second_order() {
    let g = mixture();
    for method in [Method::Emd, Method::Lmd] {
        let (l1, l2) = (
            loss(method, &g, 0.0, cfg(0.1, 0.0)),
            loss(method, &g, 0.0, cfg(0.05, 0.0)),
        );
        let order = (l1 / l2).log2() / 2.0; // normalised loss ~ ε^{2·order}
        assert!(
            (order - 1.0).abs() < 0.25,
            "{method}: L(0.1) = {l1:e}, L(0.05) = {l2:e}, residual order {order}"
        );
        let p = loss(method, &g, 0.2, cfg(0.05, 0.0));
        assert!(p > 20.0 * l2, "{method}: perturbed {p:e} vs exact {l2:e}");
        // With the diagonal term: still vanishing at Φ (F(x, t, t) = v exactly), positive when perturbed.
        let (d_exact, d_pert) = (
            loss(method, &g, 0.0, cfg(0.05, 0.5)),
            loss(method, &g, 0.2, cfg(0.05, 0.5)),
        );
        assert!(
            d_exact < l2 && d_pert > 20.0 * d_exact,
            "{method} with diagonal: exact {d_exact:e}, perturbed {d_pert:e}"
        );
    }
}

#[test]
fn self_lmd_vanishes_at_second_order() {
    // The discrete Lagrangian step with the map's own diagonal as the velocity (diagonal rows excluded:
    // they regress on x1 − x0, whose variance does not vanish).
    let g = mixture();
    let m = Method::SelfLmd;
    let (l1, l2) = (loss(m, &g, 0.0, cfg(0.1, 0.0)), loss(m, &g, 0.0, cfg(0.05, 0.0)));
    let order = (l1 / l2).log2() / 2.0;
    assert!(
        (order - 1.0).abs() < 0.25,
        "self-lmd: L(0.1) = {l1:e}, L(0.05) = {l2:e}, residual order {order}"
    );
    // Perturbing F also perturbs the diagonal it follows, so compare at a small step.
    let (e, p) = (loss(m, &g, 0.0, cfg(0.01, 0.0)), loss(m, &g, 0.2, cfg(0.01, 0.0)));
    assert!(p > 20.0 * e, "self-lmd: perturbed {p:e} vs exact {e:e}");
}

#[test]
fn continuous_time_objectives_vanish_at_the_exact_map() {
    let g = mixture();
    for method in [Method::EmdCont, Method::LmdCont] {
        check(method, &g, cfg(0.1, 0.25), 1e-8);
    }
    // Direct regression: only the dopri5 tolerance of the target remains.
    check(Method::Direct, &g, cfg(0.1, 0.25), 1e-6);
}

#[test]
fn consistency_and_trajectory_objectives_vanish_at_their_order() {
    let g = mixture();
    // CM: one Heun step per interval, local error O(Δ³), normalised loss O(Δ⁴), on the uniform grid and on
    // the default grid t_k = (k/N)⁴ alike (its intervals are ρ(k/N)^{ρ−1}/N).
    let cm = |n: usize, rho: f64| {
        let mut c = cfg(0.1, 0.0);
        c.continuous.cm_intervals = n;
        c.continuous.cm_time_power = rho;
        check(Method::Cm, &g, c, 1e-3).0
    };
    let (a, b) = (cm(16, 1.0), cm(32, 1.0));
    assert!(a / b > 8.0, "CM loss {a:e} at N = 16, {b:e} at N = 32: order too low");
    let (a, b) = (cm(32, 4.0), cm(64, 4.0));
    assert!(
        a / b > 8.0,
        "CM loss (ρ = 4) {a:e} at N = 32, {b:e} at N = 64: order too low"
    );
    // CTM: the teacher's Heun solve has global error O(h²).
    let ctm = |k: usize| {
        let mut c = cfg(0.1, 0.0);
        c.continuous.ctm_steps_per_unit = k;
        check(Method::Ctm, &g, c, 1e-3).0
    };
    let (a, b) = (ctm(8), ctm(16));
    assert!(a / b > 8.0, "CTM loss {a:e} at 8 steps, {b:e} at 16: order too low");
}

#[test]
fn progressive_matching_vanishes_when_the_frozen_map_is_exact() {
    let g = mixture();
    let teacher = GmmVelocity::new(g.clone());
    let frozen = Box::new(map(&g, 0.0));
    let o = Progressive::with_frozen(&teacher, cfg(0.1, 0.0), frozen);
    let exact = loss_of(&o, &map(&g, 0.0), &g);
    let perturbed = loss_of(&o, &map(&g, 0.2), &g);
    assert!(
        exact < 1e-12 && perturbed > 1e-3,
        "progressive: exact {exact:e}, perturbed {perturbed:e}"
    );
}

#[test]
fn teacher_free_objectives_vanish_at_the_exact_map() {
    // Off the diagonal, shortcut compares the map with two half steps of itself: zero at Φ.
    let g = mixture();
    check(Method::Shortcut, &g, cfg(0.1, 0.0), 1e-12);
    // MeanFlow regresses on the conditional velocity x1 − x0, which equals the marginal one only when the
    // data is a single point: there its loss vanishes at Φ (here a component of std 1e-3).
    let point = GaussianMixture::new(vec![vec![0.5, -0.3]], vec![1e-3], vec![1.0]).unwrap();
    let mut c = cfg(0.1, 0.25);
    c.weighting = Weighting::Adaptive { c: 1e-3, p: 0.0 };
    check(Method::Meanflow, &point, c, 1e-4);
    // So does its batch estimate of the marginal velocity, which for one point is x1 − x0 again.
    c.continuous.meanflow_velocity = MeanFlowVelocity::Batch;
    check(Method::Meanflow, &point, c, 1e-4);
}

#[test]
fn meanflow_loss_is_stationary_at_the_exact_map_and_its_adaptive_weight_is_not() {
    // MeanFlow's target is linear in the conditional velocity x1 − x0, so at Φ the expected gradient of the
    // plain squared error vanishes; the adaptive weight 1/(‖Δ‖² + c) favours the rows whose noisy target
    // lies close to the prediction and moves the stationary point away from Φ (in two dimensions, enough to
    // wreck training: see flowmap-cli/examples/meanflow_bias.rs).
    let g = mixture();
    let n = 8192;
    let grad_along = |weighting: Weighting, along: MeanFlowTangent, delta0: f64| -> f64 {
        let mut c = cfg(0.1, 0.25);
        c.weighting = weighting;
        c.continuous.meanflow_tangent = along;
        let o = objective::build(Method::Meanflow, None, c, None).unwrap();
        let delta =
            candle_core::Var::from_tensor(&Tensor::full(delta0, (1, 1), &candle_core::Device::Cpu).unwrap()).unwrap();
        // Φ plus δ·sin(2x), δ trainable: the loss's gradient in δ is the objective's expected update at
        // the exact map, projected on one direction.
        let model = tilted_map(&g, delta.as_tensor().clone());
        let target = map(&g, 0.0);
        let loss = loss_tensor(o.as_ref(), &model, &target, &g, n, 5, flowmap::Cond::none_ref());
        scalar(
            &loss
                .backward()
                .unwrap()
                .get(delta.as_tensor())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap(),
        )
    };
    let grad = |weighting: Weighting, delta0: f64| grad_along(weighting, MeanFlowTangent::Conditional, delta0);
    // The scale: the same gradient for a map 0.2 off along the direction.
    let restoring = grad(Weighting::Constant, 0.2);
    let plain = grad(Weighting::Constant, 0.0);
    let adaptive = grad(Weighting::Adaptive { c: 1e-3, p: 1.0 }, 0.0);
    // With the JVP along the target network's own diagonal (exact here), the target's mean is exact too.
    let model = grad_along(Weighting::Constant, MeanFlowTangent::Model, 0.0);
    eprintln!("restoring {restoring:e}, plain at Φ {plain:e}, adaptive at Φ {adaptive:e}, model tangent {model:e}");
    assert!(restoring > 0.05, "restoring gradient {restoring:e}");
    // Measured: restoring 0.17, plain −0.024 (the batch's sampling noise, about 0.02), adaptive 0.26, model
    // tangent −0.005 (its target carries less noise).
    assert!(
        plain.abs() < 0.25 * restoring,
        "plain MeanFlow gradient at Φ {plain:e} (restoring {restoring:e})"
    );
    assert!(
        model.abs() < 0.25 * restoring,
        "MeanFlow gradient at Φ with the model's tangent {model:e} (restoring {restoring:e})"
    );
    assert!(
        adaptive.abs() > 0.75 * restoring,
        "adaptive MeanFlow gradient at Φ {adaptive:e} (restoring {restoring:e})"
    );
}

#[test]
fn batch_velocity_is_the_posterior_mean_velocity_of_the_batch() {
    // With the data points ±1 (1-D) as the data law, x_t = (1 − t)·x0 + t·x1 has E[x0 | x_t] =
    // tanh((1 − t)·x_t / t²), so the marginal velocity is (x_t − tanh((1 − t)·x_t / t²)) / t.
    let dev = candle_core::Device::Cpu;
    let x0 = Tensor::new(&[[-1.0f64], [1.0]], &dev).unwrap();
    let single = Tensor::new(&[[0.4f64]], &dev).unwrap();
    for &t in &[0.05f64, 0.3, 0.7, 1.0] {
        for &x in &[-1.5f64, -0.2, 0.0, 0.3, 0.9, 2.0] {
            let xt = Tensor::new(&[[x]], &dev).unwrap();
            let tt = Tensor::new(&[[t]], &dev).unwrap();
            let velocity = |data: &Tensor| -> f64 {
                let v = objective::batch_velocity(&xt, &tt, data).unwrap();
                v.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
            };
            let v = velocity(&x0);
            let exact = (x - ((1.0 - t) * x / (t * t)).tanh()) / t;
            assert!(
                (v - exact).abs() < 1e-9 * (1.0 + exact.abs()),
                "t = {t}, x = {x}: {v} vs {exact}"
            );
            // One data point: the conditional velocity (x_t − x0) / t itself.
            let v1 = velocity(&single);
            assert!((v1 - (x - 0.4) / t).abs() < 1e-9 * (1.0 + v1.abs()));
        }
    }
    // Data points of another dimension, or one time too few, are errors that say so.
    let xt = Tensor::new(&[[0.1f64, 0.2], [0.3, 0.4]], &dev).unwrap();
    let t2 = Tensor::new(&[[0.5f64], [0.5]], &dev).unwrap();
    let err = objective::batch_velocity(&xt, &t2, &x0).unwrap_err().to_string();
    assert!(err.contains("batch velocity"), "{err}");
    assert!(objective::batch_velocity(&xt, &t2.narrow(0, 0, 1).unwrap(), &xt).is_err());
}

/// The exact flow map of the guided mixture (classes = components), each row at its own scale `w`.
fn guided_map(g: &GaussianMixture, delta: f64) -> FiniteDifference<Map<Guided<GmmVelocity>>> {
    let delta = Tensor::full(delta, (1, 1), &candle_core::Device::Cpu).unwrap();
    exact_map(Guided::per_row(GmmVelocity::new(g.clone()), 3), delta)
}

#[test]
fn every_teacher_based_objective_vanishes_at_the_exact_guided_map() {
    let g = mixture();
    let n = 128;
    // Labels 0, 1, 2 and the null class, scales spread over [1, 4]: as a guidance-distilled run draws them.
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
    let w: Vec<f64> = (0..n).map(|i| 1.0 + 3.0 * ((i * 37) % n) as f64 / n as f64).collect();
    let cond = flowmap::Cond::from_classes(&labels, 3, &candle_core::Device::Cpu)
        .unwrap()
        .with_guidance(&Tensor::from_vec(w, (n, 1), &candle_core::Device::Cpu).unwrap())
        .unwrap();
    let teacher = Guided::per_row(GmmVelocity::new(g.clone()), 3);
    let loss = |method: Method, c: DistillConfig, delta: f64| {
        let o = objective::build(method, Some(&teacher as &dyn VelocityField), c, None).unwrap();
        let m = guided_map(&g, delta);
        scalar(&loss_tensor(o.as_ref(), &m, &m, &g, n, 21, &cond))
    };
    // CM and CTM solve the teacher by Heun steps: their loss at the exact map falls at least eightfold when
    // the steps halve.
    let cm = |n: usize| {
        let mut c = cfg(0.1, 0.0);
        c.continuous.cm_intervals = n;
        c
    };
    let ctm = |k: usize| {
        let mut c = cfg(0.1, 0.0);
        c.continuous.ctm_steps_per_unit = k;
        c
    };
    for (method, coarse, fine) in [(Method::Cm, cm(32), cm(64)), (Method::Ctm, ctm(16), ctm(32))] {
        let (a, b) = (loss(method, coarse, 0.0), loss(method, fine, 0.0));
        assert!(
            a / b > 8.0,
            "{method}: loss at the exact guided map {a:e}, then {b:e}: order too low"
        );
        let p = loss(method, fine, 0.2);
        assert!(p > 20.0 * b, "{method}: perturbed {p:e} vs exact {b:e}");
    }
    // The discrete objectives vanish at least at second order in ε (normalised loss O(ε²): halving ε at
    // least quarters it; on these guided fields the next order still shows at ε = 0.1).
    for method in [Method::Emd, Method::Lmd] {
        let (l1, l2) = (loss(method, cfg(0.1, 0.0), 0.0), loss(method, cfg(0.05, 0.0), 0.0));
        let order = (l1 / l2).log2() / 2.0;
        assert!(
            order > 0.8,
            "{method}: L(0.1) = {l1:e}, L(0.05) = {l2:e} at the exact guided map, residual order {order}"
        );
        let (e, p) = (loss(method, cfg(0.02, 0.0), 0.0), loss(method, cfg(0.02, 0.0), 0.2));
        assert!(p > 20.0 * e, "{method}: perturbed {p:e} vs exact {e:e} at ε = 0.02");
    }
    for (method, c, tiny) in [
        (Method::EmdCont, cfg(0.1, 0.25), 1e-7),
        (Method::LmdCont, cfg(0.1, 0.25), 1e-7),
        (Method::Direct, cfg(0.1, 0.25), 1e-5), // the dopri5 tolerance of its target
    ] {
        assert_vanishes(
            method,
            "the exact guided map",
            loss(method, c, 0.0),
            loss(method, c, 0.2),
            tiny,
        );
    }
    // Progressive matching, with the exact guided map as its frozen map.
    let o = Progressive::with_frozen(&teacher, cfg(0.1, 0.0), Box::new(guided_map(&g, 0.0)));
    let at = |delta| {
        let m = guided_map(&g, delta);
        scalar(&loss_tensor(&o, &m, &m, &g, n, 21, &cond))
    };
    let (exact, perturbed) = (at(0.0), at(0.2));
    assert!(
        exact < 1e-12 && perturbed > 1e-3,
        "progressive: exact {exact:e}, perturbed {perturbed:e}"
    );
}

#[test]
fn every_data_only_objective_vanishes_at_the_exact_guided_map_of_point_classes() {
    // Three classes, each one point (std 1e-3): given x_t and its class, x1 − x0 is the class's velocity
    // v(x_t, t | c) itself, so the guided target ω·(x1 − x0) + (1 − ω)·F(x_t, t, t | ∅) is the guided field
    // v_ω exactly when the map's unconditional diagonal is the unconditional (mixture) velocity: the
    // exact guided map has zero loss, although its unconditional part is no single point's.
    let dev = candle_core::Device::Cpu;
    let means = vec![vec![1.0, 0.5], vec![-0.8, 0.2], vec![0.1, -1.1]];
    let g = GaussianMixture::new(means.clone(), vec![1e-3; 3], vec![0.5, 0.3, 0.2]).unwrap();
    let n = 96;
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    let mut rng = Rng::new(4);
    let jitter = rng.normal_tensor((n, 2), candle_core::DType::F64, &dev).unwrap();
    let centres: Vec<f64> = labels.iter().flat_map(|&k| means[k as usize].clone()).collect();
    let x0 = (Tensor::from_vec(centres, (n, 2), &dev).unwrap() + (jitter * 1e-3).unwrap()).unwrap();
    let w: Vec<f64> = (0..n).map(|i| 1.0 + 3.0 * ((i * 37) % n) as f64 / n as f64).collect();
    let cond = flowmap::Cond::from_classes(&labels, 3, &dev)
        .unwrap()
        .with_guidance(&Tensor::from_vec(w, (n, 1), &dev).unwrap())
        .unwrap();
    let loss = |method: Method, c: DistillConfig, delta: f64, cond: &flowmap::Cond| {
        let o = objective::build(method, None, c, None).unwrap();
        let m = guided_map(&g, delta);
        scalar(&loss_on(o.as_ref(), &m, &m, &x0, cond, &mut Rng::new(21)))
    };
    let mut meanflow = cfg(0.1, 0.25);
    meanflow.weighting = Weighting::Constant;
    for (method, c, tiny) in [
        (Method::Meanflow, meanflow, 1e-4),
        (Method::Shortcut, cfg(0.1, 0.25), 1e-4),
        (Method::SelfLmd, cfg(0.02, 0.25), 1e-4),
    ] {
        let (exact, perturbed) = (loss(method, c, 0.0, &cond), loss(method, c, 0.2, &cond));
        assert_vanishes(method, "the exact guided map", exact, perturbed, tiny);
        // The exact conditional map (ω = 1 whatever the rows ask) is far off: the mixing with the
        // unconditional velocity is what the guided map satisfies.
        let conditional = exact_map(
            Guided::new(GmmVelocity::new(g.clone()), 1.0, 3).unwrap(),
            Tensor::zeros((1, 1), candle_core::DType::F64, &dev).unwrap(),
        );
        let o = objective::build(method, None, c, None).unwrap();
        let off = scalar(&loss_on(
            o.as_ref(),
            &conditional,
            &conditional,
            &x0,
            &cond,
            &mut Rng::new(21),
        ));
        eprintln!("{method}: exact guided map {exact:e}, perturbed {perturbed:e}, conditional map {off:e}");
        assert!(
            off > 20.0 * exact,
            "{method}: conditional map {off:e} vs guided {exact:e}"
        );
    }
}

#[test]
fn guidance_from_data_keeps_the_conditional_velocity_at_unit_scale_and_on_null_rows() {
    // ω = 1 and the null-class rows (the dropped labels that teach the unconditional velocity) take the
    // plain target x1 − x0: bit for bit the loss without guidance scales.
    let g = mixture();
    let dev = candle_core::Device::Cpu;
    let n = 64;
    let mut rng = Rng::new(2);
    let x0 = flowmap::data::to_tensor(&g.sample(n, &mut rng), n, 2, candle_core::DType::F64, &dev).unwrap();
    let scales = |w: f64| Tensor::full(w, (n, 1), &dev).unwrap();
    let labelled = flowmap::Cond::from_classes(&vec![1; n], 3, &dev).unwrap();
    let null = flowmap::Cond::null(n, 3, &dev).unwrap();
    let m = map(&g, 0.1); // ignores its condition
    for method in [Method::Meanflow, Method::Shortcut, Method::SelfLmd] {
        let o = objective::build(method, None, cfg(0.1, 0.25), None).unwrap();
        let at = |c: &flowmap::Cond| scalar(&loss_on(o.as_ref(), &m, &m, &x0, c, &mut Rng::new(9)));
        let plain = at(&labelled);
        assert_eq!(
            at(&labelled.with_guidance(&scales(1.0)).unwrap()),
            plain,
            "{method} at ω = 1"
        );
        assert_eq!(
            at(&null.with_guidance(&scales(3.0)).unwrap()),
            at(&null),
            "{method} on null rows"
        );
        assert_ne!(
            at(&labelled.with_guidance(&scales(3.0)).unwrap()),
            plain,
            "{method} at ω = 3"
        );
    }
}
