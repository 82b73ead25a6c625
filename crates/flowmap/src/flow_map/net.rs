//! A learned flow map: a backbone read as the average velocity `F_θ(x, t, s, c)`.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{FlowMap, Point, Tangent, TangentMap};
use crate::backbone::{Arch, Backbone, Role};
use crate::cond::Cond;
use crate::Result;

/// A flow map network, `F_θ(x, t, s, c) = backbone(x, t, t − s, c)`, over any [`Arch`].
#[derive(Clone, Debug)]
pub struct FlowMapNet {
    arch: Arch,
    net: Arc<dyn Backbone>,
}

impl FlowMapNet {
    pub fn new(arch: impl Into<Arch>, vb: VarBuilder) -> Result<Self> {
        let arch = arch.into();
        let net = arch.build(Role::FlowMap, vb)?;
        Ok(FlowMapNet { arch, net })
    }
    pub fn arch(&self) -> &Arch {
        &self.arch
    }
    /// The backbone (to turn training-time dropout on: [`Backbone::set_dropout_seed`]).
    pub fn backbone(&self) -> &dyn Backbone {
        &*self.net
    }
}

impl FlowMap for FlowMapNet {
    fn state_shape(&self) -> Vec<usize> {
        self.arch.state_shape()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        self.net.forward(x, t, Some(&(t - s)?), c)
    }
    fn as_tangent(&self) -> Option<&dyn TangentMap> {
        self.net.has_tangent().then_some(self as &dyn TangentMap)
    }
}

impl TangentMap for FlowMapNet {
    /// One forward-mode pass of the backbone; the gap `t − s` has tangent `ṫ − ṡ`.
    fn average_velocity_jvp(&self, at: &Point<'_>, along: &Tangent) -> Result<(Tensor, Tensor)> {
        let gap = (at.t - at.s)?;
        let dgap = (&along.t - &along.s)?;
        self.net
            .forward_jvp((at.x, at.t, Some(&gap), at.cond), (&along.x, &along.t, Some(&dgap)))
    }
}
