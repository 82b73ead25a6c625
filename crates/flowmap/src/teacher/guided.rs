//! Classifier-free guidance of a class-conditional velocity field (Ho & Salimans 2022, "Classifier-Free
//! Diffusion Guidance", in the velocity form of flow matching):
//!
//! `v_w(x, t, c) = v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅))`,
//!
//! with `∅` the null class the teacher learnt under label dropout. `w = 1` is the conditional field and
//! `w = 0` the unconditional one (each then costs one evaluation); any other `w` evaluates the conditional
//! and the unconditional field in one batched pass of twice the rows, and counts as two evaluations.

use candle_core::Tensor;

use super::VelocityField;
use crate::cond::Cond;
use crate::{Error, Result};

/// `v_w` of `inner`, a field conditioned on `num_classes` classes (its null class is `num_classes`).
pub struct Guided<V> {
    pub inner: V,
    pub w: f64,
    pub num_classes: usize,
}

impl<V> Guided<V> {
    /// Errors unless `w` is finite and non-negative.
    pub fn new(inner: V, w: f64, num_classes: usize) -> Result<Self> {
        if !(w.is_finite() && w >= 0.0) {
            return Err(Error::arg(format!(
                "guidance scale w must be a finite number ≥ 0, got {w}"
            )));
        }
        Ok(Guided { inner, w, num_classes })
    }
}

impl<V: VelocityField> VelocityField for Guided<V> {
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }

    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        let labels = c
            .class_labels()
            .ok_or_else(|| Error::arg("classifier-free guidance needs class labels (use --class)"))?;
        let b = x.dim(0)?;
        let null = Cond::null(b, self.num_classes, x.device())?;
        if self.w == 1.0 {
            return self.inner.velocity(x, t, c);
        }
        if self.w == 0.0 {
            return self.inner.velocity(x, t, &null);
        }
        let both = Cond::labels(Tensor::cat(&[labels, null.class_labels().expect("null labels")], 0)?)?;
        let v = self
            .inner
            .velocity(&Tensor::cat(&[x, x], 0)?, &Tensor::cat(&[t, t], 0)?, &both)?;
        let (vc, vu) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
        Ok((&vu + ((vc - &vu)? * self.w)?)?)
    }

    fn evals_per_call(&self) -> usize {
        if self.w == 0.0 || self.w == 1.0 {
            1
        } else {
            2
        }
    }
}
