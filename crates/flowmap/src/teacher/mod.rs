//! Teachers: velocity fields `v(x, t)` of the probability-flow ODE `dx/dτ = v(x, τ)`.
//!
//! A teacher is either a network trained by conditional flow matching ([`VelocityNet`], trained through
//! [`crate::objective::FlowMatching`]) or the exact velocity of a Gaussian mixture ([`GmmVelocity`]), the
//! ground truth against which everything else is measured.

mod gmm;
mod net;

use std::cell::Cell;

use candle_core::Tensor;

pub use gmm::GmmVelocity;
pub use net::VelocityNet;

use crate::Result;

/// A velocity field `v(x, t)` on `B × D` states and `B × 1` times.
pub trait VelocityField {
    /// The state dimension `D`.
    fn dim(&self) -> usize;
    /// `v(x, t)`.
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;
}

impl<V: VelocityField + ?Sized> VelocityField for &V {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).velocity(x, t)
    }
}

/// Counts network function evaluations: each call on a batch is one NFE.
pub struct Counted<V> {
    pub inner: V,
    calls: Cell<usize>,
}

impl<V> Counted<V> {
    pub fn new(inner: V) -> Self {
        Counted {
            inner,
            calls: Cell::new(0),
        }
    }
    pub fn nfe(&self) -> usize {
        self.calls.get()
    }
}

impl<V: VelocityField> VelocityField for Counted<V> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.velocity(x, t)
    }
}
