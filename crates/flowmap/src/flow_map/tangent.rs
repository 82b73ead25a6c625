//! Tangents of flow maps: `(F, ∂_x F·ẋ + ∂_t F·ṫ + ∂_s F·ṡ)` at a point, along a direction.

use candle_core::Tensor;

use super::FlowMap;
use crate::cond::Cond;
use crate::Result;

/// Where a map is evaluated: the state, the two times and the condition.
#[derive(Clone, Copy)]
pub struct Point<'a> {
    pub x: &'a Tensor,
    pub t: &'a Tensor,
    pub s: &'a Tensor,
    pub cond: &'a Cond,
}

/// A direction `(ẋ, ṫ, ṡ)` at a [`Point`] (the condition is held fixed).
pub struct Tangent {
    pub x: Tensor,
    pub t: Tensor,
    pub s: Tensor,
}

impl Tangent {
    /// `(v, 1, 0)`: along the flow of `v` in the start time, holding the end time (the Eulerian direction).
    pub fn along_start(v: &Tensor, at: &Point<'_>) -> Result<Self> {
        Ok(Tangent {
            x: v.clone(),
            t: at.t.ones_like()?,
            s: at.s.zeros_like()?,
        })
    }
    /// `(0, 0, 1)`: the end time alone (the Lagrangian direction).
    pub fn along_end(at: &Point<'_>) -> Result<Self> {
        Ok(Tangent {
            x: at.x.zeros_like()?,
            t: at.t.zeros_like()?,
            s: at.s.ones_like()?,
        })
    }
}

/// The derivative of a flow map's average velocity `F(x, t, s, c)` along `(ẋ, ṫ, ṡ)`.
pub trait TangentMap: FlowMap {
    /// `(F(x, t, s, c), ∂_x F·ẋ + ∂_t F·ṫ + ∂_s F·ṡ)`, both detached.
    fn average_velocity_jvp(&self, at: &Point<'_>, along: &Tangent) -> Result<(Tensor, Tensor)>;
}

impl<M: TangentMap + ?Sized> TangentMap for &M {
    fn average_velocity_jvp(&self, at: &Point<'_>, along: &Tangent) -> Result<(Tensor, Tensor)> {
        (**self).average_velocity_jvp(at, along)
    }
}

/// A flow map whose tangent is taken by central differences with step `h`:
/// `(F(z + h ż) − F(z − h ż)) / 2h`, `z = (x, t, s)`. Two extra evaluations; error `O(h²)` plus rounding
/// `O(ε_mach/h)`. Any map has one, so the continuous objectives train any backbone.
pub struct FiniteDifference<M> {
    pub map: M,
    pub h: f64,
}

impl<M: FlowMap> FlowMap for FiniteDifference<M> {
    fn state_shape(&self) -> Vec<usize> {
        self.map.state_shape()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        self.map.average_velocity(x, t, s, c)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        self.map.map(x, t, s, c)
    }
    fn as_tangent(&self) -> Option<&dyn TangentMap> {
        Some(self)
    }
}

impl<M: FlowMap> TangentMap for FiniteDifference<M> {
    fn average_velocity_jvp(&self, at: &Point<'_>, along: &Tangent) -> Result<(Tensor, Tensor)> {
        let h = self.h;
        let shift = |z: &Tensor, dz: &Tensor, sign: f64| -> Result<Tensor> { Ok((z.detach() + (dz * (sign * h))?)?) };
        let eval = |sign: f64| {
            self.map.average_velocity(
                &shift(at.x, &along.x, sign)?,
                &shift(at.t, &along.t, sign)?,
                &shift(at.s, &along.s, sign)?,
                at.cond,
            )
        };
        let (plus, minus) = (eval(1.0)?, eval(-1.0)?);
        let f = self
            .map
            .average_velocity(&at.x.detach(), &at.t.detach(), &at.s.detach(), at.cond)?
            .detach();
        Ok((f, ((plus - minus)? / (2.0 * h))?.detach()))
    }
}
