//! Network building blocks: small plain structs built from a `VarBuilder`, implementing their forward pass
//! from primitive candle ops only (every op here has a backward pass).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{self, Activation};
use crate::Result;

/// A dense layer `act(x·Wᵀ + b)` with candle-nn's `Linear` parameter names, shapes and initialisation
/// (`weight`: `out × in`, `bias`: `out`), so checkpoints are plain safetensors of a standard MLP. Its forward
/// pass is [`kernels::dense`]: one fused node on the CPU, candle's ops elsewhere.
#[derive(Clone, Debug)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
    act: Activation,
}

impl Dense {
    pub fn new(in_dim: usize, out_dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        Ok(Dense { weight, bias, act })
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    pub fn activation(&self) -> Activation {
        self.act
    }
    /// The layer as the fused MLP kernel reads it.
    pub fn as_layer(&self) -> kernels::Layer<'_> {
        (&self.weight, &self.bias, self.act)
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::dense(x, &self.weight, &self.bias, self.act).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl super::Jvp for Dense {
    /// `ẏ = act'(z) ⊙ (ẋ Wᵀ)` with `z = x·Wᵀ + b`; one GEMM computes `[x; ẋ]·Wᵀ`.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(out) = kernels::dense_jvp(x, dx, &self.weight, &self.bias, self.act)? {
            return Ok(out);
        }
        let w = self.weight.detach();
        let b = x.dim(0)?;
        let both = kernels::plain_matmul(&Tensor::cat(&[&x.detach(), &dx.detach()], 0)?, &w.t()?)?;
        let z = both.narrow(0, 0, b)?.broadcast_add(&self.bias.detach())?;
        let dz = both.narrow(0, b, b)?;
        match self.act {
            Activation::Identity => Ok((z, dz)),
            Activation::Silu => super::Silu.forward_jvp(&z, &dz),
        }
    }
}

/// Sinusoidal features of a time column: `[sin(ω_k t), cos(ω_k t)]` for `K` frequencies `ω_k` spaced
/// geometrically between 1 and `max_frequency`.
#[derive(Clone, Debug)]
pub struct SinusoidalEmbedding {
    freqs: Tensor,
    pub(crate) freqs_f32: Vec<f32>,
}

impl SinusoidalEmbedding {
    pub fn new(features: usize, max_frequency: f64, vb: &VarBuilder) -> Result<Self> {
        let k = features.max(1);
        let freqs: Vec<f64> = (0..k)
            .map(|i| {
                let a = if k == 1 { 0.0 } else { i as f64 / (k - 1) as f64 };
                max_frequency.powf(a)
            })
            .collect();
        let freqs_f32 = freqs.iter().map(|&w| w as f32).collect();
        let freqs = Tensor::from_vec(freqs, (1, k), vb.device())?.to_dtype(vb.dtype())?;
        Ok(SinusoidalEmbedding { freqs, freqs_f32 })
    }

    /// The embedding's width, `2K`.
    pub fn width(&self) -> usize {
        2 * self.freqs.dim(1).unwrap_or(0)
    }

    /// `t`: `B × 1`; returns `B × 2K`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let arg = t.broadcast_mul(&self.freqs)?;
        Ok(Tensor::cat(&[arg.sin()?, arg.cos()?], 1)?)
    }
}

impl super::Jvp for SinusoidalEmbedding {
    /// `d/dt [sin ωt, cos ωt] = [ω cos ωt, −ω sin ωt]·ṫ`.
    fn forward_jvp(&self, t: &Tensor, dt: &Tensor) -> Result<(Tensor, Tensor)> {
        let arg = t.detach().broadcast_mul(&self.freqs)?;
        let (sin, cos) = (arg.sin()?, arg.cos()?);
        let rate = dt.detach().broadcast_mul(&self.freqs)?;
        let y = Tensor::cat(&[&sin, &cos], 1)?;
        let dy = Tensor::cat(&[(&cos * &rate)?, (sin.neg()? * &rate)?], 1)?;
        Ok((y, dy))
    }
}
