//! One evaluation of any model on held-out data: what `flowmap eval` reports and what the Python package's
//! `evaluate` returns. Points are scored by distances to held-out points (and, on a Gaussian mixture, a
//! flow map against the exact Φ); images in a classifier's features.

use candle_core::{Device, Tensor};

use super::eval::{euler_and_dopri5, eval_map, eval_teacher, exact_map_report, EvalRow, EvalSettings, ExactMapReport};
use super::generate::{guidance_label, guided, map_at, map_sampler};
use super::images::{ImageEval, ImageRow};
use super::{Model, Teacher};
use crate::classifier::Classifier;
use crate::cond::Cond;
use crate::data::{DataSource, Toy};
use crate::sample::{SampleContext, Sampler, TimeGrid};
use crate::{Error, Result};

/// What to evaluate at: the NFE values, samples per row, seed, a flow map's sampler and grid power,
/// guidance (with a guiding model for autoguidance of a teacher), and for images the classifier.
pub struct Evaluate<'a> {
    pub nfes: Vec<usize>,
    pub n: usize,
    pub seed: u64,
    pub sampler: Option<Sampler>,
    pub grid_power: f64,
    pub guidance: Option<f64>,
    pub guide: Option<&'a Teacher>,
    /// The classifier whose features images are compared in (default: the embedded MNIST classifier).
    pub classifier: Option<&'a Classifier>,
}

impl Default for Evaluate<'_> {
    fn default() -> Self {
        Evaluate {
            nfes: vec![1, 2, 4, 8],
            n: 10_000,
            seed: 0,
            sampler: None,
            grid_power: 1.0,
            guidance: None,
            guide: None,
            classifier: None,
        }
    }
}

/// The result of [`evaluate`].
pub enum Evaluation {
    /// Rows per NFE (a teacher: Euler at each NFE, then dopri5), the samples of each row, the held-out
    /// reference, and on a Gaussian mixture the flow map's error against the exact Φ.
    Points {
        rows: Vec<EvalRow>,
        samples: Vec<Vec<f64>>,
        reference: Vec<f64>,
        exact: Option<ExactMapReport>,
    },
    /// The data's own floor, then a row per NFE; the kept samples of each NFE row (in `[−1, 1]`).
    Images { rows: Vec<ImageRow>, samples: Vec<Tensor> },
}

/// Checks every setting of `e` for `model` on `data`, before anything is computed; returns the flow map's
/// sampler (none for a teacher).
pub fn check_evaluate(model: &Model, data: &DataSource, e: &Evaluate<'_>) -> Result<Option<Sampler>> {
    if e.n < 2 {
        return Err(Error::arg("an evaluation needs at least 2 samples per row"));
    }
    if e.nfes.is_empty() || e.nfes.contains(&0) {
        return Err(Error::arg("NFE values must be at least 1 (and at least one given)"));
    }
    match model {
        Model::Map(net, _) => {
            if e.guide.is_some() {
                return Err(Error::arg(
                    "a guiding model guides a teacher; a flow map has its guidance distilled in",
                ));
            }
            drop(map_at(net, e.guidance)?)
        }
        Model::Teacher(t) => drop(guided(t, e.guidance, e.guide)?),
    }
    let dim = crate::state::numel(&model.state_shape());
    if data.dim() != dim {
        return Err(Error::arg(format!(
            "data '{}' has dimension {}, but the model expects {dim}",
            data.name(),
            data.dim()
        )));
    }
    TimeGrid::power(1, e.grid_power)?;
    match model {
        Model::Map(_, ck) => Ok(Some(map_sampler(
            e.sampler,
            ck.meta.kind,
            e.nfes.iter().any(|&k| k > 1),
        )?)),
        Model::Teacher(_) if e.sampler.is_some() => Err(Error::arg(
            "a sampler applies to flow maps; a teacher is scored with Euler and dopri5",
        )),
        Model::Teacher(_) if e.grid_power != 1.0 => Err(Error::arg(
            "a grid power applies to flow maps; a teacher is scored with Euler and dopri5",
        )),
        Model::Teacher(_) => Ok(None),
    }
}

/// Scores `model` on held-out `data` at each NFE of `e`.
pub fn evaluate(model: &Model, data: &DataSource, e: &Evaluate<'_>, device: &Device) -> Result<Evaluation> {
    let sampler = check_evaluate(model, data, e)?;
    let named = |what: &str| match guidance_label(e.guidance, e.guide.is_some()) {
        Some(g) => format!("{what} ({g})"),
        None => what.to_string(),
    };
    let solvers = euler_and_dopri5(&e.nfes, 1e-5);
    if model.state_shape().len() == 3 {
        let embedded;
        let clf = match e.classifier {
            Some(c) => c,
            None => {
                embedded = Classifier::embedded_mnist(device)?;
                &embedded
            }
        };
        let ev = ImageEval::new(clf, data, e.n, e.seed, device)?.with_grid_power(e.grid_power)?;
        let classes = model.num_classes();
        let mut rows = vec![ev.floor(data, device)?];
        let (r, samples) = match (model, sampler) {
            (Model::Map(net, ck), Some(sampler)) => {
                let path = ck.meta.probability_path()?;
                let map = map_at(net, e.guidance)?;
                ev.map(&named("flow map"), &*map, classes, &e.nfes, sampler, &*path, device)?
            }
            (Model::Teacher(t), _) => {
                let field = guided(t, e.guidance, e.guide)?;
                ev.teacher(&named("teacher"), &*field, classes, &solvers, device)?
            }
            (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved by check_evaluate"),
        };
        rows.extend(r);
        return Ok(Evaluation::Images { rows, samples });
    }
    if e.classifier.is_some() {
        return Err(Error::arg("a classifier applies to image models"));
    }
    let dim = data.dim();
    let reference = data.heldout(e.n, e.seed);
    let settings = EvalSettings {
        n: e.n,
        seed: e.seed,
        max_points: if dim <= 16 { 10_000 } else { 2000 },
        grid_power: e.grid_power,
    };
    let checker = matches!(data, DataSource::Toy(Toy::Checkerboard));
    let (rows, samples) = match (model, sampler) {
        (Model::Map(net, ck), Some(sampler)) => {
            let path = ck.meta.probability_path()?;
            let cx = SampleContext::new(e.seed).with_path(&*path);
            eval_map(
                "flow map", net, &e.nfes, sampler, &cx, &reference, checker, &settings, device,
            )?
        }
        (Model::Teacher(t), _) => eval_teacher(
            "teacher",
            t,
            &solvers,
            &Cond::none(),
            &reference,
            checker,
            &settings,
            device,
        )?,
        (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved by check_evaluate"),
    };
    // Where the data is a Gaussian mixture its exact flow map is known: measure the map against it.
    let exact = match (model, data) {
        (Model::Map(net, ck), DataSource::Mixture(mix)) if !ck.meta.kind.boundary_only() => {
            Some(exact_map_report(net, mix, 2000, e.seed, device)?)
        }
        _ => None,
    };
    Ok(Evaluation::Points {
        rows,
        samples,
        reference,
        exact,
    })
}
