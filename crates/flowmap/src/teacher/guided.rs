//! Classifier-free guidance of a class-conditional velocity field (Ho & Salimans 2022, "Classifier-Free
//! Diffusion Guidance", in the velocity form of flow matching):
//!
//! `v_w(x, t, c) = v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅))`,
//!
//! with `∅` the null class the teacher learnt under label dropout. `w = 1` is the conditional field and
//! `w = 0` the unconditional one (each then costs one evaluation); any other `w` evaluates the conditional
//! and the unconditional field in one batched pass of twice the rows, and counts as two evaluations.
//!
//! [`Guided::per_row`] reads `w` from each row of the condition ([`Cond::guidance`]): the teacher of a
//! guidance-distilled flow map, whose training pairs each carry their own scale, so that every
//! teacher-based objective builds its target from `v_w` unchanged.
//!
//! [`Autoguided`] is the same extrapolation away from a weaker model of the same task instead of the null
//! class (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
//! `v_w(x, t, c) = v_weak(x, t, c) + w·(v(x, t, c) − v_weak(x, t, c))`, for conditional and unconditional
//! models alike, at a fixed scale or per row.

use candle_core::Tensor;

use super::VelocityField;
use crate::cond::Cond;
use crate::{Error, Result};

/// `v_w` of `inner`, a field conditioned on `num_classes` classes (its null class is `num_classes`).
pub struct Guided<V> {
    pub inner: V,
    /// The scale, or `None` to read it from each row of the condition.
    pub w: Option<f64>,
    pub num_classes: usize,
}

impl<V> Guided<V> {
    /// Errors unless `w` is finite and non-negative.
    pub fn new(inner: V, w: f64, num_classes: usize) -> Result<Self> {
        crate::cond::check_guidance_scale(w)?;
        Ok(Guided {
            inner,
            w: Some(w),
            num_classes,
        })
    }

    /// Guidance with the scale of each row read from the condition's [`Cond::guidance`] column (an error
    /// when it has none).
    pub fn per_row(inner: V, num_classes: usize) -> Self {
        Guided {
            inner,
            w: None,
            num_classes,
        }
    }
}

impl<V: VelocityField> VelocityField for Guided<V> {
    fn state_shape(&self) -> Vec<usize> {
        self.inner.state_shape()
    }

    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        let labels = c
            .class_labels()
            .ok_or_else(|| Error::arg("classifier-free guidance needs class labels in the condition"))?;
        let b = x.dim(0)?;
        let null = Cond::null(b, self.num_classes, x.device())?;
        let per_row = match self.w {
            Some(w) if w == 1.0 => return self.inner.velocity(x, t, &c.without_guidance()),
            Some(w) if w == 0.0 => return self.inner.velocity(x, t, &null),
            Some(_) => None,
            None => Some(c.guidance().ok_or_else(|| {
                Error::arg("a per-row guided field needs a guidance scale on every row (Cond::with_guidance)")
            })?),
        };
        let both = Cond::labels(Tensor::cat(&[labels, null.class_labels().expect("null labels")], 0)?)?;
        let v = self
            .inner
            .velocity(&Tensor::cat(&[x, x], 0)?, &Tensor::cat(&[t, t], 0)?, &both)?;
        extrapolate(&v.narrow(0, b, b)?, &v.narrow(0, 0, b)?, per_row, self.w)
    }

    fn evals_per_call(&self) -> usize {
        evals(self.w)
    }
}

/// `guide + w·(main − guide)`, with `w` per row (`B × 1`) or one scale.
fn extrapolate(guide: &Tensor, main: &Tensor, per_row: Option<&Tensor>, w: Option<f64>) -> Result<Tensor> {
    let diff = (main - guide)?;
    let scaled = match (per_row, w) {
        (Some(w), _) => diff.broadcast_mul(&crate::state::per_row(&w.to_dtype(diff.dtype())?, &diff)?)?,
        (None, Some(w)) => (diff * w)?,
        (None, None) => unreachable!("a scale per row or one for all"),
    };
    Ok((guide + scaled)?)
}

/// Evaluations per call at scale `w` (`None`: per row): one at `w = 0` or `1`, else two.
fn evals(w: Option<f64>) -> usize {
    match w {
        Some(w) if w == 0.0 || w == 1.0 => 1,
        _ => 2,
    }
}

/// `v_w = v_weak + w·(v − v_weak)`: `strong` guided by `weak`, a model of the same states and conditions
/// trained less (an earlier checkpoint) or smaller. Both see the same condition (its labels, if any); the
/// two are different networks, so a call at `w ∉ {0, 1}` costs two evaluations, one of each.
pub struct Autoguided<V, W> {
    pub strong: V,
    pub weak: W,
    /// The scale, or `None` to read it from each row of the condition.
    pub w: Option<f64>,
}

impl<V: VelocityField, W: VelocityField> Autoguided<V, W> {
    /// Errors unless `w` is finite and non-negative and the two models have one state shape.
    pub fn new(strong: V, weak: W, w: f64) -> Result<Self> {
        crate::cond::check_guidance_scale(w)?;
        Self::check(&strong, &weak)?;
        Ok(Autoguided {
            strong,
            weak,
            w: Some(w),
        })
    }

    /// Autoguidance with the scale of each row read from the condition's [`Cond::guidance`] column.
    pub fn per_row(strong: V, weak: W) -> Result<Self> {
        Self::check(&strong, &weak)?;
        Ok(Autoguided { strong, weak, w: None })
    }

    fn check(strong: &V, weak: &W) -> Result<()> {
        check_same_states(strong, weak)
    }
}

/// Errors unless `weak` and `strong` model states of one shape.
pub(crate) fn check_same_states(strong: &dyn VelocityField, weak: &dyn VelocityField) -> Result<()> {
    let (a, b) = (strong.state_shape(), weak.state_shape());
    if a != b {
        return Err(Error::arg(format!(
            "the guiding model's states are {b:?}, the guided model's {a:?}: autoguidance needs two models of the same data"
        )));
    }
    Ok(())
}

impl<V: VelocityField, W: VelocityField> VelocityField for Autoguided<V, W> {
    fn state_shape(&self) -> Vec<usize> {
        self.strong.state_shape()
    }

    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        let plain = c.without_guidance();
        let per_row = match self.w {
            Some(w) if w == 1.0 => return self.strong.velocity(x, t, &plain),
            Some(w) if w == 0.0 => return self.weak.velocity(x, t, &plain),
            Some(_) => None,
            None => Some(c.guidance().ok_or_else(|| {
                Error::arg("a per-row autoguided field needs a guidance scale on every row (Cond::with_guidance)")
            })?),
        };
        let strong = self.strong.velocity(x, t, &plain)?;
        let weak = self.weak.velocity(x, t, &plain)?;
        extrapolate(&weak, &strong, per_row, self.w)
    }

    fn evals_per_call(&self) -> usize {
        evals(self.w)
    }
}
