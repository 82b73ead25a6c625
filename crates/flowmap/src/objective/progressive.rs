use std::cell::Cell;

use crate::kernels::no_grad;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};

use super::{pair_loss, row_mse, DiagonalTarget, DistillConfig, Objective, ObjectiveState, Rows, StepContext};
use crate::backbone::{vars_sorted, Arch};
use crate::cond::Cond;
use crate::flow_map::{FlowMap, FlowMapNet, SolverMap};
use crate::ode::{Scheme, Solver};
use crate::teacher::VelocityField;
use crate::{state, Result};

/// Progressive flow-map matching (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
/// Diffusion Models", in the flow-map form of Boffi et al. 2025): two half steps of a frozen map teach
/// one full step. With `m = (t + s)/2` and `x_m = f_fr(x_t, t, m)`,
///
/// `L(θ) = E ‖F_θ(x_t, t, s) − ½(F_fr(x_t, t, m) + F_fr(x_m, m, s))‖²` (i.e. `‖f_θ − f_fr∘f_fr‖² / (t − s)²`),
///
/// plus the diagonal flow-matching term. The frozen map starts as one teacher Euler step and is replaced by
/// a snapshot of the student every `progressive_stage_steps` steps, so stage `k` matches `2^k` Euler steps.
pub struct Progressive<'a> {
    pub teacher: &'a dyn VelocityField,
    pub cfg: DistillConfig,
    frozen: Frozen<'a>,
    stage: Cell<usize>,
}

enum Frozen<'a> {
    /// Snapshots of the student's live parameters.
    Snapshot {
        live: VarMap,
        vars: VarMap,
        net: FlowMapNet,
    },
    /// A fixed map (for tests and for distilling a given map).
    Fixed(Box<dyn FlowMap + 'a>),
}

impl<'a> Progressive<'a> {
    /// `live` holds the student's parameters (snapshotted into the frozen map at each stage).
    pub fn new(teacher: &'a dyn VelocityField, cfg: DistillConfig, live: &VarMap, arch: &Arch) -> Result<Self> {
        let frozen_vars = VarMap::new();
        let any = vars_sorted(live).into_iter().next().map(|(_, v)| v);
        let (dtype, device) = match &any {
            Some(v) => (v.dtype(), v.device().clone()),
            None => (candle_core::DType::F32, candle_core::Device::Cpu),
        };
        let net = FlowMapNet::new(arch, VarBuilder::from_varmap(&frozen_vars, dtype, &device))?;
        // Stage 0 takes its targets from the teacher and never reads the snapshot, but a training state
        // saves it: it starts as the student, not as whatever the variables were initialised to, so that
        // states are the same bits on every run.
        for ((_, f), (_, l)) in vars_sorted(&frozen_vars).iter().zip(vars_sorted(live).iter()) {
            f.set(l.as_tensor())?;
        }
        let frozen = Frozen::Snapshot {
            live: live.clone(),
            vars: frozen_vars,
            net,
        };
        Ok(Progressive {
            teacher,
            cfg,
            frozen,
            stage: Cell::new(0),
        })
    }

    /// Matching two half steps of a fixed map, never refreshed.
    pub fn with_frozen(teacher: &'a dyn VelocityField, cfg: DistillConfig, frozen: Box<dyn FlowMap + 'a>) -> Self {
        Progressive {
            teacher,
            cfg,
            frozen: Frozen::Fixed(frozen),
            stage: Cell::new(0),
        }
    }

    fn frozen_average_velocity(&self, x: &Tensor, t: &Tensor, s: &Tensor, c: &Cond) -> Result<Tensor> {
        match &self.frozen {
            Frozen::Fixed(m) => m.average_velocity(x, t, s, c),
            Frozen::Snapshot { .. } if self.stage.get() == 0 => {
                SolverMap::new(self.teacher, Solver::fixed(Scheme::Euler, 1)).average_velocity(x, t, s, c)
            }
            Frozen::Snapshot { net, .. } => net.average_velocity(x, t, s, c),
        }
    }
}

impl<'a> Objective for Progressive<'a> {
    type Model = dyn FlowMap;

    fn loss(&self, cx: &mut StepContext<'_, Self::Model>) -> Result<Tensor> {
        if let Frozen::Snapshot { live, vars, .. } = &self.frozen {
            let stage = cx.step / self.cfg.continuous.progressive_stage_steps.max(1);
            if stage != self.stage.get() {
                for ((_, f), (_, l)) in vars_sorted(vars).iter().zip(vars_sorted(live).iter()) {
                    f.set(l.as_tensor())?;
                }
                self.stage.set(stage);
            }
        }
        pair_loss(&self.cfg, cx, DiagonalTarget::Teacher(self.teacher), |_, rows| {
            let target = two_half_steps(|x, t, s| self.frozen_average_velocity(x, t, s, &rows.cond), rows)?;
            Ok(row_mse(&rows.f, &target)?.mean_all()?)
        })
    }

    /// The stage and the frozen snapshot (the student as it was when the stage began).
    fn save_state(&self) -> Result<ObjectiveState> {
        let tensors = match &self.frozen {
            Frozen::Snapshot { vars, .. } => vars_sorted(vars)
                .into_iter()
                .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
            Frozen::Fixed(_) => Vec::new(),
        };
        Ok(ObjectiveState {
            tensors,
            value: serde_json::json!({ "stage": self.stage.get() }),
        })
    }

    fn load_state(&self, state: &ObjectiveState) -> Result<()> {
        let stage = state.value.get("stage").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        if let Frozen::Snapshot { vars, .. } = &self.frozen {
            let frozen = vars_sorted(vars);
            let names_match = frozen.len() == state.tensors.len()
                && frozen
                    .iter()
                    .zip(&state.tensors)
                    .all(|((a, va), (b, t))| a == b && va.dims() == t.dims());
            if !names_match {
                return Err(crate::Error::arg(
                    "the training state's progressive snapshot does not match the student",
                ));
            }
            for ((_, v), (_, t)) in frozen.iter().zip(&state.tensors) {
                v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
            }
        }
        self.stage.set(stage);
        Ok(())
    }
}

/// `½(F(x_t, t, m) + F(x_m, m, s))` with `m = (t + s)/2` and `x_m = x_t + (m − t)·F(x_t, t, m)`: the average
/// velocity of two half steps of the map `F`, detached.
pub(crate) fn two_half_steps(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>, r: &Rows) -> Result<Tensor> {
    no_grad(|| {
        let m = ((&r.t + &r.s)? * 0.5)?;
        let f1 = f(&r.x, &r.t, &m)?;
        let xm = (&r.x + f1.broadcast_mul(&state::per_row(&(&m - &r.t)?, &r.x)?)?)?;
        let f2 = f(&xm, &m, &r.s)?;
        Ok(((f1 + f2)? * 0.5)?)
    })
}
