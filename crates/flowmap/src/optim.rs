//! The optimiser and the weight average the training loop uses: AdamW (Loshchilov & Hutter 2019,
//! "Decoupled Weight Decay Regularization") and an exponential moving average of the weights.
//!
//! Both update parameters in place. On the CPU in f32 each parameter takes one fused pass
//! ([`crate::kernels`]); elsewhere they run candle-nn's `AdamW` and tensor arithmetic. The algebra is the
//! same (candle-nn's), so the two agree to f32 rounding.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};

use crate::flow_map::vars_sorted;
use crate::kernels::{self, AdamScalars};
use crate::{Error, Result};

/// AdamW: `m ← β1 m + (1 − β1) g`, `v ← β2 v + (1 − β2) g²`,
/// `θ ← (1 − lr·λ) θ − lr · m̂ / (√v̂ + eps)` with bias-corrected `m̂ = m/(1 − β1^t)`, `v̂ = v/(1 − β2^t)`.
pub struct AdamW {
    inner: Inner,
}

enum Inner {
    Fused {
        vars: Vec<Var>,
        /// First and second moments per parameter.
        moments: Vec<(Vec<f32>, Vec<f32>)>,
        step: usize,
        params: ParamsAdamW,
    },
    Candle(candle_nn::AdamW),
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let fused = vars
            .iter()
            .all(|v| kernels::applies(v.device(), v.dtype()) && v.is_contiguous());
        let inner = if fused {
            let moments = vars
                .iter()
                .map(|v| (vec![0.0; v.elem_count()], vec![0.0; v.elem_count()]))
                .collect();
            Inner::Fused {
                vars,
                moments,
                step: 0,
                params,
            }
        } else {
            Inner::Candle(candle_nn::AdamW::new(vars, params)?)
        };
        Ok(AdamW { inner })
    }

    pub fn learning_rate(&self) -> f64 {
        match &self.inner {
            Inner::Fused { params, .. } => params.lr,
            Inner::Candle(o) => o.learning_rate(),
        }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match &mut self.inner {
            Inner::Fused { params, .. } => params.lr = lr,
            Inner::Candle(o) => o.set_learning_rate(lr),
        }
    }

    /// One update from the gradients in `grads` (parameters without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match &mut self.inner {
            Inner::Candle(o) => Ok(o.step(grads)?),
            Inner::Fused {
                vars,
                moments,
                step,
                params,
            } => {
                *step += 1;
                let p = &*params;
                let a = AdamScalars {
                    lr: p.lr as f32,
                    beta1: p.beta1 as f32,
                    beta2: p.beta2 as f32,
                    eps: p.eps as f32,
                    decay: (1.0 - p.lr * p.weight_decay) as f32,
                    scale_m: (1.0 / (1.0 - p.beta1.powi(*step as i32))) as f32,
                    scale_v: (1.0 / (1.0 - p.beta2.powi(*step as i32))) as f32,
                };
                for (var, (m, v)) in vars.iter().zip(moments.iter_mut()) {
                    let Some(g) = grads.get(var) else { continue };
                    let g = g.contiguous()?;
                    let g = kernels::read(&g).ok_or_else(|| Error::arg("AdamW: gradient is not f32 on the CPU"))?;
                    var.as_tensor().inplace_op1(&AdamStep {
                        g: g.slice(),
                        moments: Mutex::new((m, v)),
                        a,
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}

struct AdamStep<'a> {
    g: &'a [f32],
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    a: AdamScalars,
}

impl InplaceOp1 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "flowmap-adamw"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), Some((lo, hi))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("AdamW: parameter is not contiguous f32")
        };
        let mut guard = self.moments.lock().expect("AdamW moments");
        let (m, v) = &mut *guard;
        if hi - lo != self.g.len() || m.len() != self.g.len() {
            candle_core::bail!("AdamW: gradient has {} entries, parameter {}", self.g.len(), hi - lo)
        }
        kernels::adamw_update(&mut theta[lo..hi], m, v, self.g, self.a);
        Ok(())
    }
}

/// An exponential moving average of a parameter set, held in its own `VarMap` of identical layout.
pub struct Ema {
    pairs: Vec<(Var, Var)>,
    decay: f64,
}

impl Ema {
    /// `ema` must hold the same names and shapes as `live`; it is first set equal to `live`.
    pub fn new(ema: &VarMap, live: &VarMap, decay: f64) -> Result<Self> {
        let (e, l) = (vars_sorted(ema), vars_sorted(live));
        if e.len() != l.len() || e.iter().zip(&l).any(|(a, b)| a.0 != b.0 || a.1.dims() != b.1.dims()) {
            return Err(Error::arg("EMA and live parameters differ in layout"));
        }
        let pairs: Vec<(Var, Var)> = e.into_iter().zip(l).map(|(a, b)| (a.1, b.1)).collect();
        for (a, b) in &pairs {
            a.set(b.as_tensor())?;
        }
        Ok(Ema { pairs, decay })
    }

    /// The decay used at `step`: `min(decay, (1 + step)/(10 + step))`, so early averages forget quickly.
    pub fn decay_at(&self, step: usize) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// `ema ← d·ema + (1 − d)·live` with `d = decay_at(step)`.
    pub fn update(&self, step: usize) -> Result<()> {
        let d = self.decay_at(step);
        for (ema, live) in &self.pairs {
            let fused = kernels::applies(ema.device(), ema.dtype()) && ema.is_contiguous() && live.is_contiguous();
            if fused {
                ema.as_tensor()
                    .inplace_op2(live.as_tensor(), &EmaStep { d: d as f32 })?;
            } else {
                let next = ((ema.as_tensor() * d)? + (live.as_tensor() * (1.0 - d))?)?;
                ema.set(&next)?;
            }
        }
        Ok(())
    }
}

struct EmaStep {
    d: f32,
}

impl InplaceOp2 for EmaStep {
    fn name(&self) -> &'static str {
        "flowmap-ema"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        match (s1, l1.contiguous_offsets(), s2, l2.contiguous_offsets()) {
            (CpuStorage::F32(e), Some((a, b)), CpuStorage::F32(l), Some((c, d))) if b - a == d - c => {
                kernels::ema_update(&mut e[a..b], &l[c..d], self.d);
                Ok(())
            }
            _ => candle_core::bail!("EMA: parameters are not contiguous f32 of equal size"),
        }
    }
}
