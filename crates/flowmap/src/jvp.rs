//! Forward-mode differentiation: Jacobian–vector products `(y, ẏ) = (f(x), Df(x)·ẋ)` in one pass.
//!
//! candle has reverse mode only, and finite differences in f32 are noisy, so each of flowmap's layers
//! implements [`Jvp`] by hand on detached tensors (no autograd graph is built). A layer's tangent rule is
//! local (linear: `ẏ = ẋ Wᵀ`; SiLU: `ẏ = ẋ ⊙ σ(x)(1 + x(1 − σ(x)))`; sinusoidal embedding:
//! `d/dt [sin ωt, cos ωt] = [ω cos ωt, −ω sin ωt]·ṫ`), and networks chain them, so convolution,
//! normalisation or attention layers plug in by implementing the same trait.
//!
//! [`TangentMap`] is the flow-map view: the derivative of `F(x, t, s)` along a direction `(ẋ, ṫ, ṡ)`.
//! [`FiniteDifference`] gives any flow map a central-difference JVP, for comparison and for maps with no
//! analytic tangent (such as an ODE solver).

use candle_core::{Module, Tensor};

use crate::flow_map::FlowMap;
use crate::Result;

/// A layer with a forward-mode derivative.
pub trait Jvp {
    /// `(f(x), Df(x)·ẋ)`, computed on detached tensors.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// The SiLU activation `x·σ(x)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silu;

impl Module for Silu {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.silu()
    }
}

impl Jvp for Silu {
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.detach();
        let sig = candle_nn::ops::sigmoid(&x)?;
        let y = (&x * &sig)?;
        // d/dx [x σ(x)] = σ(x) + x σ(x)(1 − σ(x)) = σ(x) + y (1 − σ(x))
        let slope = (&sig + (&y * sig.affine(-1.0, 1.0)?)?)?;
        Ok((y, (dx.detach() * slope)?))
    }
}

/// The derivative of a flow map's average velocity `F(x, t, s)` along `(ẋ, ṫ, ṡ)`.
pub trait TangentMap: FlowMap {
    /// `(F(x, t, s), ∂_x F·ẋ + ∂_t F·ṫ + ∂_s F·ṡ)`, both detached.
    #[allow(clippy::too_many_arguments)]
    fn average_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        s: &Tensor,
        dx: &Tensor,
        dt: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
}

impl<M: TangentMap + ?Sized> TangentMap for &M {
    fn average_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        s: &Tensor,
        dx: &Tensor,
        dt: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        (**self).average_velocity_jvp(x, t, s, dx, dt, ds)
    }
}

/// A flow map whose tangent is taken by central differences with step `h`:
/// `(F(z + h ż) − F(z − h ż)) / 2h`, `z = (x, t, s)`. Two extra evaluations; error `O(h²)` plus rounding
/// `O(ε_mach/h)`.
pub struct FiniteDifference<M> {
    pub map: M,
    pub h: f64,
}

impl<M: FlowMap> FlowMap for FiniteDifference<M> {
    fn dim(&self) -> usize {
        self.map.dim()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.map.average_velocity(x, t, s)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.map.map(x, t, s)
    }
}

impl<M: FlowMap> TangentMap for FiniteDifference<M> {
    fn average_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        s: &Tensor,
        dx: &Tensor,
        dt: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.h;
        let shift = |z: &Tensor, dz: &Tensor, sign: f64| -> Result<Tensor> { Ok((z.detach() + (dz * (sign * h))?)?) };
        let plus = self
            .map
            .average_velocity(&shift(x, dx, 1.0)?, &shift(t, dt, 1.0)?, &shift(s, ds, 1.0)?)?;
        let minus = self
            .map
            .average_velocity(&shift(x, dx, -1.0)?, &shift(t, dt, -1.0)?, &shift(s, ds, -1.0)?)?;
        let f = self
            .map
            .average_velocity(&x.detach(), &t.detach(), &s.detach())?
            .detach();
        Ok((f, ((plus - minus)? / (2.0 * h))?.detach()))
    }
}
