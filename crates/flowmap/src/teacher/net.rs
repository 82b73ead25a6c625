//! A velocity network `v_φ(x, t)`, trained by conditional flow matching.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::VelocityField;
use crate::nn::{ConditionedMlp, MlpConfig};
use crate::Result;

/// An MLP velocity field `v_φ(x, t)` with a sinusoidal time embedding.
#[derive(Clone, Debug)]
pub struct VelocityNet {
    cfg: MlpConfig,
    net: ConditionedMlp,
}

impl VelocityNet {
    pub fn new(cfg: &MlpConfig, vb: VarBuilder) -> Result<Self> {
        Ok(VelocityNet {
            cfg: cfg.clone(),
            net: ConditionedMlp::new(cfg, false, vb)?,
        })
    }
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }
}

impl VelocityField for VelocityNet {
    fn dim(&self) -> usize {
        self.cfg.dim
    }
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.net.forward(x, t, None)
    }
}
