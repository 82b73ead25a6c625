//! Classifier-free guidance: `w = 1` is the conditional field and `w = 0` the unconditional one, bit for
//! bit; on the analytic mixture whose classes are its components the guided velocity is its closed form;
//! a guided step costs two evaluations; bad scales and missing labels are errors. Autoguidance by a weaker
//! model is each model at `w = 1` and `w = 0` and their extrapolation between; both distil into one map
//! that serves every scale of its range, conditional or not.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, mixture, teacher};
use flowmap::cond::Cond;
use flowmap::ode::{Scheme, Solver};
use flowmap::sample;
use flowmap::teacher::{Autoguided, Guided, VelocityField};
use flowmap::Rng;

fn points(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let x = rng.normal_tensor((n, 2), DType::F64, &Device::Cpu).unwrap();
    let t: Vec<f64> = (0..n).map(|i| 0.05 + 0.9 * i as f64 / n as f64).collect();
    (x, Tensor::from_vec(t, (n, 1), &Device::Cpu).unwrap())
}

fn labels(n: usize) -> Cond {
    let l: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    Cond::from_classes(&l, 3, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The velocity of one component `N(μ, σ² I)` on the linear path, written out:
/// `S = (1 − t)² σ² + t²`, `E[x0 | x] = μ + (1 − t) σ² (x − (1 − t) μ) / S`, `E[x1 | x] = t (x − (1 − t) μ) / S`,
/// `v = E[x1 | x] − E[x0 | x]`.
fn component_velocity(x: &[f64], t: f64, mu: &[f64], std: f64) -> Vec<f64> {
    let a = 1.0 - t;
    let s = a * a * std * std + t * t;
    x.iter()
        .zip(mu)
        .map(|(&xi, &m)| {
            let r = xi - a * m;
            t * r / s - (m + a * std * std * r / s)
        })
        .collect()
}

#[test]
fn scale_one_is_the_conditional_field_and_zero_the_unconditional_one() {
    let (x, t) = points(12, 1);
    let c = labels(12);
    let g = teacher();
    let conditional = g.velocity(&x, &t, &c).unwrap();
    let unconditional = g.velocity(&x, &t, &Cond::null(12, 3, &Device::Cpu).unwrap()).unwrap();
    let at = |w| Guided::new(&g, w, 3).unwrap().velocity(&x, &t, &c).unwrap();
    assert_eq!(bits(&at(1.0)), bits(&conditional));
    assert_eq!(bits(&at(0.0)), bits(&unconditional));
    // The null class of the mixture is the whole mixture: the unlabelled field.
    assert_eq!(bits(&unconditional), bits(&g.velocity(&x, &t, &Cond::none()).unwrap()));
}

#[test]
fn the_guided_mixture_velocity_is_its_closed_form() {
    let (x, t) = points(30, 2);
    let c = labels(30);
    let g = teacher();
    let m = mixture();
    let unconditional = g.velocity(&x, &t, &Cond::none()).unwrap().to_vec2::<f64>().unwrap();
    let xs = x.to_vec2::<f64>().unwrap();
    let ts = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for w in [0.5, 2.0, 4.0] {
        let guided = Guided::new(&g, w, 3)
            .unwrap()
            .velocity(&x, &t, &c)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for i in 0..30 {
            let k = i % 3;
            let vc = component_velocity(&xs[i], ts[i], &m.means[k], m.stds[k]);
            for d in 0..2 {
                let want = unconditional[i][d] + w * (vc[d] - unconditional[i][d]);
                assert!(
                    (guided[i][d] - want).abs() < 1e-10 * (1.0 + want.abs()),
                    "w {w}, row {i}: {} against {want}",
                    guided[i][d]
                );
            }
        }
    }
}

#[test]
fn a_guided_solver_step_costs_two_evaluations_in_one_pass() {
    let (x, _) = points(8, 3);
    let c = labels(8);
    let g = teacher();
    let euler4 = Solver::fixed(Scheme::Euler, 4);
    let plain = sample::sample_ode(&g, &x, euler4, &c).unwrap();
    let guided = sample::sample_ode(&Guided::new(&g, 2.0, 3).unwrap(), &x, euler4, &c).unwrap();
    assert_eq!((plain.nfe, guided.nfe), (4, 8));
    assert_eq!(
        sample::sample_ode(&Guided::new(&g, 1.0, 3).unwrap(), &x, euler4, &c)
            .unwrap()
            .nfe,
        4
    );
    // Guidance pushes each sample towards its own class: its mean distance to the class mean shrinks.
    let m = mixture();
    let spread = |s: &Tensor| {
        let v = s.to_vec2::<f64>().unwrap();
        (0..8)
            .map(|i| {
                let mu = &m.means[i % 3];
                ((v[i][0] - mu[0]).powi(2) + (v[i][1] - mu[1]).powi(2)).sqrt()
            })
            .sum::<f64>()
    };
    let strong = sample::sample_ode(&Guided::new(&g, 4.0, 3).unwrap(), &x, euler4, &c).unwrap();
    let unguided = sample::sample_ode(&Guided::new(&g, 0.0, 3).unwrap(), &x, euler4, &c).unwrap();
    assert!(
        spread(&strong.x) < spread(&unguided.x),
        "{} vs {}",
        spread(&strong.x),
        spread(&unguided.x)
    );
    assert!(max_abs(&strong.x) < 10.0);
}

#[test]
fn bad_scales_and_missing_labels_are_errors() {
    let g = teacher();
    for w in [-0.5, f64::NAN, f64::INFINITY] {
        let e = Guided::new(&g, w, 3).err().unwrap().to_string();
        assert!(e.contains("finite number ≥ 0"), "{e}");
    }
    let (x, t) = points(4, 4);
    let e = Guided::new(&g, 2.0, 3)
        .unwrap()
        .velocity(&x, &t, &Cond::none())
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs class labels"), "{e}");
    let bad = Cond::from_classes(&[3, 3, 3, 3], 3, &Device::Cpu).unwrap();
    assert!(g.velocity(&x, &t, &bad).is_ok(), "3 is the null class");
    let e = g
        .velocity(
            &x,
            &t,
            &Cond::labels(Tensor::new(&[4u32, 0, 0, 0], &Device::Cpu).unwrap()).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("class 4 is out of range"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// Guidance distilled into a flow map.

use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{check_guidance_range, Arch, MlpConfig};
use flowmap::data::{DataSource, GaussianMixture, Labels, Matrix};
use flowmap::flow_map::{AtGuidance, FlowMap, FlowMapNet, SolverMap};
use flowmap::objective::Method;
use flowmap::pipeline::{MapJob, Teacher};
use flowmap::teacher::{GmmVelocity, VelocityNet};
use flowmap::train::{Silent, TrainConfig};

fn conditional_mlp() -> Arch {
    Arch::Mlp(MlpConfig {
        hidden: 32,
        depth: 2,
        num_classes: Some(3),
        ..MlpConfig::new(2)
    })
}

#[test]
fn a_per_row_guided_field_at_one_scale_is_the_guided_field_at_that_scale() {
    let (x, t) = points(12, 5);
    let g = teacher();
    let c = labels(12);
    for w in [0.0, 1.0, 2.5] {
        let fixed = Guided::new(&g, w, 3).unwrap().velocity(&x, &t, &c).unwrap();
        let c_w = c.with_uniform_guidance(w, 12, &Device::Cpu).unwrap();
        let per_row = Guided::per_row(&g, 3).velocity(&x, &t, &c_w).unwrap();
        assert!(max_abs(&(fixed - per_row).unwrap()) < 1e-14, "w = {w}");
    }
    let e = Guided::per_row(&g, 3).velocity(&x, &t, &c).unwrap_err().to_string();
    assert!(e.contains("guidance scale on every row"), "{e}");
}

#[test]
fn a_guided_map_seeded_from_its_teacher_is_one_teacher_step_at_every_scale() {
    let arch = conditional_mlp();
    let (tv, sv) = (VarMap::new(), VarMap::new());
    let teacher = VelocityNet::new(&arch, VarBuilder::from_varmap(&tv, DType::F64, &Device::Cpu)).unwrap();
    arch.seed_params(&tv, 3).unwrap();
    let guided = arch.with_guidance([1.0, 4.0]);
    let map = FlowMapNet::new(&guided, VarBuilder::from_varmap(&sv, DType::F64, &Device::Cpu)).unwrap();
    guided.init_from_teacher(&sv, &tv).unwrap();
    let (x, t) = points(9, 6);
    let s = (&t * 0.5).unwrap();
    let c = labels(9);
    let v = teacher.velocity(&x, &t, &c).unwrap();
    for w in [1.0, 2.0, 4.0] {
        let f = AtGuidance::new(&map, w)
            .unwrap()
            .average_velocity(&x, &t, &s, &c)
            .unwrap();
        assert!(max_abs(&(f - &v).unwrap()) < 1e-12, "w = {w}");
    }
    // The map needs its scale; an unguided network refuses one.
    let e = map.average_velocity(&x, &t, &s, &c).unwrap_err().to_string();
    assert!(e.contains("give it a guidance scale"), "{e}");
    let c_w = c.with_uniform_guidance(2.0, 9, &Device::Cpu).unwrap();
    let e = teacher.velocity(&x, &t, &c_w).unwrap_err().to_string();
    assert!(e.contains("no guidance input"), "{e}");
}

/// Labelled points of the three-component mixture: component `k` is class `k`.
fn labelled(n_per: usize, seed: u64) -> DataSource {
    let m = mixture();
    let mut rng = Rng::new(seed);
    let (mut data, mut labels) = (vec![], vec![]);
    for k in 0..3 {
        let one = GaussianMixture::new(vec![m.means[k].clone()], vec![m.stds[k]], vec![1.0]).unwrap();
        data.extend(one.sample(n_per, &mut rng));
        labels.extend(std::iter::repeat_n(k as u32, n_per));
    }
    let n = 3 * n_per;
    let split = n * 9 / 10;
    // Interleave so that both splits hold every class.
    let order: Vec<usize> = (0..n).map(|i| (i % 3) * n_per + i / 3).collect();
    let pick = |range: std::ops::Range<usize>| -> (Matrix, Vec<u32>) {
        let rows: Vec<usize> = order[range].to_vec();
        let d: Vec<f64> = rows.iter().flat_map(|&r| [data[2 * r], data[2 * r + 1]]).collect();
        (Matrix::new(rows.len(), 2, d), rows.iter().map(|&r| labels[r]).collect())
    };
    let ((train, lt), (heldout, lh)) = (pick(0..split), pick(split..n));
    DataSource::Points {
        name: "three-widths-labelled".into(),
        train,
        heldout,
        shape: vec![2],
        labels: Some(Labels {
            train: lt,
            heldout: lh,
            num_classes: 3,
        }),
        scale: None,
    }
}

#[test]
fn one_distilled_map_serves_every_scale_of_its_range() {
    let data = labelled(2000, 7);
    let teacher = Teacher::Gmm(GmmVelocity::new(mixture()));
    let arch = Arch::Mlp(MlpConfig {
        hidden: 128,
        num_classes: Some(3),
        ..MlpConfig::new(2)
    });
    let job = MapJob {
        teacher: Some(&teacher),
        train: range_training(),
        arch,
        ..MapJob::new(Method::Emd, &data)
    };
    let trained = job.run(&Silent).unwrap();
    assert_eq!(trained.meta.arch.guidance(), Some([1.0, 3.0]));
    let n = 600;
    let l: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    let c = Cond::from_classes(&l, 3, &Device::Cpu).unwrap();
    let g = GmmVelocity::new(mixture());
    assert_serves_its_range(&trained.net, &c, 0.0, |w| Box::new(Guided::new(&g, w, 3).unwrap()));
}

/// 1,500 steps at batch 256, each row's scale drawn from [1, 3].
fn range_training() -> TrainConfig {
    TrainConfig {
        steps: 1500,
        batch_size: 256,
        warmup_steps: 50,
        guidance_range: Some([1.0, 3.0]),
        ..TrainConfig::default()
    }
}

/// One step from noise to `s` of the guided map `net` at w = 1 and at w = 3, against Φ_{1→s} of the guided
/// field `field(w)` at each: each scale lands near its own Φ and far from the other's.
fn assert_serves_its_range<'a>(
    net: &FlowMapNet,
    c: &Cond,
    s_end: f32,
    field: impl Fn(f64) -> Box<dyn VelocityField + 'a>,
) {
    let n = 600;
    let x1 = sample::noise(n, &[2], 11, &Device::Cpu).unwrap();
    let (one, zero) = (
        Tensor::ones((n, 1), DType::F32, &Device::Cpu).unwrap(),
        Tensor::full(s_end, (n, 1), &Device::Cpu).unwrap(),
    );
    let exact = |w: f64| {
        let phi = SolverMap::new(field(w), Solver::Dopri5 { rtol: 1e-7, atol: 1e-7 });
        phi.map(
            &x1.to_dtype(DType::F64).unwrap(),
            &one.to_dtype(DType::F64).unwrap(),
            &zero.to_dtype(DType::F64).unwrap(),
            c,
        )
        .unwrap()
    };
    let ours = |w: f64| {
        AtGuidance::new(net, w)
            .unwrap()
            .map(&x1, &one, &zero, c)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let mse = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (phi1, phi3, f1, f3) = (exact(1.0), exact(3.0), ours(1.0), ours(3.0));
    let gap = mse(&phi1, &phi3);
    let (e11, e13, e31, e33) = (mse(&f1, &phi1), mse(&f1, &phi3), mse(&f3, &phi1), mse(&f3, &phi3));
    eprintln!(
        "Φ₁ vs Φ₃ {gap:.4}; map at w = 1: {e11:.4} to Φ₁, {e13:.4} to Φ₃; at w = 3: {e31:.4} to Φ₁, {e33:.4} to Φ₃"
    );
    assert!(
        e11 < 0.5 * gap && e33 < 0.5 * gap && e13 > 3.0 * e11 && e31 > 3.0 * e33,
        "Φ₁ vs Φ₃ {gap:.4}; map at w = 1: {e11:.4} to Φ₁, {e13:.4} to Φ₃; at w = 3: {e31:.4} to Φ₁, {e33:.4} to Φ₃"
    );
}

/// A weaker model of the three-component mixture: the same means and weights, each component 1.6 times
/// as wide (what an under-trained model's blur looks like).
fn blurred() -> GaussianMixture {
    let m = mixture();
    GaussianMixture::new(
        m.means.clone(),
        m.stds.iter().map(|s| 1.6 * s).collect(),
        m.weights.clone(),
    )
    .unwrap()
}

#[test]
fn autoguidance_is_the_strong_model_at_one_the_weak_at_zero_and_extrapolates_between() {
    let (x, t) = points(300, 5);
    let (strong, weak) = (teacher(), GmmVelocity::new(blurred()));
    for c in [Cond::none(), labels(300)] {
        let vs = strong.velocity(&x, &t, &c).unwrap();
        let vw = weak.velocity(&x, &t, &c).unwrap();
        let at = |w: f64| {
            let g = Autoguided::new(&strong, &weak, w).unwrap();
            (g.velocity(&x, &t, &c).unwrap(), g.evals_per_call())
        };
        assert_eq!(
            (bits(&at(1.0).0), at(1.0).1),
            (bits(&vs), 1),
            "w = 1 is the guided model"
        );
        assert_eq!(
            (bits(&at(0.0).0), at(0.0).1),
            (bits(&vw), 1),
            "w = 0 is the guiding model"
        );
        let (v2, evals) = at(2.5);
        assert_eq!(evals, 2);
        let closed = (&vw + ((&vs - &vw).unwrap() * 2.5).unwrap()).unwrap();
        assert!(max_abs(&(&v2 - &closed).unwrap()) < 1e-12);
        // Per row, at one scale on every row, it is the same field.
        let per_row = Autoguided::per_row(&strong, &weak).unwrap();
        let cw = c.with_uniform_guidance(2.5, 300, &Device::Cpu).unwrap();
        assert_eq!(bits(&per_row.velocity(&x, &t, &cw).unwrap()), bits(&v2));
        assert!(per_row
            .velocity(&x, &t, &c)
            .unwrap_err()
            .to_string()
            .contains("guidance scale"));
    }
    // Models of different states cannot guide each other; bad scales are refused.
    let three = GmmVelocity::new(GaussianMixture::new(vec![vec![0.0; 3]], vec![1.0], vec![1.0]).unwrap());
    let err = Autoguided::new(&strong, &three, 2.0).err().unwrap().to_string();
    assert!(err.contains("same data"), "{err}");
    assert!(Autoguided::new(&strong, &weak, -1.0).is_err());
    assert!(Autoguided::new(&strong, &weak, f64::NAN).is_err());
}

#[test]
fn autoguidance_distils_into_one_unconditional_map_for_every_scale() {
    // No labels anywhere: the map's only conditioning is w, and its target is the teacher autoguided by the
    // blurred mixture.
    let m = mixture();
    let data = DataSource::Mixture(m.clone());
    let (strong, weak) = (
        Teacher::Gmm(GmmVelocity::new(m)),
        Teacher::Gmm(GmmVelocity::new(blurred())),
    );
    let job = MapJob {
        teacher: Some(&strong),
        guide: Some(&weak),
        train: range_training(),
        arch: Arch::Mlp(MlpConfig {
            hidden: 128,
            ..MlpConfig::new(2)
        }),
        ..MapJob::new(Method::Emd, &data)
    };
    let trained = job.run(&Silent).unwrap();
    assert_eq!(trained.meta.arch.guidance(), Some([1.0, 3.0]));
    assert!(trained.meta.training.get("guide").is_some());
    let (gs, gw) = (GmmVelocity::new(mixture()), GmmVelocity::new(blurred()));
    // Unconditional, the one-step map to the data of three modes is this budget's hardest (at s = 0 its
    // own error is ~0.03, a third of Φ₁ − Φ₃); to s = 0.5 it is well learnt, and the scales apart.
    assert_serves_its_range(&trained.net, &Cond::none(), 0.5, |w| {
        Box::new(Autoguided::new(&gs, &gw, w).unwrap())
    });
    // A guiding model needs a range to distil, and a teacher to guide.
    let no_range = MapJob {
        teacher: Some(&strong),
        guide: Some(&weak),
        ..MapJob::new(Method::Emd, &data)
    };
    let err = no_range.run(&Silent).err().unwrap().to_string();
    assert!(err.contains("guidance range"), "{err}");
}

#[test]
fn guidance_ranges_are_checked_and_only_a_conditional_distillation_takes_one() {
    for (r, want) in [
        ([2.0, 1.0], "lo > hi"),
        ([-1.0, 1.0], "≥ 0"),
        ([0.0, f64::NAN], "finite"),
    ] {
        let e = check_guidance_range(r).unwrap_err().to_string();
        assert!(e.contains(want), "{r:?}: {e}");
    }
    let guided = TrainConfig {
        steps: 2,
        batch_size: 8,
        guidance_range: Some([1.0, 2.0]),
        ..TrainConfig::default()
    };
    // A data-only method on an unconditional network, an unconditional teacher with no guiding model, and
    // a teacher run each refuse it.
    let data = labelled(20, 1);
    let job = MapJob {
        train: guided.clone(),
        ..MapJob::new(Method::Meanflow, &data)
    };
    let e = job.run(&Silent).err().unwrap().to_string();
    assert!(e.contains("needs labelled data"), "{e}");
    let teacher = Teacher::Gmm(GmmVelocity::new(mixture()));
    let unlabelled = DataSource::Mixture(mixture());
    let job = MapJob {
        teacher: Some(&teacher),
        train: guided.clone(),
        ..MapJob::new(Method::Emd, &unlabelled)
    };
    let e = job.run(&Silent).err().unwrap().to_string();
    assert!(e.contains("class-conditional teacher"), "{e}");
    let e = flowmap::pipeline::train_teacher(&data, &conditional_mlp(), &guided, &Device::Cpu, &Silent)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("distils guidance into a flow map"), "{e}");
}
