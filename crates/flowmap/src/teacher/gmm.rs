//! The exact velocity of a Gaussian-mixture data distribution under a Gaussian probability path.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::VelocityField;
use crate::cond::Cond;
use crate::data::GaussianMixture;
use crate::path::{LinearPath, ProbabilityPath};
use crate::Result;

/// `v(x, t) = E[α̇_t·x0 + σ̇_t·x1 | x_t = x]` for `x0 ~ Σ_k w_k N(μ_k, σ_k² I)` and `x1 ~ N(0, I)`, in closed form.
///
/// Given component `k`, `x_t ~ N(α_t μ_k, S_k I)` with `S_k = α_t² σ_k² + σ_t²`, and
/// `E[x0 | x_t, k] = μ_k + α_t σ_k² / S_k · (x_t − α_t μ_k)`, `E[x1 | x_t, k] = σ_t / S_k · (x_t − α_t μ_k)`.
/// The velocity averages the per-component velocities under the posterior `π_k(x) ∝ w_k N(x; α_t μ_k, S_k I)`.
/// On the linear path this is `E[x1 − x0 | x_t = x]`.
#[derive(Clone)]
pub struct GmmVelocity {
    mixture: GaussianMixture,
    path: Arc<dyn ProbabilityPath>,
}

impl GmmVelocity {
    pub fn new(mixture: GaussianMixture) -> Self {
        GmmVelocity {
            mixture,
            path: Arc::new(LinearPath),
        }
    }
    pub fn with_path(mixture: GaussianMixture, path: Arc<dyn ProbabilityPath>) -> Self {
        GmmVelocity { mixture, path }
    }
    pub fn mixture(&self) -> &GaussianMixture {
        &self.mixture
    }
    /// The probability path whose marginal velocity this is.
    pub fn path(&self) -> &Arc<dyn ProbabilityPath> {
        &self.path
    }
}

impl VelocityField for GmmVelocity {
    fn state_shape(&self) -> Vec<usize> {
        vec![self.mixture.dim()]
    }

    /// Unconditional without labels. With labels the mixture is class-conditional, class `k` being
    /// component `k` (`x0 ~ N(μ_k, σ_k² I)`, the posterior one-hot) and the null class `K` the whole mixture.
    fn velocity(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let (dt, dev): (DType, &Device) = (x.dtype(), x.device());
        let d = self.mixture.dim() as f64;
        let c = self.path.coefficients(t)?;
        let (a2, b2) = (c.alpha.sqr()?, c.sigma.sqr()?);
        let mut logits = Vec::with_capacity(self.mixture.components());
        let mut vels = Vec::with_capacity(self.mixture.components());
        for ((mu, &std), &w) in self
            .mixture
            .means
            .iter()
            .zip(&self.mixture.stds)
            .zip(&self.mixture.weights)
        {
            let mu = Tensor::from_slice(mu, (1, mu.len()), &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(dev)?;
            let var = std * std;
            let s = (a2.affine(var, 0.0)? + &b2)?; // S_k, B × 1
            let diff = (x - mu.broadcast_mul(&c.alpha)?)?; // x − α μ_k
            let dist2 = diff.sqr()?.sum_keepdim(1)?;
            // log w_k − D/2·log S_k − ‖x − α μ_k‖² / (2 S_k)   (the 2π factor is common to all k)
            let logit = ((s.log()? * (-0.5 * d))? - (dist2 / s.affine(2.0, 0.0)?)?)?.affine(1.0, w.ln())?;
            let scaled = diff.broadcast_div(&s)?;
            let e_x0 = scaled.broadcast_mul(&c.alpha.affine(var, 0.0)?)?.broadcast_add(&mu)?;
            let e_x1 = scaled.broadcast_mul(&c.sigma)?;
            vels.push((e_x0.broadcast_mul(&c.d_alpha)? + e_x1.broadcast_mul(&c.d_sigma)?)?);
            logits.push(logit);
        }
        let mut logits = Tensor::cat(&logits, 1)?; // B × K
        if let Some(labels) = cond.class_labels() {
            let k = self.mixture.components();
            let labels = labels.to_vec1::<u32>()?;
            if let Some(&bad) = labels.iter().find(|&&l| l as usize > k) {
                return Err(crate::Error::arg(format!(
                    "class {bad} is out of range: the mixture has classes 0..{} and the null class {k}",
                    k - 1
                )));
            }
            // A labelled row keeps its own component's logit; the others get a weight of exactly zero.
            let mask: Vec<f64> = labels
                .iter()
                .flat_map(|&l| (0..k).map(move |j| if l as usize == k || j == l as usize { 0.0 } else { -1e30 }))
                .collect();
            let mask = Tensor::from_vec(mask, (labels.len(), k), &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(dev)?;
            logits = (logits + mask)?;
        }
        let max = logits.max_keepdim(D::Minus1)?;
        let p = logits.broadcast_sub(&max)?.exp()?;
        let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
        let mut v = vels[0].broadcast_mul(&p.narrow(1, 0, 1)?)?;
        for (k, vk) in vels.iter().enumerate().skip(1) {
            v = (v + vk.broadcast_mul(&p.narrow(1, k, 1)?)?)?;
        }
        Ok(v)
    }
}
