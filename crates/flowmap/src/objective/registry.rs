//! The registry of flow-map methods: one entry per method with what the rest of flowmap asks of it (its
//! name on the command line, a one-line summary, whether it distils a teacher, takes a tangent or learns
//! only `s = 0`) and how its objective is built. [`Method`]'s properties, the command line's `--method`
//! errors and [`super::build`] read this table; adding a method is its objective file, one variant of
//! [`Method`] and one line here.

use super::{
    ConsistencyDistillation, ConsistencyTrajectory, DirectRegression, DistillConfig, Emd, EmdContinuous, Lmd,
    LmdContinuous, MeanFlow, Method, Objective, Progressive, SelfLmd, Shortcut,
};
use crate::backbone::Arch;
use crate::flow_map::FlowMap;
use crate::teacher::VelocityField;
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
    pub build: for<'a, 's> fn(&BuildArgs<'a, 's>) -> Result<BoxedObjective<'a>>,
}

#[rustfmt::skip]
pub const METHODS: [MethodInfo; 11] = [
    MethodInfo { method: Method::Emd, name: "emd", summary: "Eulerian map distillation: the start point moves one teacher step", needs_teacher: true, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(Emd::new(a.teacher()?, a.cfg))) },
    MethodInfo { method: Method::Lmd, name: "lmd", summary: "Lagrangian map distillation: the end point moves one teacher step", needs_teacher: true, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(Lmd::new(a.teacher()?, a.cfg))) },
    MethodInfo { method: Method::EmdCont, name: "emd-cont", summary: "Eulerian map distillation in continuous time (a JVP along the teacher)", needs_teacher: true, needs_tangent: true, boundary_only: false, build: |a| Ok(Box::new(EmdContinuous { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::LmdCont, name: "lmd-cont", summary: "Lagrangian map distillation in continuous time (a JVP in s)", needs_teacher: true, needs_tangent: true, boundary_only: false, build: |a| Ok(Box::new(LmdContinuous { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Cm, name: "cm", summary: "consistency distillation: the map to s = 0 only", needs_teacher: true, needs_tangent: false, boundary_only: true, build: |a| Ok(Box::new(ConsistencyDistillation { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Ctm, name: "ctm", summary: "consistency trajectory model: the teacher solved part of the way, then the target map", needs_teacher: true, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(ConsistencyTrajectory { teacher: a.teacher()?, cfg: a.cfg })) },
    MethodInfo { method: Method::Progressive, name: "progressive", summary: "progressive flow-map matching: two half steps of a frozen map teach one", needs_teacher: true, needs_tangent: false, boundary_only: false, build: build_progressive },
    MethodInfo { method: Method::Direct, name: "direct", summary: "direct regression on the teacher's dopri5 solutions", needs_teacher: true, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(DirectRegression { teacher: a.teacher()?, cfg: a.cfg, tol: 1e-4 })) },
    MethodInfo { method: Method::Meanflow, name: "meanflow", summary: "MeanFlow: the average-velocity identity with one JVP, from data", needs_teacher: false, needs_tangent: true, boundary_only: false, build: |a| Ok(Box::new(MeanFlow { cfg: a.cfg })) },
    MethodInfo { method: Method::SelfLmd, name: "self-lmd", summary: "Lagrangian self-distillation: the map's own diagonal as the teacher, from data", needs_teacher: false, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(SelfLmd { cfg: a.cfg })) },
    MethodInfo { method: Method::Shortcut, name: "shortcut", summary: "shortcut models: two half jumps teach one, from data", needs_teacher: false, needs_tangent: false, boundary_only: false, build: |a| Ok(Box::new(Shortcut { cfg: a.cfg })) },
];

fn build_progressive<'a>(a: &BuildArgs<'a, '_>) -> Result<BoxedObjective<'a>> {
    let (live, arch) = a
        .student
        .ok_or_else(|| Error::arg("progressive flow-map matching needs the student's parameters"))?;
    Ok(Box::new(Progressive::new(a.teacher()?, a.cfg, live, arch)?))
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
    fn every_method_has_one_entry_in_order() {
        assert_eq!(METHODS.len(), Method::ALL.len());
        for (i, m) in Method::ALL.iter().enumerate() {
            assert_eq!(METHODS[i].method, *m);
            assert_eq!(METHODS.iter().filter(|e| e.method == *m).count(), 1);
        }
    }
}
