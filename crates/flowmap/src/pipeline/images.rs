//! Evaluation on images: samples at each NFE scored by FD, precision, recall and class accuracy in a
//! classifier's features ([`crate::image_metrics`]) against the data's held-out images, beside the data's
//! own floor (training images against the same held-out images).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::classifier::Classifier;
use crate::cond::Cond;
use crate::data::{self, DataSource};
use crate::flow_map::FlowMap;
use crate::image_metrics::{ImageMetrics, Reference};
use crate::ode::Solver;
use crate::path::ProbabilityPath;
use crate::sample::{self, SampleContext, Sampler, TimeGrid};
use crate::teacher::VelocityField;
use crate::{Error, Result, Rng};

/// How many samples of each row an evaluation keeps (for its grids); the rest are scored as they are
/// drawn and dropped.
pub const KEPT_SAMPLES: usize = 4096;

/// One row of an image evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRow {
    pub model: String,
    pub sampler: String,
    pub nfe: usize,
    #[serde(flatten)]
    pub metrics: ImageMetrics,
    pub seconds: f64,
}

/// A reference set of held-out images in a classifier's features, and how many samples to compare.
pub struct ImageEval<'a> {
    pub classifier: &'a Classifier,
    reference: Reference,
    /// Generated images per row.
    pub n: usize,
    pub seed: u64,
    /// A flow map's k-step grid is `TimeGrid::power(k, grid_power)`; 1 (the default) is uniform.
    pub grid_power: f64,
}

impl<'a> ImageEval<'a> {
    /// Up to `n` held-out images of `data` as the reference; `n` samples per row.
    pub fn new(classifier: &'a Classifier, data: &DataSource, n: usize, seed: u64, device: &Device) -> Result<Self> {
        let shape = data.state_shape();
        if shape != classifier.meta.config.state_shape {
            return Err(Error::arg(format!(
                "the classifier was trained on images of shape {:?}, the data's are {shape:?}",
                classifier.meta.config.state_shape
            )));
        }
        let m = n.min(data.heldout_len());
        let x = data::to_batch(&data.heldout(m, seed), m, &shape, DType::F32, device)?;
        Ok(ImageEval {
            classifier,
            reference: Reference::new(classifier, &x)?,
            n,
            seed,
            grid_power: 1.0,
        })
    }

    /// The same evaluation with flow maps walked on the grids `TimeGrid::power(k, rho)`.
    pub fn with_grid_power(self, rho: f64) -> Result<Self> {
        TimeGrid::power(1, rho)?;
        Ok(ImageEval {
            grid_power: rho,
            ..self
        })
    }

    /// The data's floor: `n` training images (with their labels) against the held-out reference.
    pub fn floor(&self, data: &DataSource, device: &Device) -> Result<ImageRow> {
        let mut rng = Rng::derive(self.seed, "floor");
        let batch = data.sample_batch(self.n, &mut rng, DType::F32, device)?;
        let labels = batch.cond.class_labels().map(|l| l.to_vec1::<u32>()).transpose()?;
        let metrics = self.reference.compare(self.classifier, &batch.x0, labels.as_deref())?;
        Ok(ImageRow {
            model: "data (training images)".into(),
            sampler: "-".into(),
            nfe: 0,
            metrics,
            seconds: 0.0,
        })
    }

    /// Scores `n` samples drawn chunk by chunk by `run` (which samples the noise it is given under the
    /// context it is given): each chunk is embedded in the classifier's features as it comes, so memory
    /// holds the features and the first [`KEPT_SAMPLES`] samples (for the grids), not every image. Sample `i`
    /// of a class-conditional model has class `i mod C`.
    fn score(
        &self,
        shape: &[usize],
        classes: Option<usize>,
        path: Option<&dyn ProbabilityPath>,
        device: &Device,
        mut run: impl FnMut(&Tensor, &SampleContext<'_>) -> Result<sample::Sampled>,
    ) -> Result<(ImageMetrics, usize, Tensor)> {
        let (mut feats, mut predicted, mut labels, mut kept) = (vec![], vec![], vec![], vec![]);
        let mut kept_rows = 0;
        let chunk = sample::chunk_rows(shape);
        let nfe = sample::stream(
            self.n,
            shape,
            self.seed,
            chunk,
            device,
            |z, seed, start| {
                let len = z.dim(0)?;
                let cond = match classes {
                    Some(c) => {
                        let l: Vec<u32> = (start..start + len).map(|i| (i % c) as u32).collect();
                        let cond = Cond::from_classes(&l, c, device)?;
                        labels.extend(l);
                        cond
                    }
                    None => Cond::none(),
                };
                let mut cx = SampleContext::new(seed).with_cond(&cond);
                if let Some(p) = path {
                    cx = cx.with_path(p);
                }
                run(z, &cx)
            },
            |x| {
                let (f, p) = self.classifier.embed(x)?;
                feats.push(f);
                predicted.extend(p);
                if kept_rows < KEPT_SAMPLES {
                    let take = x.dim(0)?.min(KEPT_SAMPLES - kept_rows);
                    kept.push(x.narrow(0, 0, take)?);
                    kept_rows += take;
                }
                Ok(())
            },
        )?;
        let features = Tensor::cat(&feats, 0)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut metrics = self.reference.compare_features(&features)?;
        metrics.accuracy = classes.map(|_| crate::classifier::accuracy(&predicted, &labels));
        Ok((metrics, nfe, Tensor::cat(&kept, 0)?))
    }

    /// A flow map at each NFE (the grids `TimeGrid::power(k, self.grid_power)`, uniform by default, walked
    /// by `sampler`); the rows and the first [`KEPT_SAMPLES`] samples of each.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &self,
        name: &str,
        map: &dyn FlowMap,
        classes: Option<usize>,
        nfes: &[usize],
        sampler: Sampler,
        path: &dyn ProbabilityPath,
        device: &Device,
    ) -> Result<(Vec<ImageRow>, Vec<Tensor>)> {
        let (mut rows, mut samples) = (vec![], vec![]);
        for &k in nfes {
            let start = Instant::now();
            let grid = TimeGrid::power(k, self.grid_power)?;
            let (metrics, nfe, kept) = self.score(&map.state_shape(), classes, Some(path), device, |z, cx| {
                sample::sample_with(map, z, &grid, sampler, cx)
            })?;
            rows.push(ImageRow {
                model: name.into(),
                sampler: format!("{k}-step{}", super::eval::grid_suffix(k, self.grid_power)),
                nfe,
                metrics,
                seconds: start.elapsed().as_secs_f64(),
            });
            samples.push(kept);
        }
        Ok((rows, samples))
    }

    /// A teacher's ODE sampler for each solver; the rows and the first [`KEPT_SAMPLES`] samples of each.
    pub fn teacher(
        &self,
        name: &str,
        field: &dyn VelocityField,
        classes: Option<usize>,
        solvers: &[Solver],
        device: &Device,
    ) -> Result<(Vec<ImageRow>, Vec<Tensor>)> {
        let (mut rows, mut samples) = (vec![], vec![]);
        for &solver in solvers {
            let start = Instant::now();
            let (metrics, nfe, kept) = self.score(&field.state_shape(), classes, None, device, |z, cx| {
                sample::sample_ode(field, z, solver, cx.cond)
            })?;
            rows.push(ImageRow {
                model: name.into(),
                sampler: solver.to_string(),
                nfe,
                metrics,
                seconds: start.elapsed().as_secs_f64(),
            });
            samples.push(kept);
        }
        Ok((rows, samples))
    }
}
