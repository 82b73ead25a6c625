//! Solvers for the probability-flow ODE `dx/dτ = v(x, τ)`, integrating from `t` down to `s`:
//! `Φ_{t→s}(x) = x + ∫_t^s v(x_τ, τ) dτ`.
//!
//! Times are per row (`B × 1` tensors), so one call moves every sample over its own interval. Fixed-step
//! schemes step on a grid; Dormand–Prince 5(4) runs in the reparametrised time `λ ∈ [0, 1]`,
//! `τ = t + λ (s − t)`, `dx/dλ = (s − t)·v(x, τ)`, with one adaptive step size for the batch, controlled by
//! the worst row's error.

use crate::kernels::no_grad;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cond::Cond;
use crate::teacher::VelocityField;
use crate::{state, Error, Result};

/// A fixed-step Runge–Kutta scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Order 1, one evaluation per step.
    Euler,
    /// Explicit trapezoid (Heun), order 2, two evaluations per step.
    Heun,
    /// Explicit midpoint, order 2, two evaluations per step.
    Midpoint,
    /// Classical Runge–Kutta, order 4, four evaluations per step.
    Rk4,
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [Scheme::Euler, Scheme::Heun, Scheme::Midpoint, Scheme::Rk4];
    /// Global order of accuracy.
    pub fn order(self) -> usize {
        match self {
            Scheme::Euler => 1,
            Scheme::Heun | Scheme::Midpoint => 2,
            Scheme::Rk4 => 4,
        }
    }
    /// Velocity evaluations per step.
    pub fn evals_per_step(self) -> usize {
        match self {
            Scheme::Euler => 1,
            Scheme::Heun | Scheme::Midpoint => 2,
            Scheme::Rk4 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Euler => "euler",
            Scheme::Heun => "heun",
            Scheme::Midpoint => "midpoint",
            Scheme::Rk4 => "rk4",
        }
    }
}

/// How to integrate: a fixed-step scheme with a number of steps, or adaptive Dormand–Prince.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Solver {
    Fixed { scheme: Scheme, steps: usize },
    Dopri5 { rtol: f64, atol: f64 },
}

impl Solver {
    pub fn fixed(scheme: Scheme, steps: usize) -> Self {
        Solver::Fixed { scheme, steps }
    }
    /// Dormand–Prince at `rtol = atol = tol`.
    pub fn dopri5(tol: f64) -> Self {
        Solver::Dopri5 { rtol: tol, atol: tol }
    }
    /// The tolerance used for the exact solution operator Φ in metrics and tests.
    pub fn exact() -> Self {
        Solver::Dopri5 { rtol: 1e-7, atol: 1e-7 }
    }
}

impl fmt::Display for Solver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Solver::Fixed { scheme, steps } => write!(f, "{}×{steps}", scheme.name()),
            Solver::Dopri5 { rtol, .. } => write!(f, "dopri5(rtol={rtol:e})"),
        }
    }
}

/// Parses `euler`, `heun`, `midpoint`, `rk4` (a scheme; the step count is given separately) or `dopri5`.
pub fn parse_solver(name: &str, steps: usize, tol: f64) -> Result<Solver> {
    if name == "dopri5" {
        return Ok(Solver::dopri5(tol));
    }
    let scheme = name.parse::<Scheme>()?;
    if steps == 0 {
        return Err(Error::arg("the number of solver steps must be at least 1"));
    }
    Ok(Solver::fixed(scheme, steps))
}

impl FromStr for Scheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Scheme::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            Error::arg(format!(
                "unknown solver '{s}' (expected euler, heun, midpoint, rk4 or dopri5)"
            ))
        })
    }
}

/// One step of `scheme` from times `t0` to `t1` (`B × 1` tensors, `t1 < t0` going down), under condition `c`.
pub fn step(
    field: &dyn VelocityField,
    scheme: Scheme,
    x: &Tensor,
    t0: &Tensor,
    t1: &Tensor,
    c: &Cond,
) -> Result<Tensor> {
    // The step as a time column, and broadcast over the state.
    let h_col = (t1 - t0)?;
    let h = state::per_row(&h_col, x)?;
    let v = |x: &Tensor, t: &Tensor| field.velocity(x, t, c);
    let k1 = v(x, t0)?;
    Ok(match scheme {
        Scheme::Euler => (x + k1.broadcast_mul(&h)?)?,
        Scheme::Midpoint => {
            let half = (&h * 0.5)?;
            let xm = (x + k1.broadcast_mul(&half)?)?;
            let k2 = v(&xm, &(t0 + (&h_col * 0.5)?)?)?;
            (x + k2.broadcast_mul(&h)?)?
        }
        Scheme::Heun => {
            let xe = (x + k1.broadcast_mul(&h)?)?;
            let k2 = v(&xe, t1)?;
            (x + (k1 + k2)?.broadcast_mul(&(&h * 0.5)?)?)?
        }
        Scheme::Rk4 => {
            let half = (&h * 0.5)?;
            let tm = (t0 + (&h_col * 0.5)?)?;
            let k2 = v(&(x + k1.broadcast_mul(&half)?)?, &tm)?;
            let k3 = v(&(x + k2.broadcast_mul(&half)?)?, &tm)?;
            let k4 = v(&(x + k3.broadcast_mul(&h)?)?, t1)?;
            let sum = (k1 + (k2 * 2.0)? + (k3 * 2.0)? + k4)?;
            (x + sum.broadcast_mul(&(h / 6.0)?)?)?
        }
    })
}

/// Integrates along a sequence of time columns `grid[0] → grid[1] → …` with a fixed-step scheme.
///
/// Runs under [`no_grad`]: a velocity network with trainable parameters would otherwise chain every step
/// into one graph, and memory would grow with the step count. The solution is detached.
pub fn integrate_fixed(
    field: &dyn VelocityField,
    scheme: Scheme,
    x: &Tensor,
    grid: &[Tensor],
    c: &Cond,
) -> Result<Tensor> {
    no_grad(|| {
        let mut x = x.detach();
        for w in grid.windows(2) {
            x = step(field, scheme, &x, &w[0], &w[1], c)?;
        }
        Ok(x)
    })
}

/// Integrates on a descending grid of scalar times `1 ≥ grid[0] > grid[1] > … ≥ 0`, any spacing.
pub fn solve_on_grid(field: &dyn VelocityField, scheme: Scheme, x: &Tensor, grid: &[f64], c: &Cond) -> Result<Tensor> {
    check_grid(grid)?;
    let b = x.dim(0)?;
    let cols = grid
        .iter()
        .map(|&t| Ok(Tensor::full(t, (b, 1), x.device())?.to_dtype(x.dtype())?))
        .collect::<Result<Vec<_>>>()?;
    integrate_fixed(field, scheme, x, &cols, c)
}

/// Checks that a time grid descends strictly within [0, 1].
pub fn check_grid(grid: &[f64]) -> Result<()> {
    if grid.len() < 2 {
        return Err(Error::arg("a time grid needs at least two times"));
    }
    if grid.iter().any(|t| !(0.0..=1.0).contains(t)) {
        return Err(Error::arg(format!("time grid {grid:?} leaves [0, 1]")));
    }
    if grid.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::arg(format!(
            "time grid {grid:?} must strictly decrease (maps go from t down to s)"
        )));
    }
    Ok(())
}

/// `Φ_{t→s}(x)` for per-row times `t`, `s` (`B × 1`), by `solver`; the result is detached.
pub fn solve(
    field: &dyn VelocityField,
    solver: Solver,
    x: &Tensor,
    t: &Tensor,
    s: &Tensor,
    c: &Cond,
) -> Result<Tensor> {
    no_grad(|| match solver {
        Solver::Fixed { scheme, steps } => {
            if steps == 0 {
                return Err(Error::arg("the number of solver steps must be at least 1"));
            }
            let gap = (s - t)?;
            let grid = (0..=steps)
                .map(|i| Ok((t + (&gap * (i as f64 / steps as f64))?)?))
                .collect::<Result<Vec<_>>>()?;
            integrate_fixed(field, scheme, x, &grid, c)
        }
        Solver::Dopri5 { rtol, atol } => dopri5(field, x, t, s, c, rtol, atol),
    })
}

// Dormand–Prince 5(4) tableau.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 7] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
const B4: [f64; 7] = [
    5179.0 / 57600.0,
    0.0,
    7571.0 / 16695.0,
    393.0 / 640.0,
    -92097.0 / 339200.0,
    187.0 / 2100.0,
    1.0 / 40.0,
];

/// The most steps dopri5 takes before it gives up.
pub const DOPRI5_MAX_STEPS: usize = 100_000;

fn dopri5(
    field: &dyn VelocityField,
    x: &Tensor,
    t: &Tensor,
    s: &Tensor,
    c: &Cond,
    rtol: f64,
    atol: f64,
) -> Result<Tensor> {
    if !(rtol > 0.0 && atol > 0.0) {
        return Err(Error::arg("dopri5 tolerances must be positive"));
    }
    let gap = (s - t)?;
    let gap_rows = state::per_row(&gap, x)?;
    // dx/dλ = (s − t)·v(x, t + λ(s − t))
    let rhs = |x: &Tensor, lam: f64| -> Result<Tensor> {
        let tau = (t + (&gap * lam)?)?;
        Ok(field.velocity(x, &tau, c)?.broadcast_mul(&gap_rows)?)
    };
    let worst_rms = |e: &Tensor, x0: &Tensor, x1: &Tensor| -> Result<f64> {
        let scale = (x0.abs()?.maximum(&x1.abs()?)? * rtol)?.affine(1.0, atol)?;
        let r = state::row_mean(&(e / scale)?.sqr()?)?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(r.sqrt())
    };
    let mut x = x.detach();
    let mut lam = 0.0f64;
    let mut k1 = rhs(&x, 0.0)?.detach();
    // Initial step (Hairer, Nørsett & Wanner, II.4).
    let zeros = x.zeros_like()?;
    let d0 = worst_rms(&x, &zeros, &x)?.max(1e-12);
    let d1 = worst_rms(&k1, &zeros, &x)?.max(1e-12);
    let mut h = (0.01 * d0 / d1).clamp(1e-6, 1.0);
    let mut steps = 0;
    while lam < 1.0 {
        steps += 1;
        if steps > DOPRI5_MAX_STEPS {
            return Err(Error::arg(format!(
                "dopri5 took more than {DOPRI5_MAX_STEPS} steps (rtol {rtol}, atol {atol})"
            )));
        }
        h = h.min(1.0 - lam);
        let mut k = vec![k1.clone()];
        for i in 1..7 {
            let mut xi = x.clone();
            for (j, &a) in A[i].iter().enumerate() {
                if a != 0.0 {
                    xi = (xi + (&k[j] * (a * h))?)?;
                }
            }
            k.push(rhs(&xi, lam + C[i] * h)?.detach());
        }
        // The stage-7 input is the 5th-order solution (FSAL).
        let mut x5 = x.clone();
        for (j, &a) in A[6].iter().enumerate() {
            if a != 0.0 {
                x5 = (x5 + (&k[j] * (a * h))?)?;
            }
        }
        let mut err = x.zeros_like()?;
        for j in 0..7 {
            let bj = if j < 6 { A[6][j] } else { 0.0 };
            let e = bj - B4[j];
            if e != 0.0 {
                err = (err + (&k[j] * (e * h))?)?;
            }
        }
        let ratio = worst_rms(&err, &x, &x5)?;
        if !ratio.is_finite() {
            return Err(Error::arg("dopri5: the solution became non-finite"));
        }
        if ratio <= 1.0 {
            lam += h;
            x = x5.detach();
            k1 = k.pop().expect("seven stages");
        }
        let factor = if ratio == 0.0 {
            5.0
        } else {
            (0.9 * ratio.powf(-0.2)).clamp(0.2, 5.0)
        };
        h *= factor;
        if 1.0 - lam < 1e-12 {
            break;
        }
    }
    Ok(x)
}
