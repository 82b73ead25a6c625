//! The optimiser and the weight average the training loop uses: AdamW (Loshchilov & Hutter 2019,
//! "Decoupled Weight Decay Regularization") and an exponential moving average of the weights.
//!
//! Both update parameters in place. On the CPU in f32 each parameter takes one fused pass
//! ([`crate::kernels`]); elsewhere they run tensor arithmetic. The algebra is the same (candle-nn's), so
//! the two agree to f32 rounding.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{ParamsAdamW, VarMap};

use crate::flow_map::vars_sorted;
use crate::kernels::{self, AdamScalars};
use crate::{Error, Result};

/// AdamW: `m ← β1 m + (1 − β1) g`, `v ← β2 v + (1 − β2) g²`,
/// `θ ← (1 − lr·λ) θ − lr · m̂ / (√v̂ + eps)` with bias-corrected `m̂ = m/(1 − β1^t)`, `v̂ = v/(1 − β2^t)`.
///
/// Parameters are named, so that the moments can be saved and restored by name ([`AdamW::state`]).
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    moments: Moments,
    step: usize,
    params: ParamsAdamW,
}

/// First and second moments per parameter: plain buffers for the fused CPU update, tensors elsewhere.
enum Moments {
    Fused(Vec<(Vec<f32>, Vec<f32>)>),
    Tensors(Vec<(Tensor, Tensor)>),
}

/// The optimiser's state: its step count and each parameter's moments, by name.
#[derive(Clone, Debug)]
pub struct AdamState {
    pub step: usize,
    /// `(name, m, v)`, in name order.
    pub moments: Vec<(String, Tensor, Tensor)>,
}

impl AdamW {
    /// An optimiser over `vars` (name and variable), moments zero.
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        let fused = vars
            .iter()
            .all(|(_, v)| kernels::applies(v.device(), v.dtype()) && v.is_contiguous());
        let moments = if fused {
            Moments::Fused(
                vars.iter()
                    .map(|(_, v)| (vec![0.0; v.elem_count()], vec![0.0; v.elem_count()]))
                    .collect(),
            )
        } else {
            Moments::Tensors(
                vars.iter()
                    .map(|(_, v)| Ok((v.zeros_like()?, v.zeros_like()?)))
                    .collect::<Result<_>>()?,
            )
        };
        let (names, vars) = vars.into_iter().unzip();
        Ok(AdamW {
            names,
            vars,
            moments,
            step: 0,
            params,
        })
    }

    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Whether every gradient in `grads` is finite (no NaN, no infinity).
    pub fn grads_finite(&self, grads: &GradStore) -> Result<bool> {
        for var in &self.vars {
            let Some(g) = grads.get(var) else { continue };
            let finite = match kernels::read(&g.contiguous()?) {
                Some(view) => view.slice().iter().all(|v| v.is_finite()),
                // NaN and infinity survive a sum (an overflow to infinity counts as not finite).
                None => g.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?.is_finite(),
            };
            if !finite {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One update from the gradients in `grads` (parameters without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(self.step as i32));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(self.step as i32));
        match &mut self.moments {
            Moments::Fused(moments) => {
                let a = AdamScalars {
                    lr: p.lr as f32,
                    beta1: p.beta1 as f32,
                    beta2: p.beta2 as f32,
                    eps: p.eps as f32,
                    decay: (1.0 - p.lr * p.weight_decay) as f32,
                    scale_m: scale_m as f32,
                    scale_v: scale_v as f32,
                };
                for (var, (m, v)) in self.vars.iter().zip(moments.iter_mut()) {
                    let Some(g) = grads.get(var) else { continue };
                    let g = g.contiguous()?;
                    let g = kernels::read(&g).ok_or_else(|| Error::arg("AdamW: gradient is not f32 on the CPU"))?;
                    var.as_tensor().inplace_op1(&AdamStep {
                        g: g.slice(),
                        moments: Mutex::new((m, v)),
                        a,
                    })?;
                }
            }
            // The same algebra in tensor arithmetic, for other devices and dtypes (candle-nn's order of
            // operations).
            Moments::Tensors(moments) => {
                for (var, (m, v)) in self.vars.iter().zip(moments.iter_mut()) {
                    let Some(g) = grads.get(var) else { continue };
                    let next_m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
                    let next_v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                    let m_hat = (&next_m * scale_m)?;
                    let v_hat = (&next_v * scale_v)?;
                    let theta = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
                    let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                    var.set(&(theta - (adjusted * p.lr)?)?)?;
                    *m = next_m;
                    *v = next_v;
                }
            }
        }
        Ok(())
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The step count and a copy of every moment, by name.
    pub fn state(&self) -> Result<AdamState> {
        let moments = match &self.moments {
            Moments::Fused(ms) => self
                .vars
                .iter()
                .zip(ms)
                .map(|(var, (m, v))| {
                    let dev = &Device::Cpu;
                    Ok((
                        Tensor::from_slice(m, var.shape(), dev)?,
                        Tensor::from_slice(v, var.shape(), dev)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
            Moments::Tensors(ms) => ms
                .iter()
                .map(|(m, v)| Ok((m.copy()?, v.copy()?)))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(AdamState {
            step: self.step,
            moments: self
                .names
                .iter()
                .zip(moments)
                .map(|(n, (m, v))| (n.clone(), m, v))
                .collect(),
        })
    }

    /// Restores a state from [`AdamW::state`]; its names and shapes must be this optimiser's.
    pub fn load_state(&mut self, state: &AdamState) -> Result<()> {
        let same = state.moments.len() == self.names.len()
            && state
                .moments
                .iter()
                .zip(self.names.iter().zip(&self.vars))
                .all(|((n, m, v), (name, var))| n == name && m.dims() == var.dims() && v.dims() == var.dims());
        if !same {
            return Err(Error::arg("the optimiser state does not match the parameters"));
        }
        match &mut self.moments {
            Moments::Fused(ms) => {
                for ((_, m, v), (bm, bv)) in state.moments.iter().zip(ms.iter_mut()) {
                    *bm = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    *bv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                }
            }
            Moments::Tensors(ms) => {
                for ((_, m, v), (tm, tv)) in state.moments.iter().zip(ms.iter_mut()) {
                    *tm = m.to_device(tm.device())?.to_dtype(tm.dtype())?;
                    *tv = v.to_device(tv.device())?.to_dtype(tv.dtype())?;
                }
            }
        }
        self.step = state.step;
        Ok(())
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
