//! The flow-map parameterisation, the student's initialisation, gradients, and the exact map Φ.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use flowmap::backbone::mlp::init_from_teacher;
use flowmap::backbone::mlp::seed_params;
use flowmap::backbone::MlpConfig;
use flowmap::dist::Shard;
use flowmap::flow_map::{Diagonal, FlowMap, FlowMapNet, SolverMap};
use flowmap::objective::{self, DistillConfig, FlowMatching, Method, Objective, StepContext};
use flowmap::teacher::{VelocityField, VelocityNet};
use flowmap::Rng;

fn small() -> MlpConfig {
    MlpConfig {
        hidden: 32,
        depth: 2,
        ..MlpConfig::new(2)
    }
}

fn nets() -> (VelocityNet, VarMap, FlowMapNet, VarMap) {
    let (tv, sv) = (VarMap::new(), VarMap::new());
    let teacher = VelocityNet::new(&small(), VarBuilder::from_varmap(&tv, DType::F32, &Device::Cpu)).unwrap();
    let student = FlowMapNet::new(&small(), VarBuilder::from_varmap(&sv, DType::F32, &Device::Cpu)).unwrap();
    seed_params(&tv, 3).unwrap();
    seed_params(&sv, 4).unwrap();
    (teacher, tv, student, sv)
}

fn f32_pairs(n: usize) -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(9);
    let x = rng.normal_tensor((n, 2), DType::F32, &Device::Cpu).unwrap();
    let mut t = rng.uniform_vec(n);
    let mut s = rng.uniform_vec(n);
    for i in 0..n {
        if s[i] > t[i] {
            std::mem::swap(&mut s[i], &mut t[i]);
        }
    }
    let t = Tensor::from_vec(t, (n, 1), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let s = Tensor::from_vec(s, (n, 1), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (x, t, s)
}

#[test]
fn map_is_identity_on_the_diagonal() {
    let (_, _, student, _) = nets();
    let (x, t, _) = f32_pairs(64);
    let y = student.map(&x, &t, &t, flowmap::Cond::none_ref()).unwrap();
    // (s − t) = 0 exactly, so f(x, t, t) = x bit for bit.
    assert_eq!(y.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
}

#[test]
fn student_initialised_from_teacher_is_one_euler_step() {
    let (teacher, tv, student, sv) = nets();
    init_from_teacher(&sv, &tv).unwrap();
    let (x, t, s) = f32_pairs(64);
    let f = student.map(&x, &t, &s, flowmap::Cond::none_ref()).unwrap();
    let euler = (&x
        + teacher
            .velocity(&x, &t, flowmap::Cond::none_ref())
            .unwrap()
            .broadcast_mul(&(&s - &t).unwrap())
            .unwrap())
    .unwrap();
    let err = max_abs(&(f - euler).unwrap());
    assert!(
        err < 1e-6,
        "student at init differs from one teacher Euler step by {err}"
    );
    // Its diagonal is the teacher's velocity.
    let diag = Diagonal(&student).velocity(&x, &t, flowmap::Cond::none_ref()).unwrap();
    assert!(max_abs(&(diag - teacher.velocity(&x, &t, flowmap::Cond::none_ref()).unwrap()).unwrap()) < 1e-6);
}

fn assert_all_grads(vars: &VarMap, loss: &Tensor, what: &str) {
    let grads = loss.backward().unwrap();
    for (name, var) in flowmap::flow_map::vars_sorted(vars) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient reaches '{name}'"));
        assert!(mean_sq(g) > 0.0, "{what}: gradient of '{name}' is zero");
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let (teacher, tv, student, sv) = nets();
    let mut rng = Rng::new(1);
    let x0 = rng.normal_tensor((128, 2), DType::F32, &Device::Cpu).unwrap();
    let x1 = rng.normal_tensor((128, 2), DType::F32, &Device::Cpu).unwrap();
    let mut cx = StepContext::<dyn VelocityField> {
        model: &teacher,
        target: &teacher,
        x0: &x0,
        batch_x0: &x0,
        shard: Shard::whole(128),
        x1: &x1,
        cond: flowmap::Cond::none_ref(),
        classes: None,
        path: &flowmap::path::LinearPath,
        progress: 0.0,
        step: 0,
        rng: &mut rng,
    };
    let loss = FlowMatching::new().loss(&mut cx).unwrap();
    assert_all_grads(&tv, &loss, "flow matching");
    for method in Method::all() {
        let mut rng = Rng::new(2);
        let mut cx = StepContext::<dyn FlowMap> {
            model: &student,
            target: &student,
            x0: &x0,
            batch_x0: &x0,
            shard: Shard::whole(128),
            x1: &x1,
            cond: flowmap::Cond::none_ref(),
            classes: None,
            path: &flowmap::path::LinearPath,
            progress: 0.3,
            step: 0,
            rng: &mut rng,
        };
        let t = method.needs_teacher().then_some(&teacher as &dyn VelocityField);
        let objective = objective::build(method, t, DistillConfig::default(), Some((&sv, &small().into()))).unwrap();
        let loss = objective.loss(&mut cx).unwrap();
        assert_all_grads(&sv, &loss, method.name());
        // The stop-gradient target and the teacher receive none.
        assert!(loss.backward().unwrap().get(tv.all_vars()[0].as_tensor()).is_none());
    }
}

#[test]
fn exact_map_satisfies_the_semigroup_property_and_its_diagonal_is_v() {
    let exact = SolverMap::new(teacher(), flowmap::ode::Solver::exact());
    let (x0, x1) = pairs(128, 5);
    let err = flowmap::metrics::semigroup_error(
        &exact,
        &flowmap::metrics::PathPoints {
            x0: &x0,
            x1: &x1,
            cond: flowmap::Cond::none_ref(),
            path: &flowmap::path::LinearPath,
        },
        4,
    )
    .unwrap();
    assert!(err < 1e-10, "semigroup error of Φ: {err}");
    let xt = (&x0 + (&x1 - &x0).unwrap().broadcast_mul(&col(0.6, 128)).unwrap()).unwrap();
    let on_diag = exact
        .average_velocity(&xt, &col(0.6, 128), &col(0.6, 128), flowmap::Cond::none_ref())
        .unwrap();
    assert!(
        max_abs(
            &(on_diag
                - teacher()
                    .velocity(&xt, &col(0.6, 128), flowmap::Cond::none_ref())
                    .unwrap())
            .unwrap()
        ) < 1e-12
    );
    // Near the diagonal the average velocity tends to v: F(x, t, t − h) = v(x, t) + O(h).
    let h = 1e-4;
    let near = exact
        .average_velocity(&xt, &col(0.6, 128), &col(0.6 - h, 128), flowmap::Cond::none_ref())
        .unwrap();
    assert!(
        max_abs(
            &(near
                - teacher()
                    .velocity(&xt, &col(0.6, 128), flowmap::Cond::none_ref())
                    .unwrap())
            .unwrap()
        ) < 1e-2
    );
}

#[test]
fn power_grids_run_from_one_to_zero_and_rho_one_is_uniform() {
    use flowmap::sample::TimeGrid;
    assert_eq!(TimeGrid::power(2, 2.0).unwrap().times(), &[1.0, 0.25, 0.0]);
    assert_eq!(TimeGrid::power(4, 1.0).unwrap(), TimeGrid::uniform(4).unwrap());
    assert_eq!(TimeGrid::power(1, 3.0).unwrap().times(), &[1.0, 0.0]);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(TimeGrid::power(2, bad).is_err(), "ρ = {bad} accepted");
    }
}

#[test]
fn grid_selection_keeps_the_grid_with_the_least_validation_distance() {
    use flowmap::data::DataSource;
    use flowmap::sample::{select_grid, Sampler, TimeGrid, GRID_POWERS};
    // One teacher Euler step per map application: a map whose samples depend strongly on the grid.
    let euler = SolverMap::new(teacher(), flowmap::ode::Solver::fixed(flowmap::ode::Scheme::Euler, 1));
    let validation = DataSource::Mixture(mixture()).heldout(2000, 3);
    let dev = Device::Cpu;
    let choose = |powers: &[f64], validation: &[f64]| {
        select_grid(
            &euler,
            2,
            Sampler::Deterministic,
            powers,
            validation,
            2000,
            &flowmap::sample::SampleContext::new(7),
            &dev,
        )
    };
    let choice = choose(&GRID_POWERS, &validation).unwrap();
    assert_eq!(choice.scores.len(), GRID_POWERS.len());
    let best = choice.scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    assert_eq!(choice.scores.iter().find(|s| s.1 == best).unwrap().0, choice.rho);
    assert_eq!(choice.grid, TimeGrid::power(2, choice.rho).unwrap());
    // The candidates really differ (else the choice would mean nothing), and the choice is seeded.
    let worst = choice.scores.iter().map(|s| s.1).fold(0.0, f64::max);
    assert!(worst > 2.0 * best, "scores {:?}", choice.scores);
    assert_eq!(choose(&GRID_POWERS, &validation).unwrap().scores, choice.scores);
    assert!(choose(&[], &validation).is_err());
    assert!(choose(&GRID_POWERS, &validation[..3]).is_err());
}
