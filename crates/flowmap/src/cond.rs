//! Conditioning inputs of a model: what, besides the state `x` and the times, a velocity field or a flow
//! map is evaluated on.
//!
//! Class labels: a `B`-vector of `u32` in `0..C`, where the index `C` is the reserved *null* class (the
//! unconditional model that classifier-free guidance needs). [`Cond::none`] is the condition of an
//! unconditional model, and of a conditional one asked for unconditional samples: a conditional network
//! reads a missing label as the null class. Unconditional models ignore labels.
//!
//! A guidance scale per row (`B × 1`, [`Cond::with_guidance`]): the input of a flow map that has
//! classifier-free guidance distilled into it, and the scale a per-row guided teacher
//! ([`crate::teacher::Guided::per_row`]) applies. New inputs (text embeddings) join as further fields, so
//! every signature that takes a `&Cond` stays as it is.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Errors unless a classifier-free guidance scale `w` is a finite number `≥ 0`.
pub fn check_guidance_scale(w: f64) -> Result<()> {
    if !(w.is_finite() && w >= 0.0) {
        return Err(Error::arg(format!(
            "guidance scale w must be a finite number ≥ 0, got {w}"
        )));
    }
    Ok(())
}

/// The conditioning inputs of one batch.
#[derive(Clone, Debug, Default)]
pub struct Cond {
    labels: Option<Tensor>,
    guidance: Option<Tensor>,
}

impl Cond {
    /// No condition: an unconditional model, or the null class of a conditional one.
    pub fn none() -> Self {
        Cond::default()
    }

    /// A `'static` no-condition, for defaults.
    pub fn none_ref() -> &'static Cond {
        static NONE: Cond = Cond {
            labels: None,
            guidance: None,
        };
        &NONE
    }

    /// Class labels, a `B`-vector of `u32` (the null class included).
    pub fn labels(labels: Tensor) -> Result<Self> {
        if labels.rank() != 1 || labels.dtype() != DType::U32 {
            return Err(Error::arg(format!(
                "class labels must be a vector of u32, got {:?} {:?}",
                labels.dtype(),
                labels.dims()
            )));
        }
        Ok(Cond {
            labels: Some(labels),
            guidance: None,
        })
    }

    /// Class labels from a slice, checked against `num_classes` (the null class `num_classes` is allowed).
    pub fn from_classes(labels: &[u32], num_classes: usize, device: &Device) -> Result<Self> {
        if let Some(&bad) = labels.iter().find(|&&l| l as usize > num_classes) {
            return Err(Error::arg(format!(
                "class label {bad} is out of range (0..{num_classes}, or {num_classes} for the null class)"
            )));
        }
        Cond::labels(Tensor::from_slice(labels, labels.len(), device)?)
    }

    /// Every row of a `b`-row batch in the null class `num_classes`.
    pub fn null(b: usize, num_classes: usize, device: &Device) -> Result<Self> {
        Cond::labels(Tensor::full(num_classes as u32, b, device)?)
    }

    /// The same `b` rows with every label the null class `num_classes`, the guidance scales kept (checked
    /// already, so not checked again).
    pub fn to_null(&self, b: usize, num_classes: usize, device: &Device) -> Result<Self> {
        let out = Cond {
            guidance: self.guidance.clone(),
            ..Cond::null(b, num_classes, device)?
        };
        out.check_rows(b)?;
        Ok(out)
    }

    /// The same condition with a guidance scale per row, `w`: `B × 1` (or `B`), finite and `≥ 0`.
    pub fn with_guidance(&self, w: &Tensor) -> Result<Self> {
        let b = w.dim(0)?;
        let w = w.reshape((b, 1))?.to_dtype(DType::F32)?;
        for v in w.flatten_all()?.to_vec1::<f32>()? {
            check_guidance_scale(v as f64)?;
        }
        let out = Cond {
            labels: self.labels.clone(),
            guidance: Some(w),
        };
        out.check_rows(b)?;
        Ok(out)
    }

    /// The same guidance scale `w` on each of `b` rows.
    pub fn with_uniform_guidance(&self, w: f64, b: usize, device: &Device) -> Result<Self> {
        check_guidance_scale(w)?;
        let out = Cond {
            labels: self.labels.clone(),
            guidance: Some(Tensor::full(w as f32, (b, 1), device)?),
        };
        out.check_rows(b)?;
        Ok(out)
    }

    /// The per-row guidance scales (`B × 1`), if any.
    pub fn guidance(&self) -> Option<&Tensor> {
        self.guidance.as_ref()
    }

    /// The same condition without its guidance scales.
    pub fn without_guidance(&self) -> Self {
        Cond {
            labels: self.labels.clone(),
            guidance: None,
        }
    }

    /// The class labels, if any.
    pub fn class_labels(&self) -> Option<&Tensor> {
        self.labels.as_ref()
    }

    /// Whether there is no condition at all.
    pub fn is_none(&self) -> bool {
        self.labels.is_none() && self.guidance.is_none()
    }

    /// Rows `start..start + len` (a condition with no per-row inputs is returned as is).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Cond {
            labels: self.labels.as_ref().map(|l| l.narrow(0, start, len)).transpose()?,
            guidance: self.guidance.as_ref().map(|g| g.narrow(0, start, len)).transpose()?,
        })
    }

    /// Each label replaced by the null class `num_classes` with probability `p` (one draw per row, in row
    /// order); a condition without labels is returned as is, with no draws.
    pub fn drop_labels(&self, p: f64, num_classes: usize, rng: &mut crate::Rng) -> Result<Self> {
        let Some(l) = &self.labels else {
            return Ok(self.clone());
        };
        let mut v = l.to_vec1::<u32>()?;
        for label in v.iter_mut() {
            if rng.uniform() < p {
                *label = num_classes as u32;
            }
        }
        Ok(Cond {
            guidance: self.guidance.clone(),
            ..Cond::from_classes(&v, num_classes, l.device())?
        })
    }

    /// Errors unless the per-row inputs have `b` rows.
    pub fn check_rows(&self, b: usize) -> Result<()> {
        match (&self.labels, &self.guidance) {
            (Some(l), _) if l.dim(0)? != b => Err(Error::arg(format!("{} class labels for a batch of {b}", l.dim(0)?))),
            (_, Some(g)) if g.dim(0)? != b => {
                Err(Error::arg(format!("{} guidance scales for a batch of {b}", g.dim(0)?)))
            }
            _ => Ok(()),
        }
    }
}
