//! Data sources, named by one spec string; [`specs`] lists every form (toy densities, `gmm:SPEC.json`,
//! `mnist`, `mnist:FILE`, image folders, `FILE.npy`, `FILE.csv`).
//!
//! Points are `x0` in the project's convention: data at `t = 0`. A finite set may carry class labels
//! (MNIST does); batches then carry them as their [`Cond`].

mod csv_file;
mod gmm;
pub mod images;
pub mod mnist;
pub mod npy;
mod toy;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use csv_file::read_csv;
pub use gmm::GaussianMixture;
pub use npy::{read_npy, write_npy_f32, write_npy_f32_shape, Matrix};
pub use toy::Toy;

use crate::cond::Cond;
use crate::{state, Error, Result, Rng};

/// Where training and evaluation points come from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// A 2-D toy distribution, sampled afresh for every batch.
    Toy(Toy),
    /// A Gaussian mixture, sampled afresh for every batch.
    Mixture(GaussianMixture),
    /// A finite set of states (rows of `train` and `heldout`, each of shape `shape`), split once (seeded)
    /// into training and held-out parts, with their class labels when the data has them.
    Points {
        name: String,
        train: Matrix,
        heldout: Matrix,
        shape: Vec<usize>,
        labels: Option<Labels>,
        /// How image values were mapped to `[−1, 1]`; `None` for points, which are used as given.
        scale: Option<Scale>,
    },
}

/// The affine map between a data set's own value range `[lo, hi]` and the model's `[−1, 1]`:
/// `x = 2·(v − lo)/(hi − lo) − 1` (uint8 images: `lo = 0`, `hi = 255`, i.e. `v/127.5 − 1`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
}

impl Scale {
    /// uint8 pixels, `0..=255`.
    pub const U8: Scale = Scale { lo: 0.0, hi: 255.0 };

    /// The range of `values` (an error when they are all equal: nothing to scale).
    pub fn of(values: &[f64], what: &str) -> Result<Self> {
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        if !(hi > lo) {
            return Err(Error::data(format!(
                "{what}: every value is {lo}; there is no range to scale to [-1, 1]"
            )));
        }
        Ok(Scale { lo, hi })
    }

    /// Data values to `[−1, 1]`.
    pub fn to_model(&self, v: f64) -> f64 {
        2.0 * (v - self.lo) / (self.hi - self.lo) - 1.0
    }

    /// Model values back to the data's range.
    pub fn to_data(&self, x: f64) -> f64 {
        self.lo + (x + 1.0) * 0.5 * (self.hi - self.lo)
    }
}

/// The class labels of a finite data set, split like its points.
#[derive(Clone, Debug, PartialEq)]
pub struct Labels {
    pub train: Vec<u32>,
    pub heldout: Vec<u32>,
    /// Labels lie in `0..num_classes`; `num_classes` itself is the null class.
    pub num_classes: usize,
}

/// A training batch: data `x0` (`n × shape…`) and its condition.
pub struct Batch {
    pub x0: Tensor,
    pub cond: Cond,
}

/// Fraction of a finite point set kept out of training for evaluation.
pub const HELDOUT_FRACTION: f64 = 0.1;

/// One form of data spec: its syntax, what it names, and its parser, which returns `None` for a spec
/// that is not of its form. [`DataSource::from_spec`] tries the forms in order; the command line's help
/// and its errors list them; a test checks that the README names each.
pub struct SpecForm {
    pub syntax: String,
    pub summary: &'static str,
    pub parse: fn(&str) -> Option<Result<DataSource>>,
}

/// Every form of data spec, in the order they are tried. Adding a data source is its file and one entry here.
pub fn specs() -> Vec<SpecForm> {
    let form = |syntax: &str, summary, parse| SpecForm {
        syntax: syntax.to_string(),
        summary,
        parse,
    };
    let toys: Vec<&str> = Toy::ALL.iter().map(|t| t.name()).collect();
    vec![
        form(
            &toys.join(", "),
            "2-D toy densities, sampled afresh for every batch",
            |s| s.parse::<Toy>().ok().map(|t| Ok(DataSource::Toy(t))),
        ),
        form(
            "gmm:SPEC.json",
            "a Gaussian mixture in any dimension, its exact velocity and flow map known",
            |s| {
                let path = s.strip_prefix("gmm:")?;
                Some(GaussianMixture::from_file(Path::new(path)).map(DataSource::Mixture))
            },
        ),
        form("mnist", "the 10,000 embedded MNIST digits with their labels", |s| {
            (s == "mnist").then(|| DataSource::images("mnist", mnist::Mnist::embedded()?))
        }),
        form(
            "mnist:FILE",
            "an IDX image file, with the labels file beside it when there is one",
            |s| {
                let path = s.strip_prefix("mnist:")?;
                Some(mnist::Mnist::from_file(Path::new(path)).and_then(|m| DataSource::images(s, m)))
            },
        ),
        form(
            "DIR",
            "an image folder DIR/CLASS/*.png|jpg, classes in name order",
            |s| {
                let (file, labels) = split_labels(s);
                if !Path::new(file).is_dir() {
                    return None;
                }
                if labels.is_some() {
                    return Some(Err(Error::data(format!(
                        "{s}: an image folder's labels are its class folders"
                    ))));
                }
                Some(images::read_folder(Path::new(file)).and_then(|(set, _)| DataSource::image_set(s, set)))
            },
        ),
        form(
            "FILE.npy",
            "points N × D, or images N × H × W or N × C × H × W (labels: FILE.npy#labels=LABELS.npy)",
            |s| {
                let (path, labels) = file_with_extension(s, "npy")?;
                let load = || {
                    if npy::read_npy_nd(path)?.shape.len() >= 3 {
                        return DataSource::image_set(s, images::read_npy_images(path, labels)?);
                    }
                    flat_points(s, labels, || read_npy(path))
                };
                Some(load())
            },
        ),
        form("FILE.csv", "points, one a row (an optional header)", |s| {
            let (path, labels) = file_with_extension(s, "csv")?;
            Some(flat_points(s, labels, || read_csv(path)))
        }),
    ]
}

/// `syntax — summary` lines of every data spec, for help texts.
pub fn describe_specs() -> String {
    specs()
        .iter()
        .map(|f| format!("  {} — {}", f.syntax, f.summary))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A file spec and its `#labels=LABELS.npy` suffix.
fn split_labels(spec: &str) -> (&str, Option<&Path>) {
    match spec.split_once("#labels=") {
        Some((f, l)) => (f, Some(Path::new(l))),
        None => (spec, None),
    }
}

/// The file of a spec whose name ends in `.{ext}`, with its labels' path; `None` for any other spec.
fn file_with_extension<'a>(spec: &'a str, ext: &str) -> Option<(&'a Path, Option<&'a Path>)> {
    let (file, labels) = split_labels(spec);
    let path = Path::new(file);
    (path.extension().and_then(|e| e.to_str()) == Some(ext)).then_some((path, labels))
}

/// A set of `D`-vectors that `read` loads, once it is clear that no labels were given (labels go with
/// images).
fn flat_points(spec: &str, labels: Option<&Path>, read: impl FnOnce() -> Result<Matrix>) -> Result<DataSource> {
    if labels.is_some() {
        return Err(Error::data(format!(
            "{spec}: labels go with images (an N × H × W or N × C × H × W .npy)"
        )));
    }
    let matrix = read()?;
    let shape = vec![matrix.cols];
    DataSource::points(spec, matrix, shape, None, None)
}

impl DataSource {
    /// Parses a data spec and loads what it names: the first form of [`specs`] that recognises it.
    pub fn from_spec(spec: &str) -> Result<Self> {
        for form in specs() {
            if let Some(data) = (form.parse)(spec) {
                return data;
            }
        }
        let names: Vec<String> = specs().iter().map(|f| f.syntax.clone()).collect();
        Err(Error::data(format!(
            "unknown data spec '{spec}' (expected one of {})",
            names.join(", ")
        )))
    }

    /// Data held in memory (a NumPy array, say), recorded in checkpoints as `name`: points of array shape
    /// `N × D`, used as given, or images `N × H × W` / `N × C × H × W` (uint8 pixels, or floats in their own
    /// range) mapped to `[−1, 1]`, with `N` class labels when given (images only). It is split into
    /// training and held-out rows as a file of the same values would be.
    pub fn from_array(
        name: &str,
        shape: &[usize],
        data: Vec<f64>,
        uint8: bool,
        labels: Option<Vec<u32>>,
    ) -> Result<Self> {
        if crate::state::numel(shape) != data.len() {
            return Err(Error::data(format!(
                "{name}: an array of shape {shape:?} holds {} values, not {}",
                crate::state::numel(shape),
                data.len()
            )));
        }
        match shape {
            [n, d] => flat_points(name, labels.is_some().then_some(Path::new("labels")), || {
                Ok(Matrix::new(*n, *d, data))
            }),
            _ => Self::image_set(name, images::image_set(name, shape, &data, uint8, labels)?),
        }
    }

    /// The spec of an `.npy` image array with its labels (`IMAGES.npy#labels=LABELS.npy`).
    pub fn npy_with_labels(images: &Path, labels: &Path) -> String {
        format!("{}#labels={}", images.display(), labels.display())
    }

    fn image_set(name: &str, set: images::ImageSet) -> Result<Self> {
        let [c, h, w] = set.shape;
        Self::points(
            name,
            Matrix::new(set.count, c * h * w, set.values),
            set.shape.to_vec(),
            set.labels,
            Some(set.scale),
        )
    }

    /// Grey-scale images `1 × H × W` scaled to [−1, 1], with their labels when known (classes `0..=max`).
    fn images(name: &str, m: mnist::Mnist) -> Result<Self> {
        let shape = vec![1, m.rows, m.cols];
        let labels = m
            .labels
            .as_ref()
            .map(|l| l.iter().map(|&v| v as u32).collect::<Vec<_>>());
        if let Some(l) = &labels {
            if l.len() != m.count {
                return Err(Error::data(format!(
                    "{name}: {} labels for {} images",
                    l.len(),
                    m.count
                )));
            }
        }
        Self::points(
            name,
            Matrix::new(m.count, m.dim(), m.to_signed_unit()),
            shape,
            labels,
            Some(Scale::U8),
        )
    }

    fn points(
        name: &str,
        m: Matrix,
        shape: Vec<usize>,
        labels: Option<Vec<u32>>,
        scale: Option<Scale>,
    ) -> Result<Self> {
        check_finite(&m.data, name)?;
        if m.rows < 10 {
            return Err(Error::data(format!(
                "{name}: {} points is too few (need at least 10)",
                m.rows
            )));
        }
        // A seeded shuffle, then the last 10% held out.
        let mut order: Vec<usize> = (0..m.rows).collect();
        let mut rng = Rng::derive(0, name);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let n_held = ((m.rows as f64) * HELDOUT_FRACTION).ceil() as usize;
        let take = |idx: &[usize]| {
            let mut d = Vec::with_capacity(idx.len() * m.cols);
            for &i in idx {
                d.extend_from_slice(&m.data[i * m.cols..(i + 1) * m.cols]);
            }
            Matrix::new(idx.len(), m.cols, d)
        };
        let (tr, he) = order.split_at(m.rows - n_held);
        let labels = labels.map(|l| Labels {
            train: tr.iter().map(|&i| l[i]).collect(),
            heldout: he.iter().map(|&i| l[i]).collect(),
            num_classes: l.iter().max().map_or(0, |&c| c as usize + 1),
        });
        Ok(DataSource::Points {
            name: name.to_string(),
            train: take(tr),
            heldout: take(he),
            shape,
            labels,
            scale,
        })
    }

    /// How image values were mapped to `[−1, 1]` (`None` for points).
    pub fn scale(&self) -> Option<Scale> {
        match self {
            DataSource::Points { scale, .. } => *scale,
            _ => None,
        }
    }

    /// The spec string this source was made from (the name recorded in checkpoints and reports).
    pub fn name(&self) -> String {
        match self {
            DataSource::Toy(t) => t.name().to_string(),
            DataSource::Mixture(_) => "gmm".to_string(),
            DataSource::Points { name, .. } => name.clone(),
        }
    }

    /// The number of values in one state.
    pub fn dim(&self) -> usize {
        match self {
            DataSource::Toy(_) => 2,
            DataSource::Mixture(g) => g.dim(),
            DataSource::Points { train, .. } => train.cols,
        }
    }

    /// The shape of one state: `[D]` for points, `[C, H, W]` for images.
    pub fn state_shape(&self) -> Vec<usize> {
        match self {
            DataSource::Points { shape, .. } => shape.clone(),
            _ => vec![self.dim()],
        }
    }

    /// The number of classes of labelled data.
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            DataSource::Points { labels: Some(l), .. } => Some(l.num_classes),
            _ => None,
        }
    }

    /// The size of the held-out split of a finite set (`usize::MAX` for generators, which have no end).
    pub fn heldout_len(&self) -> usize {
        match self {
            DataSource::Points { heldout, .. } => heldout.rows,
            _ => usize::MAX,
        }
    }

    /// The labels of [`DataSource::heldout`]`(n, _)`, when the data has labels.
    pub fn heldout_labels(&self, n: usize) -> Option<Vec<u32>> {
        match self {
            DataSource::Points { labels: Some(l), .. } => Some(l.heldout[..n.min(l.heldout.len())].to_vec()),
            _ => None,
        }
    }

    /// `n` training points (with replacement for finite sets), row-major `n × dim`.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f64> {
        match self {
            DataSource::Toy(t) => t.sample(n, rng),
            DataSource::Mixture(g) => g.sample(n, rng),
            DataSource::Points { train, .. } => gather_rows(train, n, rng),
        }
    }

    /// `n` held-out points for evaluation: fresh samples under a separate seed stream for generators,
    /// the held-out split (all of it when `n` exceeds it) for finite sets.
    pub fn heldout(&self, n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::derive(seed, "heldout");
        match self {
            DataSource::Points { heldout, .. } => {
                let n = n.min(heldout.rows);
                heldout.data[..n * heldout.cols].to_vec()
            }
            _ => self.sample(n, &mut rng),
        }
    }

    /// `n` training states as an `n × shape…` tensor.
    pub fn sample_tensor(&self, n: usize, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.sample_batch(n, rng, dtype, device)?.x0)
    }

    /// A training batch of `n` states with their labels, if any (the same random draws as [`Self::sample`]).
    pub fn sample_batch(&self, n: usize, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Batch> {
        let (data, cond) = match self {
            DataSource::Points { train, labels, .. } => {
                let idx = draw_rows(train.rows, n, rng);
                let cond = match labels {
                    Some(l) => Cond::from_classes(&pick(&l.train, &idx), l.num_classes, device)?,
                    None => Cond::none(),
                };
                (gather(train, &idx), cond)
            }
            _ => (self.sample(n, rng), Cond::none()),
        };
        let x0 = to_batch(&data, n, &self.state_shape(), dtype, device)?;
        Ok(Batch { x0, cond })
    }
}

fn draw_rows(rows: usize, n: usize, rng: &mut Rng) -> Vec<usize> {
    (0..n).map(|_| rng.below(rows)).collect()
}

fn pick(v: &[u32], idx: &[usize]) -> Vec<u32> {
    idx.iter().map(|&i| v[i]).collect()
}

fn gather_rows(m: &Matrix, n: usize, rng: &mut Rng) -> Vec<f64> {
    gather(m, &draw_rows(m.rows, n, rng))
}

fn gather(m: &Matrix, idx: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(idx.len() * m.cols);
    for &i in idx {
        out.extend_from_slice(&m.data[i * m.cols..(i + 1) * m.cols]);
    }
    out
}

/// Errors when `data` holds NaN or ±Inf, naming the first offending entry.
pub fn check_finite(data: &[f64], what: &str) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "{what}: value {} at flat index {i} is not finite",
            data[i]
        )));
    }
    Ok(())
}

/// A row-major buffer as an `rows × cols` tensor.
pub fn to_tensor(data: &[f64], rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(data, (rows, cols), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// A row-major buffer of `n` states of shape `shape` as an `n × shape…` tensor.
pub fn to_batch(data: &[f64], n: usize, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(data, state::batch_shape(n, shape), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Reads `N × D` points from a `.npy` or `.csv` file and checks that they are finite.
pub fn read_points(path: &Path) -> Result<Matrix> {
    let m = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => read_csv(path)?,
        _ => read_npy(path)?,
    };
    check_finite(&m.data, &path.display().to_string())?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toys_are_seeded_and_checkerboard_is_on_its_squares() {
        for toy in Toy::ALL {
            let a = toy.sample(100, &mut Rng::new(3));
            let b = toy.sample(100, &mut Rng::new(3));
            assert_eq!(a, b, "{toy} is not reproducible");
            assert!(a.iter().all(|v| v.is_finite() && v.abs() < 5.0), "{toy} out of range");
        }
        let pts = Toy::Checkerboard.sample(5000, &mut Rng::new(1));
        for p in pts.chunks(2) {
            assert_eq!(Toy::checkerboard_density(p[0], p[1]), 0.125, "{p:?} is off the board");
        }
    }

    #[test]
    fn spec_errors_name_the_problem() {
        let e = DataSource::from_spec("checkers").unwrap_err().to_string();
        assert!(e.contains("unknown data spec 'checkers'"), "{e}");
        let e = DataSource::from_spec("/nonexistent/x.npy").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.npy"), "{e}");
    }

    #[test]
    fn mixture_moments() {
        let g = GaussianMixture::new(vec![vec![2.0, 0.0], vec![-2.0, 0.0]], vec![0.5, 1.0], vec![1.0, 3.0]).unwrap();
        let n = 200_000;
        let x = g.sample(n, &mut Rng::new(5));
        let mean0 = x.chunks(2).map(|p| p[0]).sum::<f64>() / n as f64;
        // E[x] = 0.25·2 + 0.75·(−2) = −1
        assert!((mean0 + 1.0).abs() < 0.02, "mean {mean0}");
        let var1 = x.chunks(2).map(|p| p[1] * p[1]).sum::<f64>() / n as f64;
        // Var of the second coordinate: 0.25·0.25 + 0.75·1 = 0.8125
        assert!((var1 - 0.8125).abs() < 0.01, "var {var1}");
        assert!(GaussianMixture::from_json(r#"{"means": [[0,0]], "stds": [-1], "weights": [1]}"#).is_err());
    }
}
