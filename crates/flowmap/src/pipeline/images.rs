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

    /// The condition of a row's samples: class `i mod C` for sample `i` of a class-conditional model.
    fn cond(&self, classes: Option<usize>, device: &Device) -> Result<(Cond, Option<Vec<u32>>)> {
        match classes {
            Some(c) => {
                let labels: Vec<u32> = (0..self.n).map(|i| (i % c) as u32).collect();
                Ok((Cond::from_classes(&labels, c, device)?, Some(labels)))
            }
            None => Ok((Cond::none(), None)),
        }
    }

    /// A flow map at each NFE (uniform grids walked by `sampler`); the rows and the samples.
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
        let shape = map.state_shape();
        let z = sample::noise(self.n, &shape, self.seed, device)?;
        let (cond, labels) = self.cond(classes, device)?;
        let cx = SampleContext::new(self.seed).with_path(path).with_cond(&cond);
        let (mut rows, mut samples) = (vec![], vec![]);
        for &k in nfes {
            let start = Instant::now();
            let grid = TimeGrid::uniform(k)?;
            let out = sample::in_chunks(&z, &cx, sample::chunk_rows(&shape), |z, cx| {
                sample::sample_with(map, z, &grid, sampler, cx)
            })?;
            let seconds = start.elapsed().as_secs_f64();
            rows.push(ImageRow {
                model: name.into(),
                sampler: format!("{k}-step"),
                nfe: out.nfe,
                metrics: self.reference.compare(self.classifier, &out.x, labels.as_deref())?,
                seconds,
            });
            samples.push(out.x);
        }
        Ok((rows, samples))
    }

    /// A teacher's ODE sampler for each solver; the rows and the samples.
    pub fn teacher(
        &self,
        name: &str,
        field: &dyn VelocityField,
        classes: Option<usize>,
        solvers: &[Solver],
        device: &Device,
    ) -> Result<(Vec<ImageRow>, Vec<Tensor>)> {
        let shape = field.state_shape();
        let z = sample::noise(self.n, &shape, self.seed, device)?;
        let (cond, labels) = self.cond(classes, device)?;
        let cx = SampleContext::new(self.seed).with_cond(&cond);
        let (mut rows, mut samples) = (vec![], vec![]);
        for &solver in solvers {
            let start = Instant::now();
            let out = sample::in_chunks(&z, &cx, sample::chunk_rows(&shape), |z, cx| {
                sample::sample_ode(field, z, solver, cx.cond)
            })?;
            let seconds = start.elapsed().as_secs_f64();
            rows.push(ImageRow {
                model: name.into(),
                sampler: solver.to_string(),
                nfe: out.nfe,
                metrics: self.reference.compare(self.classifier, &out.x, labels.as_deref())?,
                seconds,
            });
            samples.push(out.x);
        }
        Ok((rows, samples))
    }
}
