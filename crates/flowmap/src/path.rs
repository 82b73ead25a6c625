//! Probability paths `x_t = α_t·x0 + σ_t·x1` from data (`t = 0`) to noise (`t = 1`).
//!
//! The default is the linear (rectified-flow) path `α_t = 1 − t`, `σ_t = t`, whose conditional velocity is
//! `d x_t/dt = x1 − x0`. Callers only ever see [`ProbabilityPath`], so other schedules plug in unchanged.

use candle_core::Tensor;

use crate::state::per_row;
use crate::Result;

/// `α_t`, `σ_t` and their time derivatives, evaluated per row of a `B × 1` time tensor.
pub struct Coefficients {
    pub alpha: Tensor,
    pub sigma: Tensor,
    pub d_alpha: Tensor,
    pub d_sigma: Tensor,
}

/// A Gaussian probability path between data and `N(0, I)` noise.
pub trait ProbabilityPath: Send + Sync {
    /// A short name recorded in checkpoints.
    fn name(&self) -> &'static str;

    /// The schedule at times `t` (shape `B × 1`).
    fn coefficients(&self, t: &Tensor) -> Result<Coefficients>;

    /// `α_t` and `σ_t` at one time, on the host (for samplers that re-noise).
    fn alpha_sigma(&self, t: f64) -> Result<(f64, f64)> {
        let c = self.coefficients(&Tensor::new(&[[t]], &candle_core::Device::Cpu)?)?;
        let scalar = |v: &Tensor| -> Result<f64> { Ok(v.flatten_all()?.to_vec1::<f64>()?[0]) };
        Ok((scalar(&c.alpha)?, scalar(&c.sigma)?))
    }

    /// `x_t = α_t·x0 + σ_t·x1`, for states of any shape.
    fn interpolate(&self, x0: &Tensor, x1: &Tensor, t: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t)?;
        let row = |v: &Tensor| per_row(v, x0);
        Ok((x0.broadcast_mul(&row(&c.alpha)?)? + x1.broadcast_mul(&row(&c.sigma)?)?)?)
    }

    /// The conditional velocity `d x_t / dt = α̇_t·x0 + σ̇_t·x1`, the flow-matching regression target.
    fn conditional_velocity(&self, x0: &Tensor, x1: &Tensor, t: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t)?;
        let row = |v: &Tensor| per_row(v, x0);
        Ok((x0.broadcast_mul(&row(&c.d_alpha)?)? + x1.broadcast_mul(&row(&c.d_sigma)?)?)?)
    }
}

/// The linear path `x_t = (1 − t)·x0 + t·x1`; its conditional velocity is `x1 − x0`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinearPath;

impl ProbabilityPath for LinearPath {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn coefficients(&self, t: &Tensor) -> Result<Coefficients> {
        Ok(Coefficients {
            alpha: t.affine(-1.0, 1.0)?,
            sigma: t.clone(),
            d_alpha: t.ones_like()?.neg()?,
            d_sigma: t.ones_like()?,
        })
    }
    fn alpha_sigma(&self, t: f64) -> Result<(f64, f64)> {
        Ok((1.0 - t, t))
    }
    fn interpolate(&self, x0: &Tensor, x1: &Tensor, t: &Tensor) -> Result<Tensor> {
        // (1 − t)·x0 + t·x1 = x0 + t·(x1 − x0)
        Ok((x0 + (x1 - x0)?.broadcast_mul(&per_row(t, x0)?)?)?)
    }
    fn conditional_velocity(&self, x0: &Tensor, x1: &Tensor, _t: &Tensor) -> Result<Tensor> {
        Ok((x1 - x0)?)
    }
}

/// The variance-preserving cosine path `α_t = cos(πt/2)`, `σ_t = sin(πt/2)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CosinePath;

impl ProbabilityPath for CosinePath {
    fn name(&self) -> &'static str {
        "cosine"
    }
    fn coefficients(&self, t: &Tensor) -> Result<Coefficients> {
        let h = std::f64::consts::FRAC_PI_2;
        let a = t.affine(h, 0.0)?;
        Ok(Coefficients {
            alpha: a.cos()?,
            sigma: a.sin()?,
            d_alpha: a.sin()?.affine(-h, 0.0)?,
            d_sigma: a.cos()?.affine(h, 0.0)?,
        })
    }
}

/// The path named in a checkpoint.
pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn ProbabilityPath>> {
    match name {
        "linear" => Some(std::sync::Arc::new(LinearPath)),
        "cosine" => Some(std::sync::Arc::new(CosinePath)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check_endpoints_and_derivative(path: &dyn ProbabilityPath) {
        let d = Device::Cpu;
        let ts = [0.0f64, 0.3, 1.0];
        let t = Tensor::new(&ts, &d).unwrap().reshape((3, 1)).unwrap();
        let c = path.coefficients(&t).unwrap();
        let a: Vec<f64> = c.alpha.flatten_all().unwrap().to_vec1().unwrap();
        let s: Vec<f64> = c.sigma.flatten_all().unwrap().to_vec1().unwrap();
        assert!((a[0] - 1.0).abs() < 1e-12 && s[0].abs() < 1e-12, "data at t = 0");
        assert!(a[2].abs() < 1e-12 && (s[2] - 1.0).abs() < 1e-12, "noise at t = 1");
        // Central differences agree with the stated derivatives.
        let e = 1e-6;
        let tp = (&t + e).unwrap();
        let tm = (&t - e).unwrap();
        let (cp, cm) = (path.coefficients(&tp).unwrap(), path.coefficients(&tm).unwrap());
        let pairs = [
            ("α", &cp.alpha, &cm.alpha, &c.d_alpha),
            ("σ", &cp.sigma, &cm.sigma, &c.d_sigma),
        ];
        for (name, plus, minus, exact) in pairs {
            let fd = ((plus - minus).unwrap() / (2.0 * e)).unwrap();
            let err = (fd - exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 1e-6, "{}: d{name} error {err}", path.name());
        }
    }

    #[test]
    fn schedules_hit_endpoints_with_correct_derivatives() {
        check_endpoints_and_derivative(&LinearPath);
        check_endpoints_and_derivative(&CosinePath);
    }
}
