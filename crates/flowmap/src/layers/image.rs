//! Layers with both a forward pass on candle's graph and a forward-mode tangent rule ([`Jvp`]): a 2-D
//! convolution, GroupNorm (fused with scale-shift and SiLU on the CPU) and multi-head self-attention. The
//! U-Net is built from them; the classifier reuses the convolution.

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use super::Dense;
use super::Jvp;
use crate::kernels::{self, Activation};
use crate::Result;

/// A 2-D convolution with PyTorch's parameter layout (`weight`: `O × I × k × k`, `bias`: `O`), stride 1 and
/// "same" padding; its forward pass is [`kernels::conv2d`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv2d {
    pub fn new(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
        Ok(Conv2d {
            weight: vb.get_with_hints((c_out, c_in, k, k), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
        })
    }
}

impl Conv2d {
    /// The weight (`O × I × k × k`) and the bias.
    pub(crate) fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::conv2d(x, &self.weight, &self.bias).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl Jvp for Conv2d {
    /// Linear: `ẏ = W ⋆ ẋ`.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        let (w, b) = (self.weight.detach(), self.bias.detach());
        let y = kernels::conv2d(&x.detach(), &w, &b)?;
        Ok((y, kernels::conv2d(&dx.detach(), &w, &b.zeros_like()?)?))
    }
}

/// Group normalisation over `(C / G) × H × W` per sample and group, with a per-channel affine map: one
/// fused node on the CPU for its value, gradients and tangent ([`kernels::group_norm`],
/// [`kernels::group_norm_jvp`]), candle's primitive ops elsewhere.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    groups: usize,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(GroupNorm {
            groups,
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            eps: 1e-5,
        })
    }

    /// `act(GN(x) ⊙ (1 + a) + b)` with `[a, b] = ss` (`B × 2C`; none: `GN(x)`), SiLU when `silu`: one fused
    /// node on the CPU ([`kernels::group_norm`]), candle's primitive ops elsewhere.
    pub fn forward_modulated(&self, x: &Tensor, ss: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        let ss = self.scale_shift(x, ss)?;
        kernels::group_norm(x, self.groups, self.eps, &self.affine()?, &ss, silu)
    }

    /// `conv(act(GN(x) ⊙ (1 + a) + b))`: [`GroupNorm::forward_modulated`] then `conv`, as one node on the
    /// CPU that recomputes the normalised activation in its backward pass instead of keeping it
    /// ([`kernels::norm_conv2d`]).
    pub fn forward_modulated_conv(&self, x: &Tensor, ss: Option<&Tensor>, silu: bool, conv: &Conv2d) -> Result<Tensor> {
        let ss = self.scale_shift(x, ss)?;
        let (w, b) = conv.params();
        kernels::norm_conv2d(x, self.groups, self.eps, &self.affine()?, &ss, silu, w, b)
    }

    /// Groups and ε.
    pub(crate) fn settings(&self) -> (usize, f64) {
        (self.groups, self.eps)
    }

    /// `[γ; β]`, the layout the fused kernels take.
    pub(crate) fn affine(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.weight, &self.bias], 0)?)
    }

    /// The scale-shift `[a, b]` given, or the zero one of an unmodulated norm of `x`.
    fn scale_shift(&self, x: &Tensor, ss: Option<&Tensor>) -> Result<Tensor> {
        match ss {
            Some(s) => Ok(s.clone()),
            None => self.no_modulation(x),
        }
    }

    /// The zero scale-shift `[a, b]` (`B × 2C`) of an unmodulated norm of `x`.
    fn no_modulation(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (x.dim(0)?, 2 * self.weight.dim(0)?),
            x.dtype(),
            x.device(),
        )?)
    }

    /// The forward-mode pass of [`GroupNorm::forward_modulated`] in `x` and the scale-shift, with tangents
    /// `ẋ` and `ṡs` ([`kernels::group_norm_jvp`]: one fused pass on the CPU).
    pub fn forward_modulated_jvp(
        &self,
        x: &Tensor,
        dx: &Tensor,
        ss: Option<(&Tensor, &Tensor)>,
        silu: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (ss, dss) = match ss {
            Some((s, ds)) => (s.clone(), ds.clone()),
            None => {
                let z = self.no_modulation(x)?;
                (z.clone(), z)
            }
        };
        kernels::group_norm_jvp(x, dx, self.groups, self.eps, &self.affine()?, &ss, &dss, silu)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_modulated(x, None, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl Jvp for GroupNorm {
    /// With `x̂ = (x − μ)/σ` per group: `dx̂ = (ẋ − mean ẋ − x̂·mean(x̂ ⊙ ẋ)) / σ`, then `ẏ = γ ⊙ dx̂`.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_modulated_jvp(x, dx, None, false)
    }
}

/// `softmax` over the last axis from primitive ops (candle's fused one has no backward).
fn softmax_last(z: &Tensor) -> Result<Tensor> {
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?.detach())?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Multi-head self-attention over the `H·W` positions of `B × C × H × W` features, residual, with a
/// GroupNorm in front and a zero-initialised output projection.
#[derive(Clone, Debug)]
pub struct Attention {
    norm: GroupNorm,
    qkv: Dense,
    proj: Dense,
    heads: usize,
}

impl Attention {
    pub fn new(channels: usize, heads: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            norm: GroupNorm::new(groups, channels, vb.pp("norm"))?,
            qkv: Dense::new(channels, 3 * channels, Activation::Identity, vb.pp("qkv"))?,
            proj: Dense::new(channels, channels, Activation::Identity, vb.pp("proj"))?,
            heads,
        })
    }

    /// `B × C × H × W` → `(B·H·W) × C` tokens.
    fn tokens(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        Ok(x.reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * h * w, c))?)
    }

    fn untokens(t: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
        let (b, c, h, w) = dims;
        Ok(t.reshape((b, h * w, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, h, w))?)
    }

    /// `(B·N) × 3C` → three `(B·heads) × N × d` tensors.
    fn split(&self, qkv: &Tensor, b: usize, n: usize, c: usize) -> Result<[Tensor; 3]> {
        let d = c / self.heads;
        let q = qkv.reshape((b, n, 3, self.heads, d))?.permute((2, 0, 3, 1, 4))?;
        let part = |i: usize| -> Result<Tensor> { Ok(q.get(i)?.contiguous()?.reshape((b * self.heads, n, d))?) };
        Ok([part(0)?, part(1)?, part(2)?])
    }

    /// `(B·heads) × N × d` → `(B·N) × C`.
    fn merge(&self, o: &Tensor, b: usize, n: usize, c: usize) -> Result<Tensor> {
        let d = c / self.heads;
        Ok(o.reshape((b, self.heads, n, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, c))?)
    }

    fn scale(&self, c: usize) -> f64 {
        1.0 / ((c / self.heads) as f64).sqrt()
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let run = || -> Result<Tensor> {
            let (b, c, h, w) = x.dims4()?;
            let n = h * w;
            let tokens = Self::tokens(&self.norm.forward(x)?)?;
            let [q, k, v] = self.split(&self.qkv.forward(&tokens)?, b, n, c)?;
            let p = softmax_last(&(q.matmul(&k.t()?)? * self.scale(c))?)?;
            let o = self.merge(&p.matmul(&v)?, b, n, c)?;
            Ok((x + Self::untokens(&self.proj.forward(&o)?, (b, c, h, w))?)?)
        };
        run().map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl Jvp for Attention {
    /// With `Z = Q Kᵀ/√d`, `P = softmax(Z)`, `O = P V`: `Ż = (Q̇ Kᵀ + Q K̇ᵀ)/√d`,
    /// `Ṗ = P ⊙ (Ż − rowsum(P ⊙ Ż))`, `Ȯ = Ṗ V + P V̇`; the norm and the projections by their own rules.
    fn forward_jvp(&self, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let (hn, dhn) = self.norm.forward_jvp(x, dx)?;
        let (qkv, dqkv) = self.qkv.forward_jvp(&Self::tokens(&hn)?, &Self::tokens(&dhn)?)?;
        let [q, k, v] = self.split(&qkv, b, n, c)?;
        let [dq, dk, dv] = self.split(&dqkv, b, n, c)?;
        let s = self.scale(c);
        let p = softmax_last(&(q.matmul(&k.t()?)? * s)?)?;
        let dz = ((dq.matmul(&k.t()?)? + q.matmul(&dk.t()?)?)? * s)?;
        let dp = (&p * dz.broadcast_sub(&(&p * &dz)?.sum_keepdim(D::Minus1)?)?)?;
        let o = self.merge(&p.matmul(&v)?, b, n, c)?;
        let dout = self.merge(&(dp.matmul(&v)? + p.matmul(&dv)?)?, b, n, c)?;
        let (y, dy) = self.proj.forward_jvp(&o, &dout)?;
        let y = (x.detach() + Self::untokens(&y, (b, c, h, w))?)?;
        Ok((y, (dx.detach() + Self::untokens(&dy, (b, c, h, w))?)?))
    }
}
