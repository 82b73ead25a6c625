//! Teachers: velocity fields `v(x, t)` of the probability-flow ODE `dx/dτ = v(x, τ)`.
//!
//! A teacher is either a network over any backbone trained by conditional flow matching ([`VelocityNet`], trained through
//! [`crate::objective::FlowMatching`]) or the exact velocity of a Gaussian mixture ([`GmmVelocity`]), the
//! ground truth against which everything else is measured.

mod gmm;
mod guided;
mod net;

use std::cell::Cell;

use candle_core::Tensor;

pub use gmm::GmmVelocity;
pub(crate) use guided::check_same_states;
pub use guided::{Autoguided, Guided};
pub use net::VelocityNet;

use crate::cond::Cond;
use crate::Result;

/// A velocity field `v(x, t, c)` on `B × …` states, `B × 1` times and a condition.
pub trait VelocityField {
    /// The shape of one state (`[D]` for points, `[C, H, W]` for images).
    fn state_shape(&self) -> Vec<usize>;
    /// `v(x, t, c)`.
    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor>;
    /// Network evaluations one call costs (a guided field evaluates its network twice).
    fn evals_per_call(&self) -> usize {
        1
    }
}

/// A reference to a field, or a box of one, is that field.
macro_rules! forward_velocity_field {
    ($($pointer:ty),*) => {$(
        impl<V: VelocityField + ?Sized> VelocityField for $pointer {
            fn state_shape(&self) -> Vec<usize> {
                (**self).state_shape()
            }
            fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
                (**self).velocity(x, t, c)
            }
            fn evals_per_call(&self) -> usize {
                (**self).evals_per_call()
            }
        }
    )*};
}
forward_velocity_field!(&V, Box<V>);

/// Counts network function evaluations: each call on a batch is [`VelocityField::evals_per_call`] NFE.
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
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        self.calls.set(self.calls.get() + self.inner.evals_per_call());
        self.inner.velocity(x, t, c)
    }
}
