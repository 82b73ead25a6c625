//! Solver convergence orders on the analytic mixture teacher, and dopri5 against a very fine RK4 solve.

mod common;

use common::*;
use flowmap::ode::{self, Scheme, Solver};

fn error(scheme: Scheme, steps: usize, x: &candle_core::Tensor, reference: &candle_core::Tensor) -> f64 {
    let n = x.dim(0).unwrap();
    let y = ode::solve(
        &teacher(),
        Solver::fixed(scheme, steps),
        x,
        &col(0.9, n),
        &col(0.1, n),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    max_abs(&(y - reference).unwrap())
}

#[test]
fn fixed_step_solvers_converge_at_their_order() {
    let (_, x) = pairs(64, 1);
    let n = x.dim(0).unwrap();
    let reference = ode::solve(
        &teacher(),
        Solver::fixed(Scheme::Rk4, 4000),
        &x,
        &col(0.9, n),
        &col(0.1, n),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    for scheme in Scheme::ALL {
        let errs: Vec<f64> = [16, 32, 64].iter().map(|&k| error(scheme, k, &x, &reference)).collect();
        let orders: Vec<f64> = errs.windows(2).map(|w| (w[0] / w[1]).log2()).collect();
        let observed = orders[1];
        let expected = scheme.order() as f64;
        assert!(
            (observed - expected).abs() < 0.35,
            "{}: errors {errs:?}, observed orders {orders:?}, expected {expected}",
            scheme.name()
        );
    }
}

#[test]
fn dopri5_agrees_with_fine_rk4() {
    let (_, x) = pairs(128, 2);
    let n = x.dim(0).unwrap();
    // Over the whole interval, down to the data.
    let reference = ode::solve(
        &teacher(),
        Solver::fixed(Scheme::Rk4, 4000),
        &x,
        &col(1.0, n),
        &col(0.0, n),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    let y = ode::solve(
        &teacher(),
        Solver::Dopri5 { rtol: 1e-6, atol: 1e-6 },
        &x,
        &col(1.0, n),
        &col(0.0, n),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    let err = max_abs(&(y - &reference).unwrap());
    assert!(err < 1e-4, "dopri5 at rtol 1e-6 differs from RK4×4000 by {err}");
    // Tighter tolerance, tighter agreement.
    let y = ode::solve(
        &teacher(),
        Solver::Dopri5 { rtol: 1e-9, atol: 1e-9 },
        &x,
        &col(1.0, n),
        &col(0.0, n),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    let err_tight = max_abs(&(y - &reference).unwrap());
    assert!(
        err_tight < err / 10.0 && err_tight < 1e-6,
        "dopri5 at 1e-9: {err_tight} (1e-6 gave {err})"
    );
}

#[test]
fn per_row_intervals_and_grids_agree() {
    // A row solved over [t, s] alone equals the same row inside a batch of different intervals.
    let (_, x) = pairs(3, 3);
    let t = candle_core::Tensor::new(&[[0.9f64], [0.5], [1.0]], &candle_core::Device::Cpu).unwrap();
    let s = candle_core::Tensor::new(&[[0.2f64], [0.5], [0.0]], &candle_core::Device::Cpu).unwrap();
    let solver = Solver::fixed(Scheme::Rk4, 50);
    let batch = ode::solve(&teacher(), solver, &x, &t, &s, flowmap::Cond::none_ref()).unwrap();
    let row0 = ode::solve(
        &teacher(),
        solver,
        &x.narrow(0, 0, 1).unwrap(),
        &col(0.9, 1),
        &col(0.2, 1),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    assert!(max_abs(&(batch.narrow(0, 0, 1).unwrap() - row0).unwrap()) < 1e-12);
    // s = t leaves the row unchanged.
    assert!(max_abs(&(batch.narrow(0, 1, 1).unwrap() - x.narrow(0, 1, 1).unwrap()).unwrap()) < 1e-15);
    // A uniform scalar grid equals the fixed-step solve.
    let grid: Vec<f64> = (0..=50).map(|i| 1.0 - i as f64 / 50.0).collect();
    let g = ode::solve_on_grid(&teacher(), Scheme::Rk4, &x, &grid, flowmap::Cond::none_ref()).unwrap();
    let f = ode::solve(
        &teacher(),
        solver,
        &x,
        &col(1.0, 3),
        &col(0.0, 3),
        flowmap::Cond::none_ref(),
    )
    .unwrap();
    assert!(max_abs(&(g - f).unwrap()) < 1e-12);
    assert!(
        ode::solve_on_grid(&teacher(), Scheme::Euler, &x, &[0.2, 0.5], flowmap::Cond::none_ref()).is_err(),
        "ascending grid accepted"
    );
}
