//! Flow maps `f(x, t, s) ≈ Φ_{t→s}(x)`, `0 ≤ s ≤ t ≤ 1`, in the average-velocity parameterisation
//! `f(x, t, s) = x + (s − t)·F(x, t, s)`.
//!
//! The family in one trait:
//! - a trained network ([`FlowMapNet`]);
//! - an ODE solver on a velocity field ([`SolverMap`]): the teacher's sampler, and with a tight
//!   tolerance the exact solution operator Φ that everything is measured against;
//! - its diagonal `F(x, t, t) = v(x, t)` ([`Diagonal`]): the flow-matching velocity is the `s → t` limit.

use std::cell::Cell;

use candle_core::{Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::nn::{ConditionedMlp, MlpConfig};
use crate::ode::{self, Solver};
use crate::teacher::VelocityField;
use crate::{Error, Result};

/// A map `f(x, t, s)` from time `t` down to time `s`, for `B × D` states and `B × 1` times.
pub trait FlowMap {
    /// The state dimension `D`.
    fn dim(&self) -> usize;

    /// The average velocity `F(x, t, s)`, so that `f(x, t, s) = x + (s − t)·F(x, t, s)`.
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor>;

    /// `f(x, t, s) = x + (s − t)·F(x, t, s)`; `f(x, t, t) = x` holds exactly.
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        let f = self.average_velocity(x, t, s)?;
        Ok((x + f.broadcast_mul(&(s - t)?)?)?)
    }
}

impl<M: FlowMap + ?Sized> FlowMap for &M {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        (**self).average_velocity(x, t, s)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        (**self).map(x, t, s)
    }
}

/// A learned flow map: an MLP `F_θ(x, emb(t), emb(t − s))`.
#[derive(Clone, Debug)]
pub struct FlowMapNet {
    cfg: MlpConfig,
    net: ConditionedMlp,
}

impl FlowMapNet {
    pub fn new(cfg: &MlpConfig, vb: VarBuilder) -> Result<Self> {
        Ok(FlowMapNet {
            cfg: cfg.clone(),
            net: ConditionedMlp::new(cfg, true, vb)?,
        })
    }
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }
}

impl FlowMap for FlowMapNet {
    fn dim(&self) -> usize {
        self.cfg.dim
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.net.forward(x, t, Some(&(t - s)?))
    }
}

impl crate::jvp::TangentMap for FlowMapNet {
    /// One forward-mode pass; the gap `t − s` has tangent `ṫ − ṡ`.
    fn average_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        s: &Tensor,
        dx: &Tensor,
        dt: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let gap = (t - s)?;
        let dgap = (dt - ds)?;
        self.net.forward_jvp((x, t, Some(&gap)), (dx, dt, Some(&dgap)))
    }
}

/// Initialises a flow-map network's parameters from a velocity network's: tensors of equal shape are
/// copied; a student tensor that extends the teacher's along its input (last) axis gets the teacher's
/// values in the leading columns and zeros in the rest. With [`ConditionedMlp`]'s input layout
/// `[x, emb(t), emb(t − s)]` the student then computes `F(x, t, s) = v(x, t)`: one Euler step of the teacher.
pub fn init_from_teacher(student: &VarMap, teacher: &VarMap) -> Result<()> {
    let teacher_vars = teacher.data().lock().expect("teacher vars");
    let student_vars = student.data().lock().expect("student vars");
    for (name, sv) in student_vars.iter() {
        let Some(tv) = teacher_vars.get(name) else {
            return Err(Error::arg(format!("teacher has no parameter '{name}'")));
        };
        let (ss, ts) = (sv.dims().to_vec(), tv.dims().to_vec());
        let value = if ss == ts {
            tv.as_tensor().clone()
        } else if ss.len() == 2 && ts.len() == 2 && ss[0] == ts[0] && ss[1] > ts[1] {
            let zeros = Tensor::zeros((ss[0], ss[1] - ts[1]), tv.dtype(), tv.device())?;
            Tensor::cat(&[tv.as_tensor(), &zeros], 1)?
        } else {
            return Err(Error::arg(format!(
                "parameter '{name}': teacher shape {ts:?} cannot seed student shape {ss:?}"
            )));
        };
        sv.set(&value)?;
    }
    Ok(())
}

/// The diagonal of a flow map, `v(x, t) = F(x, t, t)`: the velocity a flow map encodes as `s → t`.
pub struct Diagonal<M>(pub M);

impl<M: FlowMap> VelocityField for Diagonal<M> {
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.average_velocity(x, t, t)
    }
}

/// The flow map of a velocity field computed by an ODE solver. With [`Solver::exact`] this is Φ itself.
pub struct SolverMap<V> {
    pub field: V,
    pub solver: Solver,
}

impl<V: VelocityField> SolverMap<V> {
    pub fn new(field: V, solver: Solver) -> Self {
        SolverMap { field, solver }
    }
    /// The exact solution operator Φ (dopri5 at tolerance 1e-7).
    pub fn exact(field: V) -> Self {
        SolverMap {
            field,
            solver: Solver::exact(),
        }
    }
}

impl<V: VelocityField> FlowMap for SolverMap<V> {
    fn dim(&self) -> usize {
        self.field.dim()
    }
    /// `(Φ_{t→s}(x) − x)/(s − t)`, and `v(x, t)` on rows where `s = t`.
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        let y = self.map(x, t, s)?;
        let gap = (s - t)?;
        let on_diag = gap.abs()?.lt(1e-9)?;
        let safe_gap = on_diag.where_cond(&gap.ones_like()?, &gap)?;
        let avg = (y - x)?.broadcast_div(&safe_gap)?;
        let v = self.field.velocity(x, t)?;
        Ok(on_diag.broadcast_as(avg.shape())?.where_cond(&v, &avg)?)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        ode::solve(&self.field, self.solver, x, t, s)
    }
}

/// Counts flow-map evaluations: each `map` or `average_velocity` call on a batch is one NFE.
pub struct CountedMap<M> {
    pub inner: M,
    calls: Cell<usize>,
}

impl<M> CountedMap<M> {
    pub fn new(inner: M) -> Self {
        CountedMap {
            inner,
            calls: Cell::new(0),
        }
    }
    pub fn nfe(&self) -> usize {
        self.calls.get()
    }
}

impl<M: FlowMap> FlowMap for CountedMap<M> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.average_velocity(x, t, s)
    }
    fn map(&self, x: &Tensor, t: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.map(x, t, s)
    }
}

/// Reads every variable of a `VarMap` (for tests and checkpoints).
pub fn vars_sorted(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("vars");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
