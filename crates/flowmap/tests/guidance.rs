//! Classifier-free guidance: `w = 1` is the conditional field and `w = 0` the unconditional one, bit for
//! bit; on the analytic mixture whose classes are its components the guided velocity is its closed form;
//! a guided step costs two evaluations; bad scales and missing labels are errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, mixture, teacher};
use flowmap::cond::Cond;
use flowmap::ode::{Scheme, Solver};
use flowmap::sample;
use flowmap::teacher::{Guided, VelocityField};
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
