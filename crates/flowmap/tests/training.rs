//! Training: the loss falls, the same seed reproduces a run bit for bit, checkpoints round-trip exactly,
//! and distilling from the analytic teacher brings the map towards Φ.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::checkpoint::{Checkpoint, ModelKind};
use flowmap::data::{DataSource, Toy};
use flowmap::flow_map::{FlowMap, SolverMap};
use flowmap::objective::{DistillConfig, Method};
use flowmap::pipeline::{self, MapJob, Teacher};
use flowmap::teacher::VelocityField;
use flowmap::train::TrainConfig;
use flowmap::Rng;

fn small() -> MlpConfig {
    MlpConfig {
        hidden: 64,
        depth: 2,
        ..MlpConfig::new(2)
    }
}

fn tc(steps: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 256,
        seed,
        warmup_steps: 10,
        ..TrainConfig::default()
    }
}

fn probe() -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(77);
    let x = rng.normal_tensor((32, 2), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::full(0.8f32, (32, 1), &Device::Cpu).unwrap();
    let s = Tensor::full(0.3f32, (32, 1), &Device::Cpu).unwrap();
    (x, t, s)
}

#[test]
fn flow_matching_loss_falls() {
    let data = DataSource::Toy(Toy::Moons);
    let run = pipeline::train_teacher(
        &data,
        &Arch::Mlp(small()),
        &tc(400, 0),
        &Device::Cpu,
        &flowmap::train::Silent,
    )
    .unwrap();
    let (first, last) = run.log.first_last();
    assert!(last < 0.8 * first, "flow-matching loss {first} → {last}");
}

#[test]
fn same_seed_same_numbers_and_checkpoints_round_trip_bit_exactly() {
    let data = DataSource::Toy(Toy::Checkerboard);
    let teach = |seed| {
        pipeline::train_teacher(
            &data,
            &Arch::Mlp(small()),
            &tc(30, seed),
            &Device::Cpu,
            &flowmap::train::Silent,
        )
        .unwrap()
    };
    let (a, b, c) = (teach(5), teach(5), teach(6));
    let (x, t, _) = probe();
    let va = a
        .net
        .velocity(&x, &t, flowmap::Cond::none_ref())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        va,
        b.net
            .velocity(&x, &t, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        "same seed, different numbers"
    );
    assert_ne!(
        va,
        c.net
            .velocity(&x, &t, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        "different seeds, same numbers"
    );
    assert_eq!(a.log.losses, b.log.losses);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    a.save(&path).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.meta, a.meta);
    let (net, _) = ck.velocity_net(&Device::Cpu).unwrap();
    assert_eq!(
        va,
        net.velocity(&x, &t, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        "checkpoint changed the outputs"
    );
    assert!(ck
        .flow_map_net(&Device::Cpu)
        .err()
        .unwrap()
        .to_string()
        .contains("holds a teacher"));

    // A distilled map round-trips too, and a second identical distillation is identical.
    let teacher = Teacher::Net {
        net: a.net.clone(),
        vars: a.vars.clone(),
        meta: a.meta.clone(),
    };
    let d = |seed| {
        MapJob {
            teacher: Some(&teacher),
            objective: DistillConfig::default(),
            train: tc(20, seed),
            arch: Arch::Mlp(small()),
            ..MapJob::new(Method::Emd, &data)
        }
        .run(&flowmap::train::Silent)
        .unwrap()
    };
    let (m1, m2) = (d(1), d(1));
    let (x, t, s) = probe();
    let y1 = m1
        .net
        .map(&x, &t, &s, flowmap::Cond::none_ref())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        y1,
        m2.net
            .map(&x, &t, &s, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
    let mpath = dir.path().join("m.safetensors");
    m1.save(&mpath).unwrap();
    let ck = Checkpoint::load(&mpath).unwrap();
    assert_eq!(ck.meta.kind, ModelKind::FlowMap);
    let (net, _) = ck.flow_map_net(&Device::Cpu).unwrap();
    assert_eq!(
        y1,
        net.map(&x, &t, &s, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
}

#[test]
fn distilling_the_analytic_teacher_approaches_the_exact_map() {
    let teacher = Teacher::Gmm(flowmap::teacher::GmmVelocity::new(mixture()));
    let data = teacher.data().unwrap();
    let exact = SolverMap::new(&teacher, flowmap::ode::Solver::dopri5(1e-6));
    let (x0, x1) = pairs(512, 3);
    let (x0, x1) = (x0.to_dtype(DType::F32).unwrap(), x1.to_dtype(DType::F32).unwrap());
    let grid = flowmap::metrics::triangle_grid(5);
    let mut errors = vec![];
    let mut sg = vec![];
    for method in [Method::Emd, Method::Lmd] {
        let mut monitor = |step: usize, net: &flowmap::flow_map::FlowMapNet| -> flowmap::Result<()> {
            let e = flowmap::metrics::flow_map_errors(
                net,
                &exact,
                &flowmap::metrics::PathPoints {
                    x0: &x0,
                    x1: &x1,
                    cond: flowmap::Cond::none_ref(),
                    path: &flowmap::path::LinearPath,
                },
                &grid,
            )?;
            errors.push((method, step, flowmap::metrics::mean_relative(&e)));
            sg.push((
                method,
                step,
                flowmap::metrics::semigroup_error(
                    net,
                    &flowmap::metrics::PathPoints {
                        x0: &x0,
                        x1: &x1,
                        cond: flowmap::Cond::none_ref(),
                        path: &flowmap::path::LinearPath,
                    },
                    4,
                )?,
            ));
            Ok(())
        };
        MapJob {
            teacher: Some(&teacher),
            objective: DistillConfig::default(),
            train: tc(1000, 2),
            arch: Arch::Mlp(small()),
            ..MapJob::new(method, &data)
        }
        .run_monitored(&flowmap::train::Silent, 250, &mut monitor)
        .unwrap();
    }
    for method in [Method::Emd, Method::Lmd] {
        let e: Vec<f64> = errors.iter().filter(|r| r.0 == method).map(|r| r.2).collect();
        let (start, end) = (e[0], *e.last().unwrap());
        assert!(end < 0.25 * start, "{method}: relative flow-map error {start} → {end}");
        // A fresh network starts as a near-constant map, trivially consistent; once it moves, the
        // semigroup error must come down.
        let g: Vec<f64> = sg.iter().filter(|r| r.0 == method).map(|r| r.2).collect();
        let peak = g.iter().cloned().fold(0.0, f64::max);
        assert!(
            *g.last().unwrap() < 0.7 * peak,
            "{method}: semigroup error over training {g:?}"
        );
    }
}

/// An objective's `lr_scale` is the run's learning rate scaled, nothing else: MeanFlow at `lr = 2·10⁻³`
/// with scale 0.5 trains the same weights, bit for bit, as at `lr = 10⁻³` with scale 1; a different
/// scale trains different ones; a non-positive scale is refused by name.
#[test]
fn an_objectives_learning_rate_scale_scales_the_runs_learning_rate() {
    let data = DataSource::Toy(Toy::Checkerboard);
    let run = |lr: f64, scale: f64| {
        let mut objective = DistillConfig::for_data(Method::Meanflow, &data.state_shape(), false);
        objective.lr_scale = scale;
        MapJob {
            objective,
            train: TrainConfig { lr, ..tc(20, 3) },
            arch: Arch::Mlp(small()),
            ..MapJob::new(Method::Meanflow, &data)
        }
        .run(&flowmap::train::Silent)
    };
    let (x, t, s) = probe();
    let out = |lr, scale| {
        let m = run(lr, scale).unwrap();
        m.net
            .map(&x, &t, &s, flowmap::Cond::none_ref())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let base = out(1e-3, 1.0);
    assert_eq!(base, out(2e-3, 0.5), "the scale is not the learning rate's");
    assert_ne!(base, out(1e-3, 0.5), "the scale changed nothing");
    let e = run(1e-3, 0.0).err().unwrap().to_string();
    assert!(e.contains("lr_scale"), "{e}");
}
