//! Network building blocks, every one in this module: small plain structs built from a `VarBuilder`,
//! implementing `Module` (their forward pass, from primitive candle ops or a fused kernel with its backward)
//! and [`Jvp`] (their forward-mode tangent rule).
//!
//! - [`Dense`], [`SinusoidalEmbedding`] and [`Silu`] (`dense.rs` and here): the MLP's layers;
//! - [`Conv2d`], [`GroupNorm`] and [`Attention`] (`image.rs`): the U-Net's and the classifier's.
//!
//! Forward-mode differentiation: Jacobian–vector products `(y, ẏ) = (f(x), Df(x)·ẋ)` in one pass.
//!
//! candle has reverse mode only, and finite differences in f32 are noisy, so each of flowmap's layers
//! implements [`Jvp`] by hand on detached tensors (no autograd graph is built). A layer's tangent rule is
//! local (linear: `ẏ = ẋ Wᵀ`; SiLU: `ẏ = ẋ ⊙ σ(x)(1 + x(1 − σ(x)))`; sinusoidal embedding:
//! `d/dt [sin ωt, cos ωt] = [ω cos ωt, −ω sin ωt]·ṫ`), and networks chain them, so convolution,
//! normalisation or attention layers plug in by implementing the same trait.
//!
//! This is the layer-level rule; the flow-map view, the derivative of `F(x, t, s)` along a direction
//! `(ẋ, ṫ, ṡ)`, is [`crate::flow_map::TangentMap`], beside the maps themselves.

mod dense;
mod image;

use candle_core::{Module, Tensor};

use crate::Result;

pub use dense::{Dense, SinusoidalEmbedding};
pub use image::{Attention, Conv2d, GroupNorm};

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
