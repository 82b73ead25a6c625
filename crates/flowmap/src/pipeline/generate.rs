//! Generating from a model: the classes of the samples, the sampler or solver an NFE budget buys, guidance,
//! and the data's own value range. The CLI's `sample` and the Python package both go through
//! [`Model::generator`].

use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::{Model, Teacher};
use crate::checkpoint::ModelKind;
use crate::cond::Cond;
use crate::data::Scale;
use crate::flow_map::{AtGuidance, FlowMap, FlowMapNet};
use crate::ode::{self, Solver};
use crate::path::ProbabilityPath;
use crate::sample::{self, SampleContext, Sampled, Sampler, TimeGrid};
use crate::teacher::{Autoguided, Guided, VelocityField};
use crate::{Error, Result};

/// The classes a class-conditional model's samples get.
#[derive(Clone, Debug, PartialEq)]
pub enum Classes {
    /// Sample `i` gets class `i mod C` (the default: one grid row per class).
    All,
    /// Every sample gets class `k`.
    One(usize),
    /// The reserved null class: the unconditional model.
    Null,
    /// One class per sample, in order (cycled if there are fewer labels than samples).
    Each(Vec<u32>),
}

impl FromStr for Classes {
    type Err = Error;
    /// `all`, `null` or a class number `K`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Classes::All),
            "null" => Ok(Classes::Null),
            k => k
                .parse::<usize>()
                .map(Classes::One)
                .map_err(|_| Error::arg(format!("class '{k}' is not a class number, all or null"))),
        }
    }
}

impl Classes {
    /// The condition of samples `start..start + n` of a model with `classes` classes (`None`: an
    /// unconditional model, which takes no classes but the null one). `None` for `spec` is [`Classes::All`]
    /// for a conditional model and no condition for an unconditional one.
    pub fn cond(
        spec: Option<&Classes>,
        start: usize,
        n: usize,
        classes: Option<usize>,
        device: &Device,
    ) -> Result<Cond> {
        let Some(c) = classes else {
            return match spec {
                None | Some(Classes::Null) => Ok(Cond::none()),
                Some(_) => Err(Error::arg(
                    "classes were asked for, but the model is unconditional (it was trained without labels)",
                )),
            };
        };
        let check = |k: usize| -> Result<u32> {
            if k < c {
                Ok(k as u32)
            } else {
                Err(Error::arg(format!(
                    "class {k} is out of range: the model has classes 0..{}",
                    c - 1
                )))
            }
        };
        let labels: Vec<u32> = match spec.unwrap_or(&Classes::All) {
            Classes::All => (start..start + n).map(|i| (i % c) as u32).collect(),
            Classes::Null => vec![c as u32; n],
            Classes::One(k) => vec![check(*k)?; n],
            Classes::Each(l) if l.is_empty() => return Err(Error::arg("an empty list of classes")),
            Classes::Each(l) => (start..start + n)
                .map(|i| check(l[i % l.len()] as usize))
                .collect::<Result<_>>()?,
        };
        Cond::from_classes(&labels, c, device)
    }

    /// The rows of a grid of these samples: one per class for [`Classes::All`] of a conditional model, else
    /// none (the caller picks a square).
    pub fn grid_rows(spec: Option<&Classes>, classes: Option<usize>) -> usize {
        match (spec.unwrap_or(&Classes::All), classes) {
            (Classes::All, Some(c)) => c,
            _ => 0,
        }
    }
}

/// `x` (in the model's `[−1, 1]`) in the data's own value range, where the model was trained on images.
pub fn to_data_range(x: &Tensor, scale: Option<Scale>) -> Result<Tensor> {
    Ok(match scale {
        Some(s) => x.affine(0.5 * (s.hi - s.lo), s.lo + 0.5 * (s.hi - s.lo))?,
        None => x.clone(),
    })
}

/// `x` (in the data's own value range) in the model's `[−1, 1]`, where the model was trained on images: the
/// inverse of [`to_data_range`].
pub fn to_model_range(x: &Tensor, scale: Option<Scale>) -> Result<Tensor> {
    Ok(match scale {
        Some(s) => x.affine(2.0 / (s.hi - s.lo), -2.0 * s.lo / (s.hi - s.lo) - 1.0)?,
        None => x.clone(),
    })
}

/// The sampler asked for, or the map's own: a consistency model is defined at `s = 0` only, so its
/// multi-step samples re-noise between jumps (and a sampler that would evaluate it at `s > 0` is an error);
/// every other map walks its grid deterministically.
pub fn map_sampler(asked: Option<Sampler>, kind: ModelKind, multi_step: bool) -> Result<Sampler> {
    let boundary = kind.boundary_only();
    let sampler = match (asked, boundary) {
        (Some(s), _) => s,
        (None, true) => Sampler::Consistency,
        (None, false) => Sampler::Deterministic,
    };
    if boundary && !sampler.boundary_only() && multi_step {
        return Err(Error::arg(
            "a consistency model maps only to s = 0: sample it with the consistency sampler (or gamma:1), or in one step",
        ));
    }
    Ok(sampler)
}

/// The solver `name` (euler, heun, midpoint, rk4 or dopri5) within a budget of `nfe` evaluations: as many
/// steps as the budget buys (dopri5 adapts its own, to tolerance 1e-5).
pub fn teacher_solver(name: &str, nfe: usize) -> Result<Solver> {
    if name == "dopri5" {
        return Ok(Solver::dopri5(1e-5));
    }
    let scheme: ode::Scheme = name.parse()?;
    let steps = nfe / scheme.evals_per_step();
    if steps == 0 {
        return Err(Error::arg(format!(
            "{name} needs at least {} evaluations per step; an NFE budget of {nfe} buys none",
            scheme.evals_per_step()
        )));
    }
    Ok(Solver::fixed(scheme, steps))
}

/// The teacher `t` guided at scale `w`: by `weak` (autoguidance, `v_weak + w·(v − v_weak)`), or by its null
/// class (classifier-free guidance, `v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅))`); as it is without `w`.
pub fn guided<'a>(t: &'a Teacher, w: Option<f64>, weak: Option<&'a Teacher>) -> Result<Box<dyn VelocityField + 'a>> {
    let Some(w) = w else {
        if weak.is_some() {
            return Err(Error::arg("a guiding model guides at a scale: give the guidance w"));
        }
        return Ok(Box::new(t));
    };
    if let Some(weak) = weak {
        super::check_guide(t, weak)?;
        return Ok(Box::new(Autoguided::new(t, weak, w)?));
    }
    let Some(c) = t.num_classes() else {
        return Err(Error::arg(format!(
            "guidance {w}: the model is unconditional; classifier-free guidance needs a class-conditional teacher (trained on labelled data), or guide it by a weaker model"
        )));
    };
    Ok(Box::new(Guided::new(t, w, c)?))
}

/// A flow map as it is evaluated: a guidance-distilled one at scale `w` (which it needs), any other as it
/// is (it has no guidance input, so a scale is an error).
pub fn map_at(net: &FlowMapNet, w: Option<f64>) -> Result<Box<dyn FlowMap + '_>> {
    match (net.arch().guidance(), w) {
        (None, None) => Ok(Box::new(net)),
        (None, Some(w)) => Err(Error::arg(format!(
            "guidance {w}: this flow map was distilled without guidance, so it has no guidance input; guide its teacher instead, or distil with a guidance range"
        ))),
        (Some([lo, hi]), None) => Err(Error::arg(format!(
            "this flow map has guidance distilled into it (w in [{lo}, {hi}]): give the guidance w"
        ))),
        (Some(_), Some(w)) => Ok(Box::new(AtGuidance::new(net, w)?)),
    }
}

/// How guidance at scale `w` is named in reports: `guidance w = …`, or `autoguidance w = …` where a weaker
/// model guides.
pub fn guidance_label(w: Option<f64>, by_model: bool) -> Option<String> {
    let kind = if by_model { "autoguidance" } else { "guidance" };
    w.map(|w| format!("{kind} w = {w}"))
}

/// How to generate: the NFE budget and what spends it, the classes, guidance and the seed.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Network evaluations: a flow map's steps, or a teacher solver's budget.
    pub nfe: usize,
    /// A flow map's descending grid from 1 to 0 (overrides `nfe` and `grid_power`).
    pub grid: Option<TimeGrid>,
    /// A flow map's `nfe` steps on `t_i = (1 − i/k)^ρ`; 1 is uniform.
    pub grid_power: f64,
    /// A teacher's solver: euler, heun, midpoint, rk4 or dopri5.
    pub solver: String,
    /// A flow map's sampler (default: its own, [`map_sampler`]).
    pub sampler: Option<Sampler>,
    /// The classes of a class-conditional model's samples (default: [`Classes::All`]).
    pub classes: Option<Classes>,
    /// Guidance scale `w`: classifier-free (or, with a guiding model, auto-) guidance of a teacher, the
    /// input of a guidance-distilled map.
    pub guidance: Option<f64>,
    pub seed: u64,
    /// The precision of the networks' matrix products ([`crate::kernels::Precision`]).
    pub precision: crate::kernels::Precision,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            nfe: 1,
            grid: None,
            grid_power: 1.0,
            solver: "euler".into(),
            sampler: None,
            classes: None,
            guidance: None,
            seed: 0,
            precision: crate::kernels::Precision::F32,
        }
    }
}

/// What generates: a flow map on its grid, or a teacher's ODE solver.
enum Engine<'a> {
    Map {
        map: Box<dyn FlowMap + 'a>,
        grid: TimeGrid,
        sampler: Sampler,
        path: std::sync::Arc<dyn ProbabilityPath>,
    },
    Teacher {
        field: Box<dyn VelocityField + 'a>,
        solver: Solver,
    },
}

/// A model set up to generate ([`Model::generator`]): every setting checked before anything is sampled.
pub struct Generator<'a> {
    model: &'a Model,
    engine: Engine<'a>,
    g: Generation,
    /// Whether a guiding model guides the teacher (autoguidance), for [`Generator::describe`].
    autoguided: bool,
}

impl Model {
    /// This model set up to generate as `g` asks, guided (for a teacher, with a guidance scale) by `guide`.
    pub fn generator<'a>(&'a self, g: &Generation, guide: Option<&'a Teacher>) -> Result<Generator<'a>> {
        if g.nfe == 0 {
            return Err(Error::arg("the NFE budget must be at least 1"));
        }
        if g.guidance.is_some() && guide.is_none() && g.classes == Some(Classes::Null) {
            return Err(Error::arg(
                "guidance needs classes to guide towards; the null class is the unconditional model (guide it by a weaker model)",
            ));
        }
        // A bad class fails here, before anything is generated.
        Classes::cond(g.classes.as_ref(), 0, 1, self.num_classes(), &Device::Cpu)?;
        let engine = match self {
            Model::Map(net, ck) => {
                if guide.is_some() {
                    return Err(Error::arg(
                        "a guiding model guides a teacher; a flow map has its guidance distilled in (distil it with a guiding model)",
                    ));
                }
                let grid = match &g.grid {
                    Some(grid) => grid.clone(),
                    None => TimeGrid::power(g.nfe, g.grid_power)?,
                };
                let sampler = map_sampler(g.sampler, ck.meta.kind, grid.steps() > 1)?;
                Engine::Map {
                    map: map_at(net, g.guidance)?,
                    grid,
                    sampler,
                    path: ck.meta.probability_path()?,
                }
            }
            Model::Teacher(t) => {
                if g.grid.is_some() || g.grid_power != 1.0 {
                    return Err(Error::arg(
                        "a time grid and grid power apply to flow maps; teachers take a solver and an NFE budget",
                    ));
                }
                if g.sampler.is_some() {
                    return Err(Error::arg("a sampler walks a flow map's grid; teachers take a solver"));
                }
                Engine::Teacher {
                    solver: teacher_solver(&g.solver, g.nfe)?,
                    field: guided(t, g.guidance, guide)?,
                }
            }
        };
        Ok(Generator {
            model: self,
            engine,
            g: g.clone(),
            autoguided: guide.is_some(),
        })
    }
}

impl Generator<'_> {
    /// What generates, for reports: `flow map on grid 1,0, Deterministic sampler` or `teacher, euler×8`, and
    /// its guidance ([`guidance_label`]).
    pub fn describe(&self) -> String {
        let mut what = match &self.engine {
            Engine::Map { grid, sampler, .. } => format!("flow map on grid {grid}, {sampler:?} sampler"),
            Engine::Teacher { solver, .. } => format!("teacher, {solver}"),
        };
        if self.g.precision.effective() != crate::kernels::Precision::F32 {
            what += ", bf16 products";
        }
        match guidance_label(self.g.guidance, self.autoguided) {
            Some(g) => format!("{what}, {g}"),
            None => what,
        }
    }

    /// Samples `start..start + z.dim(0)` from the noise `z`, with `seed` for any re-noising, in the
    /// generation's precision.
    fn run(&self, z: &Tensor, seed: u64, start: usize, device: &Device) -> Result<Sampled> {
        crate::kernels::with_precision(self.g.precision, || self.run_in_precision(z, seed, start, device))
    }

    fn run_in_precision(&self, z: &Tensor, seed: u64, start: usize, device: &Device) -> Result<Sampled> {
        let cond = Classes::cond(
            self.g.classes.as_ref(),
            start,
            z.dim(0)?,
            self.model.num_classes(),
            device,
        )?;
        match &self.engine {
            Engine::Map {
                map,
                grid,
                sampler,
                path,
            } => {
                let cx = SampleContext::new(seed).with_path(&**path).with_cond(&cond);
                sample::sample_with(&**map, z, grid, *sampler, &cx)
            }
            Engine::Teacher { field, solver } => sample::sample_ode(&**field, z, *solver, &cond),
        }
    }

    /// `n` samples in chunks of at most `chunk` rows (the noise of the whole run, seeded by the generation's
    /// seed, is the same for any chunking), each passed to `sink` in the model's `[−1, 1]` range. Returns the
    /// NFE per sample.
    pub fn stream(
        &self,
        n: usize,
        chunk: usize,
        device: &Device,
        sink: impl FnMut(&Tensor) -> Result<()>,
    ) -> Result<usize> {
        if n == 0 {
            return Err(Error::arg("the number of samples must be at least 1"));
        }
        let shape = self.model.state_shape();
        sample::stream(
            n,
            &shape,
            self.g.seed,
            chunk,
            device,
            |z, seed, start| self.run(z, seed, start, device),
            sink,
        )
    }

    /// `n` samples, `n ×` the state shape, in the data's own value range, and the NFE per sample.
    pub fn sample(&self, n: usize, device: &Device) -> Result<(Tensor, usize)> {
        let shape = self.model.state_shape();
        let chunk = sample::chunk_rows(&shape).min(65_536);
        let mut parts = Vec::new();
        let nfe = self.stream(n, chunk, device, |x| {
            parts.push(x.clone());
            Ok(())
        })?;
        let x = Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?;
        Ok((to_data_range(&x, self.model.scale())?, nfe))
    }
}
