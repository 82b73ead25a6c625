//! The analytic mixture velocity against an independent Monte-Carlo estimate, and its boundary values.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use flowmap::teacher::VelocityField;
use flowmap::Rng;

/// `v(x, t) = E[x1 − x0 | x_t = x]`. Given `x0`, `x1 = (x − (1 − t) x0)/t`, so `x1 − x0 = (x − x0)/t`, and
/// `p(x0 | x_t = x) ∝ p(x0)·N(x; (1 − t) x0, t² I)`: self-normalised importance sampling over data draws.
fn monte_carlo_velocity(x: [f64; 2], t: f64, draws: &[f64]) -> [f64; 2] {
    let (mut num, mut den) = ([0.0; 2], 0.0);
    for p in draws.chunks_exact(2) {
        let r2 = (0..2).map(|j| (x[j] - (1.0 - t) * p[j]).powi(2)).sum::<f64>();
        let w = (-r2 / (2.0 * t * t)).exp();
        for j in 0..2 {
            num[j] += w * (x[j] - p[j]) / t;
        }
        den += w;
    }
    [num[0] / den, num[1] / den]
}

#[test]
fn analytic_velocity_matches_monte_carlo() {
    let draws = mixture().sample(400_000, &mut Rng::new(11));
    let points = [
        ([0.3, -0.2], 0.5),
        ([-1.0, 0.4], 0.7),
        ([1.2, 0.8], 0.9),
        ([0.0, 1.0], 0.35),
    ];
    for (x, t) in points {
        let mc = monte_carlo_velocity(x, t, &draws);
        let xt = Tensor::new(&[x], &Device::Cpu).unwrap();
        let v: Vec<f64> = teacher()
            .velocity(&xt, &col(t, 1), flowmap::Cond::none_ref())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = ((v[0] - mc[0]).powi(2) + (v[1] - mc[1]).powi(2)).sqrt();
        assert!(err < 0.03, "x {x:?}, t {t}: analytic {v:?}, Monte Carlo {mc:?}");
    }
}

#[test]
fn velocity_at_the_ends_of_the_path() {
    // At t = 1, x_t = x1, so v(x, 1) = x − E[x0]; at t = 0, x_t = x0, so v(x, 0) = E[x1] − x = −x.
    let g = mixture();
    let mean: Vec<f64> = (0..2)
        .map(|j| g.means.iter().zip(&g.weights).map(|(m, w)| m[j] * w).sum())
        .collect();
    let x = Tensor::new(&[[0.5f64, -1.5], [2.0, 0.1]], &Device::Cpu).unwrap();
    let v1 = teacher().velocity(&x, &col(1.0, 2), flowmap::Cond::none_ref()).unwrap();
    let expect = x
        .broadcast_sub(&Tensor::new(&[[mean[0], mean[1]]], &Device::Cpu).unwrap())
        .unwrap();
    assert!(max_abs(&(v1 - expect).unwrap()) < 1e-12);
    let v0 = teacher().velocity(&x, &col(0.0, 2), flowmap::Cond::none_ref()).unwrap();
    assert!(max_abs(&(v0 + &x).unwrap()) < 1e-12);
    // f32 and f64 agree to f32 rounding.
    let v32 = teacher()
        .velocity(
            &x.to_dtype(DType::F32).unwrap(),
            &col(0.4, 2).to_dtype(DType::F32).unwrap(),
            flowmap::Cond::none_ref(),
        )
        .unwrap();
    let v64 = teacher().velocity(&x, &col(0.4, 2), flowmap::Cond::none_ref()).unwrap();
    assert!(max_abs(&(v32.to_dtype(DType::F64).unwrap() - v64).unwrap()) < 1e-5);
}
