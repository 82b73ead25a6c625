//! The registry of flow-map methods: one entry per method with what the rest of flowmap asks of it (its
//! name on the command line and in checkpoints, a one-line summary, whether it distils a teacher, takes a
//! tangent or learns only `s = 0`, its recipe of defaults) and how its objective is built. [`Method`]'s
//! properties and parsing, [`DistillConfig::for_data`], [`super::build`], the command line's help and
//! errors and the benchmarks' method lists all read this table; adding a method is its objective file, its
//! variant of [`Method`] and its line here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    consistency, continuous, meanflow, self_distill, ConsistencyDistillation, ConsistencyTrajectory, DataKind,
    DirectRegression, DistillConfig, Emd, EmdContinuous, Lmd, LmdContinuous, MeanFlow, Objective, Progressive, SelfLmd,
    Shortcut,
};
use crate::backbone::Arch;
use crate::flow_map::FlowMap;
use crate::teacher::VelocityField;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// What building an objective may use: the teacher (teacher-based methods), the method's settings and the
/// student's live parameters with its architecture (progressive matching snapshots them).
pub struct BuildArgs<'a, 's> {
    pub method: Method,
    pub teacher: Option<&'a dyn VelocityField>,
    pub cfg: DistillConfig,
    pub student: Option<(&'s candle_nn::VarMap, &'s Arch)>,
}

impl<'a> BuildArgs<'a, '_> {
    fn teacher(&self) -> Result<&'a dyn VelocityField> {
        self.teacher
            .ok_or_else(|| Error::arg(format!("'{}' distils a teacher, and none was given", self.method)))
    }
}

/// A flow-map training method: distillation from a teacher, or training from data alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Eulerian map distillation, discrete: move the start point along the teacher.
    Emd,
    /// Lagrangian map distillation, discrete: move the end point along the teacher.
    Lmd,
    /// Eulerian map distillation in continuous time (a JVP along the teacher's flow).
    EmdCont,
    /// Lagrangian map distillation in continuous time (a JVP in `s`).
    LmdCont,
    /// Consistency distillation: the map restricted to `s = 0`.
    Cm,
    /// Consistency trajectory model: the teacher solved part of the way, then the target map.
    Ctm,
    /// Progressive flow-map matching: two half steps of a frozen map teach one full step.
    Progressive,
    /// Direct regression on the teacher's dopri5 solutions.
    Direct,
    /// MeanFlow, from data alone.
    Meanflow,
    /// Lagrangian self-distillation, from data alone.
    SelfLmd,
    /// Shortcut self-consistency, from data alone.
    Shortcut,
}

impl Method {
    /// The method's entry in the registry ([`super::registry`]).
    pub fn info(self) -> &'static MethodInfo {
        info(self)
    }

    /// The name on the command line and in checkpoints.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Whether the method distils a teacher (`flowmap distill`) or trains from data (`flowmap train`).
    pub fn needs_teacher(self) -> bool {
        self.info().needs_teacher
    }

    /// Whether the objective takes a tangent of the map (a JVP, exact or by finite differences).
    pub fn needs_tangent(self) -> bool {
        self.info().needs_tangent
    }

    /// Whether the trained map is defined only for `s = 0` (a consistency model).
    pub fn boundary_only(self) -> bool {
        self.info().boundary_only
    }

    /// Every method, in the registry's order.
    pub fn all() -> impl Iterator<Item = Method> {
        METHODS.iter().map(|i| i.method)
    }

    fn list(teacher: bool) -> String {
        Method::all()
            .filter(|m| m.needs_teacher() == teacher)
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::all().find(|m| m.name() == s).ok_or_else(|| {
            Error::arg(format!(
                "unknown method '{s}' (distillation: {}; from data: {})",
                Method::list(true),
                Method::list(false)
            ))
        })
    }
}

/// A boxed flow-map objective.
pub type BoxedObjective<'a> = Box<dyn Objective<Model = dyn FlowMap> + 'a>;

/// One method of the family.
pub struct MethodInfo {
    pub method: Method,
    /// The name on the command line and in checkpoints.
    pub name: &'static str,
    /// What it does, in one line.
    pub summary: &'static str,
    /// Distils a teacher (`flowmap distill`), else trains from data (`flowmap train`).
    pub needs_teacher: bool,
    /// Takes a tangent of the map (an exact JVP or finite differences).
    pub needs_tangent: bool,
    /// Learns the map only for `s = 0` (a consistency model, sampled by re-noising).
    pub boundary_only: bool,
    /// The method's defaults where its measurements chose other settings than [`DistillConfig::default`],
    /// by the kind of data ([`DistillConfig::for_data`]).
    pub recipe: fn(&mut DistillConfig, DataKind),
    pub build: for<'a, 's> fn(&BuildArgs<'a, 's>) -> Result<BoxedObjective<'a>>,
}

#[rustfmt::skip]
pub const METHODS: &[MethodInfo] = &[
    MethodInfo { method: Method::Emd, name: "emd", summary: "Eulerian map distillation: the start point moves one teacher step", needs_teacher: true, needs_tangent: false, boundary_only: false, recipe: no_recipe, build: |a| Ok(Box::new(Emd::new(a.teacher()?, a.cfg))) },
    MethodInfo { method: Method::Lmd, name: "lmd", summary: "Lagrangian map distillation: the end point moves one teacher step", needs_teacher: true, needs_tangent: false, boundary_only: false, recipe: no_recipe, build: |a| Ok(Box::new(Lmd::new(a.teacher()?, a.cfg))) },
    MethodInfo { method: Method::EmdCont, name: "emd-cont", summary: "Eulerian map distillation in continuous time (a JVP along the teacher)", needs_teacher: true, needs_tangent: true, boundary_only: false, recipe: no_recipe, build: |a| Ok(Box::new(EmdContinuous { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::LmdCont, name: "lmd-cont", summary: "Lagrangian map distillation in continuous time (a JVP in s)", needs_teacher: true, needs_tangent: true, boundary_only: false, recipe: continuous::lmd_cont_recipe, build: |a| Ok(Box::new(LmdContinuous { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Cm, name: "cm", summary: "consistency distillation: the map to s = 0 only", needs_teacher: true, needs_tangent: false, boundary_only: true, recipe: consistency::recipe, build: |a| Ok(Box::new(ConsistencyDistillation { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Ctm, name: "ctm", summary: "consistency trajectory model: the teacher solved part of the way, then the target map", needs_teacher: true, needs_tangent: false, boundary_only: false, recipe: no_recipe, build: |a| Ok(Box::new(ConsistencyTrajectory { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Progressive, name: "progressive", summary: "progressive flow-map matching: two half steps of a frozen map teach one", needs_teacher: true, needs_tangent: false, boundary_only: false, recipe: no_recipe, build: build_progressive },
    MethodInfo { method: Method::Direct, name: "direct", summary: "direct regression on the teacher's dopri5 solutions", needs_teacher: true, needs_tangent: false, boundary_only: false, recipe: no_recipe, build: |a| Ok(Box::new(DirectRegression { teacher: a.teacher()?, cfg: a.cfg, tol: 1e-4 })) },
    MethodInfo { method: Method::Meanflow, name: "meanflow", summary: "MeanFlow: the average-velocity identity with one JVP, from data", needs_teacher: false, needs_tangent: true, boundary_only: false, recipe: meanflow::recipe, build: |a| Ok(Box::new(MeanFlow { cfg: a.cfg })) },
    MethodInfo { method: Method::SelfLmd, name: "self-lmd", summary: "Lagrangian self-distillation: the map's own diagonal as the teacher, from data", needs_teacher: false, needs_tangent: false, boundary_only: false, recipe: self_distill::self_lmd_recipe, build: |a| Ok(Box::new(SelfLmd { cfg: a.cfg })) },
    MethodInfo { method: Method::Shortcut, name: "shortcut", summary: "shortcut models: two half jumps teach one, from data", needs_teacher: false, needs_tangent: false, boundary_only: false, recipe: self_distill::shortcut_recipe, build: |a| Ok(Box::new(Shortcut { cfg: a.cfg })) },
];

/// The recipe of a method that keeps [`DistillConfig::default`] on every kind of data.
fn no_recipe(_: &mut DistillConfig, _: DataKind) {}

fn build_progressive<'a>(a: &BuildArgs<'a, '_>) -> Result<BoxedObjective<'a>> {
    let (live, arch) = a
        .student
        .ok_or_else(|| Error::arg("progressive flow-map matching needs the student's parameters"))?;
    Ok(Box::new(Progressive::new(a.teacher()?, a.cfg, live, arch)?))
}

/// The recommended distillation for data of `kind` when no method is named: the teacher-based method
/// whose one-step samples measured best, the training settings it was measured with, and the measurement
/// that chose it.
///
/// Consistency distillation (`cm`) on both kinds. Points: `flowmap bench compare` (every method 30 s, energy
/// distance on 200,000 checkerboard samples) put its one-step ED at 0.000225, the next teacher-based method
/// (LMD) at 0.000607 and EMD at 0.003420 (dopri5: 0.000066); at two steps it also led (0.000150). Images:
/// `flowmap bench mnist` (2,000 map steps from the shipped teacher at batch 64, peak learning rate 5·10⁻⁴,
/// EMA decay 0.99) put its one-step FD at 28.0 against 33–88 for every other method (dopri5: 18.8); those
/// are the image recipe's settings, where the general defaults (batch 1,024) cost 16× more per step. An
/// hour of it (`bench/one-step/mnist-hour.sh`, 15,764 steps) reaches 1.21× the teacher's dopri5 FD at one
/// step and 1.09× at two, the means of three seeds. It
/// learns the map to `s = 0` only and samples several steps by re-noising; a full map `f(x, t, s)` is any
/// other method (`emd`, `lmd`, …).
pub fn recommended(kind: DataKind) -> Recommendation {
    if kind.image {
        Recommendation {
            method: Method::Cm,
            train: TrainConfig {
                batch_size: 64,
                lr: 5e-4,
                ema_decay: 0.99,
                ..TrainConfig::default()
            },
            why: "one-step FD 28.0 against 33–88 for every other method at 2,000 steps (flowmap bench mnist; teacher dopri5 18.8); after an hour's 15,764 steps 1.21× the teacher's dopri5 FD at one step, 1.09× at two (bench/one-step)",
        }
    } else {
        Recommendation {
            method: Method::Cm,
            train: TrainConfig::default(),
            why: "one-step energy distance 0.000225 against 0.000607–0.019 for the other distillations (flowmap bench compare, checkerboard; teacher dopri5 0.000066)",
        }
    }
}

/// A recommended method, its training settings (which a run's own settings override) and the measurement
/// behind it ([`recommended`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    pub method: Method,
    pub train: TrainConfig,
    pub why: &'static str,
}

/// The registry entry of `method`.
pub fn info(method: Method) -> &'static MethodInfo {
    METHODS
        .iter()
        .find(|i| i.method == method)
        .expect("every method has a registry entry (tested)")
}

/// `name — summary` lines of the methods that do (or do not) need a teacher, for help texts.
pub fn describe(teacher: bool) -> String {
    METHODS
        .iter()
        .filter(|i| i.needs_teacher == teacher)
        .map(|i| format!("  {:12} {}", i.name, i.summary))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_one_entry_and_parses_from_its_name() {
        for info in METHODS {
            assert_eq!(
                METHODS.iter().filter(|e| e.method == info.method).count(),
                1,
                "{}",
                info.name
            );
            assert_eq!(
                METHODS.iter().filter(|e| e.name == info.name).count(),
                1,
                "{}",
                info.name
            );
            assert_eq!(info.name.parse::<Method>().unwrap(), info.method);
            assert_eq!(info.method.name(), info.name);
            // The serialised name (checkpoints) is the command line's.
            assert_eq!(serde_json::to_value(info.method).unwrap(), info.name);
        }
    }
}
