//! Flow maps `f(x, t, s) ≈ Φ_{t→s}(x)`, `0 ≤ s ≤ t ≤ 1`, in the average-velocity parameterisation
//! `f(x, t, s) = x + (s − t)·F(x, t, s)`.
//!
//! The family in one trait:
//! - a trained network over any backbone ([`FlowMapNet`]);
//! - an ODE solver on a velocity field ([`SolverMap`]): the teacher's sampler, and with a tight
//!   tolerance the exact solution operator Φ that everything is measured against;
//! - its diagonal `F(x, t, t) = v(x, t)` ([`Diagonal`]): the flow-matching velocity is the `s → t` limit.
//!
//! A map may also have a tangent ([`TangentMap`]): the derivative of `F` along a direction `(ẋ, ṫ, ṡ)`,
//! which only the continuous-time objectives use; [`FiniteDifference`] gives any map one.

mod net;
mod tangent;

use std::cell::Cell;

use candle_core::Tensor;

pub use net::FlowMapNet;
pub use tangent::{FiniteDifference, Point, Tangent, TangentMap};

pub use crate::backbone::vars_sorted;
use crate::cond::Cond;
use crate::ode::{self, Solver};
use crate::teacher::VelocityField;
use crate::{state, Result};

/// A map `f(x, t, s, c)` from time `t` down to time `s`, for `B × …` states, `B × 1` times and a condition.
pub trait FlowMap {
    /// The shape of one state (`[D]` for points, `[C, H, W]` for images).
    fn state_shape(&self) -> Vec<usize>;

    /// The average velocity `F(x, t, s, c)`, so that `f(x, t, s, c) = x + (s − t)·F(x, t, s, c)`.
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor>;

    /// `f(x, t, s, c) = x + (s − t)·F(x, t, s, c)`; `f(x, t, t, c) = x` holds exactly.
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        let f = self.average_velocity(x, t, s, c)?;
        Ok((x + f.broadcast_mul(&state::per_row(&(s - t)?, x)?)?)?)
    }

    /// The map's exact tangent, when it has one (a network whose backbone has a tangent rule).
    fn as_tangent(&self) -> Option<&dyn TangentMap> {
        None
    }
}

impl<M: FlowMap + ?Sized> FlowMap for &M {
    fn state_shape(&self) -> Vec<usize> {
        (**self).state_shape()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        (**self).average_velocity(x, t, s, c)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        (**self).map(x, t, s, c)
    }
    fn as_tangent(&self) -> Option<&dyn TangentMap> {
        (**self).as_tangent()
    }
}

/// A guidance-distilled flow map at one guidance scale `w`: every evaluation carries `w` on each row of its
/// condition, so samplers and metrics use it as any other map (one network evaluation per step).
pub struct AtGuidance<M> {
    pub map: M,
    pub w: f64,
}

impl<M: FlowMap> AtGuidance<M> {
    /// Errors unless `w` is a finite number `≥ 0`.
    pub fn new(map: M, w: f64) -> Result<Self> {
        crate::cond::check_guidance_scale(w)?;
        Ok(AtGuidance { map, w })
    }
}

impl<M: FlowMap> FlowMap for AtGuidance<M> {
    fn state_shape(&self) -> Vec<usize> {
        self.map.state_shape()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        let c = c.with_uniform_guidance(self.w, x.dim(0)?, x.device())?;
        self.map.average_velocity(x, t, s, &c)
    }
}

/// The diagonal of a flow map, `v(x, t, c) = F(x, t, t, c)`: the velocity a flow map encodes as `s → t`.
pub struct Diagonal<M>(pub M);

impl<M: FlowMap> VelocityField for Diagonal<M> {
    fn state_shape(&self) -> Vec<usize> {
        self.0.state_shape()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        self.0.average_velocity(x, t, t, c)
    }
}

/// The flow map of a velocity field computed by an ODE solver. With [`Solver::exact`] this is Φ itself.
pub struct SolverMap<V> {
    pub field: V,
    pub solver: Solver,
}

impl<V: VelocityField> SolverMap<V> {
    pub fn new(field: V, solver: Solver) -> Self {
        SolverMap { field, solver }
    }
    /// The exact solution operator Φ (dopri5 at tolerance 1e-7).
    pub fn exact(field: V) -> Self {
        SolverMap {
            field,
            solver: Solver::exact(),
        }
    }
}

impl<V: VelocityField> FlowMap for SolverMap<V> {
    fn state_shape(&self) -> Vec<usize> {
        self.field.state_shape()
    }
    /// `(Φ_{t→s}(x) − x)/(s − t)`, and `v(x, t)` on rows where `s = t`.
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        let y = self.map(x, t, s, c)?;
        let gap = (s - t)?;
        let on_diag = gap.abs()?.lt(1e-9)?;
        let safe_gap = on_diag.where_cond(&gap.ones_like()?, &gap)?;
        let avg = (y - x)?.broadcast_div(&state::per_row(&safe_gap, x)?)?;
        let v = self.field.velocity(x, t, c)?;
        Ok(state::per_row(&on_diag, x)?
            .broadcast_as(avg.shape())?
            .where_cond(&v, &avg)?)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        ode::solve(&self.field, self.solver, x, t, s, c)
    }
}

/// Counts flow-map evaluations: each `map` or `average_velocity` call on a batch is one NFE.
pub struct CountedMap<M> {
    pub inner: M,
    calls: Cell<usize>,
}

impl<M> CountedMap<M> {
    pub fn new(inner: M) -> Self {
        CountedMap {
            inner,
            calls: Cell::new(0),
        }
    }
    pub fn nfe(&self) -> usize {
        self.calls.get()
    }
}

impl<M: FlowMap> FlowMap for CountedMap<M> {
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.average_velocity(x, t, s, c)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.map(x, t, s, c)
    }
}
