//! A velocity network `v_φ(x, t, c)`, trained by conditional flow matching.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::VelocityField;
use crate::backbone::{Arch, Backbone, Role};
use crate::cond::Cond;
use crate::Result;

/// A velocity field `v_φ(x, t, c)` over any [`Arch`].
#[derive(Clone, Debug)]
pub struct VelocityNet {
    arch: Arch,
    net: Arc<dyn Backbone>,
}

impl VelocityNet {
    pub fn new(arch: impl Into<Arch>, vb: VarBuilder) -> Result<Self> {
        let arch = arch.into();
        let net = arch.build(Role::Velocity, vb)?;
        Ok(VelocityNet { arch, net })
    }
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The backbone (to turn training-time dropout on: [`Backbone::set_dropout_seed`]).
    pub fn backbone(&self) -> &dyn Backbone {
        &*self.net
    }
}

impl VelocityField for VelocityNet {
    fn state_shape(&self) -> Vec<usize> {
        self.arch.state_shape()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        self.net.forward(x, t, None, c)
    }
}
