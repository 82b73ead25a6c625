//! Network building blocks: small plain structs built from a `VarBuilder`, implementing their forward pass
//! from primitive candle ops only (every op here has a backward pass).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

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
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::dense(x, &self.weight, &self.bias, self.act).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl crate::jvp::Jvp for Dense {
    /// `ẏ = act'(z) ⊙ (ẋ Wᵀ)` with `z = x·Wᵀ + b`; one GEMM computes `[x; ẋ]·Wᵀ`.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(out) = kernels::dense_jvp(x, dx, &self.weight, &self.bias, self.act)? {
            return Ok(out);
        }
        let w = self.weight.detach();
        let b = x.dim(0)?;
        let both = Tensor::cat(&[&x.detach(), &dx.detach()], 0)?.matmul(&w.t()?)?;
        let z = both.narrow(0, 0, b)?.broadcast_add(&self.bias.detach())?;
        let dz = both.narrow(0, b, b)?;
        match self.act {
            Activation::Identity => Ok((z, dz)),
            Activation::Silu => crate::jvp::Silu.forward_jvp(&z, &dz),
        }
    }
}

/// Sinusoidal features of a time column: `[sin(ω_k t), cos(ω_k t)]` for `K` frequencies `ω_k` spaced
/// geometrically between 1 and `max_frequency`.
#[derive(Clone, Debug)]
pub struct SinusoidalEmbedding {
    freqs: Tensor,
    freqs_f32: Vec<f32>,
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

/// Architecture of the time-conditioned MLP shared by teachers and flow maps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Data dimension `D`.
    pub dim: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers.
    pub depth: usize,
    /// Number of frequencies per time embedding (each gives a sine and a cosine feature).
    pub time_features: usize,
    /// Largest embedding frequency.
    pub max_frequency: f64,
}

impl MlpConfig {
    pub fn new(dim: usize) -> Self {
        MlpConfig {
            dim,
            hidden: 256,
            depth: 3,
            time_features: 16,
            max_frequency: 64.0,
        }
    }
}

/// An MLP on `[x, emb(t)]` (a velocity field) or `[x, emb(t), emb(t − s)]` (a flow map), SiLU activations.
///
/// The extra embedding comes last in the input, so a flow-map network extends a velocity network's first
/// layer by extra columns: copying the teacher's weights and zeroing those columns makes the two agree.
#[derive(Clone, Debug)]
pub struct ConditionedMlp {
    time: SinusoidalEmbedding,
    layers: Vec<Dense>,
    with_gap: bool,
}

impl ConditionedMlp {
    pub fn new(cfg: &MlpConfig, with_gap: bool, vb: VarBuilder) -> Result<Self> {
        let time = SinusoidalEmbedding::new(cfg.time_features, cfg.max_frequency, &vb)?;
        let conds = if with_gap { 2 } else { 1 };
        let mut in_dim = cfg.dim + conds * time.width();
        let mut layers = Vec::with_capacity(cfg.depth + 1);
        for i in 0..cfg.depth {
            layers.push(Dense::new(
                in_dim,
                cfg.hidden,
                Activation::Silu,
                vb.pp(format!("layer{i}")),
            )?);
            in_dim = cfg.hidden;
        }
        layers.push(Dense::new(
            in_dim,
            cfg.dim,
            Activation::Identity,
            vb.pp(format!("layer{}", cfg.depth)),
        )?);
        Ok(ConditionedMlp { time, layers, with_gap })
    }

    /// `x`: `B × D`, `t` and `gap`: `B × 1`. `gap` is required exactly when the network was built with it.
    pub fn forward(&self, x: &Tensor, t: &Tensor, gap: Option<&Tensor>) -> Result<Tensor> {
        if gap.is_some() != self.with_gap {
            return Err(crate::Error::arg("network conditioning does not match its inputs"));
        }
        let h = if kernels::applies(x.device(), x.dtype()) {
            let tg = match gap {
                Some(g) => Tensor::cat(&[t, g], 1)?,
                None => t.clone(),
            };
            kernels::conditioning(x, &tg, &self.time.freqs_f32)?
        } else {
            let mut parts = vec![x.clone(), self.time.forward(t)?];
            if let Some(g) = gap {
                parts.push(self.time.forward(g)?);
            }
            Tensor::cat(&parts, 1)?
        };
        let layers: Vec<kernels::Layer<'_>> = self.layers.iter().map(|l| (&l.weight, &l.bias, l.act)).collect();
        kernels::mlp(&h, &layers)
    }
}

impl crate::jvp::Jvp for SinusoidalEmbedding {
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

impl ConditionedMlp {
    /// The network and its tangent along `(ẋ, ṫ, ġap)` in one pass, on detached tensors.
    pub fn forward_jvp(
        &self,
        (x, t, gap): (&Tensor, &Tensor, Option<&Tensor>),
        (dx, dt, dgap): (&Tensor, &Tensor, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        use crate::jvp::Jvp;
        let (et, det) = self.time.forward_jvp(t, dt)?;
        let mut parts = vec![x.detach(), et];
        let mut tangents = vec![dx.detach(), det];
        match (gap, dgap, self.with_gap) {
            (Some(g), Some(dg), true) => {
                let (eg, deg) = self.time.forward_jvp(g, dg)?;
                parts.push(eg);
                tangents.push(deg);
            }
            (None, None, false) => {}
            _ => return Err(crate::Error::arg("network conditioning does not match its inputs")),
        }
        let mut h = Tensor::cat(&parts, 1)?;
        let mut dh = Tensor::cat(&tangents, 1)?;
        for layer in &self.layers {
            (h, dh) = layer.forward_jvp(&h, &dh)?;
        }
        Ok((h, dh))
    }
}
